"""asif (Apple Sparse Image Format): the corpus image against its known content, hand-built
images for every understood chunk state, and malformed images."""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.block.extent import Allocation
from imgfs.errors import CorruptImage, Unsupported
from imgfs.formats import asif as asifmod
from tests.conftest import SHARED

CORPUS_GZ = SHARED / "corpus/asif/dissect-hypervisor/basic.asif.gz"
MiB = 1024 * 1024
SECTOR = 512
# basic.asif (macOS diskutil): a 512,000,000-byte disk whose MiB number i (i < 255) is filled
# with the byte i, the rest unwritten; dissect.hypervisor's test checks the first 100 MiB and
# the metadata's stable uuid. The whole-disk hash below is of that content.
BASIC_SIZE = 512_000_000
BASIC_WRITTEN_MIB = 255
BASIC_STABLE_UUID = "13db9632-b79f-4e95-aada-835d5ef97bba"


def basic_expected_sha() -> str:
    h = hashlib.sha256()
    for i in range(-(-BASIC_SIZE // MiB)):
        n = min(MiB, BASIC_SIZE - i * MiB)
        h.update(bytes([i]) * n if i < BASIC_WRITTEN_MIB else bytes(n))
    return h.hexdigest()


@pytest.fixture(scope="module")
def basic_asif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("asif") / "basic.asif"
    with gzip.open(CORPUS_GZ, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 4 * MiB)
    return out


def test_corpus_image_exports_its_content(basic_asif: Path) -> None:
    disk = open_disk(str(basic_asif), read_only=True)  # probed
    try:
        assert type(disk.top).__name__ == "AsifDriver"
        assert disk.size == BASIC_SIZE
        h = hashlib.sha256()
        for off in range(0, disk.size, 4 * MiB):
            h.update(disk.read(off, 4 * MiB))
        assert h.hexdigest() == basic_expected_sha()
        assert disk.read(3 * MiB - 3, 6) == b"\x02\x02\x02\x03\x03\x03"
        ext = disk.block_status(0, disk.size)
        assert ext.allocation is Allocation.DATA and ext.length == MiB
        ext = disk.block_status(BASIC_WRITTEN_MIB * MiB, disk.size - BASIC_WRITTEN_MIB * MiB)
        assert ext.allocation is Allocation.ZERO
        assert ext.length == disk.size - BASIC_WRITTEN_MIB * MiB
        info = disk.info()[0]
        assert info.format_specific["stable-uuid"] == BASIC_STABLE_UUID
        assert info.format_specific["directory-sequence"] == 2
        assert info.cluster_size == MiB
        assert any("ignored" in n for n in info.notes)
    finally:
        disk.close()


# -- hand-built images -----------------------------------------------------------------------------


class AsifBuilder:
    """Assembles an ASIF file chunk by chunk, laid out as the format describes."""

    def __init__(self, chunk: int, sectors: int, max_sectors: int | None = None) -> None:
        self.chunk = chunk
        self.sectors = sectors
        self.max_sectors = max_sectors if max_sectors is not None else sectors
        self.per_group = 4 * SECTOR
        self.groups = chunk // (8 * (self.per_group + 1))
        self.per_table = self.groups * self.per_group
        max_chunks = -(-self.max_sectors * SECTOR // chunk)
        self.n_tables = -(-max_chunks // self.per_table)
        self.chunks: list[bytearray] = [bytearray(chunk)]  # chunk 0: header and directories
        self.directory = [0] * self.n_tables
        self.tables: dict[int, int] = {}  # table index -> chunk
        self.bitmaps: dict[tuple[int, int], int] = {}  # (table, group) -> chunk
        self.meta_chunk = 0

    def alloc(self) -> int:
        self.chunks.append(bytearray(self.chunk))
        return len(self.chunks) - 1

    def _slot(self, logical: int) -> tuple[int, int, int]:
        table, within = divmod(logical, self.per_table)
        if table not in self.tables:
            self.tables[table] = self.alloc()
            self.directory[table] = self.tables[table]
        group, slot = divmod(within, self.per_group)
        return table, group, slot

    def set_entry(self, logical: int, entry: int) -> None:
        table, group, slot = self._slot(logical)
        struct.pack_into(
            ">Q", self.chunks[self.tables[table]], 8 * (group * (self.per_group + 1) + slot), entry
        )

    def write_full(self, logical: int, data: bytes) -> None:
        phys = self.alloc()
        self.chunks[phys][: len(data)] = data
        self.set_entry(logical, (0b01 << 62) | phys)

    def write_partial(self, logical: int, sectors: dict[int, bytes], state: int = 0b01) -> None:
        """Write some sectors of a chunk; the others stay unwritten in the bitmap."""
        table, group, slot = self._slot(logical)
        phys = self.alloc()
        if (table, group) not in self.bitmaps:
            bitmap = self.alloc()
            self.bitmaps[table, group] = bitmap
            struct.pack_into(
                ">Q",
                self.chunks[self.tables[table]],
                8 * (group * (self.per_group + 1) + self.per_group),
                bitmap,
            )
        bitmap = self.chunks[self.bitmaps[table, group]]
        for sector, data in sectors.items():
            assert len(data) == SECTOR
            self.chunks[phys][sector * SECTOR : (sector + 1) * SECTOR] = data
            index = slot * (self.chunk // SECTOR) + sector
            bitmap[index // 4] |= state << (2 * (index % 4))
        self.set_entry(logical, (0b11 << 62) | phys)

    def write_metadata(self, logical: int, stable_uuid: str) -> None:
        text = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict>'
            "<key>internal metadata</key><dict><key>stable uuid</key>"
            f"<string>{stable_uuid}</string></dict><key>user metadata</key><dict>"
            "<key>note</key><string>x</string></dict></dict></plist>\n"
        ).encode()
        block = bytearray(2 * SECTOR)
        block[:20] = asifmod.META.pack(b"meta", 1, 512, 512)
        block[512 : 512 + len(text)] = text
        self.write_partial(logical, {0: bytes(block[:512]), 1: bytes(block[512:])})
        self.meta_chunk = logical

    def save(self, path: Path, stale_directory: dict[int, int] | None = None) -> None:
        dir_bytes = 8 + 8 * self.n_tables
        dir0, dir1 = SECTOR, SECTOR + ((dir_bytes + SECTOR - 1) // SECTOR) * SECTOR
        assert dir1 + dir_bytes <= self.chunk
        head = self.chunks[0]
        head[: asifmod.HEADER.size] = asifmod.HEADER.pack(
            b"shdw", 1, 512, 0, dir0, dir1, bytes(range(16)), self.sectors, self.max_sectors,
            self.chunk, SECTOR, 0, self.meta_chunk,
        )  # fmt: skip
        # The current directory (sequence 5) second, a stale one (sequence 4) first: the
        # driver must pick by sequence, not by position.
        stale = [0] * self.n_tables
        for index, chunk in (stale_directory or {}).items():
            stale[index] = chunk
        head[dir0 : dir0 + dir_bytes] = struct.pack(f">Q{self.n_tables}Q", 4, *stale)
        head[dir1 : dir1 + dir_bytes] = struct.pack(f">Q{self.n_tables}Q", 5, *self.directory)
        path.write_bytes(b"".join(self.chunks))


CHUNK = 64 * 1024


def pattern(n: int, seed: int) -> bytes:
    return (f"<asif {seed}>".encode() * (n // 8 + 1))[:n]


class Expected:
    """The content of a mostly-empty disk: its size and the written pieces."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pieces: dict[int, bytes] = {}

    def put(self, offset: int, data: bytes) -> None:
        self.pieces[offset] = data

    def slice(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for at, data in self.pieces.items():
            lo, hi = max(at, offset), min(at + len(data), offset + length)
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - at : hi - at]
        return bytes(out)

    def sha256(self, step: int = 8 * MiB) -> str:
        h = hashlib.sha256()
        for off in range(0, self.size, step):
            h.update(self.slice(off, min(step, self.size - off)))
        return h.hexdigest()


def sha256_of(read, size: int, step: int = 8 * MiB) -> str:
    h = hashlib.sha256()
    for off in range(0, size, step):
        h.update(read(off, min(step, size - off)))
    return h.hexdigest()


def built_image(path: Path) -> Expected:
    """Three tables' worth of address space: the disk spans table 0 and part of table 1 (which
    is absent: never written), the metadata sits in table 2 past the end of the disk. Full,
    partial and unallocated chunks."""
    per_table_bytes = AsifBuilder(CHUNK, sectors=0).per_table * CHUNK
    size = per_table_bytes + 10 * CHUNK
    b = AsifBuilder(CHUNK, sectors=size // SECTOR, max_sectors=3 * per_table_bytes // SECTOR)
    expected = Expected(size)
    for logical in (0, 2):
        b.write_full(logical, pattern(CHUNK, logical))
        expected.put(logical * CHUNK, pattern(CHUNK, logical))
    partial = {0: pattern(SECTOR, 30), 1: pattern(SECTOR, 31), 7: pattern(SECTOR, 37),
               127: pattern(SECTOR, 127)}  # fmt: skip
    b.write_partial(3, partial)
    for sector, data in partial.items():
        expected.put(3 * CHUNK + sector * SECTOR, data)
    # Chunk 2048 is in the second chunk group of table 0 (its own bitmap chunk).
    b.write_partial(2048, {5: pattern(SECTOR, 5)})
    expected.put(2048 * CHUNK + 5 * SECTOR, pattern(SECTOR, 5))
    b.write_metadata(3 * b.per_table - 1, "00000000-1111-2222-3333-444444444444")
    assert 1 not in b.tables
    b.save(path, stale_directory={0: 3})  # the stale directory points at a data chunk
    return expected


def test_built_image_reads_back(tmp_path: Path) -> None:
    image = tmp_path / "b.asif"
    expected = built_image(image)
    disk = open_disk(str(image), read_only=True)
    try:
        assert type(disk.top).__name__ == "AsifDriver"
        assert disk.size == expected.size
        for off, n in [(0, 1), (CHUNK - 3, 7), (3 * CHUNK, CHUNK), (3 * CHUNK + 500, 3000),
                       (2048 * CHUNK, 4 * SECTOR), (expected.size - 5 * CHUNK, 5 * CHUNK),
                       (0, 4 * CHUNK)]:  # fmt: skip
            assert disk.read(off, n) == expected.slice(off, n), (off, n)
        assert sha256_of(disk.read, disk.size) == expected.sha256()
        # block status: full chunk DATA with its host offset; partial chunks per sector.
        ext = disk.block_status(0, 10 * CHUNK)
        assert (ext.allocation, ext.length) == (Allocation.DATA, CHUNK)
        assert ext.host_offset is not None and ext.host_offset % CHUNK == 0
        ext = disk.block_status(CHUNK, 10 * CHUNK)
        assert (ext.allocation, ext.length) == (Allocation.ZERO, CHUNK)
        ext = disk.block_status(3 * CHUNK, CHUNK)
        assert (ext.allocation, ext.length) == (Allocation.DATA, 2 * SECTOR)
        ext = disk.block_status(3 * CHUNK + 2 * SECTOR, CHUNK)
        assert (ext.allocation, ext.length) == (Allocation.ZERO, 5 * SECTOR)
        ext = disk.block_status(4 * CHUNK, expected.size - 4 * CHUNK)
        assert ext.allocation is Allocation.ZERO and ext.length == 2044 * CHUNK + 5 * SECTOR
        # From the last written sector to the end (through the absent table): one zero extent.
        last = 2048 * CHUNK + 6 * SECTOR
        ext = disk.block_status(last, expected.size - last)
        assert (ext.allocation, ext.length) == (Allocation.ZERO, expected.size - last)
        info = disk.info()[0].format_specific
        assert info["stable-uuid"] == "00000000-1111-2222-3333-444444444444"
        assert info["user-metadata-keys"] == ["note"]
        assert info["directory-sequence"] == 5
    finally:
        disk.close()


def expect_error(path: Path, error: type[Exception], match: str, at: int = 0) -> None:
    start = time.monotonic()
    with pytest.raises(error, match=match):
        disk = open_disk(str(path), "asif", read_only=True)
        try:
            disk.read(at, CHUNK)
        finally:
            disk.close()
    assert time.monotonic() - start < 2


def test_uncharacterised_states_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "s.asif"
    b = AsifBuilder(CHUNK, sectors=64 * CHUNK // SECTOR)
    b.write_full(0, pattern(CHUNK, 0))
    b.set_entry(1, (0b10 << 62) | 1)
    b.set_entry(2, 1)  # state 00 with a chunk number
    b.write_partial(3, {4: pattern(SECTOR, 4)}, state=0b10)
    b.set_entry(4, (0b01 << 62) | 999)  # past the end of the file
    b.save(image)
    expect_error(image, Unsupported, "state 10", at=CHUNK)
    expect_error(image, Unsupported, "state 00 with a chunk number", at=2 * CHUNK)
    expect_error(image, Unsupported, "bitmap state 10", at=3 * CHUNK + 4 * SECTOR)
    expect_error(image, CorruptImage, "points to chunk 999", at=4 * CHUNK)
    disk = open_disk(str(image), "asif", read_only=True)
    try:  # what is understood still reads
        assert disk.read(0, CHUNK) == pattern(CHUNK, 0)
        assert disk.read(3 * CHUNK, 4 * SECTOR) == bytes(4 * SECTOR)
    finally:
        disk.close()


def test_malformed_headers(tmp_path: Path) -> None:
    image = tmp_path / "h.asif"
    b = AsifBuilder(CHUNK, sectors=64 * CHUNK // SECTOR)
    b.write_full(0, pattern(CHUNK, 0))
    b.save(image)
    good = image.read_bytes()

    def patched(offset: int, fmt: str, value: int) -> None:
        data = bytearray(good)
        struct.pack_into(fmt, data, offset, value)
        image.write_bytes(bytes(data))

    patched(0, ">I", 0x12345678)
    expect_error(image, CorruptImage, "bad ASIF magic")
    patched(4, ">I", 2)
    expect_error(image, Unsupported, "ASIF version 2")
    patched(0x40, ">I", 100_000)
    expect_error(image, Unsupported, "chunk size 100000")
    patched(0x44, ">H", 4096)
    expect_error(image, Unsupported, "sector size 4096")
    patched(0x18, ">Q", 1 << 40)
    expect_error(image, CorruptImage, "directory at 1099511627776")
    patched(0x30, ">Q", 1 << 40)  # more sectors than the maximum
    expect_error(image, CorruptImage, "out of range")
    # A huge maximum size means a huge directory: refused before anything is read.
    data = bytearray(good)
    struct.pack_into(">QQ", data, 0x30, 1 << 50, 1 << 53)
    image.write_bytes(bytes(data))
    expect_error(image, CorruptImage, "directory of .* bytes is too large")
    image.write_bytes(good[:40])
    expect_error(image, CorruptImage, "too small")
    # A table chunk past the end of the file.
    data = bytearray(good)
    dir1 = struct.unpack_from(">Q", data, 0x18)[0]
    struct.pack_into(">Q", data, dir1 + 8, 10**6)
    image.write_bytes(bytes(data))
    expect_error(image, CorruptImage, "past the end of the file")


# -- through a real FUSE mount ---------------------------------------------------------------------


def test_fuse_export_is_read_only_and_correct(
    images: Path, mount, basic_asif: Path, tmp_path: Path
) -> None:
    expected = built_image(images / "built.asif")
    shutil.copyfile(basic_asif, images / "basic.asif")
    os.chmod(images / "basic.asif", 0o644)
    m = mount(images)
    built = m.file("built.asif")
    assert os.stat(built).st_mode & 0o222 == 0
    with open(built, "rb") as f:
        assert sha256_of(lambda off, n: os.pread(f.fileno(), n, off), expected.size) == (
            expected.sha256()
        )
    basic = m.file("basic.asif")
    st = os.stat(basic)
    assert st.st_size == BASIC_SIZE and st.st_mode & 0o222 == 0, oct(st.st_mode)
    with open(basic, "rb") as f:
        for i in (0, 1, 99, 254, 255, 400):
            f.seek(i * MiB)
            assert f.read(MiB) == (bytes([i]) * MiB if i < BASIC_WRITTEN_MIB else bytes(MiB))
    with pytest.raises(OSError) as e:
        os.open(basic, os.O_WRONLY)
    assert e.value.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
    m.umount()
