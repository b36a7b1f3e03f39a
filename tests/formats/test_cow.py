"""UML COW: files from uml_mkcow and from create(), written through the driver and through a
FUSE mount, then merged with uml_moo and compared with the bytes that should be there."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from imgfs.block.chain import chain_block_status
from imgfs.block.disk import open_disk
from imgfs.block.extent import Allocation
from imgfs.block.hostfile import CacheMode
from imgfs.errors import CorruptImage, ImgfsError, InvalidRequest, ReadOnly, Unsupported
from imgfs.formats.cow import CowDriver
from tests.oracle import assert_same_bytes, pattern_image

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512


def mkcow(cow: Path, backing: Path) -> None:
    subprocess.run(["uml_mkcow", "-f", str(cow), str(backing)], check=True,
                   capture_output=True, timeout=60)  # fmt: skip


def moo(cow: Path, out: Path) -> bytes:
    """uml_moo's merge of the COW file into a copy of its backing file (names resolved from
    the COW file's directory, as imgfs does)."""
    subprocess.run(["uml_moo", str(cow), str(out)], check=True, capture_output=True,
                   timeout=60, cwd=cow.parent)  # fmt: skip
    return out.read_bytes()


def random_writes(size: int, count: int, seed: int, max_len: int = 40 * KiB):
    rng = random.Random(seed)
    for _ in range(count):
        off = rng.randrange(size)
        n = rng.randrange(1, min(max_len, size - off) + 1)
        yield off, rng.randbytes(n)


def build_v2(path: Path, backing_name: str, size: int, sectors: dict[int, bytes]) -> None:
    """A version 2 COW file assembled from the layout (kernel's packed v2 header)."""
    mtime = int((path.parent / backing_name).stat().st_mtime)  # uml_moo checks it
    header = struct.pack(">II", 0x4F4F4F4D, 2) + backing_name.encode().ljust(4096, b"\0")
    header += struct.pack(">IQi", mtime, size, SECTOR)
    assert len(header) == 4120
    stored = (size + SECTOR - 1) // (8 * SECTOR)
    data_offset = -(-(4120 + stored) // SECTOR) * SECTOR
    body = bytearray(data_offset + size)
    body[:4120] = header
    for s, data in sectors.items():
        body[4120 + s // 8] |= 1 << (s % 8)
        body[data_offset + s * SECTOR : data_offset + s * SECTOR + len(data)] = data
    path.write_bytes(body)


def read_all(path: Path, fmt: str | None = "cow") -> bytes:
    disk = open_disk(str(path), fmt, read_only=True)
    try:
        return bytes(disk.read(0, disk.size))
    finally:
        disk.close()


def test_uml_mkcow_file_reads_its_backing_file(tmp_path: Path) -> None:
    base = pattern_image(tmp_path / "base.raw", 3 * MiB + 5 * SECTOR)
    mkcow(tmp_path / "disk.cow", tmp_path / "base.raw")
    disk = open_disk(str(tmp_path / "disk.cow"))  # probed
    try:
        assert disk.top.format_name == "cow"
        assert disk.size == len(base)
        assert bytes(disk.read(0, disk.size)) == base
        ext = chain_block_status(disk.top, 0, disk.size)
        assert ext.depth == 1 and ext.length == disk.size
        info = disk.top.info()
        assert info.backing_filename == str(tmp_path / "base.raw")
        assert info.notes == []
    finally:
        disk.close()


@pytest.mark.parametrize("cache", [CacheMode.WRITEBACK, CacheMode.NONE, CacheMode.DIRECTSYNC])
@pytest.mark.parametrize("size", [2 * MiB, 1_000_000])
def test_odd_writes_through_the_driver_merge_right_with_uml_moo(
    tmp_path: Path, size: int, cache: CacheMode
) -> None:
    expected = bytearray(pattern_image(tmp_path / "base.raw", size, seed=3))
    base_hash = hashlib.sha256(expected).hexdigest()
    mkcow(tmp_path / "disk.cow", tmp_path / "base.raw")
    disk = open_disk(str(tmp_path / "disk.cow"), "cow", cache=cache)
    try:
        for off, data in random_writes(size, 150, seed=size):
            disk.write(off, data)
            expected[off : off + len(data)] = data
        # the very last bytes (a partial sector when size is not a multiple of 512)
        disk.write(size - 3, b"end")
        expected[size - 3 :] = b"end"
        disk.flush()
        assert bytes(disk.read(0, size)) == expected
    finally:
        disk.close()
    assert read_all(tmp_path / "disk.cow") == expected
    merged = moo(tmp_path / "disk.cow", tmp_path / "merged.raw")
    # uml_moo copies whole sectors only: a partial last sector is left out of its output.
    whole = size - size % SECTOR
    assert merged[:whole] == expected[:whole]
    assert len(merged) in (whole, size)
    assert hashlib.sha256((tmp_path / "base.raw").read_bytes()).hexdigest() == base_hash


@pytest.mark.parametrize("size", [64 * KiB, 64 * KiB + 3 * SECTOR])
def test_version_2_files_read_and_write(tmp_path: Path, size: int) -> None:
    expected = bytearray(pattern_image(tmp_path / "base.raw", size, seed=8))
    sectors = {1: b"A" * SECTOR, 3: b"C" * SECTOR, 127: b"Y" * SECTOR}
    if size % (8 * SECTOR):
        # v2 sizes its bitmap rounding down: the bits of the last sectors live in the padding
        # before the data, where the UML kernel puts them. uml_moo ignores those bits, so it
        # is the oracle only for the sectors the stored bitmap covers.
        sectors[129] = b"Z" * SECTOR
    build_v2(tmp_path / "old.cow", "base.raw", size, sectors)
    for s, d in sectors.items():
        expected[s * SECTOR : (s + 1) * SECTOR] = d
    covered = (size + SECTOR - 1) // (8 * SECTOR) * 8 * SECTOR
    assert read_all(tmp_path / "old.cow", None) == expected
    assert moo(tmp_path / "old.cow", tmp_path / "m0.raw")[:covered] == expected[:covered]
    disk = open_disk(str(tmp_path / "old.cow"), "cow")
    try:
        for off, data in random_writes(size, 60, seed=2, max_len=3000):
            disk.write(off, data)
            expected[off : off + len(data)] = data
        disk.flush()
    finally:
        disk.close()
    assert read_all(tmp_path / "old.cow") == expected
    assert moo(tmp_path / "old.cow", tmp_path / "m1.raw")[:covered] == expected[:covered]


def test_create_writes_a_uml_compatible_v3_file(tmp_path: Path) -> None:
    size = 5 * MiB
    expected = bytearray(pattern_image(tmp_path / "base.raw", size, seed=4))
    CowDriver.create(str(tmp_path / "new.cow"), size, {"backing_file": "base.raw"})
    mkcow(tmp_path / "ref.cow", tmp_path / "base.raw")
    ours, ref = (tmp_path / "new.cow").read_bytes(), (tmp_path / "ref.cow").read_bytes()
    assert len(ours) == len(ref)
    assert ours[:32] == ref[:32]  # magic, version, mtime, size, sector size, alignment, format
    assert ours[32:40] == b"base.raw"
    assert read_all(tmp_path / "new.cow", None) == expected
    disk = open_disk(str(tmp_path / "new.cow"))
    try:
        for off, data in random_writes(size, 100, seed=9):
            disk.write(off, data)
            expected[off : off + len(data)] = data
        disk.flush()
    finally:
        disk.close()
    assert moo(tmp_path / "new.cow", tmp_path / "merged.raw") == expected


def test_flush_puts_the_bits_on_disk_and_info_notes_a_changed_backing_file(
    tmp_path: Path,
) -> None:
    pattern_image(tmp_path / "base.raw", 1 * MiB)
    CowDriver.create(str(tmp_path / "d.cow"), 1 * MiB, {"backing_file": "base.raw"})
    bitmap_offset = 8192  # the 4128-byte header rounded up to the 4 KiB alignment
    disk = open_disk(str(tmp_path / "d.cow"))
    try:
        disk.write(512 * 9 + 100, b"x" * 1000)  # sectors 9, 10 and 11
        on_disk = (tmp_path / "d.cow").read_bytes()[bitmap_offset : bitmap_offset + 2]
        assert on_disk == b"\0\0"  # the bits wait in the cache for the flush...
        disk.flush()
        on_disk = (tmp_path / "d.cow").read_bytes()[bitmap_offset : bitmap_offset + 2]
        assert on_disk == bytes([0b0000_0000, 0b0000_1110])  # ...which writes them
        assert disk.top.info().notes == []
        os.utime(tmp_path / "base.raw", (1_000_000, 1_000_000))
        assert "mtime" in disk.top.info().notes[0]
    finally:
        disk.close()


def test_create_options_are_checked(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(4096))
    with pytest.raises(InvalidRequest, match="backing_file"):
        CowDriver.create(str(tmp_path / "a.cow"), 4096, {})
    with pytest.raises(InvalidRequest, match="qcow2"):
        CowDriver.create(str(tmp_path / "a.cow"), 4096,
                         {"backing_file": "base.raw", "backing_fmt": "qcow2"})  # fmt: skip
    with pytest.raises(InvalidRequest, match="cluster_size"):
        CowDriver.create(str(tmp_path / "a.cow"), 4096,
                         {"backing_file": "base.raw", "cluster_size": "65536"})  # fmt: skip
    with pytest.raises(InvalidRequest, match="missing"):
        CowDriver.create(str(tmp_path / "a.cow"), 4096, {"backing_file": "missing.raw"})
    CowDriver.create(str(tmp_path / "a.cow"), 4096,
                     {"backing_file": "base.raw", "backing_fmt": "raw"})  # fmt: skip
    assert read_all(tmp_path / "a.cow") == bytes(4096)


def test_write_zeroes_and_discard(tmp_path: Path) -> None:
    size = 1 * MiB
    base = pattern_image(tmp_path / "base.raw", size, seed=6)
    expected = bytearray(base)
    mkcow(tmp_path / "disk.cow", tmp_path / "base.raw")
    disk = open_disk(str(tmp_path / "disk.cow"))
    try:
        disk.write(0, b"\xaa" * 200 * KiB)
        expected[: 200 * KiB] = b"\xaa" * 200 * KiB
        disk.top.write_zeroes(1000, 100_000, True)  # reads zeros, not the backing file's data
        expected[1000:101_000] = bytes(100_000)
        disk.top.write_zeroes(300 * KiB + 7, 13, False)
        expected[300 * KiB + 7 : 300 * KiB + 20] = bytes(13)
        disk.top.discard(150 * KiB + 100, 40 * KiB)  # whole sectors go back to the base
        lo, hi = 150 * KiB + 512, 190 * KiB + 100 - 100 % 512
        expected[lo:hi] = base[lo:hi]
        assert bytes(disk.read(0, size)) == expected
        disk.flush()
    finally:
        disk.close()
    assert moo(tmp_path / "disk.cow", tmp_path / "merged.raw") == expected


def test_concurrent_partial_writes_to_the_same_sectors(tmp_path: Path) -> None:
    size = 256 * KiB
    expected = bytearray(pattern_image(tmp_path / "base.raw", size, seed=1))
    mkcow(tmp_path / "disk.cow", tmp_path / "base.raw")
    disk = open_disk(str(tmp_path / "disk.cow"))

    # Each thread writes its own 64-byte slot of every sector: copy-on-write of one must not
    # undo another's bytes.
    def worker(slot: int) -> None:
        for s in range(size // SECTOR):
            disk.write(s * SECTOR + slot * 64, bytes([slot + 1]) * 64)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(0, 8, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(size // SECTOR):
        for slot in range(0, 8, 2):
            pos = s * SECTOR + slot * 64
            expected[pos : pos + 64] = bytes([slot + 1]) * 64
    try:
        assert bytes(disk.read(0, size)) == expected
        disk.flush()
    finally:
        disk.close()
    assert moo(tmp_path / "disk.cow", tmp_path / "merged.raw") == expected


def test_small_bitmap_cache_evicts_and_stays_right(tmp_path: Path) -> None:
    size = 96 * MiB  # a 24 KiB bitmap: six pages through a two-page cache
    with open(tmp_path / "base.raw", "wb") as f:
        f.truncate(size)
    mkcow(tmp_path / "disk.cow", tmp_path / "base.raw")
    writes = {off: os.urandom(1000) for off in range(12345, size - 1000, 7 * MiB + 333)}
    disk = open_disk(str(tmp_path / "disk.cow"), driver_options={"bitmap-cache-pages": "2"})
    try:
        for off, data in writes.items():
            disk.write(off, data)
        for off, data in writes.items():
            assert bytes(disk.read(off - 10, 1020)) == bytes(10) + data + bytes(10)
        assert len(disk.top._bitmap._pages) <= 2
        disk.flush()
    finally:
        disk.close()
    disk = open_disk(str(tmp_path / "disk.cow"), read_only=True)
    try:
        for off, data in writes.items():
            assert bytes(disk.read(off, 1000)) == data
        with pytest.raises(ReadOnly):
            disk.write(0, b"x")
    finally:
        disk.close()


def test_block_status_walks_a_big_sparse_disk(tmp_path: Path) -> None:
    size = 100 * 1024 * MiB  # a 25 MiB bitmap, all but two bits clear
    with open(tmp_path / "base.raw", "wb") as f:
        f.truncate(size)
    CowDriver.create(str(tmp_path / "big.cow"), size, {"backing_file": "base.raw"})
    disk = open_disk(str(tmp_path / "big.cow"))
    try:
        disk.write(size - 3 * MiB - 100, b"late")
        disk.write(7 * MiB, b"early")
        extents = []
        pos = 0
        while pos < size:
            ext = disk.top.block_status(pos, size - pos)
            extents.append((ext.offset, ext.length, ext.allocation))
            pos += ext.length
        late = size - 3 * MiB - 512
        assert extents == [
            (0, 7 * MiB, Allocation.UNALLOCATED),
            (7 * MiB, 512, Allocation.DATA),
            (7 * MiB + 512, late - 7 * MiB - 512, Allocation.UNALLOCATED),
            (late, 512, Allocation.DATA),
            (late + 512, size - late - 512, Allocation.UNALLOCATED),
        ]
        assert bytes(disk.read(size - 3 * MiB - 101, 6)) == b"\0late\0"
    finally:
        disk.close()


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_fuse_mount_writes_merge_right(images: Path, mount, tmp_path: Path, cache: str) -> None:
    size = 4 * MiB
    expected = bytearray(pattern_image(images / "base.raw", size, seed=12))
    CowDriver.create(str(images / "disk.cow"), size, {"backing_file": "base.raw"})
    m = mount(images, "--cache", cache)
    exported = m.file("disk.cow")
    assert exported.read_bytes() == expected
    fd = os.open(exported, os.O_RDWR)
    try:
        for off, data in random_writes(size, 80, seed=77, max_len=100 * KiB):
            os.pwrite(fd, data, off)
            expected[off : off + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    assert exported.read_bytes() == expected
    m.umount()
    (tmp_path / "expected.raw").write_bytes(expected)
    moo(images / "disk.cow", tmp_path / "merged.raw")
    assert_same_bytes(tmp_path / "merged.raw", tmp_path / "expected.raw")


# -- malformed files ------------------------------------------------------------------------


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "name, mutate, error",
    [
        ("truncated", lambda p: os.truncate(p, 100), CorruptImage),
        ("tiny", lambda p: os.truncate(p, 3), CorruptImage),
        ("bitmap-truncated", lambda p: os.truncate(p, 8200), CorruptImage),
        ("version-1", lambda p: patch(p, 0, struct.pack("<II", 0x4F4F4F4D, 1)), Unsupported),
        ("version-9", lambda p: patch(p, 4, struct.pack(">I", 9)), Unsupported),
        ("sector-0", lambda p: patch(p, 20, struct.pack(">I", 0)), CorruptImage),
        ("sector-1000", lambda p: patch(p, 20, struct.pack(">I", 1000)), CorruptImage),
        ("align-3", lambda p: patch(p, 24, struct.pack(">I", 3)), CorruptImage),
        ("align-huge", lambda p: patch(p, 24, struct.pack(">I", 1 << 31)), CorruptImage),
        ("format", lambda p: patch(p, 28, struct.pack(">I", 1)), Unsupported),
        ("size-huge", lambda p: patch(p, 12, struct.pack(">Q", 1 << 63)), CorruptImage),
        ("size-past-eof", lambda p: patch(p, 12, struct.pack(">Q", 1 << 50)), CorruptImage),
        ("no-name", lambda p: patch(p, 32, b"\0"), CorruptImage),
        ("missing-backing", lambda p: patch(p, 32, b"nope.raw\0"), CorruptImage),
    ],
)
def test_malformed_files(tmp_path: Path, name: str, mutate, error: type[ImgfsError]) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(64 * KiB))
    CowDriver.create(str(tmp_path / "bad.cow"), 64 * KiB, {"backing_file": "base.raw"})
    mutate(tmp_path / "bad.cow")
    with pytest.raises(error) as e:
        open_disk(str(tmp_path / "bad.cow"), "cow", read_only=True)
    assert "\n" not in str(e.value)


def test_probe_tells_cow_from_raw(tmp_path: Path) -> None:
    with open(tmp_path / "base.raw", "wb") as f:
        f.truncate(8192)  # a hole: the backing layer reports zeros
    CowDriver.create(str(tmp_path / "d.cow"), 8192, {"backing_file": "base.raw"})
    disk = open_disk(str(tmp_path / "d.cow"), read_only=True)
    try:
        assert disk.top.format_name == "cow"
        assert disk.top.backing is not None and disk.top.backing.format_name == "raw"
        assert chain_block_status(disk.top, 0, 8192).allocation is Allocation.ZERO
    finally:
        disk.close()
