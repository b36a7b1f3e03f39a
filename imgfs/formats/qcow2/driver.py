"""The qcow2 driver: QEMU's copy-on-write format, versions 2 (compat 0.10) and 3 (compat 1.1).

Reads map guest clusters through the L1 table (held in memory) and L2 tables (bounded LRU
cache); writes allocate clusters from the refcount structures.

Crash-safe write ordering (every arrow is a ``sync()`` barrier in :meth:`flush`):

1. guest data is written into its new host cluster before the L2 entry pointing at it changes,
   and before that L2 table is written (the first barrier of a flush covers the data);
2. refcount increases (new refcount blocks self-describing) -> refcount table entries
   -> L2 tables -> L1 entries, so on-disk metadata never points at a cluster whose refcount
   is still 0 (a crash leaks clusters at worst; ``qemu-img check -r leaks`` reclaims them);
3. a dirty L2 table evicted from the cache is written only after the refcount blocks are
   written and synced (same rule as 2);
4. refcount *decreases* (discard, COW out of a compressed cluster) are deferred until the L2/L1
   tables that stopped referencing the clusters are on disk, then applied, written and the host
   ranges punched. Until then the old clusters keep their refcount, so they are never reused
   while a read or an on-disk table may still reference them.

Lazy refcounts are never used for writing (updates are always ordered); the feature bit is kept.

Other choices:

* persistent bitmaps are not updated: before the first write each one is marked ``in_use``
  (inconsistent) in the bitmap directory, as QEMU itself does while it has an image open for
  writing; the bitmaps auto-clear bit stays, so ``qemu-img check`` still counts their clusters;
* unknown auto-clear bits are cleared on a writable open (the spec's rule);
* images with the corrupt bit open read-only (with a note); a dirty image opened for writing
  has its refcounts rebuilt first (``check -r all``);
* internal snapshots (:mod:`~imgfs.formats.qcow2.snapshot`): clusters and L2 tables whose
  active entry has the COPIED flag clear are shared with a snapshot and copied before a write
  (an L2 table when one of its entries changes); the shared original only loses the active
  layer's reference, deferred like any free. ``OpenOptions.snapshot`` opens a snapshot's own
  L1 table read-only;
* ``cheap_reads`` is False for zstd images and for images whose first L2 tables hold
  compressed clusters (reads then decompress on the worker pool);
* reads map under the metadata lock and do their I/O outside it; freeing clusters waits for
  in-flight reads, so a read never returns a freed-and-reused cluster's new contents. A read
  within one cluster whose L2 table is cached maps with a single dict lookup (fast path);
* allocating writes of part of a cluster whose old content reads as zeros write only the data:
  the host supplies the zero padding (the file grows past EOF, or fallocate ZERO_RANGE on
  reused space), still before the L2 entry points at the cluster;
* compressed reads inflate only up to the end of the request (a read continuing the previous
  one inflates the cluster whole), and a small LRU keeps partly consumed inflated clusters;
  it is cleared whenever clusters are freed (after in-flight reads finish) or rewritten.
"""

from __future__ import annotations

import io
import os
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Self

import zstandard

from imgfs.block.chain import chain_block_status
from imgfs.block.driver import (
    BackingSpec,
    BlockDriver,
    CheckResult,
    ImageInfo,
    OpenOptions,
    ProbeInput,
    RepairMode,
    SnapshotInfo,
)
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.errors import CorruptImage, InvalidRequest, NoSpace, Unsupported
from imgfs.formats.qcow2 import layout as L
from imgfs.formats.qcow2 import snapshot as snap
from imgfs.formats.qcow2.cache import (
    U64_CODE,
    L2Table,
    RefcountBlock,
    TableCache,
    decode_u64,
    encode_u64,
)
from imgfs.formats.qcow2.create import CREATE_OPTIONS, create_image
from imgfs.formats.qcow2.encryption import Encryption, encryption_info, open_encryption

# Segment kinds produced by the mapper.
DATA, ZERO, UNALLOC, COMPRESSED = 0, 1, 2, 3

DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024  # QEMU's default cap on Linux
MAX_SEGMENT_CLUSTERS = 4096  # clusters mapped per request piece (bounds per-request work)
PENDING_FREE_LIMIT = 65536  # deferred frees before a write forces a metadata flush
MAX_BITMAP_DIRECTORY = 64 * 1024 * 1024
INFLATED_CACHE_BYTES = 4 * 1024 * 1024  # recently inflated compressed clusters kept
# L2 entry bits that send a read off the fast path (compressed; zero, which v2 leaves reserved).
_NOT_PLAIN = L.OFLAG_COMPRESSED | L.OFLAG_ZERO


class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    supports_write = True
    runtime_options = {
        "l2-cache-size": "bytes of L2 tables cached per image (default: enough for the whole "
        "disk, at most 32M); refcount blocks get a quarter of it"
    }

    def __init__(self, file: HostFile, options: OpenOptions, header: L.Header) -> None:
        super().__init__(file, options)
        self.h = header
        self.notes: list[str] = []
        cb = header.cluster_bits
        self.cb = cb
        self.cs = 1 << cb
        self.extl2 = bool(header.incompatible & L.INCOMPAT_EXTL2)
        self.l2_words = 2 if self.extl2 else 1
        self.l2_entries = self.cs // (8 * self.l2_words)
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.sub_size = self.cs // L.SUBCLUSTERS if self.extl2 else self.cs
        self.sub_bits = self.sub_size.bit_length() - 1
        self.refcount_bits = 1 << header.refcount_order
        self.rb_entries = self.cs * 8 // self.refcount_bits
        self.v3 = header.version >= 3
        self.data_file: HostFile | None = None
        self.data_file_name: str | None = None
        self.data_file_raw = bool(header.autoclear & L.AUTOCLEAR_DATA_FILE_RAW)
        self.backing_name: str | None = None
        self.backing_fmt: str | None = None
        self.snapshot_entries: list[snap.Entry] = []
        self.snapshot_table_size = 0
        self.view_of: str | None = None  # the snapshot id this driver shows, if not the active
        self.bitmaps: list[L.BitmapEntry] = []
        self.bitmap_directory_offset = 0
        self._bitmaps_marked = False
        self._lock = threading.RLock()
        # Reads map under the lock but do their I/O outside it; frees wait for them.
        self._inflight = 0  # changed under _inflight_lock; increments also under _lock
        self._inflight_lock = threading.Lock()
        self._drained: threading.Event | None = None  # set when a waiting free may go on
        self.l1 = array(U64_CODE)
        self._l1_dirty_lo: int | None = None
        self._l1_dirty_hi = 0
        self.reftable = array(U64_CODE)
        self._reftable_dirty: set[int] = set()
        self._free_hint = 0
        self._pending_free: list[tuple[int, int]] = []  # (host offset, length) to unreference
        self._host_end = file.size()
        # Recently inflated clusters by L2 entry (a prefix when a read stopped early), LRU by bytes.
        self._inflated: OrderedDict[int, bytes] = OrderedDict()
        self._inflated_bytes = 0
        self._inflated_lock = threading.Lock()
        self._next_seq = -1  # where the last multi-piece/compressed read ended
        self._compress_cursor = 0  # host byte offset where the last compressed cluster ended
        self.crypto: Encryption | None = None  # set when the image is encrypted (and unlocked)
        l2_cache_bytes = self._l2_cache_size(options)
        self.l2_cache_bytes = l2_cache_bytes
        self.l2_cache: TableCache[L2Table] = TableCache(
            l2_cache_bytes // self.cs, self._load_l2, self._evict_l2
        )
        self.rc_cache: TableCache[RefcountBlock] = TableCache(
            max(4, l2_cache_bytes // 4 // self.cs), self._load_refblock, self._evict_refblock
        )

    def _l2_cache_size(self, options: OpenOptions) -> int:
        if "l2-cache-size" in options.driver_options:
            size = options.size_option("l2-cache-size", 0)
            if size > 1 << 30:
                raise InvalidRequest(f"option l2-cache-size: {size} is larger than 1G")
            return max(2 * self.cs, size)
        # Enough to cover the whole disk, capped as QEMU caps it.
        cover = -(-self.h.size // (self.l2_entries * self.cs)) * self.cs
        return max(2 * self.cs, min(cover, DEFAULT_L2_CACHE_MAX))

    # -- discovery ------------------------------------------------------------------------------

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        if len(probe.head) >= 8 and probe.head[:4] == L.MAGIC:
            version = int.from_bytes(probe.head[4:8], "big")
            if version in (2, 3):
                return 100
            return 50 if version > 3 else 0  # version 1 is the older qcow format
        return 0

    @classmethod
    def companion_files(cls, path: str) -> list[str]:
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
                cluster_bits = int.from_bytes(head[20:24], "big")
                if 12 < cluster_bits <= L.MAX_CLUSTER_BITS:
                    head += f.read((1 << cluster_bits) - len(head))
            h = L.parse_header(head, path)
        except Exception:
            return []
        name = h.extension(L.EXT_DATA_FILE)
        if not h.incompatible & L.INCOMPAT_DATA_FILE or not name:
            return []
        return [name.decode("utf-8", "replace")]

    # -- open -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        head = file.pread(0, 4096)
        if bytes(head[:4]) != L.MAGIC:
            raise CorruptImage(f"{file.path}: not a qcow2 image (bad magic {bytes(head[:4])!r})")
        cluster_bits = int.from_bytes(head[20:24], "big")
        if L.MIN_CLUSTER_BITS <= cluster_bits <= L.MAX_CLUSTER_BITS and cluster_bits > 12:
            head = file.pread(0, 1 << cluster_bits)
        h = L.parse_header(bytes(head), file.path)
        self = cls(file, options, h)
        self._open_rest(bytes(head))
        return self

    def _open_rest(self, head: bytes) -> None:
        h, path, cs = self.h, self.file.path, self.cs
        file_size = self.file.size()
        if h.backing_file_offset:
            raw = head[h.backing_file_offset : h.backing_file_offset + h.backing_file_size]
            self.backing_name = raw.decode("utf-8", "surrogateescape")
            fmt = h.extension(L.EXT_BACKING_FORMAT)
            if fmt:
                self.backing_fmt = fmt.decode("utf-8", "replace")
        if h.incompatible & L.INCOMPAT_DATA_FILE:
            name = h.extension(L.EXT_DATA_FILE)
            if not name:
                raise Unsupported(f"{path}: qcow2 external data file is not named in the image")
            self.data_file_name = name.decode("utf-8", "surrogateescape")
            if self.options.open_file is None:
                raise Unsupported(f"{path}: cannot open the external data file here")
            self.data_file = self.options.open_file(self.data_file_name, not self.read_only)
            if not self.data_file.writable:
                self.read_only = True
        elif self.data_file_raw:
            raise CorruptImage(f"{path}: qcow2 data-file-raw bit set without a data file")
        if h.incompatible & L.INCOMPAT_CORRUPT:
            if not self.read_only:
                self.notes.append("the image is marked corrupt: opened read-only")
            self.read_only = True
        if h.nb_snapshots:
            self.snapshot_entries = snap.read_table(self)
            self.snapshot_table_size = sum(len(e.raw) for e in self.snapshot_entries)
        # L1 table.
        l1_bytes = h.l1_size * 8
        if h.l1_size and (h.l1_table_offset == 0 or h.l1_table_offset >= max(file_size, cs)):
            raise CorruptImage(f"{path}: qcow2 l1_table_offset {h.l1_table_offset} is invalid")
        self.l1 = (
            decode_u64(self.file.pread(h.l1_table_offset, l1_bytes))
            if l1_bytes
            else (array(U64_CODE))
        )
        # Refcount table.
        rt_bytes = h.refcount_table_clusters * cs
        if h.refcount_table_offset >= max(file_size, cs):
            raise CorruptImage(
                f"{path}: qcow2 refcount_table_offset {h.refcount_table_offset} is past the end"
            )
        self.reftable = decode_u64(self.file.pread(h.refcount_table_offset, rt_bytes))
        if self.options.snapshot is not None:
            snap.open_view(self, self.options.snapshot)
        # Bitmaps.
        ext = h.extension(L.EXT_BITMAPS)
        if ext is not None and h.autoclear & L.AUTOCLEAR_BITMAPS:
            if len(ext) < L.BITMAPS_EXT.size:
                raise CorruptImage(f"{path}: qcow2 bitmaps extension is {len(ext)} bytes")
            nb, _, dir_size, dir_offset = L.BITMAPS_EXT.unpack_from(ext)
            if dir_size > MAX_BITMAP_DIRECTORY or dir_offset % cs or nb > 65535:
                raise CorruptImage(f"{path}: qcow2 bitmap directory at {dir_offset} is invalid")
            self.bitmap_directory_offset = dir_offset
            self.bitmaps = L.parse_bitmap_directory(
                bytes(self.file.pread(dir_offset, dir_size)), nb, path
            )
        if h.crypt_method:
            self.crypto = open_encryption(self.file, h, self.options.key, file_size)
            self.cheap_reads = False  # type: ignore[misc]
        # Reads that decompress are not cheap: say so for zstd images and for images whose
        # first L2 tables hold compressed clusters (a sample, so open stays fast).
        elif h.compression_type != L.COMPRESSION_ZLIB or self._sample_compressed():
            self.cheap_reads = False  # type: ignore[misc]
        if not self.read_only:
            self._open_for_write()

    def _sample_compressed(self, tables: int = 8) -> bool:
        for l1e in self.l1:
            offset = l1e & L.L1E_OFFSET_MASK
            if not offset or offset % self.cs or offset >= self._host_end:
                continue
            words = self.l2_cache.get(offset).words
            if any(w & L.OFLAG_COMPRESSED for w in words[:: self.l2_words]):
                return True
            tables -= 1
            if tables == 0:
                break
        return False

    def _open_for_write(self) -> None:
        h = self.h
        if h.incompatible & L.INCOMPAT_DIRTY:
            # Refcounts may be stale: rebuild them as QEMU does before writing.
            from imgfs.formats.qcow2.check import check_image

            check_image(self, RepairMode.ALL)
            self.notes.append("the image was dirty: refcounts rebuilt")
        unknown = h.autoclear & ~L.AUTOCLEAR_KNOWN
        if unknown:
            # The spec: a writer must clear the auto-clear bits it does not know.
            h.autoclear &= ~unknown
            self._write_header_field(L.OFF_AUTOCLEAR, L.U64.pack(h.autoclear))
            self.notes.append(f"cleared unknown auto-clear feature bits 0x{unknown:x}")

    def _write_header_field(self, offset: int, data: bytes) -> None:
        self.file.pwrite(offset, data)
        self.file.sync()

    # -- geometry -------------------------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self.h.size

    @property
    def backing_spec(self) -> BackingSpec | None:
        if self.backing_name is None:
            return None
        return BackingSpec(self.backing_name, self.backing_fmt)

    def snapshots(self) -> list[SnapshotInfo]:
        return [snap.info_of(self, e) for e in self.snapshot_entries]

    # -- metadata access ------------------------------------------------------------------------

    def _check_host_range(self, offset: int, length: int, what: str) -> None:
        if offset % self.cs or offset == 0 or offset + length > L.MAX_HOST_OFFSET:
            raise CorruptImage(f"{self.file.path}: qcow2 {what} offset {offset} is invalid")

    def _load_l2(self, offset: int) -> L2Table:
        return L2Table(self.file.pread(offset, self.cs))

    def _load_refblock(self, offset: int) -> RefcountBlock:
        # Blocks this driver makes start in the cache; one read from past the end of the file
        # is a corrupt refcount table entry, and updating it would grow the file to wherever
        # the entry says.
        if offset >= max(self._host_end, self.file.size()):
            raise CorruptImage(
                f"{self.file.path}: qcow2 refcount block offset {offset} is past the end of file"
            )
        return RefcountBlock(self.file.pread(offset, self.cs), self.refcount_bits)

    def _evict_l2(self, offset: int, table: L2Table) -> None:
        # An L2 table may reference clusters whose refcount increase is still in the cache.
        if self.rc_cache.has_dirty() or self._reftable_dirty:
            self._write_refcounts()
        if self.data_file is not None:
            self.data_file.sync()
        self.file.sync()  # data clusters it points at, and the refcounts, come first
        self.file.pwrite(offset, table.to_bytes())

    def _evict_refblock(self, offset: int, block: RefcountBlock) -> None:
        # Only increases are ever pending in memory (decreases are applied at flush time).
        self.file.pwrite(offset, block.to_bytes())

    def _l2_for(self, l1_index: int, allocate: bool) -> L2Table | None:
        if l1_index >= len(self.l1):
            raise CorruptImage(f"{self.file.path}: qcow2 L1 index {l1_index} out of range")
        l1e = self.l1[l1_index]
        offset = l1e & L.L1E_OFFSET_MASK
        if offset:
            self._check_host_range(offset, self.cs, "L2 table")
            if offset >= self._host_end:
                raise CorruptImage(
                    f"{self.file.path}: qcow2 L2 table offset {offset} is past the end of file"
                )
            if allocate and not l1e & L.OFLAG_COPIED:
                return snap.cow_l2_table(self, l1_index, offset)  # shared with a snapshot
            return self.l2_cache.get(offset)
        if not allocate:
            return None
        host, _ = self._alloc_clusters(1)
        table = L2Table(bytes(self.cs))
        table.dirty = True
        self.l2_cache.put_new(host, table)
        self._set_l1(l1_index, host | L.OFLAG_COPIED)
        return table

    def _set_l1(self, index: int, value: int) -> None:
        self.l1[index] = value
        if self._l1_dirty_lo is None or index < self._l1_dirty_lo:
            self._l1_dirty_lo = index
        self._l1_dirty_hi = max(self._l1_dirty_hi, index + 1)

    def _entry(self, gci: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) of guest cluster ``gci``; (0, 0) when no L2 table."""
        table = self._l2_for(gci >> self.l2_bits, False)
        if table is None:
            return 0, 0
        i = (gci & (self.l2_entries - 1)) * self.l2_words
        words = table.words
        if self.extl2:
            return words[i], words[i + 1]
        return words[i], 0

    def _set_entry(self, gci: int, entry: int, bitmap: int) -> None:
        table = self._l2_for(gci >> self.l2_bits, True)
        assert table is not None
        i = (gci & (self.l2_entries - 1)) * self.l2_words
        table.words[i] = entry
        if self.extl2:
            table.words[i + 1] = bitmap
        table.dirty = True

    def _classify(self, entry: int, bitmap: int, sub: int) -> tuple[int, int]:
        """(kind, host offset of the subcluster or the compressed descriptor)."""
        if entry & L.OFLAG_COMPRESSED:
            if self.data_file is not None:
                raise CorruptImage(
                    f"{self.file.path}: qcow2 compressed cluster in an image with a data file"
                )
            return COMPRESSED, entry
        host = entry & L.L2E_OFFSET_MASK
        if host % self.cs:
            raise CorruptImage(f"{self.file.path}: qcow2 data cluster offset {host} unaligned")
        if self.extl2:
            alloc = (bitmap >> sub) & 1
            # A zero or unallocated subcluster of an allocated cluster keeps its host offset
            # (block status reports it, as qemu-img map does).
            sub_host = host + (sub << self.sub_bits) if host else 0
            if (bitmap >> (32 + sub)) & 1:
                if alloc:
                    raise CorruptImage(
                        f"{self.file.path}: qcow2 subcluster both allocated and zero "
                        f"(bitmap 0x{bitmap:016x})"
                    )
                return ZERO, sub_host
            if alloc:
                if not host and self.data_file is None:
                    raise CorruptImage(
                        f"{self.file.path}: qcow2 allocated subcluster without a host offset"
                    )
                return DATA, host + (sub << self.sub_bits)
            return UNALLOC, sub_host
        if entry & L.OFLAG_ZERO and self.v3:
            return ZERO, host  # a preallocated zero cluster keeps its host cluster
        if host or (self.data_file is not None and entry & L.OFLAG_COPIED):
            return DATA, host
        return UNALLOC, 0

    def _segments(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """Map a guest range to runs (kind, guest offset, length, host), merged where the
        kind matches and (for data) the host offsets are contiguous."""
        out: list[tuple[int, int, int, int]] = []
        end = offset + length
        pos = offset
        sub_size, sub_bits, cb = self.sub_size, self.sub_bits, self.cb
        subs_per_cluster = self.cs >> sub_bits
        cmask = self.cs - 1
        span_bits = self.l2_bits + cb
        while pos < end:
            gci = pos >> cb
            l1i = gci >> self.l2_bits
            if l1i < len(self.l1) and not self.l1[l1i] & L.L1E_OFFSET_MASK:
                # No L2 table: its whole span is unallocated, in one step (a walk over a huge
                # sparse disk must not visit every cluster).
                span_end = min(end, (l1i + 1) << span_bits)
                if out and out[-1][0] == UNALLOC and not out[-1][3]:
                    lk, lg, ll, lh = out[-1]
                    out[-1] = (lk, lg, ll + span_end - pos, lh)
                else:
                    out.append((UNALLOC, pos, span_end - pos, 0))
                pos = span_end
                continue
            entry, bitmap = self._entry(gci)
            cluster_end = min(end, (gci + 1) << cb)
            if (
                not self.extl2
                or entry & L.OFLAG_COMPRESSED
                or bitmap in (L.SUBCLUSTER_ALL, 0, L.SUBCLUSTER_ALL << 32)
            ):
                # One state for the whole cluster (with extended L2: all subclusters alike).
                pieces = [(pos, cluster_end, 0)]
                in_mask = cmask
            else:
                pieces = []
                in_mask = sub_size - 1
                p = pos
                while p < cluster_end:
                    s = (p >> sub_bits) & (subs_per_cluster - 1)
                    q = min(cluster_end, ((p >> sub_bits) + 1) << sub_bits)
                    pieces.append((p, q, s))
                    p = q
            for p, q, s in pieces:
                kind, host = self._classify(entry, bitmap, s)
                if kind == DATA:
                    host += p & in_mask
                    if host + (q - p) > L.MAX_HOST_OFFSET:
                        raise CorruptImage(f"{self.file.path}: qcow2 host offset {host} invalid")
                elif kind != COMPRESSED and host:
                    host += p & in_mask  # a zero/unallocated range with a host cluster
                if out:
                    lk, lg, ll, lh = out[-1]
                    if (
                        lk == kind
                        and kind != COMPRESSED
                        and (
                            lh + ll == host
                            if kind == DATA or (lh and host)
                            else not lh and not host
                        )
                    ):
                        out[-1] = (lk, lg, ll + q - p, lh)
                        continue
                out.append((kind, p, q - p, host))
            pos = cluster_end
        return out

    # -- reads ----------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self.crypto is not None:
            return self._read_encrypted(offset, length)
        cb = self.cb
        gci = offset >> cb
        fast = compressed = False
        host = entry = 0
        segments: list[tuple[int, int, int, int]] = []
        with self._lock:
            # Fast path: one plain data (or compressed) cluster whose L2 table is cached
            # (validated on load).
            if not self.extl2 and (offset + length - 1) >> cb == gci:
                l1i = gci >> self.l2_bits
                if l1i < len(self.l1):
                    tables = self.l2_cache.tables
                    l2_offset = self.l1[l1i] & L.L1E_OFFSET_MASK
                    table = tables.get(l2_offset)
                    if table is not None:
                        tables.move_to_end(l2_offset)
                        entry = table.words[gci & (self.l2_entries - 1)]
                        host = entry & L.L2E_OFFSET_MASK
                        if (
                            host
                            and not entry & _NOT_PLAIN
                            and not host & (self.cs - 1)
                            and host + self.cs <= L.MAX_HOST_OFFSET
                        ):
                            with self._inflight_lock:
                                self._inflight += 1
                            fast = True
                        elif entry & L.OFLAG_COMPRESSED and self.data_file is None:
                            with self._inflight_lock:
                                self._inflight += 1
                            fast = compressed = True
            if not fast:
                segments = self._segments(offset, length)
                with self._inflight_lock:
                    self._inflight += 1
        try:
            if compressed:
                prev_end, self._next_seq = self._next_seq, offset + length  # a hint only
                return self._inflated_piece(entry, offset, length, prev_end)
            if fast:
                return (self.data_file or self.file).pread(host + (offset & (self.cs - 1)), length)
            return self._read_segments(offset, length, segments)
        finally:
            self._read_done()

    def _read_encrypted(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Whole sectors are decrypted: the range is widened to sectors (the last one may
        reach past an odd virtual size; its cluster is whole on the host)."""
        start = offset & ~511
        end = (offset + length + 511) & ~511
        with self._lock:
            segments = self._segments(start, end - start)
            with self._inflight_lock:
                self._inflight += 1
        try:
            out = self._read_segments(start, end - start, segments)
        finally:
            self._read_done()
        if start == offset and end == offset + length:
            return out
        return memoryview(out)[offset - start : offset - start + length]

    def _data_pread(self, target: HostFile, host: int, guest: int, n: int) -> bytes | bytearray:
        data = target.pread(host, n)
        if self.crypto is not None:
            return self.crypto.decrypt(data, host, guest)
        return data

    def _data_pwrite(
        self, target: HostFile, host: int, guest: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Guest data to its host place (encrypted first in an encrypted image)."""
        if self.crypto is not None:
            data = self.crypto.encrypt(data, host, guest)
        target.pwrite(host, data)

    def _read_done(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1
            if not self._inflight and self._drained is not None:
                self._drained.set()

    def _wait_for_readers(self) -> None:
        """Called with the metadata lock held (so no read can map anything new): wait until
        reads that mapped host clusters before now have finished their I/O."""
        with self._inflight_lock:
            if not self._inflight:
                return
            drained = self._drained = threading.Event()
        drained.wait()
        with self._inflight_lock:
            self._drained = None

    def _read_segments(
        self, offset: int, length: int, segments: list[tuple[int, int, int, int]]
    ) -> bytes | bytearray | memoryview:
        data_file = self.data_file or self.file
        prev_end, self._next_seq = self._next_seq, offset + length  # a hint only
        if len(segments) == 1:
            kind, g, n, host = segments[0]
            if kind == DATA:
                return self._data_pread(data_file, host, g, n)
            if kind == ZERO:
                return bytes(n)
            if kind == UNALLOC:
                return self.read_backing(g, n)
            return self._inflated_piece(host, g, n, prev_end)
        out = bytearray(length)
        view = memoryview(out)
        for kind, g, n, host in segments:
            at = g - offset
            if kind == DATA:
                view[at : at + n] = self._data_pread(data_file, host, g, n)
            elif kind == UNALLOC:
                if self.backing is not None:
                    view[at : at + n] = self.read_backing(g, n)
            elif kind == COMPRESSED:
                view[at : at + n] = self._inflated_piece(host, g, n, prev_end)
        return out

    def _inflated_piece(self, entry: int, g: int, n: int, prev_end: int) -> memoryview:
        """Guest bytes [g, g + n) of one compressed cluster. A read continuing the previous one
        is sequential: inflate the cluster whole (once); otherwise stop at the end of the range."""
        if self.crypto is not None:
            raise CorruptImage(f"{self.file.path}: compressed cluster in an encrypted image")
        c_off = g & (self.cs - 1)
        whole = c_off == 0 and n == self.cs  # then it is not kept: nothing else wants it soon
        cluster = self._decompress(entry, self.cs if g == prev_end else c_off + n, not whole)
        return memoryview(cluster)[c_off : c_off + n]

    def _compressed_range(self, entry: int) -> tuple[int, int]:
        x = 62 - (self.cb - 8)
        coff = entry & ((1 << x) - 1)
        nsec = (entry >> x) & ((1 << (62 - x)) - 1)
        start = coff
        end = (coff & ~511) + (nsec + 1) * 512
        if coff == 0 or coff >= L.MAX_HOST_OFFSET or end - start > 2 * self.cs + 512:
            raise CorruptImage(f"{self.file.path}: qcow2 compressed cluster at {coff} invalid")
        return start, end - start

    def _forget_inflated(self) -> None:
        with self._inflated_lock:
            self._inflated.clear()
            self._inflated_bytes = 0

    def _decompress(self, entry: int, need: int, keep: bool = True) -> bytes:
        """At least the first ``need`` bytes of a compressed cluster. Inflating stops there the
        first time; a second read of the cluster that needs more inflates it whole."""
        cs = self.cs
        with self._inflated_lock:
            cached = self._inflated.get(entry)
            if cached is not None:
                if len(cached) >= need:
                    self._inflated.move_to_end(entry)
                    return cached
                need = cs
        start, size = self._compressed_range(entry)
        raw = self.file.pread(start, size)
        try:
            if self.h.compression_type == L.COMPRESSION_ZSTD:
                reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw))
                out = reader.read(need)
                while len(out) < need:
                    more = reader.read(need - len(out))
                    if not more:
                        break
                    out += more
            else:
                out = zlib.decompressobj(-15).decompress(raw, need)
        except (zlib.error, zstandard.ZstdError) as e:
            raise CorruptImage(
                f"{self.file.path}: qcow2 compressed cluster at {start} does not decompress ({e})"
            ) from None
        if len(out) != need:
            raise CorruptImage(
                f"{self.file.path}: qcow2 compressed cluster at {start} decompresses to "
                f"{len(out)} bytes, not {need}"
            )
        if not keep:
            return out
        with self._inflated_lock:
            old = self._inflated.pop(entry, None)
            if old is not None:
                self._inflated_bytes -= len(old)
            self._inflated[entry] = out
            self._inflated_bytes += len(out)
            while self._inflated_bytes > max(INFLATED_CACHE_BYTES, cs) and len(self._inflated) > 1:
                _, dropped = self._inflated.popitem(last=False)
                self._inflated_bytes -= len(dropped)
        return out

    def block_status(self, offset: int, length: int) -> Extent:
        length = min(length, MAX_SEGMENT_CLUSTERS << self.cb)
        with self._lock:
            segments = self._first_run(offset, length)
        kind, g, n, host = segments[0]
        if kind == DATA:
            return Extent(offset, n, Allocation.DATA, host_offset=host)
        if kind == COMPRESSED:
            # Merge consecutive compressed clusters: all data, no single host offset.
            total = 0
            for k, _, m, _ in segments:
                if k != COMPRESSED:
                    break
                total += m
            return Extent(offset, total, Allocation.DATA)
        if kind == ZERO:
            return Extent(offset, n, Allocation.ZERO, host_offset=host or None)
        return Extent(offset, n, Allocation.UNALLOCATED, host_offset=host or None)

    def _first_run(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """The segments of ``offset``..+``length`` up to where the first run (of one kind, or
        of compressed clusters) ends: mapped over a window that doubles until the run ends in
        it, so a call costs about the run's length, not the whole request's. A bad entry past
        the first cluster ends the run there; a request starting at it reports it."""
        window = self.cs - (offset & (self.cs - 1))
        found: list[tuple[int, int, int, int]] | None = None
        while True:
            n = min(window, length)
            try:
                found = self._segments(offset, n)
            except CorruptImage:
                if found is None:
                    raise
                return found
            kinds = [k for k, _, _, _ in found]
            if kinds[0] == COMPRESSED:
                ended = any(k != COMPRESSED for k in kinds)
            else:
                ended = len(kinds) > 1
            if ended or n >= length:
                return found
            window *= 2

    # -- refcounts ------------------------------------------------------------------------------

    def _refblock_for(self, cluster: int) -> tuple[RefcountBlock | None, int]:
        t = cluster // self.rb_entries
        if t >= len(self.reftable):
            return None, 0
        off = self.reftable[t] & L.REFT_OFFSET_MASK
        if not off:
            return None, 0
        self._check_host_range(off, self.cs, "refcount block")
        return self.rc_cache.get(off), cluster % self.rb_entries

    def refcount(self, cluster: int) -> int:
        block, i = self._refblock_for(cluster)
        return block.get(i) if block is not None else 0

    def _add_refcount(self, cluster: int, delta: int) -> int:
        block, i = self._refblock_for(cluster)
        if block is None:
            raise CorruptImage(
                f"{self.file.path}: qcow2 cluster {cluster} has no refcount block to update"
            )
        value = block.get(i) + delta
        if value < 0 or value > block.max_value:
            raise CorruptImage(
                f"{self.file.path}: qcow2 refcount of cluster {cluster} would become {value}"
            )
        block.set(i, value)
        return value

    def _find_free(self, start: int, want: int) -> tuple[int, int]:
        """The first run of free clusters at or after ``start``: (first cluster, count<=want)."""
        c = start
        rb = self.rb_entries
        while True:
            t = c // rb
            if t >= len(self.reftable) or not self.reftable[t] & L.REFT_OFFSET_MASK:
                return c, min(want, (t + 1) * rb - c)
            block, _ = self._refblock_for(c)
            assert block is not None
            i = block.first_zero(c - t * rb)
            if i >= rb:
                c = (t + 1) * rb
                continue
            return t * rb + i, block.zero_run(i, want)

    def _alloc_clusters(self, want: int) -> tuple[int, int]:
        """Allocate up to ``want`` contiguous free clusters (at least one) with refcount 1.
        Returns (host offset, count)."""
        rb = self.rb_entries
        while True:
            first, count = self._find_free(self._free_hint, want)
            if (first + count) << self.cb > L.MAX_HOST_OFFSET:
                raise NoSpace(f"{self.file.path}: qcow2 host offsets exhausted")
            t = first // rb
            if t >= len(self.reftable):
                self._grow_reftable(t + 1)
                continue
            if not self.reftable[t] & L.REFT_OFFSET_MASK:
                if t == 0:
                    # The header's range always has a block (cluster 0 is in use): without one
                    # the new block would land on the header, and its offset 0 would read as
                    # "no block" again, for ever.
                    raise CorruptImage(
                        f"{self.file.path}: qcow2 refcount table entry 0 is empty, but the "
                        "header's clusters must be counted"
                    )
                # A range with no refcount block is all free: its first cluster holds the new
                # block, which then describes itself.
                self._new_refblock(t)
                continue
            break
        for c in range(first, first + count):
            self._add_refcount(c, 1)
        self._free_hint = first + count
        end = (first + count) << self.cb
        if end > self._host_end:
            self._host_end = end
        return first << self.cb, count

    def _new_refblock(self, t: int) -> None:
        cluster = t * self.rb_entries
        offset = cluster << self.cb
        block = RefcountBlock(bytes(self.cs), self.refcount_bits)
        block.set(0, 1)
        self.rc_cache.put_new(offset, block)
        self.reftable[t] = offset
        self._reftable_dirty.add(t)
        self._host_end = max(self._host_end, offset + self.cs)

    def _grow_reftable(self, min_entries: int) -> None:
        """Move the refcount table to a bigger one placed in the first range the old table
        does not cover, with new refcount blocks right after it that describe the table and
        themselves. The header switches to the new table only once it and its blocks are
        on disk."""
        cs, rb, cb = self.cs, self.rb_entries, self.cb
        old_n = len(self.reftable)
        start = old_n * rb  # first cluster the old table cannot describe: all free
        new_n = max(min_entries, old_n * 2)
        while True:
            table_clusters = -(-new_n * 8 // cs)
            blocks = 0
            while True:
                need = -(-(table_clusters + blocks) // rb)
                if need == blocks:
                    break
                blocks = need
            if old_n + blocks > new_n:
                new_n = old_n + blocks
                continue
            break
        new_n = table_clusters * cs // 8
        if table_clusters * cs > L.MAX_REFTABLE_BYTES:
            raise NoSpace(f"{self.file.path}: qcow2 refcount table would exceed 8 MiB")
        # Pending refcount blocks first: the new table will point at them.
        self._write_refcounts()
        self.file.sync()
        table = array(U64_CODE, self.reftable)
        table.extend([0] * (new_n - old_n))
        used = table_clusters + blocks
        for j in range(blocks):
            block = RefcountBlock(bytes(cs), self.refcount_bits)
            first = (old_n + j) * rb
            for c in range(max(first, start), min(first + rb, start + used)):
                block.set(c - first, 1)
            block_off = (start + table_clusters + j) << cb
            table[old_n + j] = block_off
            self.file.pwrite(block_off, block.to_bytes())
        table_off = start << cb
        self.file.pwrite(table_off, encode_u64(table))
        self.file.sync()
        old_off, old_clusters = self.h.refcount_table_offset, self.h.refcount_table_clusters
        self.file.pwrite(L.OFF_REFCOUNT_TABLE, L.REFTABLE_UPDATE.pack(table_off, table_clusters))
        self.file.sync()
        self.h.refcount_table_offset, self.h.refcount_table_clusters = table_off, table_clusters
        self.reftable = table
        self._reftable_dirty.clear()
        self._host_end = max(self._host_end, (start + used) << cb)
        self._free_hint = min(self._free_hint, start + used)
        # The old table is unreferenced now (the header no longer points at it).
        for c in range(old_off >> cb, (old_off >> cb) + old_clusters):
            self._add_refcount(c, -1)
        self._free_hint = min(self._free_hint, old_off >> cb)

    def _write_refcounts(self) -> bool:
        """Write dirty refcount blocks, then (after a barrier) dirty refcount table entries."""
        wrote = False
        for offset, block in self.rc_cache.dirty_items():
            self.file.pwrite(offset, block.to_bytes())
            block.dirty = False
            wrote = True
        if self._reftable_dirty:
            if wrote:
                self.file.sync()
            lo, hi = min(self._reftable_dirty), max(self._reftable_dirty) + 1
            self.file.pwrite(
                self.h.refcount_table_offset + lo * 8, encode_u64(self.reftable[lo:hi])
            )
            self._reftable_dirty.clear()
            wrote = True
        return wrote

    # -- writes ---------------------------------------------------------------------------------

    def _writable(self) -> None:
        self.check_writable()

    def _before_write(self) -> None:
        if self.bitmaps and not self._bitmaps_marked:
            # Persistent bitmaps are not updated by imgfs: mark them in use (inconsistent),
            # as QEMU does while it has the image open for writing.
            for b in self.bitmaps:
                if not b.flags & L.BITMAP_IN_USE:
                    self.file.pwrite(
                        self.bitmap_directory_offset + b.entry_offset + 12,
                        L.U32.pack(b.flags | L.BITMAP_IN_USE),
                    )
            self.file.sync()
            self._bitmaps_marked = True

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._writable()
        view = memoryview(data).cast("B")
        with self._lock:
            self._before_write()
            if self.crypto is not None and (offset | len(view)) & 511:
                view, offset = self._widen_to_sectors(offset, view)
            self._write_locked(offset, view)
            if len(self._pending_free) > PENDING_FREE_LIMIT:
                self._flush_locked()

    def _widen_to_sectors(self, offset: int, view: memoryview) -> tuple[memoryview, int]:
        """An encrypted image is written in whole sectors: complete the edge sectors from
        their current content (under the metadata lock, so no other write slips between)."""
        start = offset & ~511
        end = (offset + len(view) + 511) & ~511
        buf = (
            bytearray(self._read_encrypted(start, offset - start))
            if start < offset
            else bytearray()
        )
        buf += view
        if len(buf) < end - start:
            tail = self._read_encrypted(end - 512, 512)
            buf += memoryview(tail)[len(buf) - (end - 512 - start) :]
        return memoryview(buf), start

    def _in_place(self, entry: int, bitmap: int, start: int, end: int) -> int | None:
        """Host offset for guest bytes [start, end) of one cluster when they can be written
        in place (allocated, not shared, not compressed), else None."""
        if entry & L.OFLAG_COMPRESSED or not entry & L.OFLAG_COPIED:
            return None
        if not self.l1[start >> (self.cb + self.l2_bits)] & L.OFLAG_COPIED:
            return None  # a shared L2 table: its entries' COPIED flags are not to be trusted
        host = entry & L.L2E_OFFSET_MASK
        if not host and self.data_file is None:
            return None
        if self.extl2:
            s0 = (start >> self.sub_bits) & 31
            s1 = ((end - 1) >> self.sub_bits) & 31
            mask = ((1 << (s1 + 1)) - 1) & ~((1 << s0) - 1)
            if bitmap & mask != mask:
                return None
        elif entry & L.OFLAG_ZERO:
            return None
        return host + (start & (self.cs - 1))

    def _data_end(self, target: HostFile) -> int:
        """Where the clusters of ``target`` end: data clusters are allocated from the image's
        refcounts (an external data file's clusters too), so past its end nothing is ours."""
        end = self._host_end if target is self.file else max(self._host_end, target.size())
        return -(-end // self.cs) * self.cs

    def _write_locked(self, offset: int, view: memoryview) -> None:
        cs, cb = self.cs, self.cb
        end = offset + len(view)
        pos = offset
        target = self.data_file or self.file
        while pos < end:
            gci = pos >> cb
            cend = min(end, (gci + 1) << cb)
            entry, bitmap = self._entry(gci)
            host = self._in_place(entry, bitmap, pos, cend)
            if host is not None:
                # Extend over following clusters that are in place and contiguous on the host.
                run_end = cend
                while run_end < end and (run_end - pos) < (MAX_SEGMENT_CLUSTERS << cb):
                    nend = min(end, run_end + cs)
                    e2, b2 = self._entry(run_end >> cb)
                    h2 = self._in_place(e2, b2, run_end, nend)
                    if h2 != host + (run_end - pos):
                        break
                    run_end = nend
                if not self.data_file_raw and host >= self._data_end(target):
                    # An L2 entry past every cluster the file holds or this driver allocated:
                    # writing there would grow the file to wherever the entry says (2 TiB, or
                    # past what the host file system allows).
                    raise CorruptImage(
                        f"{target.path}: qcow2 data cluster at {host & ~(cs - 1)} lies past "
                        f"the end of the file ({self._data_end(target)} bytes)"
                    )
                self._data_pwrite(target, host, pos, view[pos - offset : run_end - offset])
                pos = run_end
                continue
            if (
                self.extl2
                and not entry & L.OFLAG_COMPRESSED
                and entry & L.OFLAG_COPIED
                and (entry & L.L2E_OFFSET_MASK or self.data_file is not None)
            ):
                self._write_subclusters(gci, entry, bitmap, pos, cend, view[pos - offset :])
                pos = cend
                continue
            pos = self._write_allocating(gci, pos, end, view, offset)

    def _old_content(self, start: int, end: int) -> bytes | bytearray | memoryview:
        return self.read(start, end - start)

    def _write_subclusters(
        self, gci: int, entry: int, bitmap: int, pos: int, cend: int, data: memoryview
    ) -> None:
        """Extended L2: write into an allocated host cluster whose touched subclusters are not
        all allocated. Partial subclusters are completed from their old content."""
        sb = self.sub_bits
        s0 = (pos >> sb) & 31
        s1 = ((cend - 1) >> sb) & 31
        base = gci << self.cb
        lo, hi = base + (s0 << sb), base + ((s1 + 1) << sb)
        buf = bytearray(self._old_content(lo, pos)) if lo < pos else bytearray()
        buf += data[: cend - pos]
        if cend < hi:
            buf += self._old_content(cend, hi)
        host = entry & L.L2E_OFFSET_MASK
        self._data_pwrite(self.data_file or self.file, host + (s0 << sb), lo, buf)
        mask = ((1 << (s1 + 1)) - 1) & ~((1 << s0) - 1)
        bitmap = (bitmap | mask) & ~(mask << 32)
        self._set_entry(gci, entry, bitmap)

    def _write_allocating(self, gci: int, pos: int, end: int, view: memoryview, offset: int) -> int:
        """Allocate new host clusters for guest clusters from ``gci`` that cannot be written in
        place, write their data (completed from the old content), then point L2 at them.
        Returns the guest position reached."""
        cs, cb = self.cs, self.cb
        # How many consecutive guest clusters need a new host cluster.
        want = 1
        last = (end - 1) >> cb
        entries = [self._entry(gci)]
        while gci + want <= last and want < MAX_SEGMENT_CLUSTERS:
            e, b = self._entry(gci + want)
            if self._in_place(e, b, (gci + want) << cb, ((gci + want) << cb) + 1) is not None:
                break
            if (
                self.extl2
                and not e & L.OFLAG_COMPRESSED
                and e & L.OFLAG_COPIED
                and (e & L.L2E_OFFSET_MASK or self.data_file is not None)
            ):
                break
            entries.append((e, b))
            want += 1
        if self.data_file is not None:
            host, count = gci << cb, want  # host offset = guest offset, not refcounted
        else:
            host, count = self._alloc_clusters(want)
        sb = self.sub_bits
        first_start = gci << cb
        last_end = (gci + count) << cb
        run_end = min(end, last_end)
        # The bytes to write: whole clusters, or with extended L2 from the first touched
        # subcluster to the last one (compressed or shared clusters are copied whole).
        lo = first_start if self._whole(entries[0][0]) else (pos >> sb) << sb
        if self._whole(entries[count - 1][0]):
            hi = last_end
        else:
            hi = min(last_end, (((run_end - 1) >> sb) + 1) << sb)
        target = self.data_file or self.file
        new_end = host + count * cs
        if lo == pos and hi == run_end:
            buf: bytes | bytearray | memoryview = view[pos - offset : run_end - offset]
        elif (
            not self.extl2
            and self.data_file is None
            and self.crypto is None  # zeros on the host do not decrypt to zeros
            and self._reads_zero_entry(entries[0][0])
            and self._reads_zero_entry(entries[count - 1][0])
        ):
            # The padding around the data would be zeros: let the host provide them (space
            # past EOF reads as zeros; reused space below EOF is zeroed by fallocate).
            file_size = self.file.size()
            for a, z in ((host, host + (pos - lo)), (host + (run_end - first_start), new_end)):
                z = min(z, file_size)
                if a < z and not self.file.zero_range(a, z - a):
                    self.file.pwrite(a, bytes(z - a))
            self.file.pwrite(host + (pos - first_start), view[pos - offset : run_end - offset])
            if file_size < new_end:
                self.file.truncate(new_end)  # whole clusters, as qemu-img check expects
            return self._point_l2(gci, count, entries, host, lo, hi, run_end)
        else:
            b = bytearray()
            if lo < pos:
                b += self._old_content(lo, pos)
            b += view[pos - offset : run_end - offset]
            if run_end < hi:
                b += self._old_content(run_end, hi)
            buf = b
        self._data_pwrite(target, host + (lo - first_start), lo, buf)
        if self.data_file is None and self.file.size() < new_end:
            self.file.truncate(new_end)  # whole clusters, as qemu-img check expects
        return self._point_l2(gci, count, entries, host, lo, hi, run_end)

    def _reads_zero_entry(self, entry: int) -> bool:
        """Whether a (standard L2) entry's whole cluster reads as zeros."""
        if entry & L.OFLAG_COMPRESSED:
            return False
        if self.v3 and entry & L.OFLAG_ZERO:
            return True
        return not entry & L.L2E_OFFSET_MASK and self.backing is None

    def _point_l2(
        self,
        gci: int,
        count: int,
        entries: list[tuple[int, int]],
        host: int,
        lo: int,
        hi: int,
        run_end: int,
    ) -> int:
        """Data is in the host file: now the L2 entries may point at it."""
        cs, cb, sb = self.cs, self.cb, self.sub_bits
        for i in range(count):
            old_entry, old_bitmap = entries[i]
            g = gci + i
            new_entry = (host + i * cs) | L.OFLAG_COPIED
            new_bitmap = 0
            if self.extl2:
                cstart = g << cb
                a = max(lo, cstart)
                z = min(hi, cstart + cs)
                s0, s1 = ((a - cstart) >> sb), ((z - 1 - cstart) >> sb)
                mask = ((1 << (s1 + 1)) - 1) & ~((1 << s0) - 1)
                if self._whole(old_entry):
                    new_bitmap = L.SUBCLUSTER_ALL
                else:
                    new_bitmap = ((old_bitmap & L.SUBCLUSTER_ALL) | mask) | (
                        (old_bitmap >> 32) & ~mask
                    ) << 32
            self._set_entry(g, new_entry, new_bitmap)
            self._release_old(old_entry)
        return run_end

    def _whole(self, entry: int) -> bool:
        """A cluster that must be rewritten whole: no subclusters, compressed, or shared."""
        return (
            not self.extl2
            or bool(entry & L.OFLAG_COMPRESSED)
            or bool(entry & L.L2E_OFFSET_MASK and not entry & L.OFLAG_COPIED)
        )

    def _release_old(self, old_entry: int) -> None:
        """Queue the host clusters a replaced L2 entry used for unreferencing at flush time."""
        if old_entry & L.OFLAG_COMPRESSED:
            start, size = self._compressed_range(old_entry)
            self._pending_free.append((start, size))
            return
        host = old_entry & L.L2E_OFFSET_MASK
        if host and self.data_file is None:
            self._pending_free.append((host, self.cs))

    # -- discard and zeroes ---------------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        """Free whole clusters (unaligned edges are ignored, as QEMU does). Afterwards the
        range reads as zeros; on version 2 images with a backing file nothing can hide the
        backing data, so (as in QEMU) nothing is discarded."""
        self._writable()
        cs, cb = self.cs, self.cb
        first = -(-offset // cs)
        last = (offset + length) >> cb  # exclusive
        if offset + length == self.h.size:
            last = -(-self.h.size // cs)  # the short last cluster counts as whole
        if first >= last:
            return
        zero_flag = self.v3 and self.backing is not None
        if not self.v3 and self.backing is not None:
            return  # v2 cannot hide the backing data (QEMU does nothing either)
        with self._lock:
            self._before_write()
            for gci in range(first, last):
                entry, bitmap = self._entry(gci)
                if not entry and not bitmap and not zero_flag:
                    continue
                if zero_flag:
                    new_entry, new_bitmap = self._zero_entry(0)
                else:
                    new_entry, new_bitmap = 0, 0
                if (new_entry, new_bitmap) == (entry, bitmap):
                    continue
                self._set_entry(gci, new_entry, new_bitmap)
                self._drop_host(gci, entry, punch_data_file=True)
            if len(self._pending_free) > PENDING_FREE_LIMIT:
                self._flush_locked()

    def _zero_entry(self, host: int) -> tuple[int, int]:
        """The L2 entry (and bitmap) of a cluster reading as zeros, keeping ``host`` (0: none)
        as a preallocation."""
        keep = host | L.OFLAG_COPIED if host else 0
        if self.extl2:
            return keep, L.SUBCLUSTER_ALL << 32
        return keep | L.OFLAG_ZERO, 0

    def _drop_host(self, gci: int, old_entry: int, punch_data_file: bool) -> None:
        if self.data_file is not None:
            if punch_data_file and (old_entry & L.OFLAG_COPIED):
                start = gci << self.cb
                n = min(self.cs, self.h.size - start)
                if not self.data_file.punch_hole(start, n) and self.data_file_raw:
                    self.data_file.pwrite(start, bytes(n))
            return
        self._release_old(old_entry)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Whole units (clusters, or subclusters with extended L2) become zero entries on v3
        (unallocated on v2 without a backing file, as QEMU does); unaligned edges become zero
        entries when the rest of their unit already reads as zeros, else zero data."""
        self._writable()
        unit = self.sub_size
        size = self.h.size
        end = offset + length
        a = -(-offset // unit) * unit
        b = end if end == size else (end // unit) * unit
        edges: list[tuple[int, int]] = []
        if a > b:  # inside one unit
            edges.append((offset, end))
            a = b = offset
        else:
            if offset < a:
                edges.append((offset, a))
            if b < end:
                edges.append((b, end))
        for p, q in edges:
            ustart = p // unit * unit
            uend = min(ustart + unit, size)
            if self._can_widen(ustart, p, q, uend):
                self._zeroize(ustart, uend, may_unmap)
            else:
                super().write_zeroes(p, q - p, may_unmap)
        if a < b:
            self._zeroize(a, b, may_unmap)

    def _can_widen(self, ustart: int, p: int, q: int, uend: int) -> bool:
        if not self.v3 and self.backing is not None:
            return False
        with self._lock:
            kind = self._segments(ustart, 1)[0][0]
        if kind not in (ZERO, UNALLOC):
            return False
        return (p == ustart or self._reads_zero(ustart, p)) and (
            q == uend or self._reads_zero(q, uend)
        )

    def _zeroize(self, a: int, b: int, may_unmap: bool) -> None:
        """Make units [a, b) zero (a aligned to the unit, b aligned or the end of the disk)."""
        cs, cb = self.cs, self.cb
        if not self.v3:
            if self.backing is not None:
                super().write_zeroes(a, b - a, may_unmap)  # v2 has no zero clusters
                return
            self.discard(a, b - a)  # no backing file: unallocated reads as zeros
            return
        unit = self.sub_size
        with self._lock:
            self._before_write()
            pos = a
            while pos < b:
                gci = pos >> cb
                cstart = gci << cb
                cend = min(b, cstart + cs)
                entry, bitmap = self._entry(gci)
                whole = pos == cstart and (cend == cstart + cs or cend == self.h.size)
                if whole:
                    self._zero_cluster(gci, entry, may_unmap)
                elif entry & L.OFLAG_COMPRESSED:
                    self._write_locked(pos, memoryview(bytes(cend - pos)))
                else:
                    sb = self.sub_bits
                    s0 = (pos - cstart) >> sb
                    s1 = -(-(cend - cstart) // unit)
                    mask = ((1 << s1) - 1) & ~((1 << s0) - 1)
                    if self.data_file is not None and bitmap & mask:
                        self.data_file.pwrite(pos, bytes(cend - pos))
                    self._set_entry(gci, entry, (bitmap & ~mask) | (mask << 32))
                pos = cend
            if len(self._pending_free) > PENDING_FREE_LIMIT:
                self._flush_locked()

    def _reads_zero(self, start: int, end: int) -> bool:
        with self._lock:
            segments = self._segments(start, end - start)
        for kind, g, n, _ in segments:
            if kind == ZERO:
                continue
            if kind != UNALLOC:
                return False
            if self.backing is not None:
                ext = chain_block_status(self.backing, g, n)
                if ext.length < n or ext.allocation is Allocation.DATA:
                    return False
        return True

    def _zero_cluster(self, gci: int, entry: int, may_unmap: bool) -> None:
        host = entry & L.L2E_OFFSET_MASK
        keep = (
            not may_unmap
            and not entry & L.OFLAG_COMPRESSED
            and entry & L.OFLAG_COPIED
            and (host or self.data_file is not None)
        )
        if self.data_file is not None:
            start = gci << self.cb
            n = min(self.cs, self.h.size - start)
            if entry & L.OFLAG_COPIED and self.data_file_raw or keep:
                # The raw data file must read as zeros too.
                done = self.data_file.punch_hole(start, n) if may_unmap else False
                if not done and not self.data_file.zero_range(start, n):
                    self.data_file.pwrite(start, bytes(n))
            new = self._zero_entry(0)
            if keep or (self.data_file_raw and entry & L.OFLAG_COPIED):
                new = (self._zero_entry(0)[0] | L.OFLAG_COPIED | host, new[1])
            self._set_entry(gci, *new)
            return
        if keep:
            new_entry, new_bitmap = self._zero_entry(host)
            self._set_entry(gci, new_entry, new_bitmap)
            return
        self._set_entry(gci, *self._zero_entry(0))
        self._release_old(entry)

    # -- create and compressed writes -----------------------------------------------------------

    create_options = CREATE_OPTIONS

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        create_image(path, size, options)

    def preallocate(self, mode: str) -> None:
        """Point every guest cluster at a host cluster (``metadata``), and reserve
        (``falloc``) or write (``full``) the host space of the data clusters too."""
        cs, cb = self.cs, self.cb
        nclusters = -(-self.h.size // cs)
        target = self.data_file or self.file
        runs: list[tuple[int, int]] = []
        with self._lock:
            gci = 0
            while gci < nclusters:
                want = min(nclusters - gci, MAX_SEGMENT_CLUSTERS)
                if self.data_file is not None:
                    host, count = gci << cb, want
                else:
                    host, count = self._alloc_clusters(want)
                runs.append((host, count * cs))
                for i in range(count):
                    bitmap = L.SUBCLUSTER_ALL if self.extl2 else 0
                    self._set_entry(gci + i, (host + i * cs) | L.OFLAG_COPIED, bitmap)
                gci += count
            if self.data_file is None and self.file.size() < self._host_end:
                self.file.truncate(self._host_end)
            chunk = bytes(min(1 << 20, nclusters * cs)) if mode == "full" else b""
            for host, length in runs:
                if mode == "falloc":
                    os.posix_fallocate(target.fd, host, length)
                elif mode == "full":
                    pos = host
                    while pos < host + length:
                        n = min(len(chunk), host + length - pos)
                        target.pwrite(pos, chunk[:n])
                        pos += n
            self._flush_locked()

    def compressed_write_unit(self) -> int:
        return self.cs

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._writable()
        if self.crypto is not None:
            raise Unsupported(f"{self.file.path}: encrypted qcow2 images have no compressed "
                              "clusters")  # fmt: skip
        if self.data_file is not None:
            raise Unsupported(f"{self.file.path}: qcow2 images with a data file have no "
                              "compressed clusters")  # fmt: skip
        cs, cb = self.cs, self.cb
        if offset % cs:
            raise InvalidRequest(f"{self.file.path}: compressed write at {offset} not aligned")
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            n = min(cs, len(view) - pos)
            chunk = bytes(view[pos : pos + n])
            if n < cs:
                if offset + pos + n != self.h.size:
                    raise InvalidRequest(f"{self.file.path}: short compressed write of {n}")
                chunk += bytes(cs - n)
            blob = self._compress(chunk)
            if blob is None:
                self.write(offset + pos, view[pos : pos + n])
            else:
                with self._lock:
                    self._before_write()
                    self._store_compressed((offset + pos) >> cb, blob)
            pos += n

    def _compress(self, chunk: bytes) -> bytes | None:
        if self.h.compression_type == L.COMPRESSION_ZSTD:
            blob = zstandard.ZstdCompressor().compress(chunk)
        else:
            # A 4 KiB window, so that readers with a small window (QEMU uses 12 bits) decode it.
            c = zlib.compressobj(6, zlib.DEFLATED, -12)
            blob = c.compress(chunk) + c.flush()
        return blob if len(blob) < self.cs else None

    def _store_compressed(self, gci: int, blob: bytes) -> None:
        """Append a compressed cluster after the previous one when it fits in that host
        cluster (which then gains a reference), else in a new cluster."""
        cs, cb = self.cs, self.cb
        n = len(blob)
        cursor = self._compress_cursor
        host = None
        if cursor % cs and cursor % cs + n <= cs:
            block, i = self._refblock_for(cursor >> cb)
            if block is not None and 0 < block.get(i) < block.max_value:
                self._add_refcount(cursor >> cb, 1)
                host = cursor
        if host is None:
            host = self._alloc_clusters(1)[0]
        self.file.pwrite(host, blob)
        end = host + n
        self._compress_cursor = end
        if self.file.size() < -(-end // cs) * cs:
            self.file.truncate(-(-end // cs) * cs)
        x = 62 - (cb - 8)
        nsec = ((end - 1) >> 9) - (host >> 9)
        entry = L.OFLAG_COMPRESSED | (nsec << x) | host
        old_entry, _ = self._entry(gci)
        self._set_entry(gci, entry, 0)
        self._release_old(old_entry)
        self._forget_inflated()

    # -- resize ---------------------------------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Grow (the L1 table moves to a bigger one when needed) or shrink (clusters past the
        new end are freed) the disk. A grown range reads as zeros, never as the backing
        image's data or as bytes left in a partial last cluster."""
        self._writable()
        if new_size % 512 or new_size < 0:
            raise InvalidRequest(f"{self.file.path}: size {new_size} is not a multiple of 512")
        old_size = self.h.size
        if new_size < old_size and self.snapshot_entries:
            raise Unsupported(f"{self.file.path}: cannot shrink an image that has snapshots")
        with self._lock:
            need = -(-new_size // (self.l2_entries * self.cs))
            if need * 8 > L.MAX_L1_BYTES:
                raise InvalidRequest(f"{self.file.path}: size {new_size} is too large for qcow2")
            if need > len(self.l1):
                self._grow_l1(need)
            if new_size < old_size:
                self._drop_clusters_from(-(-new_size // self.cs), -(-old_size // self.cs))
                self._flush_locked()  # the tables no longer point past the end
            self.h.size = new_size
            self.file.pwrite(L.OFF_SIZE, L.U64.pack(new_size))
            self.file.sync()
        if new_size > old_size:
            self._zero_grown_range(old_size, new_size)

    def _drop_clusters_from(self, first: int, last: int) -> None:
        for gci in range(first, last):
            entry, bitmap = self._entry(gci)
            if entry or bitmap:
                self._set_entry(gci, 0, 0)
                self._drop_host(gci, entry, punch_data_file=True)

    def _zero_grown_range(self, old_size: int, new_size: int) -> None:
        cs = self.cs
        # The rest of a partial last cluster may hold bytes (or backing data) past the old end.
        tail_end = min(new_size, -(-old_size // cs) * cs)
        if tail_end > old_size:
            with self._lock:
                kind = self._segments(old_size, 1)[0][0]
            if kind != ZERO and (kind != UNALLOC or self.backing is not None):
                self.write_zeroes(old_size, tail_end - old_size, may_unmap=False)
        # Unallocated clusters past the old end would show a bigger backing image's data.
        if self.backing is not None and self.backing.virtual_size > tail_end:
            end = min(new_size, self.backing.virtual_size)
            if end > tail_end:
                self.write_zeroes(tail_end, end - tail_end, may_unmap=False)
        self.flush()

    def _grow_l1(self, entries: int) -> None:
        cs, cb = self.cs, self.cb
        # Every L1 entry must point at an L2 table already on disk before the copy is written.
        self._flush_locked()
        new_l1 = array(U64_CODE, self.l1)
        new_l1.extend([0] * (entries - len(new_l1)))
        clusters = -(-entries * 8 // cs)
        host = self._alloc_contiguous(clusters)
        self._write_refcounts()
        data = encode_u64(new_l1)
        self.file.pwrite(host, data + bytes(clusters * cs - len(data)))
        self.file.sync()
        old_off, old_size = self.h.l1_table_offset, self.h.l1_size
        self.file.pwrite(L.OFF_L1_SIZE, L.L1_UPDATE.pack(entries, host))
        self.file.sync()
        self.h.l1_size, self.h.l1_table_offset = entries, host
        self.l1 = new_l1
        if old_size:
            for c in range(old_off >> cb, (old_off + old_size * 8 - 1 >> cb) + 1):
                if self._add_refcount(c, -1) == 0:
                    self._free_hint = min(self._free_hint, c)
            self._write_refcounts()

    def _alloc_contiguous(self, clusters: int) -> int:
        """``clusters`` contiguous new clusters (tables bigger than one cluster), placed past
        the end of everything allocated, with any refcount blocks they need right after them
        (those blocks describe the run and themselves)."""
        cb, rb = self.cb, self.rb_entries
        if clusters == 1:
            return self._alloc_clusters(1)[0]
        while True:
            start = -(-self._host_end // self.cs)
            blocks = 0
            while True:
                span = range(start // rb, (start + clusters + blocks - 1) // rb + 1)
                missing = [t for t in span if t >= len(self.reftable) or not self.reftable[t]]
                if len(missing) == blocks:
                    break
                blocks = len(missing)
            if missing and missing[-1] >= len(self.reftable):
                self._grow_reftable(missing[-1] + 1)
                continue
            break
        for j, t in enumerate(missing):
            offset = (start + clusters + j) << cb
            block = RefcountBlock(bytes(self.cs), self.refcount_bits)
            block.dirty = True
            self.rc_cache.put_new(offset, block)
            self.reftable[t] = offset
            self._reftable_dirty.add(t)
        for c in range(start, start + clusters + blocks):
            self._add_refcount(c, 1)
        self._host_end = (start + clusters + blocks) << cb
        return start << cb

    # -- flush ----------------------------------------------------------------------------------

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self.read_only:
            return
        # 1. refcount increases (blocks, then table entries); data written so far rides along.
        self._write_refcounts()
        # 2. L2 tables, after a barrier that makes data and refcounts durable.
        dirty_l2 = list(self.l2_cache.dirty_items())
        if dirty_l2 or self._l1_dirty_lo is not None:
            if self.data_file is not None:
                self.data_file.sync()
            self.file.sync()
        for off, table in dirty_l2:
            self.file.pwrite(off, table.to_bytes())
            table.dirty = False
        # 3. L1 entries after the L2 tables they point at.
        if self._l1_dirty_lo is not None:
            if dirty_l2:
                self.file.sync()
            lo, hi = self._l1_dirty_lo, self._l1_dirty_hi
            self.file.pwrite(self.h.l1_table_offset + lo * 8, encode_u64(self.l1[lo:hi]))
            self._l1_dirty_lo = None
            self._l1_dirty_hi = 0
        # 4. deferred refcount decreases, now that no on-disk table references the clusters.
        if self._pending_free:
            self.file.sync()
            self._apply_pending_frees()
            self._write_refcounts()
        if self.data_file is not None:
            self.data_file.sync()
        self.file.sync()

    def _apply_pending_frees(self) -> None:
        # A read may still be using a cluster it mapped before it was unreferenced.
        self._wait_for_readers()
        pending, self._pending_free = self._pending_free, []
        self._compress_cursor = 0  # its cluster may be freed and reused now
        cb = self.cb
        for start, size in pending:
            first = start >> cb
            last = (start + size - 1) >> cb
            for c in range(first, last + 1):
                if self._add_refcount(c, -1) == 0:
                    self.file.punch_hole(c << cb, self.cs)
                    self._free_hint = min(self._free_hint, c)
            self._forget_inflated()

    def _metadata_dirty(self) -> bool:
        return bool(
            self.l2_cache.has_dirty()
            or self.rc_cache.has_dirty()
            or self._reftable_dirty
            or self._l1_dirty_lo is not None
            or self._pending_free
        )

    def close(self) -> None:
        # The Disk flushes before closing; metadata still dirty here means a write reached the
        # driver without the Disk knowing (write_compressed called on the driver directly).
        # Writing it out beats losing it.
        try:
            if not self.read_only and self._metadata_dirty():
                self.flush()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        try:
            if self.data_file is not None:
                self.data_file.close()
        finally:
            self.file.close()

    # -- info -----------------------------------------------------------------------------------

    def info(self) -> ImageInfo:
        h = self.h
        spec: dict[str, Any] = {
            "compat": "1.1" if self.v3 else "0.10",
            "compression-type": L.COMPRESSION_NAMES[h.compression_type],
        }
        if self.v3:
            spec["lazy-refcounts"] = bool(h.compatible & L.COMPAT_LAZY_REFCOUNTS)
            if self.bitmaps:
                spec["bitmaps"] = [
                    {
                        "flags": (["in-use"] if b.flags & 1 else [])
                        + (["auto"] if b.flags & 2 else []),
                        "name": b.name,
                        "granularity": 1 << b.granularity_bits,
                    }
                    for b in self.bitmaps
                ]
        spec["refcount-bits"] = self.refcount_bits
        if self.v3:
            if self.data_file_name is not None:
                spec["data-file"] = self.data_file_name
                spec["data-file-raw"] = self.data_file_raw
            spec["corrupt"] = bool(h.incompatible & L.INCOMPAT_CORRUPT)
            spec["extended-l2"] = self.extl2
        spec["l2-cache-size"] = self.l2_cache_bytes
        if h.crypt_method:
            spec["encrypt"] = (
                self.crypto.format_specific()
                if self.crypto is not None
                else encryption_info(self.file, h, self.file.size())
            )
        snapshots = [
            {
                **({"icount": e.icount} if e.icount is not None else {}),
                "vm-clock-nsec": e.snap.vm_clock_nsec % 1_000_000_000,
                "name": e.snap.name,
                "date-sec": e.snap.date_sec,
                "date-nsec": e.snap.date_nsec,
                "vm-clock-sec": e.snap.vm_clock_nsec // 1_000_000_000,
                "id": e.snap.id,
                "vm-state-size": e.snap.vm_state_size,
            }
            for e in self.snapshot_entries
        ]
        return ImageInfo(
            filename=self.file.path,
            format=self.format_name,
            virtual_size=h.size,
            actual_size=self.file.allocated_size(),
            cluster_size=self.cs,
            dirty_flag=bool(h.incompatible & L.INCOMPAT_DIRTY),
            backing_filename=self.backing_name,
            backing_filename_format=self.backing_fmt,
            format_specific=spec,
            encrypted=bool(h.crypt_method),
            snapshots=snapshots,
            notes=list(self.notes),
        )

    def check(self, repair: RepairMode) -> CheckResult:
        from imgfs.formats.qcow2.check import check_image

        if repair is not RepairMode.NONE:
            self._writable()
        if self.view_of is not None:
            raise Unsupported(f"{self.file.path}: check the image, not its snapshot {self.view_of}")
        with self._lock:
            # Deferred frees and dirty tables first, so on-disk and in-memory state agree.
            self._flush_locked()
            return check_image(self, repair)
