"""cow: User-Mode Linux copy-on-write files (``uml_mkcow``, the ``ubd`` driver). Read and write.

Every number is big-endian. Version 3 (what ``uml_mkcow`` writes), packed:

    magic u32 (0x4f4f4f4d) | version u32 | mtime u32 | size u64 | sectorsize u32 |
    alignment u32 | cow_format u32 (0 = bitmap) | backing_file char[4096]

The bitmap starts at the header size rounded up to ``alignment`` and holds one bit per sector
(least significant bit first); the data area starts after it, rounded up to ``alignment`` again,
and holds sector ``i`` at ``data + i * sectorsize``. Version 2, packed:

    magic u32 | version u32 | backing_file char[4096] | mtime u32 | size u64 | sectorsize s32

with the bitmap right after the header (4120 bytes) and the data rounded up to a sector; its
bitmap length is computed as ``(size + sectorsize - 1) // (8 * sectorsize)``, which rounds the
wrong way, so the last bits may live in the padding before the data.

A set bit means the sector is in this file; a clear bit reads the backing file (always raw).
Writes put the data in place and then set the bits; partial sectors are first filled from the
backing file. Bitmap pages are cached (bounded) and written back by ``flush`` after the data is
synced, so a bit never reaches the disk before its sector.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Self

from imgfs.block.driver import BackingSpec, BlockDriver, ImageInfo, OpenOptions, ProbeInput
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, InvalidRequest, Unsupported

MAGIC = 0x4F4F4F4D
MAGIC_BE = struct.pack(">I", MAGIC)  # "OOOM": versions 2 and 3
MAGIC_LE = struct.pack("<I", MAGIC)  # version 1 used the host's byte order
COMMON = struct.Struct(">II")  # magic, version
PATH_LEN = 4096
V2_TAIL = struct.Struct(">IQi")  # mtime, size, sectorsize (after the backing file name)
V2_SIZE = COMMON.size + PATH_LEN + V2_TAIL.size
V3_FIELDS = struct.Struct(">IIIQIII")  # magic, version, mtime, size, sectorsize, align, format
V3_SIZE = V3_FIELDS.size + PATH_LEN
assert V2_SIZE == 4120 and V3_SIZE == 4128
COW_BITMAP = 0

DEFAULT_SECTOR = 512
DEFAULT_ALIGNMENT = 4096  # what uml_mkcow writes
MAX_SECTOR = 64 * 1024
MAX_ALIGNMENT = 1024 * 1024
MAX_SIZE = 1 << 56  # 64 PiB: keeps every offset well inside 64 bits

BITMAP_PAGE = 4096  # bytes of bitmap per cache page (16 MiB of disk at 512-byte sectors)
DEFAULT_BITMAP_CACHE_PAGES = 256


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class _Bitmap:
    """The sector bitmap, cached in pages (bounded LRU) with dirty tracking. Callers hold the
    image lock. ``before_write`` runs before any page is written back (it syncs the data)."""

    def __init__(
        self,
        file: HostFile,
        offset: int,
        length: int,
        max_pages: int,
        before_write: Callable[[], None],
    ) -> None:
        self._file = file
        self._offset = offset
        self._length = length
        self._max = max(2, max_pages)
        self._pages: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self._before_write = before_write

    def _page(self, index: int) -> bytearray:
        page = self._pages.get(index)
        if page is not None:
            self._pages.move_to_end(index)
            return page
        start = index * BITMAP_PAGE
        n = min(BITMAP_PAGE, self._length - start)
        page = bytearray(self._file.pread(self._offset + start, n))
        while len(self._pages) >= self._max:
            victim = next(iter(self._pages))
            if victim in self._dirty:
                self._before_write()
                self._write_page(victim)
            del self._pages[victim]
        self._pages[index] = page
        return page

    def _write_page(self, index: int) -> None:
        self._file.pwrite(self._offset + index * BITMAP_PAGE, self._pages[index])
        self._dirty.discard(index)

    def run(self, sector: int, limit: int) -> tuple[bool, int]:
        """(state of ``sector``, how many sectors from it, at most ``limit``, share it)."""
        index = sector // 8 // BITMAP_PAGE
        page = self._page(index)
        base = index * BITMAP_PAGE * 8
        state = bool(page[(sector - base) // 8] >> (sector % 8) & 1)
        full = b"\xff" if state else b"\x00"
        s, end = sector, sector + limit
        while s < end:
            if s - base >= len(page) * 8:
                index = s // 8 // BITMAP_PAGE
                page = self._page(index)
                base = index * BITMAP_PAGE * 8
            at = (s - base) // 8
            if s % 8 == 0:
                # Whole bytes of the same state, found by C code (a big disk has long runs).
                rest = page[at:]
                same = len(rest) - len(rest.lstrip(full))
                if same:
                    s += same * 8
                    continue
            if bool(page[at] >> (s % 8) & 1) != state:
                break
            s += 1
        return state, min(s, end) - sector

    def set_range(self, first: int, count: int, value: bool) -> None:
        s, end = first, first + count
        while s < end:
            index = s // 8 // BITMAP_PAGE
            page = self._page(index)
            base = index * BITMAP_PAGE * 8
            stop = min(end, base + len(page) * 8)
            changed = False
            while s < stop:
                if s % 8 == 0 and stop - s >= 8:
                    new = 0xFF if value else 0
                    at = (s - base) // 8
                    changed |= page[at] != new
                    page[at] = new
                    s += 8
                    continue
                at, bit = (s - base) // 8, 1 << (s % 8)
                new = page[at] | bit if value else page[at] & ~bit
                changed |= page[at] != new
                page[at] = new
                s += 1
            if changed:
                self._dirty.add(index)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def write_dirty(self) -> None:
        for index in sorted(self._dirty):
            self._write_page(index)


class CowDriver(BlockDriver):
    format_name = "cow"
    runtime_options = {"bitmap-cache-pages": "4 KiB bitmap pages kept per image (default 256)"}
    supports_write = True

    create_options = {
        "backing_file": "the raw file this COW file overlays (required; stored as given, "
        "relative names are relative to the COW file)",
        "backing_fmt": "must be raw (or omitted): a UML COW file always overlays a raw file",
    }

    def __init__(
        self,
        file: HostFile,
        options: OpenOptions,
        *,
        version: int,
        backing_name: str,
        mtime: int,
        size: int,
        sector_size: int,
        bitmap_offset: int,
        bitmap_length: int,
        data_offset: int,
    ) -> None:
        super().__init__(file, options)
        self.version = version
        self.backing_name = backing_name
        self.mtime = mtime
        self._size = size
        self.sector_size = sector_size
        self.bitmap_offset = bitmap_offset
        self.data_offset = data_offset
        self._lock = threading.Lock()
        pages = DEFAULT_BITMAP_CACHE_PAGES
        if "bitmap-cache-pages" in options.driver_options:
            try:
                pages = int(options.driver_options["bitmap-cache-pages"])
            except ValueError:
                raise InvalidRequest(
                    f"cow: bad bitmap-cache-pages {options.driver_options['bitmap-cache-pages']!r}"
                ) from None
        self._bitmap = _Bitmap(file, bitmap_offset, bitmap_length, pages, self.file.sync)

    # -- discovery ------------------------------------------------------------------------------

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        head = probe.head
        if len(head) < 8:
            return 0
        if head[:4] == MAGIC_BE and struct.unpack_from(">I", head, 4)[0] in (2, 3):
            return 100
        if head[:4] == MAGIC_LE and struct.unpack_from("<I", head, 4)[0] == 1:
            return 100  # version 1, in the host's byte order: opens as Unsupported
        return 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        path = file.path
        file_size = file.size()
        if file_size < COMMON.size:
            raise CorruptImage(f"{path}: COW header truncated (file is {file_size} bytes)")
        head = bytes(file.pread(0, min(file_size, V3_SIZE)))
        if head[:4] == MAGIC_LE:
            raise Unsupported(f"{path}: COW version 1 (host byte order) files are not supported")
        magic, version = COMMON.unpack_from(head)
        if magic != MAGIC:
            raise CorruptImage(f"{path}: not a UML COW file (magic {magic:#010x})")
        if version == 3:
            if len(head) < V3_SIZE:
                raise CorruptImage(f"{path}: COW v3 header truncated ({file_size} bytes)")
            _, _, mtime, size, sector_size, alignment, cow_format = V3_FIELDS.unpack_from(head)
            raw_name = head[V3_FIELDS.size : V3_SIZE]
            if cow_format != COW_BITMAP:
                raise Unsupported(f"{path}: COW format {cow_format} (only 0, the bitmap)")
            if not _is_pow2(alignment) or alignment > MAX_ALIGNMENT:
                raise CorruptImage(f"{path}: COW alignment {alignment} is not a power of two "
                                   f"up to {MAX_ALIGNMENT}")  # fmt: skip
        elif version == 2:
            if len(head) < V2_SIZE:
                raise CorruptImage(f"{path}: COW v2 header truncated ({file_size} bytes)")
            raw_name = head[COMMON.size : COMMON.size + PATH_LEN]
            mtime, size, sector_size = V2_TAIL.unpack_from(head, COMMON.size + PATH_LEN)
            alignment = sector_size
        else:
            raise Unsupported(f"{path}: COW version {version} (versions 2 and 3 are supported)")
        if not _is_pow2(sector_size) or not 512 <= sector_size <= MAX_SECTOR:
            raise CorruptImage(f"{path}: COW sector size {sector_size} is not a power of two "
                               f"from 512 to {MAX_SECTOR}")  # fmt: skip
        if size > MAX_SIZE:
            raise CorruptImage(f"{path}: COW disk size {size} exceeds {MAX_SIZE}")
        name = raw_name.split(b"\0", 1)[0]
        if not name:
            raise CorruptImage(f"{path}: COW file names no backing file")
        sectors = -(-size // sector_size)
        bits_needed = -(-sectors // 8)
        if version == 3:
            bitmap_offset = _round_up(V3_SIZE, alignment)
            bitmap_length = bits_needed
            data_offset = _round_up(bitmap_offset + bitmap_length, alignment)
        else:
            bitmap_offset = V2_SIZE
            stored = (size + sector_size - 1) // (8 * sector_size)  # v2's own rounding
            data_offset = _round_up(bitmap_offset + stored, sector_size)
            bitmap_length = bits_needed
            if bitmap_offset + bits_needed > data_offset:
                raise Unsupported(
                    f"{path}: COW v2 bitmap of {stored} bytes is too short for {sectors} "
                    "sectors and would overlap the data"
                )
        if bitmap_offset + bitmap_length > file_size:
            raise CorruptImage(
                f"{path}: COW bitmap ends at {bitmap_offset + bitmap_length}, past the end of "
                f"the file ({file_size})"
            )
        return cls(
            file,
            options,
            version=version,
            backing_name=os.fsdecode(name),
            mtime=mtime,
            size=size,
            sector_size=sector_size,
            bitmap_offset=bitmap_offset,
            bitmap_length=bitmap_length,
            data_offset=data_offset,
        )

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        unknown = set(options) - set(cls.create_options)
        if unknown:
            raise InvalidRequest(f"cow: unknown option(s) {', '.join(sorted(unknown))}")
        backing = options.get("backing_file")
        if not backing:
            raise InvalidRequest("cow: backing_file is required (a COW file overlays a raw file)")
        fmt = options.get("backing_fmt")
        if fmt not in (None, "", "raw"):
            raise InvalidRequest(f"cow: backing_fmt {fmt!r}: a COW file overlays a raw file")
        name = os.fsencode(backing)
        if len(name) >= PATH_LEN or b"\0" in name:
            raise InvalidRequest(f"cow: backing file name {backing!r} is too long or has a NUL")
        if not 0 <= size <= MAX_SIZE:
            raise InvalidRequest(f"cow: bad size {size}")
        backing_path = backing if os.path.isabs(backing) else os.path.join(
            os.path.dirname(os.path.abspath(path)), backing
        )  # fmt: skip
        try:
            mtime = int(os.stat(backing_path).st_mtime) & 0xFFFFFFFF
        except OSError as e:
            raise InvalidRequest(f"cow: backing file {backing!r}: {e.strerror}") from None
        header = V3_FIELDS.pack(MAGIC, 3, mtime, size, DEFAULT_SECTOR, DEFAULT_ALIGNMENT,
                                COW_BITMAP) + name.ljust(PATH_LEN, b"\0")  # fmt: skip
        bitmap_offset = _round_up(V3_SIZE, DEFAULT_ALIGNMENT)
        sectors = -(-size // DEFAULT_SECTOR)
        bitmap_length = -(-sectors // 8)
        data_offset = _round_up(bitmap_offset + bitmap_length, DEFAULT_ALIGNMENT)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, data_offset + size)  # sparse: a zero bitmap, an empty data area
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- geometry -------------------------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def backing_spec(self) -> BackingSpec:
        return BackingSpec(self.backing_name, "raw")

    # -- data -----------------------------------------------------------------------------------

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, stored here) pieces covering the range. Caller holds the lock."""
        ss = self.sector_size
        end = offset + length
        sector, last = offset // ss, (end - 1) // ss
        runs = []
        while sector <= last:
            stored, count = self._bitmap.run(sector, last - sector + 1)
            lo, hi = max(offset, sector * ss), min(end, (sector + count) * ss)
            runs.append((lo, hi - lo, stored))
            sector += count
        return runs

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        with self._lock:
            runs = self._runs(offset, length)
        if len(runs) == 1:
            return self._read_run(*runs[0])
        out = bytearray(length)
        for lo, n, stored in runs:
            out[lo - offset : lo - offset + n] = self._read_run(lo, n, stored)
        return out

    def _read_run(self, offset: int, length: int, stored: bool) -> bytes | bytearray | memoryview:
        if stored:
            return self.file.pread(self.data_offset + offset, length)
        return self.read_backing(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_writable()
        ss = self.sector_size
        end = offset + len(data)
        start = offset - offset % ss
        stop = min(_round_up(end, ss), self._size)
        with self._lock:
            # Sectors written only in part take the rest of their bytes from the backing file
            # the first time (copy on write); whole sectors are simply written.
            head = b""
            if start < offset and not self._bitmap.run(start // ss, 1)[0]:
                head = bytes(self.read_backing(start, offset - start))
            tail = b""
            if end < stop and not self._bitmap.run((stop - 1) // ss, 1)[0]:
                tail = bytes(self.read_backing(end, stop - end))
            if head or tail:
                payload: bytes | bytearray | memoryview = b"".join((head, bytes(data), tail))
            else:
                payload = data
            self.file.pwrite(self.data_offset + offset - len(head), payload)
            self._bitmap.set_range(start // ss, (stop - start + ss - 1) // ss, True)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.check_writable()
        ss = self.sector_size
        end = offset + length
        first = _round_up(offset, ss)
        last = end if end == self._size else end - end % ss
        if first >= last:
            super().write_zeroes(offset, length, may_unmap)
            return
        if offset < first:
            self.write(offset, bytes(first - offset))
        with self._lock:
            # Whole sectors: zero the data area (no bytes written), then set the bits.
            host = self.data_offset + first
            done = self.file.punch_hole(host, last - first) or self.file.zero_range(
                host, last - first
            )
            if done:
                self._bitmap.set_range(first // ss, -(-(last - first) // ss), True)
        if not done:
            super().write_zeroes(first, last - first, may_unmap)
        if last < end:
            self.write(last, bytes(end - last))

    def discard(self, offset: int, length: int) -> None:
        self.check_writable()
        ss = self.sector_size
        end = offset + length
        first = _round_up(offset, ss)
        last = end if end == self._size else end - end % ss
        if first >= last:
            return
        with self._lock:
            # Whole sectors go back to the backing file's data and free their space.
            self._bitmap.set_range(first // ss, -(-(last - first) // ss), False)
            self.file.punch_hole(self.data_offset + first, last - first)

    def block_status(self, offset: int, length: int) -> Extent:
        ss = self.sector_size
        first = offset // ss
        with self._lock:
            stored, count = self._bitmap.run(first, (offset + length - 1) // ss - first + 1)
        n = min(length, (first + count) * ss - offset)
        if stored:
            return Extent(offset, n, Allocation.DATA, host_offset=self.data_offset + offset)
        return Extent(offset, n, Allocation.UNALLOCATED)

    def flush(self) -> None:
        with self._lock:
            if self._bitmap.dirty:
                self.file.sync()  # the sectors first, then the bits that point at them
                self._bitmap.write_dirty()
            self.file.sync()

    # -- management -----------------------------------------------------------------------------

    def info(self) -> ImageInfo:
        info = super().info()
        info.format_specific = {"version": self.version, "sector-size": self.sector_size}
        backing = self.backing
        if backing is not None:
            try:
                actual = int(os.stat(backing.file.path).st_mtime) & 0xFFFFFFFF
            except OSError:
                actual = None
            if actual is not None and actual != self.mtime:
                info.notes.append(
                    f"the backing file's mtime ({actual}) differs from the one recorded in the "
                    f"COW header ({self.mtime}); UML would refuse it"
                )
        return info


register(CowDriver)
