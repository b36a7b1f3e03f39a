"""vpc (Microsoft VHD): exports match qemu-img, writes pass qemu-img check/compare, differencing
images match vhdimount (libvhdi), since qemu ignores a VHD's parent."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from imgfs.block import registry
from imgfs.block.disk import open_disk
from imgfs.errors import CorruptImage, InvalidRequest, Unsupported
from imgfs.formats.vpc import VpcDriver, with_checksum
from tests.conftest import SHARED
from tests.formats.writers import striped_thread_writes
from tests.oracle import (
    assert_export_matches_qemu,
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    assert_same_bytes,
    qemu_img,
    qemu_info,
    sha256_file,
)

MiB = 1024 * 1024
CORPUS = SHARED / "corpus"


def export(image: Path, out: Path, fmt: str | None = "vpc") -> Path:
    disk = open_disk(str(image), fmt, read_only=True)
    try:
        with open(out, "wb") as f:
            f.truncate(disk.size)
            for off in range(0, disk.size, 4 * MiB):
                data = disk.read(off, min(4 * MiB, disk.size - off))
                if any(data):
                    f.seek(off)
                    f.write(data)
    finally:
        disk.close()
    return out


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "vpc"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True, timeout=120)


def decompress(src: Path, dst: Path) -> Path:
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(src.suffix)
    if opener is None:
        shutil.copyfile(src, dst)
    else:
        with opener(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return dst


def manifest_sha(rel: str) -> str:
    for line in (CORPUS / "MANIFEST.tsv").read_text().splitlines():
        cols = line.split("\t")
        if cols[0] == rel:
            return cols[6]
    raise KeyError(rel)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("force_size", ["off", "on"])
@pytest.mark.parametrize(
    "size", [5 * MiB + 123 * 512, pytest.param(100_000_000, marks=pytest.mark.slow)]
)
def test_qemu_created_images_export_like_qemu(
    tmp_path: Path, subformat: str, force_size: str, size: int
) -> None:
    image = tmp_path / "disk.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat},force_size={force_size}",
             str(image), str(size))  # fmt: skip
    qemu_io(image, "write -P 0x5a 0 70k", f"write -P 0xa5 {3 * MiB - 512} 1536",
            f"write -P 0x33 {size // 512 * 512 - 4096} 4096")  # fmt: skip
    disk = open_disk(str(image), "vpc", read_only=True)
    assert disk.size == qemu_info(image, "vpc")["virtual-size"]
    disk.close()
    assert_export_matches_qemu(image, export(image, tmp_path / "out.raw"), tmp_path, "vpc")


@pytest.mark.parametrize(
    "size",
    [
        1,
        pytest.param(512, marks=pytest.mark.slow),
        pytest.param(10 * MiB, marks=pytest.mark.slow),
        100_000_000,
        200 * 1024 * MiB,
        2040 * 1024 * MiB,
    ],
)
@pytest.mark.parametrize("force_size", ["off", "on"])
def test_create_sizes_match_qemu_img(tmp_path: Path, size: int, force_size: str) -> None:
    ours, theirs = tmp_path / "ours.vhd", tmp_path / "theirs.vhd"
    VpcDriver.create(str(ours), size, {"force_size": force_size})
    qemu_img("create", "-q", "-f", "vpc", "-o", f"force_size={force_size}", str(theirs), str(size))
    assert qemu_info(ours, "vpc")["virtual-size"] == qemu_info(theirs, "vpc")["virtual-size"]
    disk = open_disk(str(ours), "vpc", read_only=True)
    assert disk.size == qemu_info(theirs, "vpc")["virtual-size"]
    disk.close()
    assert_qemu_check_clean(ours, "vpc")


def test_create_refuses_what_qemu_refuses(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="beyond"):
        VpcDriver.create(str(tmp_path / "big.vhd"), 2041 * 1024 * MiB, {})
    with pytest.raises(InvalidRequest, match="subformat"):
        VpcDriver.create(str(tmp_path / "x.vhd"), MiB, {"subformat": "sparse"})
    with pytest.raises(InvalidRequest, match="cluster_size"):
        VpcDriver.create(str(tmp_path / "x.vhd"), MiB, {"cluster_size": "64k"})


def test_fixed_vhd_probes_as_vpc(tmp_path: Path) -> None:
    image = tmp_path / "fixed.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(image), "4M")
    assert registry.probe_file(str(image)) is VpcDriver
    assert qemu_info(image)["format"] == "raw"  # qemu does not: the reason for the tail probe


def random_writes(disk, expected: bytearray, seed: int, count: int = 60) -> None:
    rng = random.Random(seed)
    for i in range(count):
        length = rng.choice([1, 511, 512, 4097, 70_000, 3 * MiB // 2])
        offset = rng.randrange(0, len(expected) - length)
        data = bytes([(i * 7 + seed) % 251 + 1]) * length
        disk.write(offset, data)
        expected[offset : offset + length] = data


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("creator", ["qemu-img", "imgfs"])
def test_random_writes_pass_qemu_check_and_compare(
    tmp_path: Path, subformat: str, creator: str
) -> None:
    image = tmp_path / "disk.vhd"
    if creator == "qemu-img":
        qemu_img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", str(image), "20M")
    else:
        VpcDriver.create(str(image), 20 * MiB, {"subformat": subformat, "block_size": "512k"})
    qemu_io(image, "write -P 0x77 1M 1M")
    expected = bytearray(export(image, tmp_path / "before.raw").read_bytes())
    disk = open_disk(str(image), "vpc")
    random_writes(disk, expected, seed=len(subformat) + len(creator))
    disk.flush()
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "vpc")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vpc")
    assert_same_bytes(export(image, tmp_path / "after.raw"), tmp_path / "expected.raw")


def test_bximage_vpc(tmp_path: Path) -> None:
    image = tmp_path / "bx.vhd"
    subprocess.run(["bximage", "-q", "-func=create", "-hd=10M", "-imgmode=vpc", str(image)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    qemu_io(image, "write -P 0x42 4095 9000", "write -P 0x43 9M 64k")
    assert_export_matches_qemu(image, export(image, tmp_path / "out.raw"), tmp_path, "vpc")
    disk = open_disk(str(image), "vpc")
    disk.write(2 * MiB + 3, b"\x99" * 5000)
    disk.close()
    qemu_img("convert", "-f", "vpc", "-O", "raw", str(image), str(tmp_path / "q.raw"))
    expected = (tmp_path / "q.raw").read_bytes()
    assert expected[2 * MiB + 3 : 2 * MiB + 5003] == b"\x99" * 5000
    assert_same_bytes(export(image, tmp_path / "after.raw"), tmp_path / "q.raw")


def vhdimount_read(image: Path, mnt: Path, index: int) -> bytes:
    mnt.mkdir(exist_ok=True)
    subprocess.run(["vhdimount", str(image), str(mnt)], check=True, capture_output=True,
                   timeout=60)  # fmt: skip
    try:
        files = sorted(p for p in mnt.iterdir())
        return files[index].read_bytes()
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=60)


def test_differencing_reads_and_writes_match_vhdimount(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    parent, child = images / "parent.vhd", images / "child.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(parent), "8M")
    qemu_io(parent, "write -P 0x11 0 8M")
    VpcDriver.create(str(child), qemu_info(parent, "vpc")["virtual-size"],
                     {"backing_file": "parent.vhd", "block_size": "1M"})  # fmt: skip
    disk = open_disk(str(child), "vpc")
    assert disk.top.backing is not None
    expected = bytearray(disk.read(0, disk.size))
    assert expected == b"\x11" * 8 * MiB + bytes(len(expected) - 8 * MiB)
    random_writes(disk, expected, seed=5, count=40)
    disk.flush()
    disk.close()
    ours = export(child, tmp_path / "ours.raw")
    assert ours.read_bytes() == bytes(expected)
    # libvhdi finds the parent through the locators and reads the chain on its own.
    theirs = vhdimount_read(child, tmp_path / "mnt", -1)
    assert theirs[: len(expected)] == bytes(expected)
    # Moving the pair keeps working: the parent is found relative to the child.
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)
    assert export(moved / "child.vhd", tmp_path / "moved.raw").read_bytes() == bytes(expected)


def test_differencing_through_fuse_mount(tmp_path: Path, images: Path, mount) -> None:
    parent, child = images / "base.vhd", images / "top.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", str(parent), "6M")
    qemu_io(parent, "write -P 0x21 0 6M")
    VpcDriver.create(str(child), 6 * MiB, {"backing_file": "base.vhd"})
    m = mount(images)
    expected = bytearray(b"\x21" * 6 * MiB)
    with open(m.file("top.vhd"), "r+b") as f:
        rng = random.Random(9)
        for i in range(30):
            length = rng.choice([1, 700, 4096, 100_000])
            offset = rng.randrange(0, 6 * MiB - length)
            f.seek(offset)
            f.write(bytes([i + 1]) * length)
            expected[offset : offset + length] = bytes([i + 1]) * length
        f.flush()
    m.umount()
    assert export(child, tmp_path / "ours.raw").read_bytes() == bytes(expected)
    assert vhdimount_read(child, tmp_path / "vmnt", -1)[: len(expected)] == bytes(expected)


def test_dynamic_through_fuse_mount(tmp_path: Path, images: Path, mount) -> None:
    image = images / "disk.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(image), "12M")
    size = qemu_info(image, "vpc")["virtual-size"]
    expected = bytearray(size)
    m = mount(images)
    with open(m.file("disk.vhd"), "r+b") as f:
        rng = random.Random(3)
        for i in range(40):
            length = rng.choice([3, 512, 65536, 300_001])
            offset = rng.randrange(0, size - length)
            f.seek(offset)
            f.write(bytes([i + 1]) * length)
            expected[offset : offset + length] = bytes([i + 1]) * length
    m.umount()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "vpc")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vpc")


@pytest.mark.parametrize(
    "rel",
    [
        "vpc/dissect-hypervisor/dynamic.vhd.gz",
        "vpc/dissect-hypervisor/fixed.vhd.gz",
        "vpc/imhex-patterns/vhd.hexpat.vhd.xz",
        "vpc/dfvfs/ext2.vhd.xz",
        pytest.param("vpc/qemu-iotests/d2v-zerofilled.vhd.bz2", marks=pytest.mark.slow),
    ],
)
def test_corpus_exports_match_qemu_and_manifest(tmp_path: Path, rel: str) -> None:
    image = decompress(
        CORPUS / rel, tmp_path / Path(rel).name.rsplit(".vhd", 1)[0].join(["", ".vhd"])
    )
    out = export(image, tmp_path / "out.raw")
    assert sha256_file(out) == manifest_sha(rel)
    assert_export_matches_qemu(image, out, tmp_path, "vpc")


@pytest.mark.parametrize(
    ("rel", "size"),
    [("vpc/qemu-iotests/hyperv2012r2-dynamic.vhd", 136365211648),
     ("vpc/qemu-iotests/virtualpc-dynamic.vhd", 136363130880)],
)  # fmt: skip
def test_corpus_size_rule_per_creator(rel: str, size: int) -> None:
    """Hyper-V ("win ") means current_size, Virtual PC ("vpc ") the CHS geometry."""
    disk = open_disk(str(CORPUS / rel), "vpc", read_only=True)
    try:
        assert disk.size == size == qemu_info(CORPUS / rel, "vpc")["virtual-size"]
        ext = disk.block_status(0, disk.size)
        assert ext.length == disk.size  # nothing allocated: one extent
        assert disk.read(size - 4096, 4096) == bytes(4096)
    finally:
        disk.close()


def test_force_size_calc_option(tmp_path: Path) -> None:
    rel = CORPUS / "vpc/qemu-iotests/virtualpc-dynamic.vhd"
    disk = open_disk(str(rel), "vpc", read_only=True,
                     driver_options={"force_size_calc": "current_size"})  # fmt: skip
    assert disk.size != 136363130880
    disk.close()


def test_corpus_differencing_without_parent_is_a_clear_error(tmp_path: Path) -> None:
    image = decompress(CORPUS / "vpc/dfvfs/fat-differential.vhd.xz", tmp_path / "fd.vhd")
    with pytest.raises(CorruptImage, match="fat-parent.vhd"):
        open_disk(str(image), "vpc", read_only=True)
    # With a blank parent of the right size it reads the way qemu reads it alone.
    VpcDriver.create(str(tmp_path / "fat-parent.vhd"), 4 * MiB, {"force_size": "on"})
    out = export(image, tmp_path / "out.raw")
    assert sha256_file(out) == manifest_sha("vpc/dfvfs/fat-differential.vhd.xz")


def test_bad_footer_checksum(tmp_path: Path) -> None:
    image = decompress(CORPUS / "vpc/dfvfs/image.vhd.xz", tmp_path / "image.vhd")
    with pytest.raises(CorruptImage, match="checksum"):
        open_disk(str(image), "vpc", read_only=True)


def test_damaged_footer_copy_and_header_checksum_are_noted(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(image), "4M")
    qemu_io(image, "write -P 0x61 0 1M")
    good = export(image, tmp_path / "good.raw").read_bytes()
    raw = bytearray(image.read_bytes())
    raw[0x40] ^= 0xFF  # start footer copy's checksum
    raw[512 + 0x24] ^= 0xFF  # dynamic header checksum
    image.write_bytes(raw)
    disk = open_disk(str(image), "vpc", read_only=True)
    notes = disk.top.info().notes
    disk.close()
    assert any("footer copy at the start" in n for n in notes)
    assert any("dynamic header checksum" in n for n in notes)
    assert export(image, tmp_path / "again.raw").read_bytes() == good


def test_afl5_is_rejected_fast() -> None:
    start = time.monotonic()
    with pytest.raises(CorruptImage):
        open_disk(str(CORPUS / "malformed/qemu-iotests/afl5.img"), "vpc", read_only=True)
    assert time.monotonic() - start < 1


def test_huge_bat_is_rejected(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(image), "4M")
    raw = bytearray(image.read_bytes())
    raw[512 + 28 : 512 + 32] = (0x40000001).to_bytes(4, "big")
    image.write_bytes(raw)
    with pytest.raises(CorruptImage, match="1073741825"):
        open_disk(str(image), "vpc", read_only=True)


def test_write_zeroes_keeps_unallocated_blocks_unallocated(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    VpcDriver.create(str(image), 8 * MiB, {"force_size": "on"})
    qemu_io(image, "write -P 0x31 0 2M")
    size_before = image.stat().st_size
    disk = open_disk(str(image), "vpc")
    disk.write_zeroes(MiB, 6 * MiB)
    disk.close()
    assert image.stat().st_size == size_before
    expected = b"\x31" * MiB + bytes(7 * MiB)
    assert export(image, tmp_path / "out.raw").read_bytes() == expected


def test_fixed_image_smaller_than_its_size_protects_the_footer(tmp_path: Path) -> None:
    image = tmp_path / "fixed.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(image), "4M")
    raw = bytearray(image.read_bytes())
    footer = bytearray(raw[-512:])
    footer[48:56] = (5 * MiB).to_bytes(8, "big")  # current_size past the data area
    raw[-512:] = with_checksum(footer, 64)
    image.write_bytes(raw)
    disk = open_disk(str(image), "vpc")
    assert disk.size == 5 * MiB
    assert any("less than its size" in n for n in disk.top.info().notes)
    assert disk.read(4 * MiB, MiB) == bytes(MiB)
    disk.write(MiB, b"ok")
    with pytest.raises(Unsupported):
        disk.write(4 * MiB + 100, b"x")
    disk.close()
    assert image.read_bytes()[-512:] == raw[-512:]


def test_parent_uuid_mismatch_is_noted(tmp_path: Path) -> None:
    parent, child = tmp_path / "p.vhd", tmp_path / "c.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(parent), "4M")
    VpcDriver.create(str(child), qemu_info(parent, "vpc")["virtual-size"],
                     {"backing_file": "p.vhd"})  # fmt: skip
    disk = open_disk(str(child), "vpc", read_only=True)
    assert not disk.top.info().notes
    disk.close()
    raw = bytearray(parent.read_bytes())
    footer = bytearray(raw[-512:])
    footer[68:84] = bytes(range(16))
    raw[-512:] = with_checksum(footer, 64)
    parent.write_bytes(raw)
    disk = open_disk(str(child), "vpc", read_only=True)
    assert any("UUID" in n for n in disk.top.info().notes)
    disk.close()


def test_block_cut_off_by_a_crash_reads_zeros_and_new_blocks_go_after_it(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    VpcDriver.create(str(image), 8 * MiB, {"force_size": "on", "block_size": "1M"})
    qemu_io(image, "write -P 0x31 0 1M", "write -P 0x32 3M 1M")
    size = image.stat().st_size
    os.truncate(image, size - 512 - MiB)  # the last block and the end footer never made it
    disk = open_disk(str(image), "vpc")
    assert any("past the end of the file" in n for n in disk.top.info().notes)
    assert disk.read(3 * MiB, MiB) == bytes(MiB)
    disk.write(5 * MiB, b"\x35" * 1000)
    disk.close()
    expected = bytearray(8 * MiB)
    expected[:MiB] = b"\x31" * MiB
    expected[5 * MiB : 5 * MiB + 1000] = b"\x35" * 1000
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vpc")


def test_check_finds_shared_blocks(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(image), "8M")
    qemu_io(image, "write -P 1 0 1M", "write -P 2 3M 1M")
    disk = open_disk(str(image), "vpc", read_only=True)
    assert disk.check().corruptions == 0
    assert disk.check().allocated_clusters == 2
    disk.close()
    raw = bytearray(image.read_bytes())
    raw[1536 + 4 : 1536 + 8] = raw[1536:1540]  # block 1 points at block 0's place
    image.write_bytes(raw)
    disk = open_disk(str(image), "vpc", read_only=True)
    result = disk.check()
    disk.close()
    assert result.corruptions == 1 and "share space" in result.messages[0]


@pytest.mark.parametrize("parent", [False, True])
def test_concurrent_writes_from_threads(tmp_path: Path, parent: bool) -> None:
    image = tmp_path / "disk.vhd"
    if parent:
        base = tmp_path / "base.vhd"
        qemu_img(
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            str(base),
            "16M",
        )
        qemu_io(base, "write -P 0x66 0 16M")
        VpcDriver.create(
            str(image),
            qemu_info(base, "vpc")["virtual-size"],
            {"backing_file": base.name, "block_size": "1M"},
        )
    else:
        VpcDriver.create(str(image), 16 * MiB, {"block_size": "1M"})
    disk = open_disk(str(image), "vpc")
    expected = striped_thread_writes(disk, 16 * MiB)
    disk.flush()
    assert disk.read(0, 16 * MiB) == expected
    disk.close()
    assert export(image, tmp_path / "out.raw").read_bytes()[: 16 * MiB] == bytes(expected)
    again = open_disk(str(image), "vpc", read_only=True)
    assert again.check().corruptions == 0
    again.close()


def test_discard_frees_space_and_reads_zeros(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    VpcDriver.create(str(image), 8 * MiB, {"force_size": "on", "block_size": "1M"})
    disk = open_disk(str(image), "vpc")
    disk.write(0, b"\x5a" * 8 * MiB)
    disk.flush()
    used = image.stat().st_blocks
    disk.discard(MiB, 3 * MiB + 5000)  # two whole blocks and parts of two others
    disk.close()
    expected = bytearray(b"\x5a" * 8 * MiB)
    expected[MiB : 4 * MiB + 4096] = bytes(3 * MiB + 4096)  # the 4 KiB-aligned part of the last
    (tmp_path / "expected.raw").write_bytes(expected)
    assert image.stat().st_blocks <= used - (3 * MiB - 64 * 1024) // 512
    assert_qemu_check_clean(image, "vpc")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vpc")
    disk = open_disk(str(image), "vpc")
    disk.write(2 * MiB + 10, b"\x01" * 10)  # a discarded block comes back
    disk.close()
    expected[2 * MiB + 10 : 2 * MiB + 20] = b"\x01" * 10
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vpc")


def test_write_zeroes_with_unmap_frees_whole_blocks(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    VpcDriver.create(str(image), 4 * MiB, {"block_size": "1M"})
    disk = open_disk(str(image), "vpc")
    size = disk.size
    disk.write(0, b"\x5a" * size)
    disk.flush()
    used = image.stat().st_blocks
    disk.write_zeroes(MiB - 100, 2 * MiB + 200, may_unmap=True)
    disk.close()
    assert image.stat().st_blocks <= used - (2 * MiB - 64 * 1024) // 512
    expected = bytearray(b"\x5a" * size)
    expected[MiB - 100 : 3 * MiB + 100] = bytes(2 * MiB + 200)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vpc")
