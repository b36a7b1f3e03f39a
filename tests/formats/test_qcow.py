"""qcow (version 1): exports equal qemu-img's, writes pass qemu-img compare, create() opens in
qemu. qemu has no check for qcow (exit status 63), so compare is the oracle for writes."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.errors import CorruptImage, KeyRequired, Unsupported
from imgfs.formats.qcow import QcowDriver
from tests.formats.test_qed import (
    corrupt_copy,
    export,
    qemu_io,
    random_qemu_io_commands,
    random_writes,
    write_file,
)
from tests.oracle import (
    assert_export_matches_qemu,
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    assert_same_bytes,
    pattern_image,
    qemu_img,
    qemu_info,
    qemu_raw,
)

KiB = 1024
MiB = 1024 * 1024


def compressible(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"epsilon\n", bytes(64)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def compressed_qcow(tmp_path: Path, name: str, size: int, seed: int) -> tuple[Path, Path]:
    """A qcow image whose clusters qemu compressed, and the raw bytes it holds."""
    src = tmp_path / f"{name}.src"
    data = bytearray(compressible(size, seed))
    data[size // 3 : size // 3 + 100 * KiB] = os.urandom(100 * KiB)  # some clusters won't shrink
    data[size // 2 : size // 2 + 200 * KiB] = bytes(200 * KiB)
    src.write_bytes(data)
    image = tmp_path / name
    # qemu-img 7.2 exits 1 at the very end of a compressed convert to qcow (after writing every
    # cluster), so the result is checked with compare rather than by the exit status.
    qemu_img("convert", "-f", "raw", "-c", "-O", "qcow", str(src), str(image), check=False)
    assert_qemu_compare_identical(image, src, "qcow")
    assert image.stat().st_size < size // 2, "qemu did not compress the clusters"
    return image, src


def test_qemu_written_image_exports_like_qemu(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow"
    size = 20 * MiB + 1536
    qemu_img("create", "-q", "-f", "qcow", str(image), str(size))
    qemu_io(image, *random_qemu_io_commands(random.Random(1), size, 50, 512), fmt="qcow")
    assert_export_matches_qemu(image, export(image, tmp_path / "ours.raw"), tmp_path)


def make_chain(tmp_path: Path, backing_fmt: str, short: bool) -> tuple[Path, Path]:
    size = 6 * MiB
    base_size = 2 * MiB + 512 if short else size
    if backing_fmt == "raw":
        base = tmp_path / "base.raw"
        pattern_image(base, base_size, seed=4)
    else:
        base = tmp_path / "base.qcow"
        # qemu-io writes to qcow slowly (a sync per table update); convert is fast.
        pattern_image(tmp_path / "base.src", base_size, seed=5)
        qemu_img("convert", "-f", "raw", "-O", "qcow", str(tmp_path / "base.src"), str(base))
        qemu_io(base, "write -z 64k 128k", fmt="qcow")
    top = tmp_path / "top.qcow"
    qemu_img(
        "create", "-q", "-f", "qcow", "-b", base.name, "-F", backing_fmt, str(top), str(size)
    )  # fmt: skip
    qemu_io(
        top, "write -P 99 4096 1024", "write -z 1M 48k", "write -P 5 2M 12k",
        f"write -P 6 {min(base_size - 1024, size - 8192)} 8k", fmt="qcow",
    )  # fmt: skip
    return base, top


@pytest.mark.parametrize("backing_fmt", ["raw", "qcow"])
@pytest.mark.parametrize("short", [False, True])
def test_backing_chain_exports_like_qemu(tmp_path: Path, backing_fmt: str, short: bool) -> None:
    base, top = make_chain(tmp_path, backing_fmt, short)
    disk = open_disk(str(top), "qcow", read_only=True)
    try:
        spec = disk.top.backing_spec
        assert spec is not None and spec.filename == base.name and spec.format is None
    finally:
        disk.close()
    assert_export_matches_qemu(top, export(top, tmp_path / "ours.raw"), tmp_path)


@pytest.mark.parametrize("backing_fmt", ["raw", "qcow"])
def test_random_writes_over_backing_match_qemu_compare(tmp_path: Path, backing_fmt: str) -> None:
    _, top = make_chain(tmp_path, backing_fmt, short=True)
    expected = bytearray(qemu_raw(top, tmp_path / "before.raw").read_bytes())
    random_writes(top, expected, random.Random(8), 60)
    write_file(tmp_path / "expected.raw", expected)
    assert_qemu_check_clean(top)
    assert_qemu_compare_identical(top, tmp_path / "expected.raw")
    assert_same_bytes(export(top, tmp_path / "ours.raw"), tmp_path / "expected.raw")


def test_partial_writes_copy_the_backing_cluster(tmp_path: Path) -> None:
    # 4 KiB clusters over a backing file (qemu itself uses 512-byte clusters then): a partial
    # write must copy the rest of the cluster from the backing image.
    base = tmp_path / "base.raw"
    data = bytearray(pattern_image(base, 1 * MiB, seed=2))
    top = tmp_path / "top.qcow"
    QcowDriver.create(str(top), 2 * MiB, {})
    raw = bytearray(top.read_bytes())
    name = b"base.raw"
    struct.pack_into(">QI", raw, 8, len(raw), len(name))
    top.write_bytes(bytes(raw) + name)
    disk = open_disk(str(top), "qcow")
    try:
        assert disk.top.cluster_size == 4096
        disk.write(5000, b"x" * 100)
        disk.write(MiB - 100, b"y" * 300)  # straddles the backing file's end
        disk.flush()
    finally:
        disk.close()
    expected = data + bytes(MiB)
    expected[5000:5100] = b"x" * 100
    expected[MiB - 100 : MiB + 200] = b"y" * 300
    assert_qemu_compare_identical(top, write_file(tmp_path / "expected.raw", expected))


def test_compressed_image_exports_like_qemu(tmp_path: Path) -> None:
    image, src = compressed_qcow(tmp_path, "c.qcow", 4 * MiB, seed=1)
    assert_same_bytes(export(image, tmp_path / "ours.raw"), src)
    assert_export_matches_qemu(image, tmp_path / "ours.raw", tmp_path)


def test_writes_into_compressed_clusters(tmp_path: Path) -> None:
    image, src = compressed_qcow(tmp_path, "c.qcow", 3 * MiB, seed=2)
    expected = bytearray(src.read_bytes())
    random_writes(image, expected, random.Random(12), 60)
    write_file(tmp_path / "expected.raw", expected)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "qcow")
    assert_same_bytes(export(image, tmp_path / "ours.raw"), tmp_path / "expected.raw")


def test_write_compressed_reads_back_in_qemu(tmp_path: Path) -> None:
    image = tmp_path / "new.qcow"
    size = 3 * MiB + 512
    QcowDriver.create(str(image), size, {})
    data = bytearray(compressible(size, 5))
    data[MiB : MiB + 64 * KiB] = os.urandom(64 * KiB)
    disk = open_disk(str(image), "qcow")
    try:
        unit = disk.top.compressed_write_unit()
        for off in range(0, size, 64 * unit):
            disk.top.write_compressed(off, data[off : off + 64 * unit])
        disk.flush()
    finally:
        disk.close()
    assert image.stat().st_size < size // 2
    assert_qemu_compare_identical(image, write_file(tmp_path / "expected.raw", data), "qcow")


def test_writes_through_fuse_mount(images: Path, mount, tmp_path: Path) -> None:
    pattern_image(images / "base.raw", 3 * MiB, seed=9)
    top = images / "disk.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", str(top), str(5 * MiB))
    image, _ = compressed_qcow(images, "packed.qcow", 2 * MiB, seed=3)
    (images / "packed.qcow.src").unlink()
    m = mount(images)
    rng = random.Random(11)
    for name in ("disk.qcow", "packed.qcow"):
        expected = bytearray(qemu_raw(images / name, tmp_path / f"{name}.before").read_bytes())
        exported = m.file(name)
        with open(exported, "r+b") as f:
            for _ in range(25):
                off = rng.randrange(0, len(expected) - 1)
                data = os.urandom(min(len(expected) - off, rng.choice([1, 777, 5000, 131073])))
                f.seek(off)
                f.write(data)
                expected[off : off + len(data)] = data
            f.flush()
            os.fsync(f.fileno())
        write_file(tmp_path / f"{name}.expected", expected)
        assert_same_bytes(exported, tmp_path / f"{name}.expected")
    m.umount()
    for name in ("disk.qcow", "packed.qcow"):
        assert_qemu_compare_identical(images / name, tmp_path / f"{name}.expected", "qcow")


@pytest.mark.parametrize("backing", [None, "raw", "qcow"])
def test_create_opens_in_qemu(tmp_path: Path, backing: str | None) -> None:
    size = 5 * MiB
    expected = bytearray(size)
    options: dict[str, str] = {}
    if backing == "raw":
        expected[: 3 * MiB] = pattern_image(tmp_path / "base.raw", 3 * MiB, seed=6)
        options = {"backing_file": "base.raw", "backing_fmt": "raw"}
    elif backing == "qcow":
        QcowDriver.create(str(tmp_path / "base.qcow"), 4 * MiB, {})
        base = open_disk(str(tmp_path / "base.qcow"), "qcow")
        try:
            base.write(0, b"\x07" * (4 * MiB))
        finally:
            base.close()
        expected[: 4 * MiB] = b"\x07" * (4 * MiB)
        options = {"backing_file": "base.qcow"}
    image = tmp_path / "new.qcow"
    QcowDriver.create(str(image), size, options)
    info = qemu_info(image, "qcow")
    assert info["virtual-size"] == size
    assert info.get("backing-filename") == options.get("backing_file")
    assert_qemu_compare_identical(image, write_file(tmp_path / "expected.raw", expected), "qcow")
    random_writes(image, expected, random.Random(4), 25, fmt="qcow")
    qemu_io(image, "write -P 66 1M 4k", fmt="qcow")
    expected[MiB : MiB + 4096] = b"\x42" * 4096
    assert_qemu_compare_identical(image, write_file(tmp_path / "expected.raw", expected), "qcow")


def header(**fields: int) -> bytes:
    values = {
        "version": 1, "bf_off": 0, "bf_size": 0, "mtime": 0, "size": 10 * MiB,
        "cluster_bits": 12, "l2_bits": 9, "padding": 0, "crypt": 0, "l1": 48,
    }  # fmt: skip
    values.update(fields)
    return struct.pack(">4sIQIIQBBHIQ", b"QFI\xfb", *values.values())


MALFORMED = {
    "cluster_bits_small": (header(cluster_bits=3), CorruptImage, "cluster_bits 3"),
    "cluster_bits_huge": (header(cluster_bits=63), CorruptImage, "cluster_bits 63"),
    "l2_bits_huge": (header(l2_bits=40), CorruptImage, "l2_bits 40"),
    "l2_bits_14": (header(l2_bits=14), CorruptImage, "l2_bits 14"),
    "l2_bits_5": (header(l2_bits=5), CorruptImage, "l2_bits 5"),
    "size_huge": (header(size=(1 << 64) - 1), CorruptImage, "size"),
    "l1_long": (header(size=1 << 60, cluster_bits=9, l2_bits=6), CorruptImage, "L1"),
    "l1_past_eof": (header(l1=1 << 40), CorruptImage, "1099511627776"),
    "backing_out": (header(bf_off=48, bf_size=1 << 20), CorruptImage, "backing"),
    "encrypted": (header(crypt=1), KeyRequired, "encrypted \\(aes\\); no key given"),
    "crypt_method": (header(crypt=2), Unsupported, "crypt_method 2"),
    "version_2": (header(version=2), Unsupported, "version 2"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_headers_are_rejected(tmp_path: Path, case: str) -> None:
    head, error, quoted = MALFORMED[case]
    image = tmp_path / "bad.qcow"
    with open(image, "wb") as f:
        f.write(head)
        f.truncate(64 * KiB)
    start = time.monotonic()
    with pytest.raises(error, match=quoted):
        open_disk(str(image), "qcow", read_only=True)
    assert time.monotonic() - start < 2


def test_qemu_encrypted_image_needs_a_key(tmp_path: Path) -> None:
    image = tmp_path / "enc.qcow"
    qemu_img(
        "create", "-q", "-f", "qcow", "--object", "secret,id=sec0,data=123456",
        "-o", "encrypt.format=aes,encrypt.key-secret=sec0", str(image), "1M",
    )  # fmt: skip
    with pytest.raises(KeyRequired, match="no key given"):
        open_disk(str(image), read_only=True)


def test_bad_table_entries_fail_reads_not_the_process(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow"
    qemu_img("create", "-q", "-f", "qcow", str(image), "4M")
    qemu_io(image, "write -P 5 0 8k", fmt="qcow")
    raw = image.read_bytes()
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0]
    bad_compressed = struct.pack(">Q", (1 << 63) | (100 << 51) | 8192)
    cases = {
        "data.qcow": [(l2, struct.pack(">Q", 1 << 45))],
        "l2.qcow": [(l1, struct.pack(">Q", 1 << 45))],
        "compressed.qcow": [(l2, bad_compressed), (8192, b"not deflate" * 10)],
        "short.qcow": [(l2, bad_compressed), (8192, zlib.compress(b"a" * 100)[2:-4])],
    }
    for name, patches in cases.items():
        bad = corrupt_copy(tmp_path, image, name, patches)
        disk = open_disk(str(bad), "qcow", read_only=True)
        try:
            with pytest.raises(CorruptImage, match="0x"):
                disk.read(0, 4096)
        finally:
            disk.close()


def test_probe_claims_version_1_only(tmp_path: Path) -> None:
    v1 = tmp_path / "a.img"
    qemu_img("create", "-q", "-f", "qcow", str(v1), "1M")
    v2 = tmp_path / "b.img"
    qemu_img("create", "-q", "-f", "qcow2", str(v2), "1M")
    disk = open_disk(str(v1), read_only=True)
    try:
        assert disk.top.format_name == "qcow"
    finally:
        disk.close()
    out = subprocess.run(["qemu-img", "info", str(v2)], capture_output=True, text=True)
    assert "qcow2" in out.stdout
    from imgfs.block import registry

    assert registry.probe_file(str(v2)).format_name != "qcow"


@pytest.mark.parametrize(("cluster_bits", "l2_bits"), [(9, 6), (16, 13), (12, 8), (9, 13)])
def test_other_geometries_read_and_write_like_qemu(
    tmp_path: Path, cluster_bits: int, l2_bits: int
) -> None:
    # qemu-img creates only two geometries; the rest of what qemu opens is made by patching
    # the header of an empty image whose L1 table is large enough.
    image = tmp_path / "geo.qcow"
    size = 3 * MiB
    l1_len = -(-size // (1 << (cluster_bits + l2_bits))) * 8
    with open(image, "wb") as f:
        f.write(header(size=size, cluster_bits=cluster_bits, l2_bits=l2_bits))
        f.truncate(48 + -(-l1_len // 512) * 512)
    qemu_io(image, "write -P 9 100k 300k", "write -P 8 2M 5k", fmt="qcow")
    expected = bytearray(qemu_raw(image, tmp_path / "before.raw").read_bytes())
    assert_same_bytes(export(image, tmp_path / "ours.raw"), tmp_path / "before.raw")
    random_writes(image, expected, random.Random(cluster_bits * l2_bits), 25)
    assert_qemu_compare_identical(image, write_file(tmp_path / "expected.raw", expected), "qcow")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_matrix_qemu_io_then_driver_writes(tmp_path: Path, seed: int) -> None:
    base = tmp_path / "base.raw"
    pattern_image(base, 5 * MiB + 512, seed=seed)
    image = tmp_path / "disk.qcow"
    backing = ["-b", "base.raw", "-F", "raw"] if seed % 2 else []
    qemu_img("create", "-q", "-f", "qcow", *backing, str(image), str(12 * MiB))
    rng = random.Random(seed)
    qemu_io(image, *random_qemu_io_commands(rng, 12 * MiB, 40, 512), fmt="qcow")
    assert_export_matches_qemu(image, export(image, tmp_path / "ours.raw"), tmp_path)
    expected = bytearray(qemu_raw(image, tmp_path / "before.raw").read_bytes())
    random_writes(image, expected, rng, 80)
    assert_qemu_compare_identical(image, write_file(tmp_path / "expected.raw", expected))
    packed, src = compressed_qcow(tmp_path, "packed.qcow", 3 * MiB, seed)
    expected = bytearray(src.read_bytes())
    random_writes(packed, expected, rng, 80)
    assert_qemu_compare_identical(packed, write_file(tmp_path / "p.expected", expected), "qcow")


def test_reads_spanning_many_l2_tables_match_qemu(tmp_path: Path) -> None:
    # 512-byte clusters and 64-entry L2 tables (32 KiB each): runs of contiguous, unallocated
    # and backing-less clusters cross table boundaries and missing tables within one read.
    image = tmp_path / "span.qcow"
    size = 2 * MiB
    with open(image, "wb") as f:
        f.write(header(size=size, cluster_bits=9, l2_bits=6))
        f.truncate(48 + 512)
    qemu_io(
        image, "write -P 1 0 100k", "write -P 2 300k 1k", "write -P 3 1M 40k",
        "write -P 4 60k 10k", "write -P 5 1500k 200k", fmt="qcow",
    )  # fmt: skip
    expected = qemu_raw(image, tmp_path / "expected.raw").read_bytes()
    rng = random.Random(7)
    disk = open_disk(str(image), "qcow", read_only=True)
    try:
        for _ in range(300):
            offset = rng.randrange(size)
            length = rng.choice([1, 511, 4096, 33 * KiB, 200 * KiB, size])
            assert bytes(disk.read(offset, length)) == expected[offset : offset + length], (
                offset,
                length,
            )
    finally:
        disk.close()


def test_contiguous_run_past_the_file_end_is_corrupt(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow"
    qemu_img("create", "-q", "-f", "qcow", str(image), "4M")
    qemu_io(image, "write -P 5 0 8k", fmt="qcow")
    raw = image.read_bytes()
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0]
    second = struct.unpack_from(">Q", raw, l2 + 8)[0]
    assert second + 4096 == len(raw), "the second cluster is not the last in the file"
    # The third entry continues the run of the first two, one cluster past the file's end.
    bad = corrupt_copy(tmp_path, image, "past.qcow", [(l2 + 16, struct.pack(">Q", len(raw)))])
    disk = open_disk(str(bad), "qcow", read_only=True)
    try:
        assert bytes(disk.read(0, 8192)) == b"\x05" * 8192
        with pytest.raises(CorruptImage, match="outside the file"):
            disk.read(0, 16384)
    finally:
        disk.close()
