"""asif: Apple Sparse Image Format (macOS 26 virtual disks), read-only.

Apple publishes no specification; the layout here is the community's reverse-engineered one
(huven/asif-format, and the dissect.hypervisor write-up), checked against a diskutil-made
image. Big-endian throughout; the file is cut into chunks of ``chunk_size`` bytes (1 MiB), and
chunk 0 holds the header and two directories.

* header ``shdw`` (0x50 bytes used): version, header size, flags, two directory offsets, a UUID,
  the sector count (the disk's size), the maximum sector count, the chunk size, the sector size
  and the chunk number of the metadata (a logical address, past the disk's end);
* a directory: a 64-bit sequence number (the higher of the two directories is current), then
  one 64-bit entry per table: the chunk holding that table, 0 for none (all zeros);
* a table: C chunk groups; a group is N = 4 * sector size data-chunk entries and one bitmap-chunk
  entry, so a table covers C * N chunks. An entry's top two bits are its state (00 unallocated,
  01 every sector written, 11 see the bitmap), the low 55 bits the physical chunk;
* a bitmap chunk: 2 bits per sector of its group, LSB first (00 unwritten, 01 written).

States nobody has characterised yet (entry state 10, state 00 with a chunk number, bitmap states
10 and 11) are refused on read with Unsupported rather than guessed.
"""

from __future__ import annotations

import plistlib
import struct
import threading
import uuid
import xml.parsers.expat
from array import array
from collections import OrderedDict
from typing import Any, Self

from imgfs.block.driver import BlockDriver, ImageInfo, OpenOptions, ProbeInput
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, Unsupported

HEADER = struct.Struct(
    ">4s I I I"  # magic 'shdw', version, header size, flags
    " Q Q"  # directory offsets (bytes)
    " 16s"  # UUID
    " Q Q"  # sector count, maximum sector count
    " I H H"  # chunk size (bytes), sector size (bytes), unknown
    " Q"  # metadata chunk (logical, in chunks)
)
assert HEADER.size == 0x50
MAGIC = b"shdw"
VERSION = 1

# The metadata chunk's header: magic 'meta', version, header size, then the plist's offset
# (a 64-bit value at 0x0c, not 8-byte aligned).
META = struct.Struct(">4s I I Q")
assert META.size == 20
META_MAGIC = b"meta"

ENTRY_STATE_SHIFT = 62
ENTRY_CHUNK_MASK = (1 << 55) - 1
STATE_UNALLOCATED = 0b00
STATE_FULL = 0b01
STATE_PARTIAL = 0b11
SECTOR_UNWRITTEN = 0b00
SECTOR_WRITTEN = 0b01

MIN_CHUNK = 64 * 1024
MAX_CHUNK = 64 * 1024 * 1024
MAX_DIRECTORY_BYTES = 64 * 1024 * 1024
MAX_BYTES = 1 << 62
TABLE_CACHE_TABLES = 16


class AsifDriver(BlockDriver):
    format_name = "asif"
    supports_write = False
    # Reads are table lookups (cached) and host reads; no decompression.
    cheap_reads = True

    def __init__(
        self,
        file: HostFile,
        options: OpenOptions,
        header: tuple[Any, ...],
        sequence: int,
        directory_offset: int,
        directory: array,
    ) -> None:
        super().__init__(file, options)
        self.read_only = True
        (_magic, self._version, _hsize, self._flags, _d0, _d1, raw_uuid, self._sectors,
         self._max_sectors, self._chunk, self._sector_size, self._unknown_46,
         self._metadata_chunk) = header  # fmt: skip
        self._uuid = str(uuid.UUID(bytes=bytes(raw_uuid)))
        self._sequence = sequence
        self._directory_offset = directory_offset
        self._directory = directory
        self._file_size = file.size()
        self._per_group = 4 * self._sector_size  # N data chunks per group
        self._group_entries = self._per_group + 1
        self._groups = self._chunk // (8 * self._group_entries)  # C groups per table
        self._per_table = self._groups * self._per_group  # chunks one table covers
        self._sectors_per_chunk = self._chunk // self._sector_size
        self._tables: OrderedDict[int, array] = OrderedDict()
        self._lock = threading.Lock()

    # -- discovery ------------------------------------------------------------------------------

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        head = probe.head
        if len(head) >= 8 and head[:4] == MAGIC:
            return 100 if struct.unpack_from(">I", head, 4)[0] == VERSION else 50
        return 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        path = file.path
        size = file.size()
        if size < HEADER.size:
            raise CorruptImage(f"{path}: {size} bytes is too small for an ASIF header")
        header = HEADER.unpack(file.pread(0, HEADER.size))
        (magic, version, header_size, _flags, dir0, dir1, _uuid, sectors, max_sectors,
         chunk, sector_size, _unknown, _meta) = header  # fmt: skip
        if magic != MAGIC:
            raise CorruptImage(f"{path}: bad ASIF magic {bytes(magic)!r}")
        if version != VERSION:
            raise Unsupported(f"{path}: ASIF version {version}")
        if header_size < HEADER.size or header_size > MIN_CHUNK:
            raise CorruptImage(f"{path}: ASIF header size {header_size}")
        if sector_size != 512:
            # Only 512-byte sectors have been seen; the table geometry depends on it.
            raise Unsupported(f"{path}: ASIF sector size {sector_size}")
        if chunk & (chunk - 1) or not MIN_CHUNK <= chunk <= MAX_CHUNK:
            raise Unsupported(f"{path}: ASIF chunk size {chunk}")
        if sectors > max_sectors or max_sectors * sector_size > MAX_BYTES:
            raise CorruptImage(
                f"{path}: ASIF sector count {sectors} / maximum {max_sectors} out of range"
            )
        per_group = 4 * sector_size
        per_table = (chunk // (8 * (per_group + 1))) * per_group
        max_chunks = -(-max_sectors * sector_size // chunk)
        n_tables = -(-max_chunks // per_table)
        dir_bytes = 8 + 8 * n_tables
        if dir_bytes > MAX_DIRECTORY_BYTES:
            raise CorruptImage(f"{path}: ASIF directory of {dir_bytes} bytes is too large")
        best: tuple[int, int, bytes] | None = None
        for offset in (dir0, dir1):
            if offset < header_size or offset + dir_bytes > size:
                raise CorruptImage(
                    f"{path}: ASIF directory at {offset} ({dir_bytes} bytes) is outside the "
                    f"file ({size})"
                )
            raw = bytes(file.pread(offset, dir_bytes))
            (sequence,) = struct.unpack_from(">Q", raw, 0)
            if best is None or sequence > best[0]:
                best = (sequence, offset, raw)
        assert best is not None
        sequence, offset, raw = best
        directory = array("Q", raw[8:])
        assert directory.itemsize == 8
        directory.byteswap()  # big-endian on disk; the host is little-endian
        return cls(file, options, header, sequence, offset, directory)

    # -- geometry -------------------------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self._sectors * self._sector_size

    # -- mapping --------------------------------------------------------------------------------

    def _table(self, index: int) -> array | None:
        """Table ``index`` of the directory (its entries, host order), or None when absent."""
        with self._lock:
            table = self._tables.get(index)
            if table is not None:
                self._tables.move_to_end(index)
                return table
        if index >= len(self._directory):
            raise CorruptImage(f"{self.file.path}: table {index} is past the directory")
        chunk = self._directory[index] & ENTRY_CHUNK_MASK
        if chunk == 0:
            return None
        table_bytes = self._groups * self._group_entries * 8
        where = chunk * self._chunk
        if where + table_bytes > self._file_size:
            raise CorruptImage(
                f"{self.file.path}: table {index} in chunk {chunk} is past the end of the file"
            )
        # A failed read (WouldBlock, I/O error) leaves the cache as it was.
        table = array("Q", bytes(self.file.pread(where, table_bytes)))
        table.byteswap()
        with self._lock:
            self._tables[index] = table
            while len(self._tables) > TABLE_CACHE_TABLES:
                self._tables.popitem(last=False)
        return table

    def _entries(self, logical_chunk: int) -> tuple[int, int] | None:
        """(data entry, bitmap entry) of a logical chunk; None when its table is absent."""
        table_index, within = divmod(logical_chunk, self._per_table)
        table = self._table(table_index)
        if table is None:
            return None
        group, slot = divmod(within, self._per_group)
        base = group * self._group_entries
        return table[base + slot], table[base + self._per_group]

    def _host_chunk(self, entry: int, what: str) -> int:
        chunk = entry & ENTRY_CHUNK_MASK
        if chunk == 0 or chunk * self._chunk >= self._file_size:
            raise CorruptImage(
                f"{self.file.path}: {what} entry {entry:#018x} points to chunk {chunk}, outside "
                f"the file"
            )
        return chunk * self._chunk

    def _sector_states(
        self, logical_chunk: int, bitmap_entry: int, first: int, count: int
    ) -> bytes:
        """The 2-bit state of sectors ``first .. first+count`` of a partial chunk, one per byte."""
        bitmap = self._host_chunk(bitmap_entry, "bitmap")
        slot = logical_chunk % self._per_group
        sector = slot * self._sectors_per_chunk + first  # sector index within the group
        lo = sector // 4
        hi = (sector + count + 3) // 4
        packed = self.file.pread(bitmap + lo, hi - lo)
        skip = sector - lo * 4
        states = bytearray()
        for byte in packed:
            states += bytes((byte & 3, (byte >> 2) & 3, (byte >> 4) & 3, (byte >> 6) & 3))
        return bytes(states[skip : skip + count])

    def _classify(self, offset: int, limit: int) -> tuple[Allocation, int, int | None]:
        """(ZERO or DATA, end of the run, host offset at ``offset`` when DATA) for the bytes
        from ``offset``, stopping at ``limit`` or the chunk's end."""
        logical, inner = divmod(offset, self._chunk)
        chunk_end = min(limit, (logical + 1) * self._chunk)
        entries = self._entries(logical)
        if entries is None:
            # No table: everything it would cover reads as zeros.
            table_end = (logical // self._per_table + 1) * self._per_table * self._chunk
            return Allocation.ZERO, min(limit, table_end), None
        entry, bitmap_entry = entries
        state = entry >> ENTRY_STATE_SHIFT
        if state == STATE_UNALLOCATED:
            if entry & ENTRY_CHUNK_MASK:
                raise Unsupported(
                    f"{self.file.path}: chunk entry {entry:#018x} for disk offset "
                    f"{logical * self._chunk}: state 00 with a chunk number is not understood"
                )
            return Allocation.ZERO, chunk_end, None
        if state == STATE_FULL:
            host = self._host_chunk(entry, "data") + inner
            return Allocation.DATA, chunk_end, host
        if state != STATE_PARTIAL:
            raise Unsupported(
                f"{self.file.path}: chunk entry {entry:#018x} for disk offset "
                f"{logical * self._chunk} has state {state:02b}, which is not understood"
            )
        ss = self._sector_size
        first = inner // ss
        last = (chunk_end - logical * self._chunk + ss - 1) // ss
        states = self._sector_states(logical, bitmap_entry, first, last - first)
        state0 = states[0]
        if state0 not in (SECTOR_UNWRITTEN, SECTOR_WRITTEN):
            raise Unsupported(
                f"{self.file.path}: sector {offset // ss} has bitmap state {state0:02b}, which "
                "is not understood"
            )
        run = 1
        while run < len(states) and states[run] == state0:
            run += 1
        end = min(chunk_end, logical * self._chunk + (first + run) * ss)
        if state0 == SECTOR_UNWRITTEN:
            return Allocation.ZERO, end, None
        return Allocation.DATA, end, self._host_chunk(entry, "data") + inner

    # -- data -----------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        end = offset + length
        kind, run_end, host = self._classify(offset, end)
        if run_end >= end:
            return bytes(length) if host is None else self.file.pread(host, length)
        out = bytearray(length)
        pos = offset
        while True:
            if host is not None:
                out[pos - offset : run_end - offset] = self.file.pread(host, run_end - pos)
            pos = run_end
            if pos >= end:
                return out
            kind, run_end, host = self._classify(pos, end)

    def block_status(self, offset: int, length: int) -> Extent:
        limit = offset + length
        kind, end, host = self._classify(offset, limit)
        # Merge zero runs and physically contiguous data, within a bounded number of steps.
        steps = 0
        while end < limit and steps < 4096:
            nkind, nend, nhost = self._classify(end, limit)
            if nkind != kind:
                break
            if kind is Allocation.DATA and (host is None or nhost != host + (end - offset)):
                break
            end = nend
            steps += 1
        return Extent(offset, end - offset, kind, host_offset=host)

    # -- management -----------------------------------------------------------------------------

    def _metadata(self) -> tuple[dict[str, Any] | None, str | None]:
        """The metadata plist (a dict) or why it could not be read."""
        try:
            offset = self._metadata_chunk * self._chunk
            kind, _end, host = self._classify(offset, offset + self._chunk)
            if host is None:
                return None, "the metadata chunk is not allocated"
            head = META.unpack(self.file.pread(host, META.size))
            if head[0] != META_MAGIC:
                return None, f"the metadata chunk has magic {bytes(head[0])!r}"
            start = head[3]
            if not META.size <= start < self._chunk:
                return None, f"metadata plist offset {start} is outside its chunk"
            text = bytes(self.file.pread(host + start, self._chunk - start)).split(b"\0", 1)[0]
            plist = plistlib.loads(text, fmt=plistlib.FMT_XML)
            if not isinstance(plist, dict):
                return None, "the metadata plist is not a dictionary"
            return plist, None
        except (
            CorruptImage,
            Unsupported,
            plistlib.InvalidFileException,
            xml.parsers.expat.ExpatError,
            ValueError,
            LookupError,  # an XML declaration naming an unknown encoding
        ) as e:
            return None, f"metadata unreadable: {e}"

    def info(self) -> ImageInfo:
        info = super().info()
        info.cluster_size = self._chunk
        specific: dict[str, Any] = {
            "version": self._version,
            "uuid": self._uuid,
            "chunk-size": self._chunk,
            "sector-size": self._sector_size,
            "max-size": self._max_sectors * self._sector_size,
            "header-flags": self._flags,
            "directory-offset": self._directory_offset,
            "directory-sequence": self._sequence,
        }
        plist, problem = self._metadata()
        if plist is not None:
            internal = plist.get("internal metadata")
            if isinstance(internal, dict) and isinstance(internal.get("stable uuid"), str):
                specific["stable-uuid"] = internal["stable uuid"]
            user = plist.get("user metadata")
            if isinstance(user, dict):
                specific["user-metadata-keys"] = sorted(str(k) for k in user)
        info.format_specific = specific
        info.notes.append("read-only: imgfs does not write ASIF images")
        info.notes.append(
            "ASIF has no published specification; understood: header magic/version/size, "
            "directory offsets and sequence, UUID, sector count, maximum size, chunk and sector "
            "size, metadata chunk; tables, chunk groups, chunk states 00/01/11 and bitmap sector "
            "states 00/01"
        )
        info.notes.append(
            f"ignored: header flags ({self._flags:#x}), the 16-bit field at 0x46 "
            f"({self._unknown_46:#x}), header bytes past 0x50, entry bits 61-55; refused on read: "
            "chunk state 10, state 00 with a chunk number, bitmap states 10/11"
        )
        if problem is not None:
            info.notes.append(problem)
        return info


register(AsifDriver)
