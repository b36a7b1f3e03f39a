"""qcow: QEMU Copy-On-Write version 1, the predecessor of qcow2.

Layout: a 48-byte big-endian header, the backing file name, the L1 table (one 64-bit offset
per ``2**(cluster_bits + l2_bits)`` guest bytes), then L2 tables (``2**l2_bits`` entries) and
data clusters. An L2 entry is 0 (unallocated: the backing image answers), a cluster offset, or,
with bit 63 set, a raw-deflate compressed cluster: the low ``63 - cluster_bits`` bits give its
offset and the next ``cluster_bits`` bits its compressed size. There are no refcounts, no zero
clusters and no dirty flag.

Writes append at the end of the file, cluster aligned: data first, then a new L2 table (already
holding the new entries), then the L1 entry. A partial write to a new cluster copies the rest
from the backing image (or a compressed cluster's old contents).

Crash safety: qcow has no refcounts, dirty flag or log, so nothing repairs a table entry that
reached the disk before the data it points at (the host may write back dirty pages in any
order). Each pointer update is therefore behind a ``sync()`` barrier: the new data (and a new L2
table) are durable before an L2 entry (or the L1 entry) points at them. Otherwise a crash could
leave an entry past the end of the file (an unreadable image) or a cluster of zeros where a
partial write's untouched sectors held the backing file's data. It costs one host sync per
allocating write; overwrites of allocated clusters need none.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
import zlib
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Self

from imgfs.block.driver import (
    BackingSpec,
    BlockDriver,
    ImageInfo,
    OpenOptions,
    ProbeInput,
    read_stored_name,
)
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.crypto import Secret, SectorCipher, qcow_aes
from imgfs.errors import CorruptImage, InvalidRequest, KeyRequired, Unsupported
from imgfs.formats.qed import PageCache

MAGIC = b"QFI\xfb"
VERSION = 1
HEADER = struct.Struct(">4sIQIIQBBHIQ")
assert HEADER.size == 48

CLUSTER_BITS_MIN = 9
CLUSTER_BITS_MAX = 16
# qemu's limits: an L2 table holds 512 bytes to 64 KiB of entries.
L2_BITS_MIN = 6
L2_BITS_MAX = 13
# qemu stores at most this many bytes of backing file name.
BACKING_NAME_MAX = 1023
SIZE_MAX = 1 << 62
# One _map call takes no more steps (a cluster, or an L2 table's run of zero entries) than
# this; callers loop. A block-status request over a huge disk must not walk millions of entries
# under the lock.
MAP_RUN_STEPS = 65536
# The L1 table is loaded whole: 128 MiB covers 32 TiB at qemu's default geometry.
MAX_L1_BYTES = 128 * 1024 * 1024
COMPRESSED = 1 << 63
CRYPT_AES = 1
L2_CACHE_TABLES = 128  # at most 8 MiB with 64 KiB tables
# Raw deflate with a 4 KiB window, which is what qemu's qcow inflates.
DEFLATE_WBITS = -12

_ENTRY = struct.Struct(">Q")


def _big_endian_entries(raw: bytes | bytearray | memoryview) -> array:
    table = array("Q", bytes(raw))
    if sys.byteorder == "little":
        table.byteswap()
    return table


@dataclass(slots=True)
class QcowHeader:
    version: int
    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int
    cluster_bits: int
    l2_bits: int
    padding: int
    crypt_method: int
    l1_table_offset: int

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.mtime,
            self.size,
            self.cluster_bits,
            self.l2_bits,
            self.padding,
            self.crypt_method,
            self.l1_table_offset,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> QcowHeader:
        _, *fields = HEADER.unpack_from(raw)
        return cls(*fields)


class QcowDriver(BlockDriver):
    format_name = "qcow"
    supports_write = True
    cheap_reads = False  # compressed clusters inflate on read

    create_options = {
        "backing_file": "name of the backing image (relative to the new image)",
        "backing_fmt": "format of the backing image (qcow cannot record it; it is probed)",
        "encrypt.format": "aes: encrypt with AES-128-CBC keyed by the passphrase (legacy)",
        "encryption": "on/off: the same as encrypt.format=aes",
        "encrypt.key-secret": "accepted for qemu-img compatibility; the key comes from --key",
        "key-file": "file holding the passphrase (its exact bytes); set by imgfs create --key",
    }

    def __init__(
        self, file: HostFile, options: OpenOptions, header: QcowHeader, backing_name: str | None
    ) -> None:
        super().__init__(file, options)
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << header.cluster_bits
        self.l2_entries = 1 << header.l2_bits
        self.l2_bytes = self.l2_entries * 8
        self.l2_span = self.l2_entries * self.cluster_size
        self.offset_mask = (1 << (63 - self.cluster_bits)) - 1
        self._backing_name = backing_name
        self._lock = threading.RLock()
        self._l2_cache = PageCache(L2_CACHE_TABLES)
        self._file_end = file.size()
        count = -(-header.size // self.l2_span)
        self.l1 = _big_endian_entries(file.pread(header.l1_table_offset, count * 8))
        # The last cluster inflated, keyed by its L2 entry (replaced whole, so thread-safe):
        # small sequential reads of a compressed image hit it.
        self._inflated: tuple[int, bytes] | None = None
        # Legacy AES: data clusters (not compressed ones) encrypted, IVs from guest sectors.
        self._crypto: SectorCipher | None = None
        if header.crypt_method == CRYPT_AES:
            assert options.key is not None
            self._crypto = qcow_aes(options.key)

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        if probe.head[:4] == MAGIC and probe.head[4:8] == VERSION.to_bytes(4, "big"):
            return 100
        return 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        path = file.path
        raw = bytes(file.pread(0, HEADER.size))
        if raw[:4] != MAGIC:
            raise CorruptImage(f"{path}: not a qcow image (magic {raw[:4]!r})")
        h = QcowHeader.unpack(raw)
        if h.version != VERSION:
            raise Unsupported(f"{path}: qcow version {h.version} is not qcow version 1")
        if not CLUSTER_BITS_MIN <= h.cluster_bits <= CLUSTER_BITS_MAX:
            raise CorruptImage(f"{path}: bad qcow cluster_bits {h.cluster_bits}")
        if not L2_BITS_MIN <= h.l2_bits <= L2_BITS_MAX:
            raise CorruptImage(f"{path}: bad qcow l2_bits {h.l2_bits}")
        if h.crypt_method not in (0, CRYPT_AES):
            raise Unsupported(f"{path}: qcow crypt_method {h.crypt_method} is unknown")
        if h.crypt_method == CRYPT_AES and options.key is None:
            raise KeyRequired(f"{path}: encrypted (aes); no key given (--key)")
        if h.size > SIZE_MAX:
            raise CorruptImage(f"{path}: bad qcow size {h.size}")
        file_size = file.size()
        l1_len = -(-h.size // (1 << (h.cluster_bits + h.l2_bits))) * 8
        if h.l1_table_offset < HEADER.size or h.l1_table_offset + l1_len > file_size:
            raise CorruptImage(
                f"{path}: qcow L1 table at {h.l1_table_offset} ({l1_len} bytes) "
                f"is outside the file ({file_size} bytes)"
            )
        if l1_len > MAX_L1_BYTES:
            # The L1 table is loaded whole; a sparse file could otherwise make it any size.
            raise Unsupported(
                f"{path}: qcow L1 table of {l1_len} bytes for a {h.size}-byte disk "
                f"(imgfs holds at most {MAX_L1_BYTES})"
            )
        backing_name = None
        if h.backing_file_offset:
            backing_name = read_stored_name(
                file, h.backing_file_offset, h.backing_file_size, first=HEADER.size,
                end=file_size, max_size=BACKING_NAME_MAX, what="qcow backing file name",
            )  # fmt: skip
        return cls(file, options, h, backing_name)

    @property
    def virtual_size(self) -> int:
        return self.header.size

    @property
    def backing_spec(self) -> BackingSpec | None:
        return BackingSpec(self._backing_name) if self._backing_name is not None else None

    # -- metadata ------------------------------------------------------------------------------

    def _l2_table(self, l1_index: int) -> tuple[int, array | None]:
        l2_offset = self.l1[l1_index]
        if not l2_offset:
            return 0, None
        # A table cut short by the end of the file reads as zeros past it (as in qemu); one
        # that starts outside the file is corrupt.
        if l2_offset >= self._file_end or l2_offset < HEADER.size:
            raise CorruptImage(
                f"{self.file.path}: qcow L1 entry {l1_index} points at a bad L2 table "
                f"{l2_offset:#x}"
            )
        table = self._l2_cache.get((l2_offset, 0))
        if table is None:
            table = _big_endian_entries(self.file.pread(l2_offset, self.l2_bytes))
            self._l2_cache.put((l2_offset, 0), table)
        return l2_offset, table

    def _entry(self, cluster: int) -> int:
        l1_index, l2_index = divmod(cluster, self.l2_entries)
        _, table = self._l2_table(l1_index)
        if table is None:
            return 0
        entry = table[l2_index]
        host = entry & self.offset_mask if entry & COMPRESSED else entry
        if entry and (host >= self._file_end or host < HEADER.size):
            raise CorruptImage(
                f"{self.file.path}: qcow L2 entry for guest offset "
                f"{cluster * self.cluster_size} points outside the file ({entry:#x})"
            )
        return entry

    def _map(self, offset: int, length: int) -> tuple[int, int]:
        """(entry, run length) from ``offset``: a run of contiguous host clusters, of
        unallocated clusters, or one compressed cluster."""
        cs = self.cluster_size
        cluster = offset // cs
        first = self._entry(cluster)
        run = min(length, cs - offset % cs)
        if first & COMPRESSED:
            return first, run
        if not first:
            return 0, self._unallocated_run(cluster + 1, run, length)
        expected = first
        per_table = self.l2_entries
        steps = 0
        # The rest of the run one L2 table at a time (a 1 MiB read spans 256 clusters of the
        # default 4 KiB, and a cache lookup per cluster was half the read's CPU), bounded in
        # tables so a hostile image cannot make one call walk forever.
        while run < length and steps < MAP_RUN_STEPS:
            steps += 1
            cluster += 1
            l1_index, l2_index = divmod(cluster, per_table)
            count = min(per_table - l2_index, -(-(length - run) // cs))
            _, table = self._l2_table(l1_index)
            if table is None:
                break
            # Fast path: the whole slice continues the run (compared in C, not entry by entry).
            span = array("Q", range(expected + cs, expected + (count + 1) * cs, cs))
            if table[l2_index : l2_index + count] == span:
                expected += count * cs
                if expected >= self._file_end:
                    raise CorruptImage(
                        f"{self.file.path}: qcow L2 entry for guest offset "
                        f"{(cluster + count - 1) * cs} points outside the file ({expected:#x})"
                    )
                run = min(length, run + count * cs)
                cluster += count - 1
                continue
            for i in range(l2_index, l2_index + count):
                expected += cs
                if table[i] != expected:
                    return first, run
                if expected >= self._file_end:
                    raise CorruptImage(
                        f"{self.file.path}: qcow L2 entry for guest offset "
                        f"{(cluster + i - l2_index) * cs} points outside the file "
                        f"({expected:#x})"
                    )
                run = min(length, run + cs)
            break  # not reached: the fast path failed, so some entry in the slice differs
        return first, run

    def _unallocated_run(self, cluster: int, run: int, length: int) -> int:
        """``run`` extended over the zero entries from ``cluster`` on, a table slice at a time
        (so a huge empty disk maps in few steps). Stops before a table that cannot be read:
        the error is raised when a request reaches it."""
        cs = self.cluster_size
        steps = 0
        while run < length and steps < MAP_RUN_STEPS:
            steps += 1
            l1_index, l2_index = divmod(cluster, self.l2_entries)
            try:
                _, table = self._l2_table(l1_index)
            except CorruptImage:
                break
            left = self.l2_entries - l2_index
            if table is None:
                zeros = left
            else:
                raw = table[l2_index:].tobytes()
                zeros = (len(raw) - len(raw.lstrip(b"\0"))) // 8
            run = min(length, run + zeros * cs)
            cluster += zeros
            if zeros < left:
                break
        return run

    def _inflate(self, entry: int) -> bytes:
        cached = self._inflated
        if cached is not None and cached[0] == entry:
            return cached[1]
        cs = self.cluster_size
        host = entry & self.offset_mask
        csize = (entry >> (63 - self.cluster_bits)) & (cs - 1)
        packed = self.file.pread(host, csize)
        try:
            out = zlib.decompressobj(-15).decompress(packed, cs)
        except zlib.error as e:
            raise CorruptImage(
                f"{self.file.path}: bad compressed qcow cluster at {host:#x}: {e}"
            ) from None
        if len(out) != cs:
            raise CorruptImage(
                f"{self.file.path}: compressed qcow cluster at {host:#x} inflates to "
                f"{len(out)} bytes, not {cs}"
            )
        self._inflated = (entry, out)
        return out

    # -- data ----------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self._crypto is None:
            return self._read(offset, length)
        # Whole sectors are decrypted (clusters are whole on the host past an odd end).
        start, end = offset & ~511, (offset + length + 511) & ~511
        out = self._read(start, end - start)
        if start == offset and end == offset + length:
            return out
        return memoryview(out)[offset - start : offset - start + length]

    def _read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        out: bytearray | None = None
        pos, end = offset, offset + length
        cs = self.cluster_size
        while pos < end:
            piece: bytes | bytearray | memoryview
            with self._lock:
                entry, run = self._map(pos, end - pos)
            if entry & COMPRESSED:
                # Outside the lock: compressed bytes are never overwritten (a rewritten
                # cluster moves to the end of the file), so a stale entry still inflates.
                inner = pos % cs
                piece = self._inflate(entry)[inner : inner + run]
            elif entry:
                piece = self.file.pread(entry + pos % cs, run)
                if self._crypto is not None:
                    piece = self._crypto.decrypt(piece, pos >> 9)
            else:
                piece = self.read_backing(pos, run)
            if run == length:
                return piece
            if out is None:
                out = bytearray(length)
            out[pos - offset : pos - offset + run] = piece
            pos += run
        return out if out is not None else b""

    def _allocate(self, nbytes: int, align: bool = True) -> int:
        cs = self.cluster_size
        offset = -(-self._file_end // cs) * cs if align else self._file_end
        self._file_end = offset + nbytes
        return offset

    def _set_entries(self, cluster: int, entries: list[int]) -> None:
        """Point guest clusters ``cluster...`` (one L2 table) at ``entries``; a new L2 table is
        written, already holding them, before the L1 entry that points at it."""
        l1_index, l2_index = divmod(cluster, self.l2_entries)
        l2_offset, table = self._l2_table(l1_index)
        if table is None:
            table = array("Q", bytes(self.l2_bytes))
            table[l2_index : l2_index + len(entries)] = array("Q", entries)
            disk_table = array("Q", table)
            if sys.byteorder == "little":
                disk_table.byteswap()
            l2_offset = self._allocate(self.l2_bytes)
            self.file.pwrite(l2_offset, disk_table.tobytes())
            self._l2_cache.put((l2_offset, 0), table)
            self.file.sync()  # barrier: the data and the new table before the L1 entry
            self.file.pwrite(self.header.l1_table_offset + l1_index * 8, _ENTRY.pack(l2_offset))
            # Only now in memory: after a host error the disk's L1 does not name the table, and
            # a retried write must allocate again rather than fill a table nothing reaches.
            self.l1[l1_index] = l2_offset
            return
        self.file.sync()  # barrier: the new data before the L2 entries that point at it
        self.file.pwrite(l2_offset + l2_index * 8, b"".join(_ENTRY.pack(e) for e in entries))
        table[l2_index : l2_index + len(entries)] = array("Q", entries)

    def _old_contents(self, entry: int, start: int, stop: int, keep: tuple[int, int]) -> bytearray:
        """A buffer for the clusters ``[start, stop)`` being (re)allocated, holding what they
        read as outside ``keep`` (the guest range the write replaces)."""
        if entry & COMPRESSED:
            return bytearray(self._inflate(entry))
        buf = bytearray(stop - start)
        if self.backing is not None:
            for lo, hi in ((start, keep[0]), (keep[1], min(stop, self.virtual_size))):
                if lo < hi:
                    buf[lo - start : hi - start] = self.read_backing(lo, hi - lo)
        return buf

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_writable()
        view = memoryview(data).cast("B")
        cs = self.cluster_size
        with self._lock:
            if self._crypto is not None and (offset | len(view)) & 511:
                # Whole sectors: complete the edges from their current content.
                start, stop = offset & ~511, (offset + len(view) + 511) & ~511
                buf = bytearray(self.read(start, stop - start))
                buf[offset - start : offset - start + len(view)] = view
                view, offset = memoryview(buf), start
            pos, end = offset, offset + len(view)
            while pos < end:
                entry, run = self._map(pos, end - pos)
                if entry and not entry & COMPRESSED:
                    piece = view[pos - offset : pos - offset + run]
                    if self._crypto is not None:
                        piece = memoryview(self._crypto.encrypt(piece, pos >> 9))
                    self.file.pwrite(entry + pos % cs, piece)
                    pos += run
                    continue
                first = pos // cs
                last = min(
                    (pos + run - 1) // cs, (first // self.l2_entries + 1) * self.l2_entries - 1
                )
                run = min(run, (last + 1) * cs - pos)
                start, stop = first * cs, (last + 1) * cs
                head = pos - start
                if head == 0 and run == stop - start:
                    buf = bytearray(view[pos - offset : pos - offset + run])
                else:
                    buf = self._old_contents(entry, start, stop, (pos, pos + run))
                    buf[head : head + run] = view[pos - offset : pos - offset + run]
                host = self._allocate(len(buf))
                if self._crypto is not None:
                    buf = bytearray(self._crypto.encrypt(buf, start >> 9))
                self.file.pwrite(host, buf)
                self._set_entries(first, [host + i * cs for i in range(last - first + 1)])
                pos += run

    def compressed_write_unit(self) -> int:
        return self.cluster_size

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_writable()
        if self._crypto is not None:
            raise Unsupported(f"{self.file.path}: encrypted qcow images take no compressed writes")
        cs = self.cluster_size
        if offset % cs:
            raise InvalidRequest(f"{self.file.path}: compressed write at {offset} not aligned")
        view = memoryview(data).cast("B")
        with self._lock:
            for i in range(0, len(view), cs):
                chunk = bytes(view[i : i + cs])
                cluster = (offset + i) // cs
                if (
                    self._entry(cluster)
                    or len(chunk) < cs
                    and offset + i + len(chunk) < self.virtual_size
                ):
                    self.write(offset + i, chunk)
                    continue
                chunk = chunk.ljust(cs, b"\0")
                packer = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, DEFLATE_WBITS)
                packed = packer.compress(chunk) + packer.flush()
                if len(packed) >= cs:
                    self.write(offset + i, chunk[: min(cs, len(view) - i)])
                    continue
                host = self._allocate(len(packed), align=False)
                self.file.pwrite(host, packed)
                self._set_entries(
                    cluster, [COMPRESSED | len(packed) << (63 - self.cluster_bits) | host]
                )

    def discard(self, offset: int, length: int) -> None:
        self.check_writable()
        if self._crypto is not None:
            return  # a punched cluster would decrypt to noise; keeping the data is allowed
        self._zero_whole_clusters(offset, length, discard=True)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.check_writable()
        if self._crypto is not None:
            super().write_zeroes(offset, length, may_unmap)  # encrypted zeros, not holes
            return
        cs = self.cluster_size
        end = offset + length
        first = -(-offset // cs) * cs
        last = end // cs * cs if end < self.virtual_size else -(-end // cs) * cs
        if first >= last:
            super().write_zeroes(offset, length, may_unmap)
            return
        if offset < first:
            super().write_zeroes(offset, first - offset, may_unmap)
        self._zero_whole_clusters(first, min(last, end) - first, discard=False)
        if last < end:
            super().write_zeroes(last, end - last, may_unmap)

    def _zero_whole_clusters(self, offset: int, length: int, discard: bool) -> None:
        """Whole clusters: allocated ones get their host space punched; unallocated ones over a
        backing image and compressed ones get new clusters that are holes in the file."""
        cs = self.cluster_size
        start = -(-offset // cs)
        end = offset + length
        stop = end // cs if end < self.virtual_size else -(-end // cs)
        with self._lock:
            cluster = start
            while cluster < stop:
                entry, run = self._map(cluster * cs, (stop - cluster) * cs)
                n = -(-run // cs)
                if entry and not entry & COMPRESSED:
                    if not self.file.punch_hole(entry, n * cs):
                        self.file.pwrite(entry, bytes(n * cs))
                elif not discard and (entry & COMPRESSED or self.backing is not None):
                    n = min(n, self.l2_entries - cluster % self.l2_entries)
                    host = self._allocate(n * cs)
                    self.file.truncate(max(self.file.size(), host + n * cs))
                    self._set_entries(cluster, [host + i * cs for i in range(n)])
                cluster += n

    def block_status(self, offset: int, length: int) -> Extent:
        with self._lock:
            entry, run = self._map(offset, length)
        if entry & COMPRESSED:
            return Extent(offset, run, Allocation.DATA)
        if entry:
            return Extent(
                offset, run, Allocation.DATA, host_offset=entry + offset % self.cluster_size
            )
        return Extent(offset, run, Allocation.UNALLOCATED)

    def info(self) -> ImageInfo:
        info = super().info()
        info.cluster_size = self.cluster_size
        info.encrypted = self.header.crypt_method != 0
        if info.encrypted:
            info.format_specific = {"encrypt": {"format": "aes"}}
        return info

    # -- create --------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        unknown = set(options) - set(cls.create_options)
        if unknown:
            raise InvalidRequest(f"qcow: unknown option(s) {', '.join(sorted(unknown))}")
        size = -(-size // 512) * 512
        if size < 0 or size > SIZE_MAX:
            raise InvalidRequest(f"qcow: bad size {size}")
        backing = options.get("backing_file")
        if options.get("backing_fmt") and not backing:
            raise InvalidRequest("qcow: backing_fmt given without backing_file")
        name = backing.encode("utf-8", "surrogateescape") if backing else b""
        encrypt = options.get("encrypt.format") or None
        if (options.get("encryption") or "off").lower() in ("on", "yes", "true", "1"):
            encrypt = encrypt or "aes"
        if encrypt not in (None, "aes"):
            raise InvalidRequest(f"qcow: encrypt.format={encrypt!r}: only aes")
        if encrypt and not options.get("key-file"):
            raise InvalidRequest("an encrypted qcow image needs a passphrase: imgfs create --key")
        if encrypt:
            Secret.from_file(options["key-file"])  # readable (the key itself is not stored)
        if len(name) > BACKING_NAME_MAX:
            raise InvalidRequest(f"qcow: backing file name too long ({len(name)} bytes)")
        # As qemu: 512-byte clusters over a backing file (a sector write never copies), 4 KiB
        # clusters otherwise; either way one L2 table covers 2 MiB.
        cluster_bits, l2_bits = (9, 12) if name else (12, 9)
        l1_offset = -(-(HEADER.size + len(name)) // 8) * 8
        l1_len = -(-size // (1 << (cluster_bits + l2_bits))) * 8
        header = QcowHeader(
            version=VERSION,
            backing_file_offset=HEADER.size if name else 0,
            backing_file_size=len(name),
            mtime=int(time.time()) & 0xFFFFFFFF,
            size=size,
            cluster_bits=cluster_bits,
            l2_bits=l2_bits,
            padding=0,
            crypt_method=CRYPT_AES if encrypt else 0,
            l1_table_offset=l1_offset,
        )
        with open(path, "wb") as f:
            f.write(header.pack() + name)
            f.truncate(l1_offset + -(-l1_len // 512) * 512)
            f.flush()
            os.fsync(f.fileno())


register(QcowDriver)
