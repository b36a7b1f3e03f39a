"""VMDK extents: flat, zero, hosted sparse (KDMV, including streamOptimized), VMFS sparse (COWD)
and seSparse. Each maps offsets *inside the extent* to its host file.

Sparse extents (VMware "Virtual Disk Format 5.0", "Hosted Sparse Extents"): a grain directory
(GD) of 32-bit sector offsets of grain tables (GT); each GT holds ``numGTEsPerGT`` 32-bit sector
offsets of grains. GTE 0 is unallocated, GTE 1 a zeroed grain when the header's zeroed-grain
flag is set. A redundant GD/GT copy (rgdOffset) is kept in step on writes.

Crash safety of sparse writes: new grains (and new grain tables) are appended, and each pointer
update is behind a ``sync()`` barrier: the grains are durable before the GT entries that name
them, a new GT before the GD entry. The host may write dirty pages back in any order, and a
sparse extent has no log or dirty flag, so without it a crash could leave a GT entry past the end
of the file (qemu-img check fails) or naming a grain of zeros where a partial write's untouched
sectors held the parent's data. One host sync per allocating write; in-place overwrites need
none.
"""

from __future__ import annotations

import enum
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from imgfs.block.hostfile import HostFile
from imgfs.errors import CorruptImage, ReadOnly, Unsupported

SECTOR = 512
ZERO_CHUNK = 1024 * 1024
_ZEROS = bytes(ZERO_CHUNK)

# -- on-disk structures -------------------------------------------------------------------------

KDMV_MAGIC = 0x564D444B  # "KDMV" little-endian
COWD_MAGIC = 0x44574F43  # "COWD"
SESPARSE_MAGIC = 0xCAFEBABE
SESPARSE_VOLATILE_MAGIC = 0xCAFECAFE

# SparseExtentHeader: magic, version, flags, capacity, grainSize, descriptorOffset,
# descriptorSize, numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown,
# singleEndLineChar, nonEndLineChar, doubleEndLineChar1, doubleEndLineChar2, compressAlgorithm.
KDMV_HEADER = struct.Struct("<IIIQQQQIQQQB4sH433x")
assert KDMV_HEADER.size == 512

FLAG_VALID_NEWLINE = 1 << 0
FLAG_REDUNDANT_GT = 1 << 1
FLAG_ZEROED_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESS_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF

# Stream markers: val (u64), size (u32), then type (u32) when size is 0.
MARKER = struct.Struct("<QII")
GRAIN_MARKER = struct.Struct("<QI")
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

# COWD (VMFS sparse, "VMware 3" header): magic, version, flags, numSectors, grainSize,
# gdOffset, numGDEntries, freeSector.
COWD_HEADER = struct.Struct("<IIIIIIII")
COWD_GTES_PER_GT = 4096

# seSparse constant header (all sizes and offsets in sectors).
SESPARSE_HEADER = struct.Struct("<" + "Q" * 26)
SESPARSE_VOLATILE = struct.Struct("<QQQQ")
# seSparse offsets and sizes are in sectors; 2^40 sectors is 512 PiB.
SESPARSE_LIMIT = 1 << 40

# -- limits -------------------------------------------------------------------------------------

# VMware writes 64 KiB grains; qemu refuses grains over 1 GiB (2^21 sectors).
MAX_GRAIN_SECTORS = 1 << 21
# A compressed grain is inflated whole into memory: a 1 GiB one (from a 1 MiB zlib bomb) is
# refused. VMware's streams use 64 KiB grains.
MAX_COMPRESSED_GRAIN_SECTORS = 1 << 15
# New grains of an uncompressed extent are built and written this many bytes at a time (a
# 1 GiB grain is not built in memory whole).
MAX_GRAIN_BUFFER = 4 * 1024 * 1024
MAX_GTES_PER_GT = 1 << 16
# 16 M GD entries (64 MiB) covers 512 TiB at qemu's defaults.
MAX_GD_ENTRIES = 1 << 24
# Metadata caches: at most this many bytes of grain tables, and of inflated grains.
GT_CACHE_BYTES = 8 * 1024 * 1024
GRAIN_CACHE_BYTES = 4 * 1024 * 1024


class State(enum.Enum):
    DATA = "data"  # stored uncompressed at host offset
    ZERO = "zero"  # reads as zeros in this layer
    UNALLOCATED = "unallocated"  # the parent answers
    COMPRESSED = "compressed"  # one deflated grain (streamOptimized)


@dataclass(frozen=True, slots=True)
class Mapping:
    state: State
    host_offset: int | None
    length: int


# A function giving the current guest bytes of a range that this extent does not hold: the
# parent image's data. Offsets are inside the extent.
BackingReader = Callable[[int, int], bytes | bytearray | memoryview]


class VmdkExtent:
    """Base: a run of guest sectors stored in one host file."""

    kind = "?"

    def __init__(self, file: HostFile | None, length: int, writable: bool) -> None:
        self.file = file
        self.length = length
        self.writable = writable

    def map(self, offset: int, length: int) -> Mapping:
        raise NotImplementedError

    def map_for_read(self, offset: int, length: int) -> Mapping:
        """Like map, for a read: may skip work that only block status needs."""
        return self.map(offset, length)

    def read_compressed(self, offset: int, length: int) -> bytes:
        raise Unsupported("this extent has no compressed grains")

    def write(self, offset: int, data: memoryview, backing: BackingReader) -> None:
        raise ReadOnly(f"{self.describe()}: this extent is read-only")

    def zero(self, offset: int, length: int, backing: BackingReader, may_unmap: bool) -> None:
        """Make a range read as zeros (the default writes zero bytes, a chunk at a time)."""
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            self.write(offset, memoryview(_ZEROS)[:n], backing)
            offset += n

    def discard(self, offset: int, length: int) -> None:
        """The guest no longer needs the range; the default keeps the data."""
        return None

    def describe(self) -> str:
        return self.file.path if self.file is not None else "zero extent"

    def info(self) -> dict[str, object]:
        return {
            "filename": self.describe(),
            "format": self.kind,
            "virtual-size": self.length,
        }

    def check(self, messages: list[str]) -> tuple[int, int]:
        """(corruptions, allocated grains) found in this extent's metadata."""
        return 0, 0


class FlatExtent(VmdkExtent):
    kind = "FLAT"
    read_only_reason: str | None = None

    def __init__(self, file: HostFile, length: int, base: int, writable: bool) -> None:
        super().__init__(file, length, writable)
        self.base = base

    def map(self, offset: int, length: int) -> Mapping:
        assert self.file is not None
        is_data, run = self.file.data_extents(self.base + offset, length)
        if not is_data:
            return Mapping(State.ZERO, None, run)  # a hole in the host file reads as zeros
        return Mapping(State.DATA, self.base + offset, run)

    def map_for_read(self, offset: int, length: int) -> Mapping:
        return Mapping(State.DATA, self.base + offset, length)

    def zero(self, offset: int, length: int, backing: BackingReader, may_unmap: bool) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.describe()}: extent is read-only")
        assert self.file is not None
        start = self.base + offset
        done = (may_unmap and self.file.punch_hole(start, length)) or self.file.zero_range(
            start, length
        )
        if not done:
            super().zero(offset, length, backing, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.describe()}: extent is read-only")
        assert self.file is not None
        self.file.punch_hole(self.base + offset, length)  # unsupported: the data stays

    def write(self, offset: int, data: memoryview, backing: BackingReader) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.describe()}: extent is read-only")
        assert self.file is not None
        self.file.pwrite(self.base + offset, data)


class ZeroExtent(VmdkExtent):
    kind = "ZERO"

    def map(self, offset: int, length: int) -> Mapping:
        return Mapping(State.ZERO, None, length)


class _LRU:
    """A bounded cache keyed by int."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.items: OrderedDict[int, object] = OrderedDict()

    def get(self, key: int) -> object | None:
        item = self.items.get(key)
        if item is not None:
            self.items.move_to_end(key)
        return item

    def put(self, key: int, value: object) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


class SparseExtent(VmdkExtent):
    """A hosted sparse extent (KDMV, also streamOptimized) or a VMFS sparse one (COWD)."""

    kind = "SPARSE"

    def __init__(
        self,
        file: HostFile,
        length: int,
        writable: bool,
        *,
        grain_sectors: int,
        gtes_per_gt: int,
        gd_offset: int,
        rgd_offset: int | None,
        gd_entries: int,
        zeroed_grain: bool,
        compressed: bool,
        markers: bool,
        kind: str,
        version: int,
        overhead: int = 0,
        footer: bool = False,
    ) -> None:
        super().__init__(file, length, writable)
        self.kind = kind
        self.version = version
        self.grain_size = grain_sectors * SECTOR
        self.gtes_per_gt = gtes_per_gt
        self.gt_bytes = gtes_per_gt * 4
        self.gt_span = self.grain_size * gtes_per_gt  # guest bytes one GT covers
        self.zeroed_grain = zeroed_grain
        self.compressed = compressed
        self.markers = markers
        self.lock = threading.Lock()
        self.file_end = -(-file.size() // SECTOR) * SECTOR
        if gd_entries > MAX_GD_ENTRIES:
            raise CorruptImage(
                f"{file.path}: grain directory of {gd_entries} entries is too big "
                f"(limit {MAX_GD_ENTRIES})"
            )
        self.gd_offset = gd_offset
        self.rgd_offset = rgd_offset
        self.gd = self._load_gd(gd_offset, gd_entries, "grain directory")
        self.rgd = (
            self._load_gd(rgd_offset, gd_entries, "redundant grain directory")
            if rgd_offset is not None
            else None
        )
        self.gt_cache = _LRU(GT_CACHE_BYTES // self.gt_bytes)
        self.grain_cache = _LRU(GRAIN_CACHE_BYTES // self.grain_size)
        self.overhead = overhead  # sectors before the first grain (header and tables)
        self.read_only_reason: str | None = None
        if compressed and writable:
            if footer or not markers:
                # The footer (or a marker-less stream) must stay last; appending would bury it.
                self.writable = False
                self.read_only_reason = (
                    "its grain directory is in the footer" if footer else "it has no markers"
                )
            else:
                # New compressed grains are appended after everything the tables reference,
                # each run followed by an end-of-stream marker.
                end = max(self._metadata_end(), overhead * SECTOR)
                if end > self.file_end:
                    # Appending there would leave a hole of any size and sector numbers past
                    # what a GT entry holds.
                    self.writable = False
                    self.read_only_reason = (
                        f"its tables reference byte {end}, past the end of the file "
                        f"({self.file_end} bytes)"
                    )
                else:
                    self.file_end = end

    def _metadata_end(self) -> int:
        """The end of the last byte any table references: GDs, GTs and grains (with their
        markers), rounded up to a sector."""
        assert self.file is not None
        end = self.gd_offset * SECTOR + len(self.gd) * 4
        if self.rgd is not None:
            end = max(end, self.rgd_offset * SECTOR + len(self.rgd) * 4)  # type: ignore[operator]
        last_grain = 0
        for table in (self.gd, self.rgd or ()):
            for gt_sector in table:
                if gt_sector:
                    end = max(end, gt_sector * SECTOR + self.gt_bytes)
                    if table is self.gd:
                        gt = array("I", bytes(self.file.pread(gt_sector * SECTOR, self.gt_bytes)))
                        last_grain = max(last_grain, max(gt, default=0))
        if last_grain > 1:
            _, size = GRAIN_MARKER.unpack(
                bytes(self.file.pread(last_grain * SECTOR, GRAIN_MARKER.size))
            )
            end = max(end, last_grain * SECTOR + GRAIN_MARKER.size + size)
        return -(-end // SECTOR) * SECTOR

    def _load_gd(self, sector: int, entries: int, what: str) -> array:
        offset = sector * SECTOR
        size = entries * 4
        if offset + size > self.file_end:
            raise CorruptImage(
                f"{self.describe()}: {what} at sector {sector} ({entries} entries) lies past "
                f"the end of the file ({self.file_end} bytes)"
            )
        table = array("I", bytes(self.file.pread(offset, size)))  # type: ignore[union-attr]
        if table and max(table) * SECTOR + self.gt_bytes > self.file_end:  # max() is C-fast
            for i, gt_sector in enumerate(table):
                if gt_sector and gt_sector * SECTOR + self.gt_bytes > self.file_end:
                    raise CorruptImage(
                        f"{self.describe()}: {what} entry {i} points at sector {gt_sector}, "
                        f"past the end of the file"
                    )
        return table

    def share_caches(self, ways: int) -> None:
        """Shrink the caches to a 1/ways share, when the disk has ``ways`` extents."""
        self.gt_cache.capacity = max(16, self.gt_cache.capacity // ways)
        self.grain_cache.capacity = max(2, self.grain_cache.capacity // ways)

    # -- lookups --------------------------------------------------------------------------------

    def _gt(self, gd_index: int, table_sector: int) -> array:
        key = table_sector
        gt = self.gt_cache.get(key)
        if gt is None:
            assert self.file is not None
            gt = array("I", bytes(self.file.pread(table_sector * SECTOR, self.gt_bytes)))
            self.gt_cache.put(key, gt)
        return gt  # type: ignore[return-value]

    def _gte(self, grain: int) -> int:
        gd_index, gt_index = divmod(grain, self.gtes_per_gt)
        if gd_index >= len(self.gd):
            return 0
        table = self.gd[gd_index]
        if table == 0:
            return 0
        return self._gt(gd_index, table)[gt_index]

    def _classify(self, gte: int) -> State:
        if gte == 0:
            return State.UNALLOCATED
        if gte == 1 and self.zeroed_grain:
            return State.ZERO
        return State.COMPRESSED if self.compressed else State.DATA

    def map(self, offset: int, length: int) -> Mapping:
        with self.lock:
            return self._map(offset, length, merge_compressed=True)

    def map_for_read(self, offset: int, length: int) -> Mapping:
        # A compressed run is read one grain at a time.
        with self.lock:
            return self._map(offset, length, merge_compressed=False)

    def _map(self, offset: int, length: int, merge_compressed: bool) -> Mapping:
        grain, within = divmod(offset, self.grain_size)
        first = self._gte(grain)
        state = self._classify(first)
        run = min(length, self.grain_size - within)
        host = first * SECTOR + within if state is State.DATA else None
        if state is State.COMPRESSED and not merge_compressed:
            return Mapping(state, None, run)
        # Extend across following grains with the same state (and contiguous host data),
        # up to the end of this grain table.
        last_in_gt = (grain // self.gtes_per_gt + 1) * self.gtes_per_gt
        expected = first
        g = grain + 1
        while run < length and g < last_in_gt:
            gte = self._gte(g)
            if self._classify(gte) is not state:
                break
            if state is State.DATA:
                expected += self.grain_size // SECTOR
                if gte != expected:
                    break
            run = min(length, run + self.grain_size)
            g += 1
        return Mapping(state, host, run)

    def read_compressed(self, offset: int, length: int) -> bytes:
        grain, within = divmod(offset, self.grain_size)
        with self.lock:
            data = self.grain_cache.get(grain)
            if data is None:
                data = self._inflate(grain, self._gte(grain))
                self.grain_cache.put(grain, data)
        return data[within : within + length]  # type: ignore[index]

    def _inflate(self, grain: int, gte: int) -> bytes:
        assert self.file is not None
        where = gte * SECTOR
        if where >= self.file_end:
            raise CorruptImage(f"{self.describe()}: grain {grain} at sector {gte} is past EOF")
        if self.markers:
            lba, size = GRAIN_MARKER.unpack(bytes(self.file.pread(where, GRAIN_MARKER.size)))
            limit = self.grain_size + self.grain_size // 2 + 4096
            if size == 0 or size > limit or where + GRAIN_MARKER.size + size > self.file_end:
                raise CorruptImage(
                    f"{self.describe()}: compressed grain {grain} has a bad size {size}"
                )
            payload = bytes(self.file.pread(where + GRAIN_MARKER.size, size))
        else:
            payload = bytes(
                self.file.pread(where, min(self.file_end - where, 2 * self.grain_size + 4096))
            )
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(payload, self.grain_size + 1)
        except zlib.error as e:
            raise CorruptImage(f"{self.describe()}: grain {grain} does not inflate: {e}") from None
        if len(data) > self.grain_size:
            raise CorruptImage(f"{self.describe()}: grain {grain} inflates past the grain size")
        if len(data) < self.grain_size:
            data += bytes(self.grain_size - len(data))
        return data

    # -- writes ---------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.describe()}: extent is read-only")

    def write(self, offset: int, data: memoryview, backing: BackingReader) -> None:
        self._check_writable()
        write_in_gt = self._append_compressed if self.compressed else self._write_in_gt
        with self.lock:
            end = offset + len(data)
            pos = offset
            while pos < end:
                gt_end = min(end, (pos // self.gt_span + 1) * self.gt_span)
                write_in_gt(pos, data[pos - offset : gt_end - offset], backing)
                pos = gt_end

    def _append_compressed(self, offset: int, data: memoryview, backing: BackingReader) -> None:
        """streamOptimized: every touched grain is rebuilt whole, deflated and appended with
        its marker; the GT then points at the new copy (an old copy is left unreferenced)."""
        assert self.file is not None
        gs = self.grain_size
        gd_index = offset // self.gt_span
        # A missing table is appended (blank) first, so the grains stay last before the EOS.
        gt, table = self._gt_for_update(gd_index)
        end = offset + len(data)
        first_grain, last_grain = offset // gs, (end - 1) // gs
        buf = bytearray()
        placed: list[tuple[int, int, bytes]] = []  # (grain, sector, content)
        for g in range(first_grain, last_grain + 1):
            lo, hi = max(offset, g * gs), min(end, (g + 1) * gs)
            if hi - lo == gs:
                content = bytes(data[lo - offset : hi - offset])
            else:
                gte = self._gte(g)
                state = self._classify(gte)
                if state is State.COMPRESSED:
                    cached = self.grain_cache.get(g)
                    old = cached if cached is not None else self._inflate(g, gte)
                elif state is State.UNALLOCATED:
                    old = bytes(backing(g * gs, gs))
                else:
                    old = bytes(gs)
                merged = bytearray(old)  # type: ignore[arg-type]
                merged[lo - g * gs : hi - g * gs] = data[lo - offset : hi - offset]
                content = bytes(merged)
            packed = zlib.compress(content)
            sector = (self.file_end + len(buf)) // SECTOR
            buf += GRAIN_MARKER.pack(g * gs // SECTOR, len(packed)) + packed
            buf += bytes(-len(buf) % SECTOR)
            placed.append((g, sector, content))
        buf += bytes(SECTOR)  # end-of-stream marker: all zeros
        self.file.pwrite(self.file_end, buf)
        self.file_end += len(buf) - SECTOR
        self.file.sync()  # barrier: the grains before the GT entries that name them
        base = gd_index * self.gtes_per_gt
        for g, sector, content in placed:
            gt[g - base] = sector
            self.grain_cache.put(g, content)
        self._write_gt_entries(gd_index, table, gt, first_grain - base, last_grain - base + 1)

    def zero(self, offset: int, length: int, backing: BackingReader, may_unmap: bool) -> None:
        if not self.zeroed_grain:
            super().zero(offset, length, backing, may_unmap)
            return
        self._check_writable()
        gs = self.grain_size
        first_full = -(-offset // gs) * gs
        last_full = (offset + length) // gs * gs
        if first_full >= last_full:
            super().zero(offset, length, backing, may_unmap)
            return
        if offset < first_full:
            super().zero(offset, first_full - offset, backing, may_unmap)
        with self.lock:
            pos = first_full
            while pos < last_full:
                gt_end = min(last_full, (pos // self.gt_span + 1) * self.gt_span)
                gd_index = pos // self.gt_span
                gt, table = self._gt_for_update(gd_index)
                lo = (pos % self.gt_span) // gs
                hi = lo + (gt_end - pos) // gs
                for i in range(lo, hi):
                    gt[i] = 1
                self._write_gt_entries(gd_index, table, gt, lo, hi)
                pos = gt_end
        if last_full < offset + length:
            super().zero(last_full, offset + length - last_full, backing, may_unmap)

    def _write_in_gt(self, offset: int, data: memoryview, backing: BackingReader) -> None:
        """Write a range that lies inside one grain table's span."""
        assert self.file is not None
        gs = self.grain_size
        gd_index = offset // self.gt_span
        end = offset + len(data)
        first_grain = offset // gs
        last_grain = (end - 1) // gs
        gtes = [self._gte(g) for g in range(first_grain, last_grain + 1)]
        # Grains already allocated take the data in place, in runs of contiguous host sectors.
        pending: list[int] = []  # grains that need allocating
        for i, gte in enumerate(gtes):
            g = first_grain + i
            if self._classify(gte) is State.DATA:
                lo, hi = max(offset, g * gs), min(end, (g + 1) * gs)
                host = gte * SECTOR + lo - g * gs
                if host + (hi - lo) > self.file_end or gte < self.overhead:
                    raise CorruptImage(
                        f"{self.describe()}: grain {g} at sector {gte} lies outside the grain "
                        f"area [{self.overhead}, {self.file_end // SECTOR})"
                    )
                self.file.pwrite(host, data[lo - offset : hi - offset])
            else:
                pending.append(i)
        if not pending:
            return
        # New grains go at the end of the file (which reads as zeros past its end), full grains
        # only: one pwrite for the run, or for grains too big to build at once, one per piece
        # of MAX_GRAIN_BUFFER.
        host = self.file_end
        if gs * len(pending) <= MAX_GRAIN_BUFFER:
            buf = bytearray(gs * len(pending))
            for n, i in enumerate(pending):
                g = first_grain + i
                lo, hi = max(offset, g * gs), min(end, (g + 1) * gs)
                if hi - lo < gs and self._classify(gtes[i]) is State.UNALLOCATED:
                    buf[n * gs : (n + 1) * gs] = backing(g * gs, gs)
                buf[n * gs + lo - g * gs : n * gs + hi - g * gs] = data[lo - offset : hi - offset]
            self.file.pwrite(host, buf)
        else:
            for n, i in enumerate(pending):
                g = first_grain + i
                from_backing = self._classify(gtes[i]) is State.UNALLOCATED
                for piece in range(0, gs, MAX_GRAIN_BUFFER):
                    start = g * gs + piece  # guest offset of this piece
                    n_bytes = min(MAX_GRAIN_BUFFER, gs - piece)
                    lo, hi = max(offset, start), min(end, start + n_bytes)
                    if lo == start and hi == start + n_bytes:
                        chunk: bytes | bytearray | memoryview = data[lo - offset : hi - offset]
                    else:
                        chunk = (
                            bytearray(backing(start, n_bytes))
                            if from_backing
                            else bytearray(n_bytes)
                        )
                        if lo < hi:
                            chunk[lo - start : hi - start] = data[lo - offset : hi - offset]
                    # Past the end of the file reads as zeros already: zero pieces stay holes.
                    if chunk != bytes(n_bytes):
                        self.file.pwrite(host + n * gs + piece, chunk)
            # The file must cover the new grains (reopening checks grains against its size).
            if self.file.size() < host + gs * len(pending):
                self.file.pwrite(host + gs * len(pending) - SECTOR, bytes(SECTOR))
        self.file_end = host + gs * len(pending)
        self.file.sync()  # barrier: the grains before the GT entries that name them
        gt, table = self._gt_for_update(gd_index)
        base_in_gt = first_grain - gd_index * self.gtes_per_gt
        for n, i in enumerate(pending):
            gt[base_in_gt + i] = host // SECTOR + n * (gs // SECTOR)
        self._write_gt_entries(
            gd_index, table, gt, base_in_gt + pending[0], base_in_gt + pending[-1] + 1
        )

    def grow(self, sectors: int) -> None:
        """Grow a hosted sparse extent (one with an embedded descriptor) to ``sectors``."""
        assert self.file is not None
        with self.lock:
            head = bytes(self.file.pread(0, SECTOR))
            fields = list(KDMV_HEADER.unpack(head))
            span = self.gt_span // SECTOR
            entries = -(-sectors // span)
            if entries > MAX_GD_ENTRIES:
                raise Unsupported(f"{self.describe()}: {sectors} sectors need too many tables")
            old_entries = len(self.gd)
            if entries > old_entries:
                # New directories at the end, each followed by its new (blank) tables; the
                # old directories stay where they are, unreferenced.
                gt_sectors = -(-self.gt_bytes // SECTOR)
                gd_sectors = -(-entries * 4 // SECTOR)
                blank_tables = bytes((entries - old_entries) * gt_sectors * SECTOR)
                copies = [("rgd", self.rgd)] if self.rgd is not None else []
                copies.append(("gd", self.gd))
                new_offsets: dict[str, int] = {}
                new_tables: dict[str, array] = {}
                for name, old in copies:
                    start = self.file_end // SECTOR
                    first_table = start + gd_sectors
                    table = array("I", old)  # type: ignore[arg-type]
                    table.extend(first_table + i * gt_sectors for i in range(entries - old_entries))
                    body = table.tobytes().ljust(gd_sectors * SECTOR, b"\0") + blank_tables
                    self.file.pwrite(start * SECTOR, body)
                    self.file_end += len(body)
                    new_offsets[name] = start
                    new_tables[name] = table
                self.file.sync()  # the tables are durable before the header points at them
                fields[9] = new_offsets["gd"]
                if "rgd" in new_offsets:
                    fields[8] = new_offsets["rgd"]
                self.gd = new_tables["gd"]
                self.gd_offset = new_offsets["gd"]
                if "rgd" in new_tables:
                    self.rgd = new_tables["rgd"]
                    self.rgd_offset = new_offsets["rgd"]
            fields[3] = sectors
            self.file.pwrite(0, KDMV_HEADER.pack(*fields))
            self.length = sectors * SECTOR

    def _gt_for_update(self, gd_index: int) -> tuple[array, int]:
        """The grain table for ``gd_index``, allocating it (and its redundant copy) if absent.
        New tables are written zero-filled before the GD entries that point at them."""
        assert self.file is not None
        if gd_index >= len(self.gd):
            raise CorruptImage(f"{self.describe()}: write past the grain directory")
        table = self.gd[gd_index]
        if table:
            return self._gt(gd_index, table), table
        blank = bytes(-(-self.gt_bytes // SECTOR) * SECTOR)
        new_table = self.file_end
        self.file.pwrite(new_table, blank)
        self.file_end += len(blank)
        if self.rgd is not None:
            new_rtable = self.file_end
            self.file.pwrite(new_rtable, blank)
            self.file_end += len(blank)
        self.file.sync()  # barrier: the new tables before the GD entries that name them
        try:
            if self.rgd is not None:
                self.rgd[gd_index] = new_rtable // SECTOR
                self.file.pwrite(
                    self.rgd_offset * SECTOR + gd_index * 4,  # type: ignore[operator]
                    struct.pack("<I", new_rtable // SECTOR),
                )
            self.gd[gd_index] = new_table // SECTOR
            self.file.pwrite(
                self.gd_offset * SECTOR + gd_index * 4, struct.pack("<I", new_table // SECTOR)
            )
        except BaseException:
            # A host error: forget the new tables (the disk's GD does not name them), or later
            # writes would fill a table no GD entry reaches. The space they took is leaked.
            self.gd[gd_index] = 0
            if self.rgd is not None:
                self.rgd[gd_index] = 0
            raise
        gt = array("I", bytes(self.gt_bytes))
        self.gt_cache.put(new_table // SECTOR, gt)
        return gt, new_table // SECTOR

    def _write_gt_entries(self, gd_index: int, table: int, gt: array, lo: int, hi: int) -> None:
        """Write GT entries [lo, hi) to the table and to its redundant copy."""
        assert self.file is not None
        chunk = gt[lo:hi].tobytes()
        try:
            self.file.pwrite(table * SECTOR + lo * 4, chunk)
            if self.rgd is not None and self.rgd[gd_index]:
                self.file.pwrite(self.rgd[gd_index] * SECTOR + lo * 4, chunk)
        except BaseException:
            # A host error: the cached table already holds the new entries but the disk may
            # not. Drop it so the next access reads what the disk holds; otherwise a later
            # write to the grain would go in place, to space no on-disk GT entry names.
            self.gt_cache.items.pop(table, None)
            raise

    # -- info and check -------------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        out = super().info()
        out["cluster-size"] = self.grain_size
        if self.compressed:
            out["compressed"] = True
        return out

    def check(self, messages: list[str]) -> tuple[int, int]:
        corrupt = allocated = 0
        assert self.file is not None
        grain_sectors = self.grain_size // SECTOR
        for gd_index, table in enumerate(self.gd):
            if not table:
                continue
            gt = array("I", bytes(self.file.pread(table * SECTOR, self.gt_bytes)))
            for i, gte in enumerate(gt):
                state = self._classify(gte)
                if state in (State.UNALLOCATED, State.ZERO):
                    continue
                allocated += 1
                end = (gte + (1 if self.compressed else grain_sectors)) * SECTOR
                if end > self.file_end:
                    corrupt += 1
                    if len(messages) < 100:
                        grain = gd_index * self.gtes_per_gt + i
                        messages.append(
                            f"{self.describe()}: grain {grain} at sector {gte} points past EOF"
                        )
        return corrupt, allocated


def open_sparse(file: HostFile, length: int, writable: bool) -> SparseExtent:
    """Open a hosted (KDMV) or VMFS (COWD) sparse extent from its header."""
    head = bytes(file.pread(0, 512))
    (magic,) = struct.unpack_from("<I", head)
    if magic == KDMV_MAGIC:
        return _open_kdmv(file, head, length, writable)
    if magic == COWD_MAGIC:
        return _open_cowd(file, head, length, writable)
    raise CorruptImage(f"{file.path}: not a sparse extent (magic {head[:4]!r})")


def read_kdmv_header(file: HostFile, head: bytes) -> tuple:
    fields = KDMV_HEADER.unpack(head)
    version = fields[1]
    if version not in (1, 2, 3):
        raise Unsupported(f"{file.path}: sparse extent version {version}")
    return fields


def _open_kdmv(file: HostFile, head: bytes, length: int, writable: bool) -> SparseExtent:
    fields = read_kdmv_header(file, head)
    (_, version, flags, capacity, grain, _, _, gtes, rgd, gd, overhead, _, _, compress) = fields
    gd_at_end = gd == GD_AT_END
    if gd_at_end:
        # streamOptimized written front to back: the real header is the footer, 1024 bytes
        # before the end (footer marker, footer, end-of-stream marker).
        size = file.size()
        if size < 1536:
            raise CorruptImage(f"{file.path}: stream image too short for a footer")
        tail = bytes(file.pread(size - 1536, 1536))
        _, marker_size, marker_type = MARKER.unpack_from(tail, 0)
        (footer_magic,) = struct.unpack_from("<I", tail, 512)
        if marker_size != 0 or marker_type != MARKER_FOOTER or footer_magic != KDMV_MAGIC:
            raise CorruptImage(f"{file.path}: grain directory at end, but no footer found")
        fields = read_kdmv_header(file, tail[512:1024])
        (_, version, flags, capacity, grain, _, _, gtes, rgd, gd, overhead, _, _, compress) = fields
        if gd == GD_AT_END:
            raise CorruptImage(f"{file.path}: footer gives no grain directory offset")
    if not (1 <= grain <= MAX_GRAIN_SECTORS) or grain & (grain - 1):
        raise CorruptImage(f"{file.path}: bad grain size {grain} sectors")
    if not (1 <= gtes <= MAX_GTES_PER_GT):
        raise CorruptImage(f"{file.path}: bad numGTEsPerGT {gtes}")
    compressed = bool(flags & FLAG_COMPRESSED)
    if compressed and compress != COMPRESS_DEFLATE:
        raise Unsupported(f"{file.path}: compression algorithm {compress}")
    if compressed and grain > MAX_COMPRESSED_GRAIN_SECTORS:
        raise Unsupported(
            f"{file.path}: compressed grains of {grain} sectors (imgfs inflates at most "
            f"{MAX_COMPRESSED_GRAIN_SECTORS})"
        )
    span = grain * gtes
    gd_entries = -(-capacity // span)
    if gd_entries > MAX_GD_ENTRIES:
        raise CorruptImage(
            f"{file.path}: capacity {capacity} sectors needs {gd_entries} grain directory "
            f"entries (limit {MAX_GD_ENTRIES})"
        )
    if capacity * SECTOR < length:
        raise CorruptImage(
            f"{file.path}: sparse extent capacity {capacity} sectors is smaller than the "
            f"descriptor's {length // SECTOR}"
        )
    footer = gd_at_end
    use_rgd = bool(flags & FLAG_REDUNDANT_GT) and rgd not in (0, GD_AT_END)
    if use_rgd and compressed:
        # VMware's streams carry no usable redundant tables; use them only if they are sane.
        gd_bytes = gd_entries * 4
        use_rgd = rgd * SECTOR + gd_bytes <= file.size() and rgd != gd
    return SparseExtent(
        file,
        length,
        writable,
        grain_sectors=grain,
        gtes_per_gt=gtes,
        gd_offset=gd,
        rgd_offset=rgd if use_rgd else None,
        gd_entries=gd_entries,
        zeroed_grain=bool(flags & FLAG_ZEROED_GRAIN),
        compressed=compressed,
        markers=bool(flags & FLAG_MARKERS),
        kind="streamOptimized" if compressed else "SPARSE",
        version=version,
        overhead=overhead,
        footer=footer,
    )


def _open_cowd(file: HostFile, head: bytes, length: int, writable: bool) -> SparseExtent:
    _, version, _, sectors, grain, gd, gd_entries, _ = COWD_HEADER.unpack_from(head)
    if not (1 <= grain <= MAX_GRAIN_SECTORS) or grain & (grain - 1):
        raise CorruptImage(f"{file.path}: bad grain size {grain} sectors")
    needed = -(-sectors // (grain * COWD_GTES_PER_GT))
    if gd_entries < needed:
        raise CorruptImage(f"{file.path}: {gd_entries} GD entries cannot cover {sectors} sectors")
    return SparseExtent(
        file,
        length,
        False,  # VMFS sparse is read-only here
        grain_sectors=grain,
        gtes_per_gt=COWD_GTES_PER_GT,
        gd_offset=gd,
        rgd_offset=None,
        gd_entries=min(gd_entries, needed),
        zeroed_grain=False,
        compressed=False,
        markers=False,
        kind="VMFSSPARSE",
        version=version,
    )


class SeSparseExtent(VmdkExtent):
    """ESXi's space-efficient sparse extent (read-only): 4 KiB grains, 64-bit GD/GT entries
    whose top nibble is the state (GD: 1 allocated; GT: 0 unallocated, 1 unmapped, 2 zero,
    3 allocated with the grain index split across the low 48 and the next 12 bits)."""

    kind = "SESPARSE"

    def __init__(self, file: HostFile, length: int) -> None:
        super().__init__(file, length, False)
        h = SESPARSE_HEADER.unpack(bytes(file.pread(0, SESPARSE_HEADER.size)))
        (magic, version, capacity, grain, gt_size, flags) = h[:6]
        # h[6:10] are reserved; then volatile header, journal header, journal (offset, size).
        vol_off = h[10]
        (gd_off, gd_size, gts_off, gts_size, _fb_off, _fb_size, _bm_off, _bm_size) = h[16:24]
        (grains_off, grains_size) = h[24:26]
        if magic != SESPARSE_MAGIC:
            raise CorruptImage(f"{file.path}: not a seSparse extent (magic {magic:#x})")
        if version != 0x200000001:
            raise Unsupported(f"{file.path}: seSparse version {version:#x}")
        if grain != 8 or gt_size != 64 or flags != 0:
            raise Unsupported(
                f"{file.path}: seSparse grain size {grain}, table size {gt_size}, "
                f"flags {flags:#x} (only 8, 64, 0 are known)"
            )
        self.file_end = file.size()
        for name, off, size in (
            ("grain directory", gd_off, gd_size),
            ("grain tables", gts_off, gts_size),
            ("grains", grains_off, grains_size),
        ):
            if off >= SESPARSE_LIMIT or size >= SESPARSE_LIMIT:
                raise CorruptImage(f"{file.path}: seSparse {name} at {off}+{size} is absurd")
        if capacity * SECTOR < length:
            raise CorruptImage(f"{file.path}: seSparse capacity {capacity} below the extent")
        vmagic, _free_gt, _txn, replay = SESPARSE_VOLATILE.unpack(
            bytes(file.pread(vol_off * SECTOR, SESPARSE_VOLATILE.size))
        )
        if vmagic != SESPARSE_VOLATILE_MAGIC:
            raise CorruptImage(f"{file.path}: seSparse volatile header magic {vmagic:#x}")
        if replay:
            raise Unsupported(f"{file.path}: seSparse journal needs replaying")
        self.grain_size = grain * SECTOR
        self.gtes_per_gt = gt_size * SECTOR // 8
        self.gt_bytes = gt_size * SECTOR
        self.gt_span = self.grain_size * self.gtes_per_gt
        entries = -(-capacity * SECTOR // self.gt_span)
        if entries * 8 > gd_size * SECTOR or entries > MAX_GD_ENTRIES:
            raise CorruptImage(
                f"{file.path}: seSparse grain directory of {gd_size} sectors cannot cover "
                f"{capacity} sectors"
            )
        self.gd = array("Q", bytes(file.pread(gd_off * SECTOR, entries * 8)))
        self.gts_offset = gts_off * SECTOR
        self.gts_count = gts_size // gt_size
        self.grains_offset = grains_off * SECTOR
        self.grains_count = grains_size // grain
        self.gt_cache = _LRU(GT_CACHE_BYTES // self.gt_bytes)
        self.lock = threading.Lock()

    def _gte(self, grain: int) -> int:
        gd_index, gt_index = divmod(grain, self.gtes_per_gt)
        if gd_index >= len(self.gd):
            return 0
        gde = self.gd[gd_index]
        top = gde >> 60
        if top == 0:
            if gde:
                raise CorruptImage(f"{self.describe()}: bad seSparse GD entry {gde:#x}")
            return 0
        if top != 1:
            raise CorruptImage(f"{self.describe()}: bad seSparse GD entry {gde:#x}")
        table = gde & ((1 << 60) - 1)
        if table >= self.gts_count:
            raise CorruptImage(f"{self.describe()}: seSparse grain table {table} out of range")
        gt = self.gt_cache.get(table)
        if gt is None:
            assert self.file is not None
            gt = array(
                "Q", bytes(self.file.pread(self.gts_offset + table * self.gt_bytes, self.gt_bytes))
            )
            self.gt_cache.put(table, gt)
        return gt[gt_index]  # type: ignore[index]

    def _decode(self, gte: int) -> tuple[State, int | None]:
        top = gte >> 60
        if top == 0:
            if gte:
                raise CorruptImage(f"{self.describe()}: bad seSparse GT entry {gte:#x}")
            return State.UNALLOCATED, None
        if top in (1, 2):  # unmapped and zeroed both read as zeros
            return State.ZERO, None
        if top == 3:
            index = ((gte & 0x0FFF000000000000) >> 48) | ((gte & 0x0000FFFFFFFFFFFF) << 12)
            if index >= self.grains_count:
                raise CorruptImage(f"{self.describe()}: seSparse grain {index} out of range")
            return State.DATA, self.grains_offset + index * self.grain_size
        raise CorruptImage(f"{self.describe()}: bad seSparse GT entry {gte:#x}")

    def map(self, offset: int, length: int) -> Mapping:
        grain, within = divmod(offset, self.grain_size)
        with self.lock:
            state, host = self._decode(self._gte(grain))
            run = min(length, self.grain_size - within)
            g = grain + 1
            while run < length and g % self.gtes_per_gt:
                s2, h2 = self._decode(self._gte(g))
                if s2 is not state:
                    break
                if state is State.DATA and h2 != host + (g - grain) * self.grain_size:  # type: ignore[operator]
                    break
                run = min(length, run + self.grain_size)
                g += 1
        return Mapping(state, host + within if host is not None else None, run)

    def info(self) -> dict[str, object]:
        out = super().info()
        out["cluster-size"] = self.grain_size
        return out
