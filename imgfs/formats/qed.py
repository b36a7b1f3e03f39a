"""qed: the QEMU Enhanced Disk format (docs/interop/qed_spec.txt).

Layout: a little-endian header in the first ``header_size`` clusters, one L1 table, L2 tables
and data clusters, all cluster aligned. Tables are ``table_size`` clusters of 64-bit offsets. A
data entry is 0 (unallocated: the backing image answers), 1 (a zero cluster) or a cluster offset.

Writes append clusters at the end of the file: the data first, then a new L2 table (already
holding the new entries), then the L1 entry, so that a crash leaves at worst leaked clusters.
The NEED_CHECK feature bit is set (and synced) before the first allocating write and cleared by
the next flush once everything is durable, as qemu does; a writable open of an image that still
has it runs the consistency check and repair first.

Each pointer update is behind a ``sync()`` barrier: new data clusters (and a new L2 table) are
durable before an L2 entry (or the L1 entry) points at them. The host may write dirty pages back
in any order, so without it a crash can leave an entry past the end of the file (which a
read-only open cannot use until a writable open repairs it) or, over a backing file, a cluster
of zeros where a partial write's untouched sectors held the backing data (which no check can
see). One host sync per allocating write; overwrites of allocated clusters need none.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Self

from imgfs.block.driver import (
    BackingSpec,
    BlockDriver,
    CheckResult,
    ImageInfo,
    OpenOptions,
    ProbeInput,
    RepairMode,
    read_stored_name,
)
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, InvalidRequest, Unsupported
from imgfs.units import size_option

MAGIC = b"QED\0"
HEADER = struct.Struct("<4sIIIQQQQQII")
assert HEADER.size == 64

F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
KNOWN_FEATURES = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE

CLUSTER_MIN = 4096
CLUSTER_MAX = 64 * 1024 * 1024
TABLE_MIN = 1
TABLE_MAX = 16
DEFAULT_CLUSTER = 64 * 1024
DEFAULT_TABLE = 4
# qemu refuses backing names longer than its PATH_MAX buffer.
BACKING_NAME_MAX = 4096
# Virtual sizes beyond this are refused (offsets must fit in a signed 64-bit file offset).
SIZE_MAX = 1 << 62
# One _map call takes no more steps (a cluster, or a table page's run of zero entries) than
# this; callers loop. A block-status request over a huge disk must not walk millions of entries
# under the lock.
MAP_RUN_STEPS = 65536

ZERO_CLUSTER = 1
# check() reports the first problems found, not all of a hostile image's millions.
MAX_MESSAGES = 20
# L2 tables are cached in pages of this many bytes, so a huge table never loads whole.
L2_PAGE_BYTES = 64 * 1024
L2_CACHE_PAGES = 128  # 8 MiB at most

_ENTRY = struct.Struct("<Q")
_ZERO_PAGE = bytes(L2_PAGE_BYTES)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class PageCache:
    """A bounded LRU of table pages: key -> array of entries (native ints)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pages: OrderedDict[tuple[int, int], array] = OrderedDict()

    def get(self, key: tuple[int, int]) -> array | None:
        page = self._pages.get(key)
        if page is not None:
            self._pages.move_to_end(key)
        return page

    def put(self, key: tuple[int, int], page: array) -> None:
        self._pages[key] = page
        self._pages.move_to_end(key)
        while len(self._pages) > self.capacity:
            self._pages.popitem(last=False)

    def clear(self) -> None:
        self._pages.clear()


def entries_from_bytes(raw: bytes | bytearray | memoryview, big_endian: bool) -> array:
    table = array("Q", bytes(raw))
    if big_endian != (sys.byteorder == "big"):
        table.byteswap()
    return table


@dataclass(slots=True)
class QedHeader:
    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            self.cluster_size,
            self.table_size,
            self.header_size,
            self.features,
            self.compat_features,
            self.autoclear_features,
            self.l1_table_offset,
            self.image_size,
            self.backing_filename_offset,
            self.backing_filename_size,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> QedHeader:
        magic, *fields = HEADER.unpack_from(raw)
        return cls(*fields)


def max_image_size(cluster_size: int, table_size: int) -> int:
    entries = table_size * cluster_size // 8
    return entries * entries * cluster_size


class QedDriver(BlockDriver):
    format_name = "qed"
    supports_write = True

    create_options = {
        "cluster_size": "cluster size in bytes, a power of two from 4 KiB to 64 MiB (64 KiB)",
        "table_size": "L1/L2 table size in clusters, a power of two from 1 to 16 (4)",
        "backing_file": "name of the backing image (relative to the new image)",
        "backing_fmt": "format of the backing image; 'raw' is recorded, others are probed",
    }

    def __init__(
        self, file: HostFile, options: OpenOptions, header: QedHeader, backing_name: str | None
    ) -> None:
        super().__init__(file, options)
        self.header = header
        self.cluster_size = header.cluster_size
        self.cluster_bits = header.cluster_size.bit_length() - 1
        self.table_bytes = header.table_size * header.cluster_size
        self.table_entries = self.table_bytes // 8
        self.l2_span = self.table_entries * self.cluster_size
        self.page_entries = min(self.table_entries, L2_PAGE_BYTES // 8)
        self._backing_name = backing_name
        self._lock = threading.RLock()
        self._l2_cache = PageCache(L2_CACHE_PAGES)
        # New clusters go past everything the header accounts for, even in a file cut short.
        self._file_end = max(
            self._round_up(file.size()),
            header.header_size * header.cluster_size,
            header.l1_table_offset + self.table_bytes,
        )
        self.l1 = array("Q")
        self._load_l1()
        self.notes: list[str] = []

    # -- open ----------------------------------------------------------------------------------

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        return 100 if probe.head[:4] == MAGIC else 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        path = file.path
        raw = bytes(file.pread(0, HEADER.size))
        if raw[:4] != MAGIC:
            raise CorruptImage(f"{path}: not a qed image (magic {raw[:4]!r})")
        h = QedHeader.unpack(raw)
        if not _is_pow2(h.cluster_size) or not CLUSTER_MIN <= h.cluster_size <= CLUSTER_MAX:
            raise CorruptImage(f"{path}: bad qed cluster_size {h.cluster_size}")
        if not _is_pow2(h.table_size) or not TABLE_MIN <= h.table_size <= TABLE_MAX:
            raise CorruptImage(f"{path}: bad qed table_size {h.table_size}")
        unknown = h.features & ~KNOWN_FEATURES
        if unknown:
            raise Unsupported(f"{path}: unknown qed feature bits {unknown:#x}")
        file_size = file.size()
        header_bytes = h.header_size * h.cluster_size
        if h.header_size < 1 or header_bytes > max(file_size, h.cluster_size):
            raise CorruptImage(f"{path}: bad qed header_size {h.header_size}")
        if h.image_size % 512 or h.image_size > min(
            SIZE_MAX, max_image_size(h.cluster_size, h.table_size)
        ):
            raise CorruptImage(f"{path}: bad qed image_size {h.image_size}")
        if (
            h.l1_table_offset % h.cluster_size
            or h.l1_table_offset < header_bytes
            or h.l1_table_offset >= file_size
        ):
            raise CorruptImage(f"{path}: bad qed l1_table_offset {h.l1_table_offset}")
        l2_span = (h.table_size * h.cluster_size // 8) * h.cluster_size
        l1_len = -(-h.image_size // l2_span) * 8
        if h.l1_table_offset + l1_len > file_size:
            raise CorruptImage(
                f"{path}: qed L1 table at {h.l1_table_offset} ({l1_len} bytes) "
                f"passes the end of the file ({file_size})"
            )
        backing_name = None
        if h.features & F_BACKING_FILE:
            backing_name = read_stored_name(
                file, h.backing_filename_offset, h.backing_filename_size, first=HEADER.size,
                end=header_bytes, max_size=BACKING_NAME_MAX, what="qed backing file name",
            )  # fmt: skip
        if h.autoclear_features and not options.read_only and file.writable:
            h.autoclear_features = 0
            file.pwrite(0, h.pack())
        driver = cls(file, options, h, backing_name)
        if h.features & F_NEED_CHECK:
            if driver.read_only:
                driver.notes.append("the image needs a consistency check (opened read-only)")
            else:
                result = driver.check(RepairMode.ALL)
                if result.corruptions > result.corruptions_fixed:
                    raise CorruptImage(
                        f"{path}: qed consistency check failed: {result.corruptions} "
                        f"corruptions, first: {result.messages[0] if result.messages else '?'}"
                    )
                driver._set_need_check(False)
                driver.file.sync()
                driver.notes.append(
                    f"consistency check after an unclean shutdown: {result.corruptions_fixed} "
                    f"corruptions fixed, {result.leaks} leaked clusters"
                )
        return driver

    def _load_l1(self) -> None:
        count = -(-self.header.image_size // self.l2_span)
        self.l1 = entries_from_bytes(
            self.file.pread(self.header.l1_table_offset, count * 8), big_endian=False
        )

    @property
    def virtual_size(self) -> int:
        return self.header.image_size

    @property
    def backing_spec(self) -> BackingSpec | None:
        if self._backing_name is None:
            return None
        raw = bool(self.header.features & F_BACKING_FORMAT_NO_PROBE)
        return BackingSpec(self._backing_name, "raw" if raw else None)

    # -- helpers -------------------------------------------------------------------------------

    def _round_up(self, n: int) -> int:
        return -(-n // self.cluster_size) * self.cluster_size

    def _valid_table_offset(self, offset: int) -> bool:
        return (
            offset % self.cluster_size == 0
            and offset >= self.header.header_size * self.cluster_size
            and offset + self.table_bytes <= self._file_end
        )

    def _valid_data_offset(self, offset: int) -> bool:
        return (
            offset % self.cluster_size == 0
            and offset >= self.header.header_size * self.cluster_size
            and offset < self._file_end
        )

    def _l2_page(self, l2_offset: int, page_no: int) -> array:
        key = (l2_offset, page_no)
        page = self._l2_cache.get(key)
        if page is None:
            page_bytes = self.page_entries * 8
            raw = self.file.pread(l2_offset + page_no * page_bytes, page_bytes)
            page = entries_from_bytes(raw, big_endian=False)
            self._l2_cache.put(key, page)
        return page

    def _l2_offset(self, l1_index: int) -> int:
        l2_offset = self.l1[l1_index]
        if l2_offset and not self._valid_table_offset(l2_offset):
            raise CorruptImage(
                f"{self.file.path}: qed L1 entry {l1_index} points at a bad L2 table {l2_offset:#x}"
            )
        return l2_offset

    def _entry(self, cluster: int) -> int:
        """The L2 entry of guest cluster ``cluster`` (0 when its L2 table is unallocated)."""
        l1_index, l2_index = divmod(cluster, self.table_entries)
        l2_offset = self._l2_offset(l1_index)
        if not l2_offset:
            return 0
        page_no, i = divmod(l2_index, self.page_entries)
        entry = self._l2_page(l2_offset, page_no)[i]
        if entry > ZERO_CLUSTER and not self._valid_data_offset(entry):
            raise CorruptImage(
                f"{self.file.path}: qed L2 entry for guest offset "
                f"{cluster * self.cluster_size} points at a bad cluster {entry:#x}"
            )
        return entry

    def _map(self, offset: int, length: int) -> tuple[int, int]:
        """(entry, run length) for the run starting at ``offset``: a run of contiguous host
        clusters, of zero clusters, or of unallocated clusters, at most ``length`` bytes."""
        cs = self.cluster_size
        cluster = offset // cs
        first = self._entry(cluster)
        run = min(length, cs - offset % cs)
        if not first:
            return 0, self._unallocated_run(cluster + 1, run, length)
        expected = first
        steps = 0
        while run < length and steps < MAP_RUN_STEPS:
            steps += 1
            cluster += 1
            if first > ZERO_CLUSTER:
                expected += cs
            entry = self._entry(cluster)
            if entry != expected:
                break
            run = min(length, run + cs)
        return first, run

    def _unallocated_run(self, cluster: int, run: int, length: int) -> int:
        """``run`` extended over the zero entries from ``cluster`` on, a table page (or an
        absent table) at a time, so a huge empty disk maps in few steps. Stops before a table
        that cannot be read: the error is raised when a request reaches it."""
        cs = self.cluster_size
        steps = 0
        while run < length and steps < MAP_RUN_STEPS:
            steps += 1
            l1_index, l2_index = divmod(cluster, self.table_entries)
            try:
                l2_offset = self._l2_offset(l1_index)
                if not l2_offset:
                    left = zeros = self.table_entries - l2_index
                else:
                    page_no, i = divmod(l2_index, self.page_entries)
                    raw = self._l2_page(l2_offset, page_no)[i:].tobytes()
                    left = self.page_entries - i
                    zeros = (len(raw) - len(raw.lstrip(b"\0"))) // 8
            except CorruptImage:
                break
            run = min(length, run + zeros * cs)
            cluster += zeros
            if zeros < left:
                break
        return run

    # -- data ----------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        out: bytearray | None = None
        pos, end = offset, offset + length
        while pos < end:
            with self._lock:
                entry, run = self._map(pos, end - pos)
            if entry > ZERO_CLUSTER:
                piece = self.file.pread(entry + pos % self.cluster_size, run)
            elif entry == ZERO_CLUSTER:
                piece = bytes(run)
            else:
                piece = self.read_backing(pos, run)
            if run == length:
                return piece
            if out is None:
                out = bytearray(length)
            out[pos - offset : pos - offset + run] = piece
            pos += run
        return out if out is not None else b""

    def _set_need_check(self, on: bool) -> None:
        h = self.header
        new = (h.features | F_NEED_CHECK) if on else (h.features & ~F_NEED_CHECK)
        if new != h.features:
            h.features = new
            self.file.pwrite(0, h.pack())

    def _before_allocation(self) -> None:
        """The image is marked as needing a check, durably, before metadata changes."""
        if not self.header.features & F_NEED_CHECK:
            self._set_need_check(True)
            self.file.sync()

    def _allocate(self, nbytes: int) -> int:
        offset = self._file_end
        self._file_end += self._round_up(nbytes)
        return offset

    def _set_entries(self, cluster: int, entries: list[int]) -> None:
        """Point guest clusters ``cluster...`` (all in one L2 table) at ``entries``; allocates
        the L2 table if needed (its contents written before the L1 entry)."""
        l1_index, l2_index = divmod(cluster, self.table_entries)
        l2_offset = self._l2_offset(l1_index)
        if not l2_offset:
            table = array("Q", bytes(self.table_bytes))
            table[l2_index : l2_index + len(entries)] = array("Q", entries)
            if sys.byteorder == "big":
                table.byteswap()
            l2_offset = self._allocate(self.table_bytes)
            self.file.pwrite(l2_offset, table.tobytes())
            self.file.sync()  # barrier: the data and the new table before the L1 entry
            self.file.pwrite(self.header.l1_table_offset + l1_index * 8, _ENTRY.pack(l2_offset))
            # Only now in memory: after a host error the disk's L1 does not name the table, and
            # a retried write must allocate again rather than fill a table nothing reaches.
            self.l1[l1_index] = l2_offset
            return
        raw = b"".join(_ENTRY.pack(e) for e in entries)
        if any(e > ZERO_CLUSTER for e in entries):
            self.file.sync()  # barrier: the new data before the L2 entries that point at it
        self.file.pwrite(l2_offset + l2_index * 8, raw)
        for i, e in enumerate(entries):
            page_no, j = divmod(l2_index + i, self.page_entries)
            page = self._l2_cache.get((l2_offset, page_no))
            if page is not None:
                page[j] = e

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_writable()
        view = memoryview(data).cast("B")
        cs = self.cluster_size
        pos, end = offset, offset + len(view)
        with self._lock:
            while pos < end:
                entry, run = self._map(pos, end - pos)
                if entry > ZERO_CLUSTER:
                    self.file.pwrite(entry + pos % cs, view[pos - offset : pos - offset + run])
                    pos += run
                    continue
                # Allocate the clusters of this run, up to the end of its L2 table.
                first = pos // cs
                last = (pos + run - 1) // cs
                last = min(last, (first // self.table_entries + 1) * self.table_entries - 1)
                run = min(run, (last + 1) * cs - pos)
                start, stop = first * cs, (last + 1) * cs
                head, tail = pos - start, stop - (pos + run)
                self._before_allocation()
                if not head and not tail:
                    # Whole clusters: the caller's bytes go straight to the new space (a zeroed
                    # staging copy cost more CPU than the write itself).
                    host = self._allocate(run)
                    self.file.pwrite(host, view[pos - offset : pos - offset + run])
                    self._set_entries(first, [host + i * cs for i in range(last - first + 1)])
                    pos += run
                    continue
                buf = bytearray(stop - start)
                if entry == 0 and self.backing is not None:
                    if head:
                        buf[:head] = self.read_backing(start, head)
                    if tail:
                        tail_at = min(stop, self.virtual_size)
                        if tail_at > pos + run:
                            buf[len(buf) - tail : len(buf) - tail + (tail_at - pos - run)] = (
                                self.read_backing(pos + run, tail_at - pos - run)
                            )
                buf[head : head + run] = view[pos - offset : pos - offset + run]
                host = self._allocate(len(buf))
                self.file.pwrite(host, buf)
                self._set_entries(first, [host + i * cs for i in range(last - first + 1)])
                pos += run

    def discard(self, offset: int, length: int) -> None:
        self.check_writable()
        self._zero_whole_clusters(offset, length, discard=True)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.check_writable()
        cs = self.cluster_size
        end = offset + length
        first = -(-offset // cs) * cs
        last = end // cs * cs
        if end == self.virtual_size:
            last = self._round_up(end)
        if first >= last:
            super().write_zeroes(offset, length, may_unmap)
            return
        if offset < first:
            super().write_zeroes(offset, first - offset, may_unmap)
        self._zero_whole_clusters(first, min(last, end) - first, discard=False)
        if last < end:
            super().write_zeroes(last, end - last, may_unmap)

    def _zero_whole_clusters(self, offset: int, length: int, discard: bool) -> None:
        """Whole clusters of the range: allocated ones get their host space punched (the
        mapping stays, so nothing leaks); unallocated ones over a backing image become zero
        clusters unless this is a discard."""
        cs = self.cluster_size
        start = -(-offset // cs)
        stop = (offset + length) // cs
        if offset + length == self.virtual_size:
            stop = -(-(offset + length) // cs)
        with self._lock:
            cluster = start
            while cluster < stop:
                entry, run = self._map(cluster * cs, (stop - cluster) * cs)
                n = -(-run // cs)
                if entry > ZERO_CLUSTER:
                    if not self.file.punch_hole(entry, n * cs):
                        self.file.pwrite(entry, bytes(n * cs))
                elif entry == 0 and self.backing is not None and not discard:
                    self._before_allocation()
                    done = 0
                    while done < n:
                        c = cluster + done
                        k = min(n - done, self.table_entries - c % self.table_entries)
                        self._set_entries(c, [ZERO_CLUSTER] * k)
                        done += k
                cluster += n

    def block_status(self, offset: int, length: int) -> Extent:
        with self._lock:
            entry, run = self._map(offset, length)
        if entry > ZERO_CLUSTER:
            host = entry + offset % self.cluster_size
            return Extent(offset, run, Allocation.DATA, host_offset=host)
        if entry == ZERO_CLUSTER:
            return Extent(offset, run, Allocation.ZERO)
        return Extent(offset, run, Allocation.UNALLOCATED)

    def flush(self) -> None:
        with self._lock:
            self.file.sync()
            if self.header.features & F_NEED_CHECK and not self.read_only:
                self._set_need_check(False)
                self.file.sync()

    def resize(self, new_size: int) -> None:
        self.check_writable()
        h = self.header
        if new_size % 512 or new_size > min(SIZE_MAX, max_image_size(h.cluster_size, h.table_size)):
            raise InvalidRequest(
                f"{self.file.path}: qed size {new_size} is not a multiple of 512 or too large "
                f"for cluster_size {h.cluster_size} and table_size {h.table_size}"
            )
        if new_size < h.image_size:
            raise Unsupported(f"{self.file.path}: qed images cannot shrink")
        with self._lock:
            h.image_size = new_size
            self.file.pwrite(0, h.pack())
            self._load_l1()

    # -- management ----------------------------------------------------------------------------

    def info(self) -> ImageInfo:
        info = super().info()
        info.cluster_size = self.cluster_size
        info.dirty_flag = bool(self.header.features & F_NEED_CHECK)
        info.notes.extend(self.notes)
        return info

    def check(self, repair: RepairMode) -> CheckResult:
        """qemu's qed check: every table and data offset aligned and inside the file, every
        cluster referenced once; unreferenced clusters are leaks. Repair zeroes bad entries."""
        # Leaks cannot be repaired (nor can qemu): only RepairMode.ALL changes anything.
        fix = repair is RepairMode.ALL
        if fix:
            self.check_writable()
        cs = self.cluster_size
        result = CheckResult()
        with self._lock:
            file_size = self.file.size()
            nclusters = -(-file_size // cs)
            used = bytearray(nclusters)
            header_clusters = self.header.header_size
            used[:header_clusters] = b"\1" * min(header_clusters, nclusters)

            def mark(offset: int, count: int) -> bool:
                first = offset // cs
                count = max(0, min(count, nclusters - first))
                if any(used[first : first + count]):
                    return False
                used[first : first + count] = b"\1" * count
                return True

            mark(self.header.l1_table_offset, self.header.table_size)
            allocated = fragmented = 0
            last_host = -1
            # The whole L1 table, as qemu checks it, not only the entries the size uses.
            for l1_index, l2_offset in list(self._iter_table(self.header.l1_table_offset)):
                ok = (
                    l2_offset % cs == 0
                    and l2_offset + self.table_bytes <= nclusters * cs
                    and l2_offset >= header_clusters * cs
                )
                if not ok or not mark(l2_offset, self.header.table_size):
                    result.corruptions += 1
                    if len(result.messages) < MAX_MESSAGES:
                        result.messages.append(f"L1 entry {l1_index}: bad L2 offset {l2_offset:#x}")
                    if fix:
                        if l1_index < len(self.l1):
                            self.l1[l1_index] = 0
                        self.file.pwrite(self.header.l1_table_offset + l1_index * 8, bytes(8))
                        result.corruptions_fixed += 1
                    continue
                for l2_index, entry in self._iter_table(l2_offset):
                    if entry <= ZERO_CLUSTER:
                        continue
                    ok = entry % cs == 0 and entry < nclusters * cs and entry >= cs
                    allocated += 1
                    if ok and mark(entry, 1):
                        if last_host >= 0 and entry != last_host + cs:
                            fragmented += 1
                        last_host = entry
                        continue
                    result.corruptions += 1
                    if len(result.messages) < MAX_MESSAGES:
                        result.messages.append(
                            f"L2 table {l2_offset:#x} entry {l2_index}: bad cluster {entry:#x}"
                        )
                    if fix:
                        self.file.pwrite(l2_offset + l2_index * 8, bytes(8))
                        result.corruptions_fixed += 1
            self._l2_cache.clear()
            result.leaks = used.count(0)
            result.total_clusters = -(-self.header.image_size // cs)
            result.allocated_clusters = allocated
            result.fragmented_clusters = fragmented
            result.image_end_offset = nclusters * cs
            if fix and result.corruptions == result.corruptions_fixed:
                self.file.sync()
        return result

    def _iter_table(self, table_offset: int) -> Iterator[tuple[int, int]]:
        """(index, entry) of the non-zero entries of a whole table, read a page at a time;
        holes in the host file are skipped without reading them."""
        page_bytes = self.page_entries * 8
        pos, end = 0, self.table_bytes
        while pos < end:
            is_data, run = self.file.data_extents(table_offset + pos, end - pos)
            if not is_data and run >= page_bytes:
                pos += run // page_bytes * page_bytes  # whole pages of hole only
                continue
            raw = self.file.pread(table_offset + pos, page_bytes)
            if raw != _ZERO_PAGE[:page_bytes]:
                base = pos // 8
                for i, entry in enumerate(entries_from_bytes(raw, big_endian=False)):
                    if entry:
                        yield base + i, entry
            pos += page_bytes

    # -- create --------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        unknown = set(options) - set(cls.create_options)
        if unknown:
            raise InvalidRequest(f"qed: unknown option(s) {', '.join(sorted(unknown))}")
        cluster_size = size_option(options, "cluster_size", DEFAULT_CLUSTER)
        table_size = size_option(options, "table_size", DEFAULT_TABLE)
        if not _is_pow2(cluster_size) or not CLUSTER_MIN <= cluster_size <= CLUSTER_MAX:
            raise InvalidRequest(f"qed: bad cluster_size {cluster_size}")
        if not _is_pow2(table_size) or not TABLE_MIN <= table_size <= TABLE_MAX:
            raise InvalidRequest(f"qed: bad table_size {table_size}")
        size = -(-size // 512) * 512
        if size < 0 or size > min(SIZE_MAX, max_image_size(cluster_size, table_size)):
            raise InvalidRequest(f"qed: bad size {size} for cluster_size {cluster_size}")
        backing = options.get("backing_file")
        backing_fmt = options.get("backing_fmt")
        features = 0
        name = b""
        if backing:
            name = backing.encode("utf-8", "surrogateescape")
            if len(name) > min(BACKING_NAME_MAX, cluster_size - HEADER.size):
                raise InvalidRequest(f"qed: backing file name too long ({len(name)} bytes)")
            features |= F_BACKING_FILE
            if backing_fmt == "raw":
                features |= F_BACKING_FORMAT_NO_PROBE
        elif backing_fmt:
            raise InvalidRequest("qed: backing_fmt given without backing_file")
        header = QedHeader(
            cluster_size=cluster_size,
            table_size=table_size,
            header_size=1,
            features=features,
            compat_features=0,
            autoclear_features=0,
            l1_table_offset=cluster_size,
            image_size=size,
            backing_filename_offset=HEADER.size if name else 0,
            backing_filename_size=len(name),
        )
        with open(path, "wb") as f:
            f.write(header.pack() + name)
            f.truncate(cluster_size * (1 + table_size))
            f.flush()
            os.fsync(f.fileno())


register(QedDriver)
