"""bochs: Bochs "growing" redolog images (``bximage -imgmode=growing``), and "undoable" redologs
over their base image. Read-only.

Layout, every number little-endian:

* a header of ``header_size`` bytes (512): magic ``Bochs Virtual HD Image``, type ``Redolog``,
  subtype ``Growing``, version (0x00020000, or 0x00010000 for v1, which lacks the timestamp
  word), then the catalog entry count, the bitmap size, the extent size, [the timestamp,] and
  the disk size (u64);
* the catalog at ``header_size``: one u32 per extent of the disk, 0xffffffff when unallocated,
  else the index of the extent's slot in the file;
* slots from ``header_size + 4 * catalog``, each ``ceil(bitmap/512) + ceil(extent/512)``
  sectors: a bitmap (bit ``i``, least significant first, says sector ``i`` of the extent is
  stored) and then the extent's sectors.

Sectors whose catalog entry or bitmap bit is clear read as zeros; in an "Undoable" redolog (the
journal Bochs keeps beside a base image, named ``BASE.redolog``) they read the base image, a raw
(flat) file, which is this driver's backing file. qemu reads only Growing images.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from typing import Self

from imgfs.block.driver import BackingSpec, BlockDriver, OpenOptions, ProbeInput
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, Unsupported

SECTOR = 512
HEADER = struct.Struct("<32s16s16sII")  # magic, type, subtype, version, header size
assert HEADER.size == 72
REDOLOG_V2 = struct.Struct("<IIIIQ")  # catalog, bitmap, extent, timestamp, disk
REDOLOG_V1 = struct.Struct("<IIIQ")  # catalog, bitmap, extent, disk
HEADER_SIZE = 512

MAGIC = b"Bochs Virtual HD Image"
REDOLOG = b"Redolog"
GROWING = b"Growing"
UNDOABLE = b"Undoable"
VOLATILE = b"Volatile"
# Bochs names an undoable disk's journal after its base image: "disk.img" -> "disk.img.redolog".
REDOLOG_SUFFIX = ".redolog"
VERSION_2 = 0x00020000
VERSION_1 = 0x00010000
UNALLOCATED = 0xFFFFFFFF

# qemu's limits: extents of 512 bytes to 8 MiB (a power of two), at most 1 M catalog entries
# (what bximage needs for its largest disk).
MAX_EXTENT = 8 * 1024 * 1024
MAX_CATALOG = 0x100000
MAX_HEADER = 64 * 1024


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


class BochsDriver(BlockDriver):
    format_name = "bochs"
    supports_write = False

    def __init__(
        self,
        file: HostFile,
        options: OpenOptions,
        *,
        disk_size: int,
        extent_size: int,
        bitmap_bytes: int,
        data_offset: int,
        catalog: array,
        base_name: str | None = None,
    ) -> None:
        super().__init__(file, options)
        self.read_only = True
        self._size = disk_size
        self.extent_size = extent_size
        self._bitmap_bytes = bitmap_bytes
        self._slot_size = -(-bitmap_bytes // SECTOR) * SECTOR + -(-extent_size // SECTOR) * SECTOR
        self._bitmap_span = -(-bitmap_bytes // SECTOR) * SECTOR
        self._data_offset = data_offset
        self._catalog = catalog  # never changes: reads need no lock
        self._base_name = base_name  # an undoable redolog's base image (raw), beside it

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        if len(probe.head) < HEADER.size:
            return 0
        magic, kind, _subtype, _version, _size = HEADER.unpack_from(probe.head)
        return 100 if _cstr(magic) == MAGIC and _cstr(kind) == REDOLOG else 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        path = file.path
        file_size = file.size()
        if file_size < HEADER_SIZE:
            raise CorruptImage(f"{path}: bochs header truncated (file is {file_size} bytes)")
        head = bytes(file.pread(0, HEADER_SIZE))
        magic, kind, subtype, version, header_size = HEADER.unpack_from(head)
        if _cstr(magic) != MAGIC or _cstr(kind) != REDOLOG:
            raise CorruptImage(f"{path}: not a bochs redolog (magic {_cstr(magic)[:32]!r})")
        sub = _cstr(subtype)
        base_name: str | None = None
        if sub == UNDOABLE:
            name = os.path.basename(path)
            if not name.endswith(REDOLOG_SUFFIX) or name == REDOLOG_SUFFIX:
                raise Unsupported(
                    f"{path}: bochs Undoable redolog not named BASE{REDOLOG_SUFFIX}: cannot "
                    "tell which base image it journals"
                )
            base_name = name[: -len(REDOLOG_SUFFIX)]
        elif sub == VOLATILE:
            raise Unsupported(
                f"{path}: bochs Volatile redologs (temporary files) are not supported"
            )
        elif sub != GROWING:
            raise CorruptImage(f"{path}: unknown bochs redolog subtype {sub[:16]!r}")
        if version == VERSION_2:
            catalog_len, bitmap_bytes, extent_size, _stamp, disk = REDOLOG_V2.unpack_from(
                head, HEADER.size
            )
        elif version == VERSION_1:
            catalog_len, bitmap_bytes, extent_size, disk = REDOLOG_V1.unpack_from(head, HEADER.size)
        else:
            raise Unsupported(f"{path}: bochs header version {version:#010x}")
        if not HEADER_SIZE <= header_size <= MAX_HEADER:
            raise CorruptImage(f"{path}: bochs header size {header_size} out of range")
        if extent_size < SECTOR or extent_size & (extent_size - 1) or extent_size > MAX_EXTENT:
            raise CorruptImage(
                f"{path}: bochs extent size {extent_size} is not a power of two from "
                f"{SECTOR} to {MAX_EXTENT}"
            )
        sectors_per_extent = extent_size // SECTOR
        if not -(-sectors_per_extent // 8) <= bitmap_bytes <= MAX_EXTENT // SECTOR:
            raise CorruptImage(
                f"{path}: bochs bitmap size {bitmap_bytes} does not fit extents of "
                f"{extent_size} bytes"
            )
        if catalog_len > MAX_CATALOG:
            raise CorruptImage(f"{path}: bochs catalog size {catalog_len} is too large")
        disk_size = disk - disk % SECTOR  # qemu counts whole sectors
        if catalog_len < -(-disk_size // extent_size):
            raise CorruptImage(
                f"{path}: bochs catalog size {catalog_len} is too small for a disk of "
                f"{disk} bytes in extents of {extent_size}"
            )
        data_offset = header_size + 4 * catalog_len
        if data_offset > file_size:
            raise CorruptImage(
                f"{path}: bochs catalog of {catalog_len} entries ends at {data_offset}, past "
                f"the end of the file ({file_size})"
            )
        catalog = array("I")
        assert catalog.itemsize == 4
        catalog.frombytes(bytes(file.pread(header_size, 4 * catalog_len)))
        if sys.byteorder == "big":
            catalog.byteswap()
        driver = cls(
            file,
            options,
            disk_size=disk_size,
            extent_size=extent_size,
            bitmap_bytes=bitmap_bytes,
            data_offset=data_offset,
            catalog=catalog,
            base_name=base_name,
        )
        driver._validate_catalog(file_size)
        return driver

    def _validate_catalog(self, file_size: int) -> None:
        # Only the extents the disk uses are looked at; each slot's bitmap must be in the file.
        used = -(-self._size // self.extent_size)
        allocated = [e for e in self._catalog[:used] if e != UNALLOCATED]
        if allocated:
            highest = max(allocated)
            slot = self._data_offset + highest * self._slot_size
            if slot + self._bitmap_span > file_size:
                raise CorruptImage(
                    f"{self.file.path}: bochs catalog entry {highest} puts an extent at "
                    f"{slot}, past the end of the file ({file_size})"
                )

    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def backing_spec(self) -> BackingSpec | None:
        return BackingSpec(self._base_name, "raw") if self._base_name is not None else None

    def _slot_offset(self, extent_index: int) -> int | None:
        entry = self._catalog[extent_index]
        if entry == UNALLOCATED:
            return None
        return self._data_offset + entry * self._slot_size

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        out = bytearray(length)
        done = 0
        es = self.extent_size
        while done < length:
            pos = offset + done
            index, within = divmod(pos, es)
            n = min(es - within, length - done)
            slot = self._slot_offset(index)
            if slot is not None:
                self._read_extent(slot, pos - within, within, memoryview(out)[done : done + n])
            elif self.backing is not None:
                out[done : done + n] = self.read_backing(pos, n)
            done += n
        return out

    def _read_extent(self, slot: int, extent_base: int, within: int, dest: memoryview) -> None:
        """Fill ``dest`` from the extent in ``slot`` (guest offset ``extent_base``), starting
        ``within`` bytes into it; sectors whose bitmap bit is clear read the base image of an
        undoable redolog, or stay zero."""
        first = within // SECTOR
        last = (within + len(dest) - 1) // SECTOR
        bitmap = self.file.pread(slot + first // 8, last // 8 - first // 8 + 1)
        data_start = slot + self._bitmap_span
        sector = first
        while sector <= last:
            stored, run_end = self._run(bitmap, first, sector, last)
            lo = max(within, sector * SECTOR)
            hi = min(within + len(dest), run_end * SECTOR)
            if stored:
                dest[lo - within : hi - within] = self.file.pread(data_start + lo, hi - lo)
            elif self.backing is not None:
                dest[lo - within : hi - within] = self.read_backing(extent_base + lo, hi - lo)
            sector = run_end

    @classmethod
    def _run(
        cls, bitmap: bytes | memoryview, first: int, sector: int, last: int
    ) -> tuple[bool, int]:
        """The state of ``sector`` and the end of its run (at most ``last + 1``); ``bitmap``
        starts at the byte holding ``first``'s bit. Whole bytes of one state go 8 at a time."""
        stored = cls._bit(bitmap, sector, first)
        full = 0xFF if stored else 0
        end = sector + 1
        while end <= last:
            if end % 8 == 0 and last - end >= 7 and bitmap[end // 8 - first // 8] == full:
                end += 8
            elif cls._bit(bitmap, end, first) == stored:
                end += 1
            else:
                break
        return stored, end

    @staticmethod
    def _bit(bitmap: bytes | memoryview, sector: int, first: int) -> bool:
        byte = sector // 8 - first // 8
        return bool(bitmap[byte] >> (sector % 8) & 1)

    def block_status(self, offset: int, length: int) -> Extent:
        es = self.extent_size
        index, within = divmod(offset, es)
        slot = self._slot_offset(index)
        run = min(length, es - within)
        if slot is None:
            end = offset + run  # extent-aligned from here on: take the following free extents
            while end < offset + length and self._slot_offset(end // es) is None:
                end = min(offset + length, end + es)
            return Extent(offset, end - offset, Allocation.UNALLOCATED)
        first = within // SECTOR
        last = (within + run - 1) // SECTOR
        bitmap = self.file.pread(slot + first // 8, last // 8 - first // 8 + 1)
        stored, end = self._run(bitmap, first, first, last)
        n = min(run, end * SECTOR - within)
        if stored:
            host = slot + self._bitmap_span + within
            return Extent(offset, n, Allocation.DATA, host_offset=host)
        return Extent(offset, n, Allocation.UNALLOCATED)


register(BochsDriver)
