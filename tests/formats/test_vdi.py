"""VDI: qemu-img as the oracle for reads, writes, create, and hostile headers."""

from __future__ import annotations

import gzip
import lzma
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.block.driver import RepairMode
from imgfs.block.extent import Allocation
from imgfs.block.hostfile import CacheMode
from imgfs.errors import CorruptImage, InvalidRequest, Unsupported
from imgfs.formats.vdi import VdiDriver
from tests.conftest import SHARED
from tests.oracle import (
    assert_export_matches_qemu,
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    assert_same_bytes,
    qemu_check,
    qemu_img,
    qemu_info,
    qemu_raw,
    sha256_file,
)

MiB = 1024 * 1024
CORPUS = SHARED / "corpus" / "vdi"


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "vdi"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True, timeout=120)


def export(image: Path, out: Path, fmt: str | None = "vdi") -> Path:
    disk = open_disk(str(image), fmt, read_only=True)
    try:
        with open(out, "wb") as f:
            for off in range(0, disk.size, 4 * MiB):
                f.write(disk.read(off, 4 * MiB))
    finally:
        disk.close()
    return out


def qemu_vdi(path: Path, size: int, static: bool = False) -> Path:
    qemu_img("create", "-q", "-f", "vdi", "-o", f"static={'on' if static else 'off'}", str(path),
             str(size))  # fmt: skip
    return path


def random_writes(disk, expected: bytearray, seed: int, count: int, max_len: int) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        off = rng.randrange(disk.size)
        n = min(rng.randrange(1, max_len), disk.size - off)
        data = rng.randbytes(n)
        assert disk.write(off, data) == n
        expected[off : off + n] = data


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("size", [5 * MiB, 7 * MiB + 512, 1 * MiB])
def test_qemu_images_export_like_qemu(tmp_path: Path, static: bool, size: int) -> None:
    image = qemu_vdi(tmp_path / "disk.vdi", size, static)
    rng = random.Random(size)
    cmds = []
    for i in range(12):
        n = rng.choice([512, 4096, 70000 // 512 * 512])
        off = rng.randrange(0, size - n) // 512 * 512
        cmds.append(f"write -P {i + 1} {off} {n}")
    qemu_io(image, *cmds)
    exported = export(image, tmp_path / "out.raw")
    assert_export_matches_qemu(image, exported, tmp_path, "vdi")


@pytest.mark.parametrize(
    "name, opener, raw_sha",
    [
        (
            "dissect-hypervisor/basic.vdi.gz",
            gzip.open,
            "92d551781f9b62f3c8601ffd375cc7547efb1127e3cd2acc652f50f2d31afb8c",
        ),
        (
            "yvhdt/test.vdi.xz",
            lzma.open,
            "bb9f8df61474d25e71fa00722318cd387396ca1736605e1248821cc0de3d3af8",
        ),
    ],
)
def test_corpus(tmp_path: Path, name: str, opener, raw_sha: str) -> None:
    image = tmp_path / "corpus.vdi"
    with opener(CORPUS / name) as src, open(image, "wb") as dst:
        shutil.copyfileobj(src, dst)
    exported = export(image, tmp_path / "out.raw", None)  # probed as vdi
    assert sha256_file(exported) == raw_sha  # MANIFEST's raw sha256
    assert_export_matches_qemu(image, exported, tmp_path)


def test_virtualbox_image_is_writable_and_stays_consistent(tmp_path: Path) -> None:
    image = tmp_path / "vbox.vdi"
    with lzma.open(CORPUS / "yvhdt/test.vdi.xz") as src, open(image, "wb") as dst:
        shutil.copyfileobj(src, dst)
    disk = open_disk(str(image), "vdi")
    expected = bytearray(disk.size)
    random_writes(disk, expected, 7, 30, 200_000)
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "vdi")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vdi")


@pytest.mark.parametrize("producer", ["qemu", "imgfs"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_random_writes_then_qemu_check_and_compare(
    tmp_path: Path, producer: str, static: bool
) -> None:
    image = tmp_path / "disk.vdi"
    size = 9 * MiB + 512 * 3
    if producer == "qemu":
        qemu_vdi(image, size, static)
    else:
        VdiDriver.create(str(image), size, {"static": "on" if static else "off"})
        assert_qemu_check_clean(image, "vdi")
    disk = open_disk(str(image), "vdi")
    expected = bytearray(disk.size)
    random_writes(disk, expected, 3, 60, 300_000)
    assert disk.read(0, disk.size) == expected
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "vdi")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vdi")
    info = qemu_info(image, "vdi")
    assert info["virtual-size"] == len(expected)


def test_create_options(tmp_path: Path) -> None:
    VdiDriver.create(str(tmp_path / "d.vdi"), 3 * MiB, {})
    VdiDriver.create(str(tmp_path / "s.vdi"), 3 * MiB, {"static": "on", "preallocation": "full"})
    for name in ("d.vdi", "s.vdi"):
        assert qemu_info(tmp_path / name)["format"] == "vdi"
        assert_qemu_check_clean(tmp_path / name, "vdi")
    # static with full preallocation really reserves the data area; dynamic holds no data
    assert os.stat(tmp_path / "s.vdi").st_blocks * 512 >= 3 * MiB
    assert os.stat(tmp_path / "d.vdi").st_size < MiB + 4096
    with pytest.raises(InvalidRequest, match="cluster_size"):
        VdiDriver.create(str(tmp_path / "x.vdi"), MiB, {"cluster_size": "64k"})
    with pytest.raises(InvalidRequest, match="static"):
        VdiDriver.create(str(tmp_path / "x.vdi"), MiB, {"static": "maybe"})


def test_unflushed_writes_leave_the_on_disk_image_consistent(tmp_path: Path) -> None:
    """Data reaches the file before the block map: a copy taken before flush is a consistent
    image holding the old contents (new blocks unreferenced)."""
    image = qemu_vdi(tmp_path / "disk.vdi", 4 * MiB)
    qemu_io(image, "write -P 0x11 0 64k")
    before = qemu_raw(image, tmp_path / "before.raw", "vdi")
    disk = open_disk(str(image), "vdi")
    disk.write(2 * MiB + 5, b"new block" * 1000)
    disk.write(100, b"old block rewritten")
    crash = tmp_path / "crash.vdi"
    shutil.copyfile(image, crash)
    disk.close()
    assert_qemu_check_clean(crash, "vdi")
    expected = bytearray(before.read_bytes())
    expected[100 : 100 + 19] = b"old block rewritten"  # in-place data writes land at once
    (tmp_path / "crash-expected.raw").write_bytes(expected)
    assert_qemu_compare_identical(crash, tmp_path / "crash-expected.raw", "vdi")


def test_discard_and_write_zeroes(tmp_path: Path) -> None:
    image = qemu_vdi(tmp_path / "disk.vdi", 6 * MiB)
    qemu_io(image, "write -P 0x22 0 6M")
    disk = open_disk(str(image), "vdi")
    used = os.stat(image).st_blocks
    disk.discard(MiB, 2 * MiB)  # two whole blocks: host space freed
    disk.discard(4 * MiB + 512, 4096)  # partial: kept (allowed)
    disk.write_zeroes(5 * MiB + 1000, 3000)
    disk.flush()
    assert os.stat(image).st_blocks <= used - (2 * MiB - 64 * 1024) // 512  # ~2 MiB freed
    assert disk.block_status(0, 6 * MiB).allocation is Allocation.DATA
    hole = disk.block_status(MiB + MiB // 2, MiB)
    assert hole.allocation is Allocation.ZERO and hole.length >= MiB // 2 - 4096
    expected = bytearray(b"\x22" * 6 * MiB)
    expected[MiB : 3 * MiB] = bytes(2 * MiB)
    expected[5 * MiB + 1000 : 5 * MiB + 4000] = bytes(3000)
    assert disk.read(0, 6 * MiB) == expected
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "vdi")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vdi")


def test_block_status(tmp_path: Path) -> None:
    image = qemu_vdi(tmp_path / "disk.vdi", 4 * MiB)
    qemu_io(image, "write -P 1 1M 1M", "write -P 2 2M 1M")
    disk = open_disk(str(image), "vdi", read_only=True)
    try:
        first = disk.block_status(0, 4 * MiB)
        assert (first.allocation, first.length) == (Allocation.UNALLOCATED, MiB)
        data = disk.block_status(MiB, 3 * MiB)
        assert (data.allocation, data.length) == (Allocation.DATA, 2 * MiB)
    finally:
        disk.close()


def test_through_fuse_mount(tmp_path: Path, images: Path, mount) -> None:
    image = images / "disk.vdi"
    VdiDriver.create(str(image), 8 * MiB, {})
    qemu_io(image, "write -P 0x5a 3M 100k")
    expected = bytearray(qemu_raw(image, tmp_path / "start.raw", "vdi").read_bytes())
    m = mount(images)
    exported = m.file("disk.vdi")
    assert exported.stat().st_size == 8 * MiB
    rng = random.Random(11)
    fd = os.open(exported, os.O_RDWR)
    try:
        for _ in range(40):
            off = rng.randrange(8 * MiB - 1)
            data = rng.randbytes(min(rng.randrange(1, 200_000), 8 * MiB - off))
            assert os.pwrite(fd, data, off) == len(data)
            expected[off : off + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    assert exported.read_bytes() == expected
    m.umount()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "vdi")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vdi")


def test_export_through_mount_matches_qemu(tmp_path: Path, images: Path, mount) -> None:
    image = qemu_vdi(images / "disk.vdi", 5 * MiB, static=True)
    qemu_io(image, "write -P 7 777k 1M", "write -P 9 4M 512")
    m = mount(images, "--read-only")
    assert_export_matches_qemu(image, m.file("disk.vdi"), tmp_path, "vdi")
    m.umount()


# -- hostile and unsupported headers ----------------------------------------------------------


def _patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _open_fails(path: Path, error: type[Exception], match: str) -> None:
    start = time.monotonic()
    with pytest.raises(error, match=match):
        open_disk(str(path), "vdi").close()
    assert time.monotonic() - start < 2


def test_truncated_header(tmp_path: Path) -> None:
    image = qemu_vdi(tmp_path / "disk.vdi", MiB)
    os.truncate(image, 300)
    _open_fails(image, CorruptImage, "shorter than its header")


def test_bad_version_is_unsupported(tmp_path: Path) -> None:
    image = qemu_vdi(tmp_path / "disk.vdi", MiB)
    _patch(image, 0x44, "<I", 0x00010000)
    _open_fails(image, Unsupported, "VDI version 1.0")


def test_differencing_image_is_unsupported(tmp_path: Path) -> None:
    image = qemu_vdi(tmp_path / "disk.vdi", MiB)
    _patch(image, 0x4C, "<I", 4)
    _open_fails(image, Unsupported, "differencing")


@pytest.mark.parametrize(
    "offset, fmt, value, match",
    [
        (0x180, "<I", 0x3FFFFFFF, "map|overlaps|blocks"),  # blocks in image
        (0x180, "<I", 0xFFFFFFFF, "limit"),
        (0x178, "<I", 3 * 512, "block size"),
        (0x178, "<I", 0, "block size"),
        (0x170, "<Q", 1 << 62, "disk size"),
        (0x154, "<I", 0x7FFFFE00, "header size|overlaps"),  # offset_blocks
        (0x184, "<I", 99, "allocated"),
    ],
)
def test_hostile_fields(tmp_path: Path, offset: int, fmt: str, value: int, match: str) -> None:
    image = qemu_vdi(tmp_path / "disk.vdi", 4 * MiB)
    _patch(image, offset, fmt, value)
    _open_fails(image, CorruptImage, match)


def test_huge_map_that_fits_the_header_but_not_the_file(tmp_path: Path) -> None:
    image = qemu_vdi(tmp_path / "disk.vdi", 4 * MiB)
    _patch(image, 0x158, "<I", 0x40000000)  # offset_data far away so the map "fits"
    _patch(image, 0x170, "<Q", 0x8000000 * MiB)
    _patch(image, 0x180, "<I", 0x8000000)
    _open_fails(image, CorruptImage, "past the end of the file|limit")


def test_bad_map_entry_reads_as_corrupt(tmp_path: Path) -> None:
    image = qemu_vdi(tmp_path / "disk.vdi", 2 * MiB)
    _patch(image, 0x200, "<I", 7)  # block 0 -> data index 7 of a 2-block image
    disk = open_disk(str(image), "vdi", read_only=True)
    try:
        with pytest.raises(CorruptImage, match="entry 7"):
            disk.read(0, 512)
        assert disk.read(MiB, 512) == bytes(512)
    finally:
        disk.close()


def test_export_matches_raw_file_byte_for_byte(tmp_path: Path) -> None:
    """The whole export of a qemu-written image equals qemu's raw conversion."""
    image = qemu_vdi(tmp_path / "disk.vdi", 3 * MiB)
    qemu_io(image, "write -P 0xcc 1536k 1k")
    assert_same_bytes(export(image, tmp_path / "a.raw"), qemu_raw(image, tmp_path / "b.raw"))


@pytest.mark.parametrize("cache", [CacheMode.NONE, CacheMode.DIRECTSYNC])
def test_writes_with_o_direct(tmp_path: Path, cache: CacheMode) -> None:
    image = tmp_path / "disk.vdi"
    VdiDriver.create(str(image), 5 * MiB + 512, {})
    disk = open_disk(str(image), "vdi", cache=cache)
    expected = bytearray(disk.size)
    random_writes(disk, expected, 21, 25, 150_000)
    assert disk.read(0, disk.size) == expected
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "vdi")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vdi")


def test_multi_terabyte_disk(tmp_path: Path) -> None:
    """Offsets past 2**32 sectors and a table of millions of entries."""
    image = tmp_path / "big.vdi"
    size = 3 << 40
    VdiDriver.create(str(image), size, {})
    disk = open_disk(str(image), "vdi")
    disk.write(size - 5, b"hello")
    disk.write((2 << 40) + 12345, b"world" * 1000)
    disk.close()
    assert_qemu_check_clean(image, "vdi")
    assert os.stat(image).st_blocks * 512 < 32 * MiB
    out = subprocess.run(
        ["qemu-io", "-f", "vdi", "-r", "-c", f"read -P 0 {size - MiB} {MiB - 5}",
         "-c", f"read -v {size - 5} 5", str(image)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "hello" in out and "failed" not in out


def test_concurrent_writers(tmp_path: Path) -> None:
    """Threads writing interleaved 4 KiB pieces of the same blocks: every allocation happens
    once and no write is lost."""
    image = tmp_path / "disk.vdi"
    size = 4 * MiB
    VdiDriver.create(str(image), size, {})
    disk = open_disk(str(image), "vdi")
    expected = bytearray(size)
    pieces = [(off, bytes([1 + off // 4096 % 250]) * 4096) for off in range(0, size, 4096)]
    random.Random(2).shuffle(pieces)
    for off, data in pieces:
        expected[off : off + 4096] = data

    def worker(k: int) -> None:
        for off, data in pieces[k::4]:
            disk.write(off, data)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert disk.read(0, size) == expected
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "vdi")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vdi")


def test_check_and_repair_of_the_allocated_count(tmp_path: Path) -> None:
    """A header that counts a block the map does not name (a crash between the two writes)
    is found by check, as by qemu-img check, and repaired."""
    image = qemu_vdi(tmp_path / "disk.vdi", 4 * MiB)
    qemu_io(image, "write -P 3 1M 64k")
    _patch(image, 0x184, "<I", 2)
    assert qemu_check(image, "vdi")[0] == 2
    disk = open_disk(str(image), "vdi")
    try:
        assert disk.check(RepairMode.NONE).corruptions == 1
        result = disk.check(RepairMode.ALL)
        assert (result.corruptions, result.corruptions_fixed) == (0, 1)
        disk.write(3 * MiB, b"after repair")
    finally:
        disk.close()
    assert_qemu_check_clean(image, "vdi")
    expected = bytearray(4 * MiB)
    expected[MiB : MiB + 64 * 1024] = b"\x03" * 64 * 1024
    expected[3 * MiB : 3 * MiB + 12] = b"after repair"
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vdi")
