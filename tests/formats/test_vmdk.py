"""vmdk driver: exports equal qemu-img convert -O raw; writes pass qemu-img check and compare."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.block.extent import Allocation
from imgfs.errors import CorruptImage, ReadOnly, Unsupported
from imgfs.formats.vmdk.driver import VmdkDriver
from tests.conftest import SHARED
from tests.oracle import (
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    pattern_image,
    qemu_img,
    qemu_info,
    qemu_raw,
    sha256_file,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
CORPUS = SHARED / "corpus"
SUBFORMATS = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
]


def qemu_io(image: Path, *commands: str, fmt: str = "vmdk") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    result = subprocess.run(
        [*args, str(image)], capture_output=True, text=True, timeout=120, check=True
    )
    assert "error" not in result.stdout.lower() and "fail" not in result.stdout.lower(), (
        result.stdout
    )


def has_data(path: Path, offset: int, length: int) -> bool:
    """Whether a sparse file has any data (not a hole) in a range."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            return False
        return data < offset + length
    finally:
        os.close(fd)


def export_matches(image: Path, reference: Path) -> None:
    """Every byte imgfs exports equals the reference raw file. Data extents are compared
    byte for byte; zero and unallocated runs must be holes or zeros in the reference (and
    reads of them are checked at their edges), so sparse multi-GiB disks stay fast."""
    disk = open_disk(str(image), read_only=True)
    try:
        size = disk.size
        assert size == reference.stat().st_size, (size, reference.stat().st_size)
        with open(reference, "rb") as ref:
            offset = 0
            while offset < size:
                ext = disk.block_status(offset, min(size - offset, 256 * MiB))
                assert ext.offset == offset and ext.length > 0
                if ext.allocation is Allocation.DATA:
                    pos = offset
                    while pos < offset + ext.length:
                        n = min(8 * MiB, offset + ext.length - pos)
                        got = bytes(disk.read(pos, n))
                        ref.seek(pos)
                        assert got == ref.read(n), f"{image}: differs in [{pos}, {pos + n})"
                        pos += n
                else:
                    if has_data(reference, offset, ext.length):
                        pos = offset
                        while pos < offset + ext.length:
                            n = min(8 * MiB, offset + ext.length - pos)
                            ref.seek(pos)
                            assert bytes(disk.read(pos, n)) == ref.read(n), f"{image} @{pos}"
                            pos += n
                    else:
                        for pos in {offset, max(offset, offset + ext.length - 4096)}:
                            n = min(4096, offset + ext.length - pos)
                            assert bytes(disk.read(pos, n)) == bytes(n)
                offset += ext.length
    finally:
        disk.close()


def assert_matches_qemu(image: Path, scratch: Path) -> None:
    reference = qemu_raw(image, scratch / (image.name + ".qemu.raw"), "vmdk")
    export_matches(image, reference)
    reference.unlink()


def random_qemu_writes(image: Path, size: int, seed: int, count: int = 12) -> None:
    rng = random.Random(seed)
    commands = []
    for _ in range(count):
        length = rng.choice([512, 4096, 65536, 100 * 512, 300 * 1024])
        offset = rng.randrange(0, (size - length) // 512) * 512
        commands.append(f"write -P {rng.randrange(1, 255)} {offset} {length}")
    commands.append(f"write -P 0x5a {size - 512} 512")
    qemu_io(image, *commands)


# -- reading what qemu-img writes ---------------------------------------------------------------


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_reads_qemu_images_of_every_subformat(tmp_path: Path, subformat: str) -> None:
    size = 5 * GiB if subformat.startswith("twoGb") else 64 * MiB
    image = tmp_path / "d.vmdk"
    if subformat == "streamOptimized":
        src = tmp_path / "src.raw"
        pattern_image(src, 8 * MiB + 4096, seed=3)
        qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(src), str(image))
    else:
        qemu_img(
            "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(image), str(size)
        )
        random_qemu_writes(image, size, seed=len(subformat))
        if subformat.startswith("twoGb"):  # a write straddling the 2 GiB extent boundary
            qemu_io(image, f"write -P 0x77 {2 * GiB - 3 * 512} {7 * 512}")
    assert_matches_qemu(image, tmp_path)


@pytest.mark.parametrize(
    "options",
    [
        "adapter_type=lsilogic,hwversion=7",
        "adapter_type=buslogic,toolsversion=10240",
        "adapter_type=legacyESX",
        "compat6=on",
        "zeroed_grain=on",
    ],
)
def test_reads_qemu_images_with_options(tmp_path: Path, options: str) -> None:
    image = tmp_path / "o.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", options, str(image), str(48 * MiB))
    random_qemu_writes(image, 48 * MiB, seed=7)
    if "zeroed_grain" in options:
        qemu_io(image, "write -P 0x33 0 1M", "write -z 128k 256k")
        disk = open_disk(str(image), read_only=True)
        try:
            assert disk.block_status(128 * 1024, 256 * 1024).allocation is Allocation.ZERO
        finally:
            disk.close()
    assert_matches_qemu(image, tmp_path)


def test_convert_of_pattern_image(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = pattern_image(src, 9 * MiB + 512, seed=11)
    image = tmp_path / "c.vmdk"
    qemu_img("convert", "-O", "vmdk", str(src), str(image))
    disk = open_disk(str(image))
    try:
        assert disk.size == len(data)
        assert bytes(disk.read(0, len(data))) == data
        assert bytes(disk.read(12345, 99999)) == data[12345 : 12345 + 99999]
    finally:
        disk.close()


def test_info_matches_qemu(tmp_path: Path) -> None:
    for subformat in ("twoGbMaxExtentSparse", "streamOptimized", "monolithicFlat"):
        image = tmp_path / f"{subformat}.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(image), "3G")
        theirs = qemu_info(image)
        disk = open_disk(str(image), read_only=True)
        try:
            ours = disk.info()[0].to_qemu_json()
        finally:
            disk.close()
        for key in ("virtual-size", "format"):
            assert ours[key] == theirs[key]
        assert ours.get("cluster-size") == theirs.get("cluster-size")
        data, their_data = ours["format-specific"]["data"], theirs["format-specific"]["data"]
        for key in ("cid", "parent-cid", "create-type"):
            assert data[key] == their_data[key]
        assert [{k: e[k] for k in ("virtual-size", "format")} for e in data["extents"]] == [
            {k: e[k] for k in ("virtual-size", "format")} for e in their_data["extents"]
        ]


def test_probe_and_companions_hide_extent_files(tmp_path: Path) -> None:
    image = tmp_path / "two.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(image), "5G")
    assert sorted(VmdkDriver.companion_files(str(image))) == [
        "two-s001.vmdk",
        "two-s002.vmdk",
        "two-s003.vmdk",
    ]
    mono = tmp_path / "mono.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(mono), "1M")
    assert VmdkDriver.companion_files(str(mono)) == []
    junk = tmp_path / "junk.vmdk"
    junk.write_bytes(b"KDMV" + os.urandom(2000))
    assert VmdkDriver.companion_files(str(junk)) == []
    assert VmdkDriver.companion_files(str(tmp_path / "missing.vmdk")) == []


# -- the corpus ---------------------------------------------------------------------------------


def unpack(src: Path, dest_dir: Path) -> Path:
    """Copy (decompressing) a corpus file into dest_dir, returning the copy."""
    openers = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
    opener = openers.get(src.suffix)
    dest = dest_dir / (src.stem if opener else src.name)
    with (opener or open)(src, "rb") as fin, open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout, 4 * MiB)
    return dest


def corpus_image(tmp_path: Path, rel: str) -> Path:
    """A corpus image (and every file beside it) unpacked into tmp_path."""
    src = CORPUS / rel
    image = None
    for f in sorted(src.parent.iterdir()):
        if f.name == src.name or (src.parent.name not in ("vmdk-rs", "cot", "qemu-iotests")):
            copy = unpack(f, tmp_path)
            if f.name == src.name:
                image = copy
    assert image is not None
    return image


SMALL_CORPUS = [
    "vmdk/dfvfs/ext2.vmdk",
    "vmdk/vmdk-rs/monolithicSparse.vmdk.xz",
    "vmdk/vmdk-rs/streamOptimized.vmdk",
    "vmdk/vmdk-rs/streamOptimizedWithMarkers.vmdk",
    "vmdk/vmdk-rs/twoGbMaxExtentSparse/twoGbMaxExtentSparse.vmdk",
    "vmdk/vmdk-rs/monolithicFlat/monolithicFlat.vmdk",
    "vmdk/vmdk-rs/twoGbMaxExtentFlat/twoGbMaxExtentFlat.vmdk",
    "vmdk/vmdk-rs/vmfs/vmfs_thick.vmdk",
    "vmdk/dissect-hypervisor/sesparse/sesparse-descriptor.vmdk",
    "vmdk/qemu-iotests/iotest-version3-2013.vmdk",
    "vmdk/cot/input.vmdk",
]
BIG_CORPUS = [
    "vmdk/qemu-iotests/iotest-version3.vmdk",
    "vmdk/cot/input-2014.vmdk",
    "vmdk/cot/ubuntu.2.0-disk1.vmdk",
]


@pytest.mark.parametrize("rel", SMALL_CORPUS)
def test_corpus_matches_qemu(tmp_path: Path, rel: str) -> None:
    image = corpus_image(tmp_path, rel)
    assert_matches_qemu(image, tmp_path)


@pytest.mark.parametrize("rel", BIG_CORPUS)
def test_big_corpus_matches_qemu(tmp_path: Path, rel: str) -> None:
    image = corpus_image(tmp_path, rel)
    assert_matches_qemu(image, tmp_path)


def test_corpus_sha256_of_monolithic_sparse(tmp_path: Path) -> None:
    image = corpus_image(tmp_path, "vmdk/vmdk-rs/monolithicSparse.vmdk.xz")
    out = tmp_path / "out.raw"
    disk = open_disk(str(image), read_only=True)
    try:
        out.write_bytes(bytes(disk.read(0, disk.size)))
    finally:
        disk.close()
    assert sha256_file(out) == "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"


@pytest.mark.parametrize("name", ["afl9.vmdk", "afl9-2015.vmdk"])
def test_fuzzed_images_fail_cleanly(tmp_path: Path, name: str) -> None:
    image = unpack(CORPUS / "malformed/qemu-iotests" / name, tmp_path)
    start = time.monotonic()
    with pytest.raises((CorruptImage, Unsupported)):
        open_disk(str(image), read_only=True)
    assert time.monotonic() - start < 2
    assert VmdkDriver.companion_files(str(image)) == []


def header_fields(image: Path) -> list:
    from imgfs.formats.vmdk.extents import KDMV_HEADER

    return list(KDMV_HEADER.unpack(image.read_bytes()[:512]))


def patch_header(image: Path, index: int, value: object) -> None:
    from imgfs.formats.vmdk.extents import KDMV_HEADER

    fields = header_fields(image)
    fields[index] = value
    with open(image, "r+b") as f:
        f.write(KDMV_HEADER.pack(*fields))


@pytest.mark.parametrize(
    "index,value,message",
    [
        (1, 9, "version 9"),
        (4, 3, "grain size 3"),
        (4, 1 << 30, "grain size"),
        (7, 0, "numGTEsPerGT 0"),
        (9, 1 << 40, "past the end"),
        (6, 1 << 30, "descriptor size"),
        (3, 1 << 62, "capacity"),
    ],
)
def test_hostile_headers(tmp_path: Path, index: int, value: object, message: str) -> None:
    image = tmp_path / "h.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(image), "64M")
    patch_header(image, index, value)
    with pytest.raises((CorruptImage, Unsupported), match=message):
        open_disk(str(image), "vmdk", read_only=True)


def test_hostile_grain_table_entries(tmp_path: Path) -> None:
    image = tmp_path / "g.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(image), "64M")
    qemu_io(image, "write -P 1 0 64k")
    gd = header_fields(image)[9]
    with open(image, "r+b") as f:
        f.seek(gd * 512)
        f.write((1 << 31).to_bytes(4, "little"))  # GT past EOF
    with pytest.raises(CorruptImage, match="past the end"):
        open_disk(str(image), "vmdk", read_only=True)


def test_hostile_descriptors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.vmdk"
    bad.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n')
    with pytest.raises(CorruptImage, match="no extents"):
        open_disk(str(bad), "vmdk", read_only=True)
    bad.write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 100 WEIRD "x"\n'
    )
    with pytest.raises(Unsupported, match="WEIRD"):
        open_disk(str(bad), "vmdk", read_only=True)
    bad.write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 100 FLAT "gone"\n'
    )
    with pytest.raises(CorruptImage, match="not found"):
        open_disk(str(bad), "vmdk", read_only=True)
    assert VmdkDriver.companion_files(str(bad)) == ["gone"]
    (tmp_path / "data.bin").write_bytes(b"\x42" * 4096)
    bad.write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
        'RW 0 FLAT "data.bin" 0\nRW 4 FLAT "data.bin" 2\nRW 0 ZERO\nRW 4 ZERO\n'
    )
    disk = open_disk(str(bad), "vmdk", read_only=True)
    try:
        assert disk.size == 4096
        assert bytes(disk.read(0, 4096)) == b"\x42" * 2048 + bytes(2048)
    finally:
        disk.close()
    bad.write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
        'RW 99999999999999999999 FLAT "data.bin" 0\n'
    )
    with pytest.raises(CorruptImage, match="beyond any vmdk"):
        open_disk(str(bad), "vmdk", read_only=True)


def test_sparse_extent_without_descriptor_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "two.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(image), "1G")
    with pytest.raises(Unsupported, match="without a descriptor"):
        open_disk(str(tmp_path / "two-s001.vmdk"), "vmdk", read_only=True)


# -- writes -------------------------------------------------------------------------------------


def write_random(disk, expected_path: Path, size: int, seed: int, count: int = 40) -> None:  # type: ignore[no-untyped-def]
    """Odd-sized writes at odd offsets through the driver, mirrored into a sparse raw file."""
    rng = random.Random(seed)
    with open(expected_path, "r+b") as exp:
        for _ in range(count):
            length = rng.choice([1, 7, 511, 513, 4096, 65535, 65537, 200000, 1 << 20])
            offset = rng.randrange(0, size - length)
            data = rng.randbytes(length)
            disk.write(offset, data)
            exp.seek(offset)
            exp.write(data)


def blank_raw(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize(
    "subformat,size",
    [
        ("monolithicSparse", 80 * MiB),
        ("monolithicFlat", 80 * MiB),
        ("twoGbMaxExtentSparse", 5 * GiB),
        ("twoGbMaxExtentFlat", 5 * GiB),
    ],
)
def test_writes_pass_qemu_check_and_compare(tmp_path: Path, subformat: str, size: int) -> None:
    image = tmp_path / "w.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(image), str(size))
    expected = blank_raw(tmp_path / "expected.raw", size)
    disk = open_disk(str(image))
    try:
        write_random(disk, expected, min(size, 96 * MiB), seed=5)
        if size > 2 * GiB:
            data = os.urandom(3 * 65536 + 5)
            disk.write(2 * GiB - 65536 - 3, data)  # across the extent boundary
            with open(expected, "r+b") as exp:
                exp.seek(2 * GiB - 65536 - 3)
                exp.write(data)
        disk.flush()
        cid_before = None
        if subformat == "monolithicSparse":
            # -U: the image is open for writing here, so QEMU's image locks keep a plain
            # qemu-img info out.
            info = json.loads(qemu_img("info", "-U", "--output=json", str(image)).stdout)
            cid_before = info["format-specific"]["data"]["cid"]
    finally:
        disk.close()
    assert_qemu_check_clean(image, "vmdk")
    assert_qemu_compare_identical(image, expected, "vmdk")
    if cid_before is not None:
        assert cid_before == qemu_info(image)["format-specific"]["data"]["cid"]
    # And our own reads agree.
    export_matches(image, expected)


def test_first_write_changes_the_cid(tmp_path: Path) -> None:
    for subformat in ("monolithicSparse", "monolithicFlat"):
        image = tmp_path / f"{subformat}.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(image), "8M")
        before = qemu_info(image)["format-specific"]["data"]["cid"]
        disk = open_disk(str(image))
        disk.write(100, b"x" * 10)
        disk.write(5000, b"y" * 10)
        disk.close()
        after = qemu_info(image)["format-specific"]["data"]["cid"]
        assert before != after
        assert_qemu_check_clean(image, "vmdk")


def test_zeroed_grain_writes(tmp_path: Path) -> None:
    image = tmp_path / "z.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", str(image), "16M")
    qemu_io(image, "write -P 0x61 0 4M")
    size_before = image.stat().st_size
    expected = blank_raw(tmp_path / "e.raw", 16 * MiB)
    with open(expected, "r+b") as f:
        f.write(b"\x61" * 4 * MiB)
        f.seek(100)
        f.write(bytes(3 * MiB))
    disk = open_disk(str(image))
    try:
        disk.write_zeroes(100, 3 * MiB, may_unmap=True)
        disk.write_zeroes(8 * MiB, 4 * MiB, may_unmap=True)
        assert disk.block_status(128 * 1024, 65536).allocation is Allocation.ZERO
        assert disk.block_status(8 * MiB, 65536).allocation is Allocation.ZERO
    finally:
        disk.close()
    assert image.stat().st_size <= size_before + 2 * 65536  # only the partial grains
    assert_qemu_check_clean(image, "vmdk")
    assert_qemu_compare_identical(image, expected, "vmdk")


def test_parent_chain_reads_and_copy_on_write(tmp_path: Path) -> None:
    parent = tmp_path / "parent.vmdk"
    src = tmp_path / "src.raw"
    data = bytearray(pattern_image(src, 16 * MiB, seed=2))
    qemu_img("convert", "-O", "vmdk", str(src), str(parent))
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "parent.vmdk", "-F", "vmdk", str(child))
    qemu_io(child, "write -P 0x44 1M 64k")
    data[MiB : MiB + 65536] = b"\x44" * 65536
    disk = open_disk(str(child))
    try:
        assert disk.info()[1].format == "vmdk"
        for offset, length in ((5, 3), (70000, 1000), (4 * MiB - 7, 100000), (MiB + 10, 5)):
            piece = bytes([offset % 251 + 1]) * length
            disk.write(offset, piece)
            data[offset : offset + length] = piece
        assert bytes(disk.read(0, len(data))) == bytes(data)
    finally:
        disk.close()
    expected = tmp_path / "expected.raw"
    expected.write_bytes(data)
    assert_qemu_check_clean(child, "vmdk")
    assert_qemu_compare_identical(child, expected, "vmdk")
    # The parent is untouched.
    assert_qemu_compare_identical(parent, src, "vmdk")


def test_parent_cid_mismatch_is_noted(tmp_path: Path) -> None:
    parent = tmp_path / "p.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(parent), "4M")
    child = tmp_path / "c.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "p.vmdk", "-F", "vmdk", str(child))
    disk = open_disk(str(child), read_only=True)
    assert not disk.info()[0].notes
    disk.close()
    qemu_io(parent, "write -P 9 0 512")  # changes the parent's CID
    disk = open_disk(str(child), read_only=True)
    try:
        notes = disk.info()[0].notes
        assert any("parentCID" in n for n in notes), notes
        assert bytes(disk.read(0, 512)) == b"\x09" * 512
    finally:
        disk.close()


def test_stream_optimized_writes_append_grains(tmp_path: Path) -> None:
    src = tmp_path / "s.raw"
    data = bytearray(pattern_image(src, 3 * MiB + 4096, seed=8))
    image = tmp_path / "s.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(src), str(image))
    rng = random.Random(4)
    disk = open_disk(str(image))
    try:
        assert not disk.read_only
        assert any("streamOptimized" in n for n in disk.info()[0].notes)
        for offset, length in ((0, 1), (65530, 20), (MiB, 3 * 65536), (3 * MiB + 4000, 96)):
            piece = rng.randbytes(length)
            disk.write(offset, piece)
            data[offset : offset + length] = piece
        disk.write(0, b"again")  # a grain rewritten twice
        data[0:5] = b"again"
        assert bytes(disk.read(0, len(data))) == bytes(data)
    finally:
        disk.close()
    expected = tmp_path / "e.raw"
    expected.write_bytes(data)
    assert_qemu_check_clean(image, "vmdk")
    assert_qemu_compare_identical(image, expected, "vmdk")
    assert image.read_bytes()[-512:] == bytes(512)  # still ends with an end-of-stream marker


def test_write_compressed_builds_a_stream_image(tmp_path: Path) -> None:
    image = tmp_path / "c.vmdk"
    size = 4 * MiB
    VmdkDriver.create(str(image), size, {"subformat": "streamOptimized"})
    src = tmp_path / "src.raw"
    data = pattern_image(src, size, seed=6)
    disk = open_disk(str(image))
    try:
        unit = disk.top.compressed_write_unit()
        assert unit == 65536
        for offset in range(0, size, unit):
            disk.top.write_compressed(offset, data[offset : offset + unit])
    finally:
        disk.close()
    assert image.stat().st_size < size // 4  # the pattern compresses well
    assert_qemu_check_clean(image, "vmdk")
    assert_qemu_compare_identical(image, src, "vmdk")
    flat = tmp_path / "flat.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(flat), "1M")
    disk = open_disk(str(flat))
    try:
        with pytest.raises(Unsupported):
            disk.top.write_compressed(0, bytes(65536))
    finally:
        disk.close()


def test_stream_with_footer_opens_read_only(tmp_path: Path) -> None:
    image = corpus_image(tmp_path, "vmdk/cot/input-2014.vmdk")
    image.chmod(0o644)
    disk = open_disk(str(image))
    try:
        assert disk.read_only
        assert any("footer" in n for n in disk.info()[0].notes)
        with pytest.raises(ReadOnly):
            disk.write(0, b"x")
    finally:
        disk.close()


def test_writes_through_a_fuse_mount(images: Path, mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = images / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(image), "3G")
    qemu_io(image, "write -P 0x21 0 1M")
    expected = blank_raw(tmp_path / "expected.raw", 3 * GiB)
    with open(expected, "r+b") as f:
        f.write(b"\x21" * MiB)
    flat = images / "flat.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(flat), "2M")
    qemu_io(flat, "write -P 0x3c 4096 8192")
    m = mount(images)
    assert sorted(os.listdir(m.path)) == ["disk.vmdk.raw", "flat.vmdk.raw"]
    assert m.file("flat.vmdk").read_bytes() == qemu_raw(flat, tmp_path / "f.raw").read_bytes()
    rng = random.Random(9)
    fd = os.open(m.file("disk.vmdk"), os.O_RDWR)
    try:
        with open(expected, "r+b") as exp:
            for offset in [3, 65533, 2 * GiB - 1000, 3 * GiB - 70000, *rng.sample(range(GiB), 8)]:
                data = rng.randbytes(rng.choice([1, 999, 70000]))
                os.pwrite(fd, data, offset)
                exp.seek(offset)
                exp.write(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.umount()
    assert_qemu_check_clean(image, "vmdk")
    assert_qemu_compare_identical(image, expected, "vmdk")


# -- create -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"subformat": "monolithicFlat"},
        {"subformat": "twoGbMaxExtentSparse", "adapter_type": "lsilogic"},
        {"subformat": "twoGbMaxExtentFlat", "hwversion": "7"},
        {"subformat": "streamOptimized"},
        {"zeroed_grain": "on", "toolsversion": "1234", "adapter_type": "buslogic"},
        {"compat6": "on"},
    ],
)
def test_create_is_accepted_by_qemu(tmp_path: Path, options: dict[str, str]) -> None:
    image = tmp_path / "new.vmdk"
    size = 3 * GiB if options.get("subformat", "").startswith("twoGb") else 50 * MiB + 512
    VmdkDriver.create(str(image), size, options)
    info = qemu_info(image, "vmdk")
    assert info["virtual-size"] == size
    assert info["format-specific"]["data"]["create-type"] == options.get(
        "subformat", "monolithicSparse"
    )
    assert_qemu_check_clean(image, "vmdk")
    expected = blank_raw(tmp_path / "expected.raw", size)
    disk = open_disk(str(image))
    try:
        write_random(disk, expected, size, seed=1, count=10)
        disk.write(size - 4096, b"\xee" * 4096)
        with open(expected, "r+b") as f:
            f.seek(size - 4096)
            f.write(b"\xee" * 4096)
    finally:
        disk.close()
    assert_qemu_check_clean(image, "vmdk")
    assert_qemu_compare_identical(image, expected, "vmdk")
    qemu_io(image, f"read -P 0xee {size - 4096} 4096")


def test_create_matches_qemu_layout(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    VmdkDriver.create(str(ours), 100 * MiB, {"adapter_type": "lsilogic", "hwversion": "6"})
    qemu_img(
        "create", "-q", "-f", "vmdk", "-o", "adapter_type=lsilogic,hwversion=6", str(theirs), "100M"
    )
    assert header_fields(ours) == header_fields(theirs)
    assert ours.stat().st_size == theirs.stat().st_size
    text = ours.read_bytes()[512:10240].rstrip(b"\0").decode()
    assert 'ddb.adapterType = "lsilogic"' in text and 'ddb.virtualHWVersion = "6"' in text
    assert 'ddb.geometry.heads = "255"' in text


def test_create_child_of_a_parent(tmp_path: Path) -> None:
    parent = tmp_path / "base.vmdk"
    src = tmp_path / "src.raw"
    data = bytearray(pattern_image(src, 4 * MiB, seed=4))
    qemu_img("convert", "-O", "vmdk", str(src), str(parent))
    child = tmp_path / "top.vmdk"
    VmdkDriver.create(str(child), 4 * MiB, {"backing_file": "base.vmdk", "backing_fmt": "vmdk"})
    info = qemu_info(child, "vmdk")
    assert info["backing-filename"] == "base.vmdk"
    assert (
        info["format-specific"]["data"]["parent-cid"]
        == qemu_info(parent)["format-specific"]["data"]["cid"]
    )
    disk = open_disk(str(child))
    try:
        disk.write(1000, b"z" * 3000)
        data[1000:4000] = b"z" * 3000
    finally:
        disk.close()
    expected = tmp_path / "e.raw"
    expected.write_bytes(data)
    assert_qemu_check_clean(child, "vmdk")
    assert_qemu_compare_identical(child, expected, "vmdk")
    qemu_io(child, "read -P 0x7a 1000 3000")


@pytest.mark.parametrize(
    "options",
    [
        {"subformat": "bogus"},
        {"adapter_type": "scsi"},
        {"zeroed_grain": "maybe"},
        {"compat6": "on", "hwversion": "7"},
        {"cluster_size": "65536"},
        {"subformat": "monolithicFlat", "backing_file": "x.vmdk"},
        {"backing_file": "missing.vmdk"},
        {"hwversion": "seven"},
    ],
)
def test_create_rejects_bad_options(tmp_path: Path, options: dict[str, str]) -> None:
    from imgfs.errors import ImgfsError

    with pytest.raises(ImgfsError):
        VmdkDriver.create(str(tmp_path / "bad.vmdk"), MiB, options)


def test_create_odd_and_empty_sizes(tmp_path: Path) -> None:
    from imgfs.errors import InvalidRequest

    image = tmp_path / "odd.vmdk"
    VmdkDriver.create(str(image), 1000, {})
    assert qemu_info(image)["virtual-size"] == 1024  # whole sectors, as qemu-img rounds
    with pytest.raises(InvalidRequest, match="size 0"):
        VmdkDriver.create(str(tmp_path / "empty.vmdk"), 0, {})


# -- robustness ---------------------------------------------------------------------------------


def exercise(path: Path) -> None:
    """Open, walk, read and check an image; only imgfs's own errors may come out."""
    disk = open_disk(str(path), "vmdk", read_only=True)
    try:
        offset = 0
        while offset < min(disk.size, 64 * MiB):
            ext = disk.block_status(offset, disk.size - offset)
            disk.read(offset, min(ext.length, MiB))
            offset += ext.length
        disk.info()
        disk.check()
    finally:
        disk.close()


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_mutated_metadata_gives_clean_errors(tmp_path: Path, subformat: str) -> None:
    from imgfs.errors import ImgfsError

    base = tmp_path / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(base), "4M")
    qemu_io(base, "write -P 1 0 1M", "write -P 2 3M 100k")
    if subformat == "streamOptimized":
        stream = tmp_path / "stream.vmdk"
        qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(base), str(stream))
        base = stream
    original = base.read_bytes()
    rng = random.Random(subformat)
    fuzzed = tmp_path / "fuzzed.vmdk"
    for _ in range(150):
        data = bytearray(original)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(0, min(len(data), 80000))
            width = rng.choice([1, 4, 8])
            data[pos : pos + width] = rng.choice(
                [b"\xff" * width, bytes(width), rng.randbytes(width)]
            )
        fuzzed.write_bytes(data)
        start = time.monotonic()
        try:
            exercise(fuzzed)
        except ImgfsError:
            pass
        assert time.monotonic() - start < 5


def test_grain_pointing_into_metadata_is_not_written(tmp_path: Path) -> None:
    image = tmp_path / "m.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(image), "4M")
    gd_sector = header_fields(image)[9]
    with open(image, "r+b") as f:
        f.seek(gd_sector * 512)
        gt_sector = int.from_bytes(f.read(4), "little")
        f.seek(gt_sector * 512)
        f.write((0).to_bytes(4, "little") + (1).to_bytes(4, "little"))  # grain 1 at the header
    header = image.read_bytes()[:512]
    disk = open_disk(str(image), "vmdk")
    try:
        with pytest.raises(CorruptImage, match="outside the grain area"):
            disk.write(65536, b"boom")
    finally:
        disk.close()
    assert image.read_bytes()[:512] == header


def test_concurrent_writes_from_threads(tmp_path: Path) -> None:
    import threading

    image = tmp_path / "t.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(image), "32M")
    size = 32 * MiB
    expected = bytearray(size)
    jobs: list[tuple[int, bytes]] = []
    rng = random.Random(12)
    for i in range(8 * 40):
        # Disjoint pieces that share grains and grain tables between threads.
        offset = i * 100000 + rng.randrange(0, 1000)
        jobs.append((offset, rng.randbytes(rng.randrange(1, 60000))))
    for offset, data in jobs:
        expected[offset : offset + len(data)] = data
    disk = open_disk(str(image))
    try:

        def worker(k: int) -> None:
            for offset, data in jobs[k::8]:
                disk.write(offset, data)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        disk.flush()
    finally:
        disk.close()
    exp = tmp_path / "e.raw"
    exp.write_bytes(expected)
    assert_qemu_check_clean(image, "vmdk")
    assert_qemu_compare_identical(image, exp, "vmdk")


def make_cowd(path: Path, sectors: int, grain: int, grains: dict[int, bytes]) -> bytes:
    """A VMFS sparse (COWD) file laid out as the VMware 3 header describes it: header, one GD
    sector run, 4096-entry GTs, then grains. Returns the disk's raw bytes."""
    import struct

    gt_entries = 4096
    gd_entries = -(-sectors // (grain * gt_entries))
    gd_sector = 4
    gt_start = gd_sector + -(-gd_entries * 4 // 512)
    gt_sectors = gt_entries * 4 // 512
    next_sector = gt_start + gd_entries * gt_sectors
    image = bytearray(next_sector * 512)
    raw = bytearray(sectors * 512)
    header = struct.pack("<4sIIIIIII", b"COWD", 1, 3, sectors, grain, gd_sector, gd_entries, 0)
    image[: len(header)] = header
    for i in range(gd_entries):
        struct.pack_into("<I", image, gd_sector * 512 + 4 * i, gt_start + i * gt_sectors)
    for index, data in sorted(grains.items()):
        gd_index, gt_index = divmod(index, gt_entries)
        struct.pack_into(
            "<I", image, (gt_start + gd_index * gt_sectors) * 512 + 4 * gt_index, next_sector
        )
        image += data
        raw[index * grain * 512 : (index + 1) * grain * 512] = data
        next_sector += grain
    struct.pack_into("<I", image, 28, next_sector)
    path.write_bytes(image)
    return bytes(raw)


def test_vmfs_sparse_cowd_matches_qemu(tmp_path: Path) -> None:
    grain = 16
    rng = random.Random(3)
    grains = {i: rng.randbytes(grain * 512) for i in (0, 1, 5, 4095, 4096, 4100, 9000)}
    image = tmp_path / "delta.vmdk"
    raw = make_cowd(image, 9001 * grain, grain, grains)
    # qemu 7.2 is no oracle here: alone, a COWD file fails to open (qemu looks for a CID at
    # byte 512), and through a descriptor qemu lists the extent twice (twice the size, the
    # data repeated). The expected bytes come from the builder above.
    disk = open_disk(str(image))
    try:
        assert disk.read_only
        assert bytes(disk.read(0, len(raw))) == raw
    finally:
        disk.close()
    desc = tmp_path / "snap.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="vmfsSparse"\n\nRW {9001 * grain} VMFSSPARSE "delta.vmdk"\n'
    )
    disk = open_disk(str(desc))
    try:
        assert disk.size == len(raw)
        assert bytes(disk.read(0, len(raw))) == raw
        assert disk.block_status(2 * grain * 512, 4096).allocation is Allocation.UNALLOCATED
    finally:
        disk.close()


def test_flat_zeroes_and_discard_punch_holes(tmp_path: Path) -> None:
    image = tmp_path / "f.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(image), "8M")
    flat = tmp_path / "f-flat.vmdk"
    disk = open_disk(str(image))
    try:
        disk.write(0, b"\x11" * 8 * MiB)
        disk.write_zeroes(MiB, 2 * MiB, may_unmap=True)
        disk.discard(5 * MiB, MiB)
        disk.write_zeroes(7 * MiB + 3, 100, may_unmap=False)
        assert disk.block_status(MiB, 2 * MiB).allocation is Allocation.ZERO
    finally:
        disk.close()
    assert flat.stat().st_blocks * 512 <= 5 * MiB + 65536
    expected = bytearray(b"\x11" * 8 * MiB)
    expected[MiB : 3 * MiB] = bytes(2 * MiB)
    expected[5 * MiB : 6 * MiB] = bytes(MiB)
    expected[7 * MiB + 3 : 7 * MiB + 103] = bytes(100)
    exp = tmp_path / "e.raw"
    exp.write_bytes(expected)
    assert_qemu_compare_identical(image, exp, "vmdk")


def grain_tables(image: Path, gd_field: int) -> list[list[int]]:
    """Every grain table reached from the GD (field 9) or the redundant GD (field 8)."""
    import struct

    fields = header_fields(image)
    capacity, grain, gtes = fields[3], fields[4], fields[7]
    entries = -(-capacity // (grain * gtes))
    data = image.read_bytes()
    gd = struct.unpack_from(f"<{entries}I", data, fields[gd_field] * 512)
    return [list(struct.unpack_from(f"<{gtes}I", data, t * 512)) if t else [] for t in gd]


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_redundant_tables_kept_in_step(tmp_path: Path, subformat: str) -> None:
    image = tmp_path / "r.vmdk"
    VmdkDriver.create(str(image), 100 * MiB, {"subformat": subformat})
    expected = bytearray(100 * MiB)
    # Blank out two GD entries (and their copies) so writes must allocate new tables too.
    fields = header_fields(image)
    with open(image, "r+b") as f:
        for directory in (fields[8], fields[9]):
            f.seek(directory * 512 + 4)
            f.write(bytes(8))
    disk = open_disk(str(image))
    rng = random.Random(2)
    try:
        for _ in range(30):
            offset, data = rng.randrange(0, 100 * MiB - 70000), rng.randbytes(70000)
            disk.write(offset, data)
            expected[offset : offset + len(data)] = data
    finally:
        disk.close()
    primary, redundant = grain_tables(image, 9), grain_tables(image, 8)
    assert primary == redundant
    assert sum(1 for t in primary for e in t if e) > 10
    assert_qemu_check_clean(image, "vmdk")
    exp = tmp_path / "e.raw"
    exp.write_bytes(expected)
    assert_qemu_compare_identical(image, exp, "vmdk")


def test_check_counts_grains_past_the_end(tmp_path: Path) -> None:
    image = tmp_path / "k.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(image), "64M")
    qemu_io(image, "write -P 1 0 192k")
    disk = open_disk(str(image), read_only=True)
    try:
        result = disk.check()
        assert (result.corruptions, result.allocated_clusters) == (0, 3)
    finally:
        disk.close()
    gd_sector = header_fields(image)[9]
    with open(image, "r+b") as f:
        f.seek(gd_sector * 512)
        gt_sector = int.from_bytes(f.read(4), "little")
        f.seek(gt_sector * 512 + 4)
        f.write((1 << 30).to_bytes(4, "little"))
    theirs = qemu_img("check", "-f", "vmdk", str(image), check=False)
    assert theirs.returncode != 0 and "points after EOF" in theirs.stderr  # qemu stops: status 1
    disk = open_disk(str(image), read_only=True)
    try:
        result = disk.check()
        assert result.corruptions == 1 and result.exit_status == 2
        assert "grain 1" in result.messages[0]
    finally:
        disk.close()


@pytest.mark.parametrize(
    "subformat,old,new",
    [
        ("monolithicSparse", 10 * MiB + 512, 20 * MiB),  # within the grain directory
        ("monolithicSparse", 10 * MiB, 200 * MiB + 4096),  # the directory grows
        ("monolithicFlat", 10 * MiB, 30 * MiB),
    ],
)
def test_resize_grows(tmp_path: Path, subformat: str, old: int, new: int) -> None:
    image = tmp_path / "r.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(image), str(old))
    qemu_io(image, f"write -P 0x13 0 {old}")
    expected = bytearray(b"\x13" * old + bytes(new - old))
    disk = open_disk(str(image))
    try:
        disk.resize(new)
        assert disk.size == new
        assert bytes(disk.read(old - 10, 20)) == b"\x13" * 10 + bytes(10)
        for offset in (old + 3, new - 70000, new // 2 + 1):
            disk.write(offset, b"\x77" * 65536)
            expected[offset : offset + 65536] = b"\x77" * 65536
    finally:
        disk.close()
    assert qemu_info(image)["virtual-size"] == new
    exp = tmp_path / "e.raw"
    exp.write_bytes(expected)
    assert_qemu_check_clean(image, "vmdk")
    assert_qemu_compare_identical(image, exp, "vmdk")
    if subformat == "monolithicSparse":
        assert grain_tables(image, 9) == grain_tables(image, 8)


def test_resize_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    image = tmp_path / "t.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(image), "3G")
    disk = open_disk(str(image))
    try:
        with pytest.raises(Unsupported):
            disk.resize(4 * GiB)
    finally:
        disk.close()
    mono = tmp_path / "m.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(mono), "8M")
    disk = open_disk(str(mono))
    try:
        with pytest.raises(Unsupported, match="shrink"):
            disk.resize(4 * MiB)
    finally:
        disk.close()


def test_split_child_copies_on_write_from_its_parent(tmp_path: Path) -> None:
    parent = tmp_path / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(parent), "3G")
    near = 2 * GiB - 65536
    qemu_io(parent, f"write -P 0x51 {near} 256k", "write -P 0x52 0 64k")
    child = tmp_path / "child.vmdk"
    VmdkDriver.create(
        str(child), 3 * GiB, {"subformat": "twoGbMaxExtentSparse", "backing_file": "base.vmdk"}
    )
    expected = blank_raw(tmp_path / "e.raw", 3 * GiB)
    with open(expected, "r+b") as f:
        f.seek(near)
        f.write(b"\x51" * 256 * 1024)
        f.seek(0)
        f.write(b"\x52" * 65536)
    disk = open_disk(str(child))
    try:
        assert disk.info()[0].backing_filename == "base.vmdk"
        for offset, length in ((near + 100, 10), (2 * GiB + 5, 7), (2 * GiB + 70000, 3), (9, 9)):
            piece = bytes([offset % 200 + 1]) * length
            disk.write(offset, piece)
            with open(expected, "r+b") as f:
                f.seek(offset)
                f.write(piece)
    finally:
        disk.close()
    assert_qemu_check_clean(child, "vmdk")
    assert_qemu_compare_identical(child, expected, "vmdk")


def test_crlf_descriptor_keeps_its_line_endings(tmp_path: Path) -> None:
    image = tmp_path / "w.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(image), "1M")
    image.write_bytes(image.read_bytes().replace(b"\n", b"\r\n"))
    disk = open_disk(str(image))
    try:
        disk.write(0, b"crlf")
    finally:
        disk.close()
    text = image.read_bytes()
    assert b"\n" not in text.replace(b"\r\n", b"")
    assert qemu_info(image)["virtual-size"] == MiB
    qemu_io(image, "read -P 0x63 0 1", "read -P 0x66 3 1")  # "c" ... "f"
