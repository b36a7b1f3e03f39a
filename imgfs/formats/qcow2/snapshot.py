"""qcow2 internal snapshots: the snapshot table, snapshot views, and create/apply/delete.

A snapshot is an L1 table of its own plus an entry in the snapshot table. Refcounts count
references *per path*: every L1 table (active or snapshot) that reaches an L2 table adds one
to that table's refcount and one to the refcount of each cluster the L2 table maps. So making a
snapshot adds one to everything the active L1 reaches, and a cluster or L2 table with refcount
above one is shared and copied before a write (the COPIED flag of its active L1/L2 entry is
clear).

Crash-safe update order (every arrow is a ``sync()``). Refcounts only ever rise before the
header points at a new structure and only fall after it stopped pointing at the old one, so
a crash anywhere loses no data and never leaves a refcount below its references: at worst
clusters leak, and (in the window between a refcount change and the COPIED flags that follow
it) ``qemu-img check`` reports COPIED flags that disagree with a refcount, which
``check -r all`` repairs; such a flag only ever makes a write copy a cluster it did not need
to, never write into a cluster that a snapshot uses:

* create: new L1 copy written and refcount *increases* (the copy's clusters, and one per
  reference of the active L1) written -> active COPIED flags cleared (L2 tables, then L1) ->
  new snapshot table written to newly allocated clusters (their refcounts too) -> header
  switch (``nb_snapshots`` + ``snapshots_offset``, one sector-aligned write of sector 0) ->
  old table's clusters freed;
* apply: new active L1 written to newly allocated clusters and refcount increases for every
  reference of the snapshot's L1 -> header switch (``size``, ``l1_size``,
  ``l1_table_offset``, one sector write) -> refcount decreases for the old active L1 and
  what it referenced (freed clusters punched);
* delete: new snapshot table (without the entry) in new clusters -> header switch -> refcount
  decreases for the snapshot's L1 and what it referenced, and for the old table -> active
  COPIED flags set where a refcount dropped to one.

VM state and the extra data of existing entries are kept byte for byte: entries are carried
as the raw bytes they were read as, and only new entries are encoded.
"""

from __future__ import annotations

import struct
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imgfs.block.driver import SnapshotInfo
from imgfs.errors import CorruptImage, InvalidRequest, NoSpace, Unsupported
from imgfs.formats.qcow2 import layout as L
from imgfs.formats.qcow2.cache import L2Table, decode_u64, encode_u64

if TYPE_CHECKING:
    from imgfs.formats.qcow2.driver import Qcow2Driver

# Extra data qemu writes in each entry: vm_state_size_large, disk_size, icount.
EXTRA = struct.Struct(">QQQ")
MAX_EXTRA = 1024
MAX_TABLE_BYTES = 64 * 1024 * 1024  # qemu's limit on the whole snapshot table
MAX_ID_OR_NAME = 65535
# Counting references in memory takes four bytes per host cluster: cap it (as check does).
MAX_COUNT_CLUSTERS = 1 << 28
ICOUNT_NONE = (1 << 64) - 1
OFF_NB_SNAPSHOTS = 60  # nb_snapshots (u32) then snapshots_offset (u64)
SNAP_UPDATE = struct.Struct(">IQ")
SECTOR = 512


@dataclass(frozen=True, slots=True)
class Entry:
    """One snapshot table entry: its raw bytes (padding included) and the decoded fields."""

    raw: bytes
    snap: L.Snapshot
    icount: int | None


def read_table(drv: Qcow2Driver) -> list[Entry]:
    """Read and validate the snapshot table the header names."""
    h, path, cs = drv.h, drv.file.path, drv.cs
    file_size = drv.file.size()
    if h.nb_snapshots == 0:
        return []
    start = h.snapshots_offset
    if start == 0 or start >= file_size:
        raise CorruptImage(f"{path}: qcow2 snapshots_offset {start} is outside the file")
    _check_overlaps(drv, start, L.SNAPSHOT_HEADER.size, [])  # before parsing what is there
    pos = start
    entries: list[Entry] = []
    reader = _TableReader(drv, start, min(file_size, start + MAX_TABLE_BYTES))
    for i in range(h.nb_snapshots):
        if pos + L.SNAPSHOT_HEADER.size > file_size:
            raise CorruptImage(f"{path}: qcow2 snapshot table entry {i} at {pos} is past the end")
        fixed = reader.read(pos, L.SNAPSHOT_HEADER.size)
        (l1_off, l1_size, id_len, name_len, sec, nsec, clock, vm32, extra) = (
            L.SNAPSHOT_HEADER.unpack(fixed)
        )
        if extra > MAX_EXTRA:
            raise CorruptImage(f"{path}: qcow2 snapshot {i} extra data size {extra} too large")
        used = L.SNAPSHOT_HEADER.size + extra + id_len + name_len
        total = used + -used % 8
        if pos + total - start > MAX_TABLE_BYTES:
            raise CorruptImage(
                f"{path}: qcow2 snapshot table of {h.nb_snapshots} entries exceeds "
                f"{MAX_TABLE_BYTES} bytes"
            )
        # qemu does not write the padding of the last entry: the file may end before it.
        if pos + used > file_size:
            raise CorruptImage(f"{path}: qcow2 snapshot table entry {i} at {pos} is past the end")
        raw = reader.read(pos, min(total, file_size - pos))
        raw += bytes(total - len(raw))
        body = raw[L.SNAPSHOT_HEADER.size :]
        vm_state, disk_size, icount = vm32, None, None
        if extra >= 8:
            vm_state = L.U64.unpack_from(body, 0)[0]
        if extra >= 16:
            disk_size = L.U64.unpack_from(body, 8)[0]
        if extra >= 24:
            value = L.U64.unpack_from(body, 16)[0]
            icount = None if value == ICOUNT_NONE else value
        sid = body[extra : extra + id_len].decode("utf-8", "replace")
        name = body[extra + id_len : extra + id_len + name_len].decode("utf-8", "replace")
        if not id_len:
            raise CorruptImage(f"{path}: qcow2 snapshot {i} has an empty id")
        if l1_size * 8 > L.MAX_L1_BYTES:
            raise CorruptImage(f"{path}: qcow2 snapshot {sid!r} l1_size {l1_size} too large")
        if l1_off % cs or (l1_size and (l1_off == 0 or l1_off + l1_size * 8 > file_size)):
            raise CorruptImage(
                f"{path}: qcow2 snapshot {sid!r} L1 table offset {l1_off} is invalid"
            )
        if disk_size is not None and disk_size > l1_size * drv.l2_entries * cs:
            raise CorruptImage(
                f"{path}: qcow2 snapshot {sid!r} disk size {disk_size} exceeds its L1 table"
            )
        snap = L.Snapshot(l1_off, l1_size, sid, name, sec, nsec, clock, vm_state, disk_size)
        entries.append(Entry(raw, snap, icount))
        pos += total
    _check_overlaps(drv, start, pos - start, entries)
    return entries


class _TableReader:
    """Reads of the snapshot table in 1 MiB pieces (a table may hold 65536 small entries)."""

    CHUNK = 1024 * 1024

    def __init__(self, drv: Qcow2Driver, start: int, end: int) -> None:
        self.file, self.end = drv.file, end
        self.base, self.buf = start, b""

    def read(self, pos: int, n: int) -> bytes:
        if not (self.base <= pos and pos + n <= self.base + len(self.buf)):
            self.base = pos
            self.buf = bytes(self.file.pread(pos, max(n, min(self.CHUNK, self.end - pos))))
        at = pos - self.base
        return self.buf[at : at + n]


def _check_overlaps(drv: Qcow2Driver, table_off: int, table_len: int, entries: list[Entry]) -> None:
    """The snapshot table and the snapshots' L1 tables must not lie on the header, the
    refcount table, the active L1 table or each other."""
    h, cs, path = drv.h, drv.cs, drv.file.path
    fixed = [
        ("the header", 0, cs),
        ("the refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs),
        ("the active L1 table", h.l1_table_offset, h.l1_size * 8),
    ]

    def clash(what: str, off: int, n: int, others: list[tuple[str, int, int]]) -> None:
        for other, o, m in others:
            if n and m and off < o + m and o < off + n:
                raise CorruptImage(f"{path}: qcow2 {what} at {off} overlaps {other} at {o}")

    clash("snapshot table", table_off, table_len, fixed)
    for e in entries:
        s = e.snap
        clash(f"snapshot {s.id!r} L1 table", s.l1_table_offset, s.l1_size * 8,
              fixed[:2] + [("the snapshot table", table_off, table_len)])  # fmt: skip


def info_of(drv: Qcow2Driver, e: Entry) -> SnapshotInfo:
    s = e.snap
    return SnapshotInfo(
        id=s.id,
        name=s.name,
        virtual_size=snapshot_size(drv, e),
        date_sec=s.date_sec,
        date_nsec=s.date_nsec,
        vm_clock_nsec=s.vm_clock_nsec,
        vm_state_size=s.vm_state_size,
        icount=e.icount,
    )


def snapshot_size(drv: Qcow2Driver, e: Entry) -> int:
    """The snapshot's virtual size: from its extra data, else (old images) the image's."""
    if e.snap.disk_size is not None:
        return e.snap.disk_size
    return min(drv.h.size, e.snap.l1_size * drv.l2_entries * drv.cs)


def find(entries: list[Entry], key: str) -> Entry | None:
    """A snapshot by id first, then by name (as qemu-img looks them up)."""
    for e in entries:
        if e.snap.id == key:
            return e
    for e in entries:
        if e.snap.name == key:
            return e
    return None


# -- snapshot views ------------------------------------------------------------------------------


def open_view(drv: Qcow2Driver, key: str) -> None:
    """Make a freshly opened driver show snapshot ``key`` (id or name), read-only: its own L1
    table and virtual size."""
    e = find(drv.snapshot_entries, key)
    if e is None:
        raise InvalidRequest(f"{drv.file.path}: no snapshot with id or name {key!r}")
    s = e.snap
    drv.read_only = True
    drv.l1 = decode_u64(drv.file.pread(s.l1_table_offset, s.l1_size * 8))
    drv.h.size = snapshot_size(drv, e)
    drv.h.l1_size = s.l1_size
    drv.h.l1_table_offset = s.l1_table_offset
    drv.view_of = s.id


# -- copy on write of a shared L2 table ----------------------------------------------------------


def cow_l2_table(drv: Qcow2Driver, l1_index: int, old_offset: int) -> L2Table:
    """Give the active L1 its own copy of a shared L2 table (called under the metadata lock).

    The copy's entries keep pointing at the same clusters: their refcounts do not change (one
    path through the old table becomes one path through the new one). The old table loses the
    active layer's reference once the new L1 entry is on disk (a deferred free)."""
    old = drv.l2_cache.get(old_offset)
    words = array(old.words.typecode, old.words)
    step, cb = drv.l2_words, drv.cb
    has_data_file = drv.data_file is not None
    for j in range(0, len(words), step):
        e = words[j]
        host = e & L.L2E_OFFSET_MASK
        if e & L.OFLAG_COMPRESSED or not host or has_data_file:
            continue
        unshared = drv.refcount(host >> cb) == 1
        words[j] = (e & ~L.OFLAG_COPIED) | (L.OFLAG_COPIED if unshared else 0)
    host, _ = drv._alloc_clusters(1)
    table = L2Table(b"")
    table.words = words
    table.dirty = True
    drv.l2_cache.put_new(host, table)
    drv._set_l1(l1_index, host | L.OFLAG_COPIED)
    drv._pending_free.append((old_offset, drv.cs))
    return table


# -- reference counting over one L1 table --------------------------------------------------------


class _Refs:
    """How many references one or more L1 tables hold on each host cluster."""

    def __init__(self, drv: Qcow2Driver) -> None:
        self.drv = drv
        n = -(-max(drv._host_end, drv.file.size()) // drv.cs)
        if n > MAX_COUNT_CLUSTERS:
            raise Unsupported(f"{drv.file.path}: image too big for snapshot operations")
        self.counts = array("I", bytes(4 * n))

    def add(self, offset: int, size: int, what: str) -> None:
        cb = self.drv.cb
        first, last = offset >> cb, (offset + size - 1) >> cb
        if last >= len(self.counts):
            raise CorruptImage(
                f"{self.drv.file.path}: qcow2 {what} at {offset} is past the end of the file"
            )
        for c in range(first, last + 1):
            self.counts[c] += 1

    def add_l1(self, l1: array, what: str) -> None:
        """Every L2 table ``l1`` reaches, and every cluster those tables map (per path)."""
        drv = self.drv
        cs, cb, step = drv.cs, drv.cb, drv.l2_words
        seen: set[int] = set()
        for l1e in l1:
            l2_off = l1e & L.L1E_OFFSET_MASK
            if not l2_off:
                continue
            if l2_off % cs or l2_off in seen:
                raise CorruptImage(f"{drv.file.path}: qcow2 {what} L2 table {l2_off} invalid")
            seen.add(l2_off)
            self.add(l2_off, cs, f"{what} L2 table")
            words = _l2_words(drv, l2_off)
            for j in range(0, len(words), step):
                e = words[j]
                if e & L.OFLAG_COMPRESSED:
                    x = 62 - (cb - 8)
                    coff = e & ((1 << x) - 1)
                    nsec = (e >> x) & ((1 << (62 - x)) - 1)
                    self.add(coff, (nsec + 1) * 512 - (coff & 511), f"{what} compressed cluster")
                    continue
                host = e & L.L2E_OFFSET_MASK
                if host and drv.data_file is None:
                    if host % cs:
                        raise CorruptImage(
                            f"{drv.file.path}: qcow2 {what} cluster {host} unaligned"
                        )
                    self.add(host, cs, f"{what} data cluster")

    def check_increase(self) -> None:
        """Raise (changing nothing) if adding the counts would overflow a refcount."""
        drv = self.drv
        counts = self.counts
        for c in range(len(counts)):
            if counts[c]:
                block, i = drv._refblock_for(c)
                if block is None:
                    raise CorruptImage(f"{drv.file.path}: qcow2 cluster {c} has no refcount")
                if block.get(i) + counts[c] > block.max_value:
                    raise NoSpace(
                        f"{drv.file.path}: refcount of cluster {c} would overflow "
                        f"({drv.refcount_bits}-bit refcounts)"
                    )

    def apply(self, sign: int) -> list[int]:
        """Add ``sign`` times the counts to the refcounts; returns the clusters now free.
        Increases are checked for overflow first, so nothing changes when one would."""
        drv = self.drv
        counts = self.counts
        if sign > 0:
            self.check_increase()
        freed = []
        for c in range(len(counts)):
            if counts[c]:
                if drv._add_refcount(c, sign * counts[c]) == 0:
                    freed.append(c)
        return freed


def _l2_words(drv: Qcow2Driver, offset: int) -> array:
    table = drv.l2_cache.tables.get(offset)
    if table is not None:
        return table.words
    if offset + drv.cs > drv.file.size():
        raise CorruptImage(f"{drv.file.path}: qcow2 L2 table {offset} is past the end of the file")
    return decode_u64(drv.file.pread(offset, drv.cs))


def _free_clusters(drv: Qcow2Driver, clusters: list[int]) -> None:
    for c in clusters:
        drv.l2_cache.drop(c << drv.cb)
        drv.file.punch_hole(c << drv.cb, drv.cs)
        drv._free_hint = min(drv._free_hint, c)


def _unref_range(drv: Qcow2Driver, offset: int, size: int) -> list[int]:
    freed = []
    if not size:
        return freed
    for c in range(offset >> drv.cb, ((offset + size - 1) >> drv.cb) + 1):
        if drv._add_refcount(c, -1) == 0:
            freed.append(c)
    return freed


# -- table updates -------------------------------------------------------------------------------


def encode_entry(
    *, sid: str, name: str, l1_off: int, l1_size: int, disk_size: int, now: float
) -> bytes:
    id_b, name_b = sid.encode(), name.encode()
    sec = int(now)
    nsec = int((now - sec) * 1e9)
    out = L.SNAPSHOT_HEADER.pack(
        l1_off, l1_size, len(id_b), len(name_b), sec, nsec, 0, 0, EXTRA.size
    ) + EXTRA.pack(0, disk_size, 0)
    out += id_b + name_b
    return out + bytes(-len(out) % 8)


def _write_table(drv: Qcow2Driver, raws: list[bytes]) -> None:
    """Put a new snapshot table (``raws``, the encoded entries) in new clusters, then switch
    the header to it, then free the old one. Refcounts of everything the new table's entries
    reference must already be on disk."""
    cs, h = drv.cs, drv.h
    data = b"".join(raws)
    new_off = 0
    if raws:
        if len(data) > MAX_TABLE_BYTES:
            raise NoSpace(f"{drv.file.path}: the snapshot table would exceed {MAX_TABLE_BYTES}")
        clusters = -(-len(data) // cs)
        new_off = drv._alloc_contiguous(clusters)
        drv.file.pwrite(new_off, data + bytes(clusters * cs - len(data)))
        if drv.file.size() < new_off + clusters * cs:
            drv.file.truncate(new_off + clusters * cs)
    drv._write_refcounts()
    drv.file.sync()
    old_off, old_len = h.snapshots_offset, drv.snapshot_table_size
    _switch_header(drv, {OFF_NB_SNAPSHOTS: SNAP_UPDATE.pack(len(raws), new_off)})
    h.nb_snapshots, h.snapshots_offset = len(raws), new_off
    drv.snapshot_table_size = len(data)
    if old_len:
        drv._wait_for_readers()
        _free_clusters(drv, _unref_range(drv, old_off, old_len))
        drv._write_refcounts()
        drv.file.sync()


def _write_new_l1(drv: Qcow2Driver, l1: array) -> int:
    """Write an L1 table into newly allocated clusters (refcounts written and synced)."""
    clusters = max(1, -(-len(l1) * 8 // drv.cs))
    offset = drv._alloc_contiguous(clusters)
    data = encode_u64(l1)
    drv.file.pwrite(offset, data + bytes(clusters * drv.cs - len(data)))
    if drv.file.size() < offset + clusters * drv.cs:
        drv.file.truncate(offset + clusters * drv.cs)
    drv._write_refcounts()
    drv.file.sync()
    return offset


def _switch_header(drv: Qcow2Driver, fields: dict[int, bytes]) -> None:
    """Rewrite header fields with one write of the first sector (atomic on every disk)."""
    sector = bytearray(drv.file.pread(0, SECTOR))
    for off, value in fields.items():
        sector[off : off + len(value)] = value
    drv.file.pwrite(0, bytes(sector))
    drv.file.sync()


def _set_entries(drv: Qcow2Driver, entries: list[Entry]) -> None:
    drv.snapshot_entries = entries


class _Operation:
    """The metadata lock for one snapshot operation. If the operation fails half-way, the
    driver's in-memory metadata no longer matches a state worth writing: the driver turns
    read-only so that nothing more is flushed; the file holds the last consistent state the
    update order left (see the top of this module)."""

    def __init__(self, drv: Qcow2Driver) -> None:
        self.drv = drv

    def __enter__(self) -> None:
        self.drv._lock.acquire()

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        try:
            if error is not None and not isinstance(error, InvalidRequest):
                self.drv.read_only = True
                self.drv.notes.append(f"a snapshot operation failed ({error}): now read-only")
        finally:
            self.drv._lock.release()


def _prepare(drv: Qcow2Driver) -> None:
    drv.check_writable()
    if drv.view_of is not None:
        raise InvalidRequest(f"{drv.file.path}: a snapshot view cannot change snapshots")
    if drv.data_file is not None:
        raise Unsupported(f"{drv.file.path}: qcow2 images with a data file have no snapshots")
    drv._before_write()
    drv._flush_locked()  # on-disk metadata now equals memory; deferred frees applied
    drv._compress_cursor = 0


def _sync_copied_flags(drv: Qcow2Driver) -> None:
    """COPIED flags of the active L1 and its L2 tables set exactly when the refcount is one
    (the tables' changes are written by the next flush, in order)."""
    cb, step = drv.cb, drv.l2_words
    for i, l1e in enumerate(drv.l1):
        l2_off = l1e & L.L1E_OFFSET_MASK
        if not l2_off:
            continue
        l2_unshared = drv.refcount(l2_off >> cb) == 1
        want = l2_off | (L.OFLAG_COPIED if l2_unshared else 0)
        if want != l1e:
            drv._set_l1(i, want)
        table = drv.l2_cache.get(l2_off)
        words = table.words
        for j in range(0, len(words), step):
            e = words[j]
            host = e & L.L2E_OFFSET_MASK
            if e & L.OFLAG_COMPRESSED or not host:
                continue
            new = e & ~L.OFLAG_COPIED
            if l2_unshared and drv.refcount(host >> cb) == 1:
                new |= L.OFLAG_COPIED
            if new != e:
                words[j] = new
                table.dirty = True


def create(drv: Qcow2Driver, name: str, now: float | None = None) -> SnapshotInfo:
    """Snapshot the active layer as ``name`` (disk only: no VM state)."""
    with _Operation(drv):
        _prepare(drv)
        entries = drv.snapshot_entries
        if not name or "\0" in name or len(name.encode()) > MAX_ID_OR_NAME:
            raise InvalidRequest(f"{drv.file.path}: bad snapshot name {name!r}")
        # Names may repeat, as with qemu-img; ids are unique: one more than the highest.
        if len(entries) >= L.MAX_SNAPSHOTS:
            raise NoSpace(f"{drv.file.path}: already {len(entries)} snapshots")
        sid = str(1 + max((int(e.snap.id) for e in entries if e.snap.id.isdigit()), default=0))
        refs = _Refs(drv)
        refs.add_l1(drv.l1, "active")
        # The copy of the L1 table (COPIED flags mean nothing in an inactive table: cleared).
        l1_copy = array(drv.l1.typecode, (e & ~L.OFLAG_COPIED for e in drv.l1))
        l1_size = len(l1_copy)
        refs.check_increase()
        # New space first (the L1 copy), so that running out of it leaves a leak at worst;
        # the refcount increases and COPIED flags then only rewrite clusters in place.
        l1_off = _write_new_l1(drv, l1_copy) if l1_size else 0
        refs.apply(+1)
        drv._write_refcounts()
        drv.file.sync()
        # Everything the active L1 reaches is shared now.
        _sync_copied_flags(drv)
        drv._flush_locked()
        raw = encode_entry(
            sid=sid, name=name, l1_off=l1_off, l1_size=l1_size, disk_size=drv.h.size,
            now=time.time() if now is None else now,
        )  # fmt: skip
        e = _decode_new(drv, raw)
        _write_table(drv, [x.raw for x in entries] + [raw])
        _set_entries(drv, entries + [e])
        return info_of(drv, e)


def _decode_new(drv: Qcow2Driver, raw: bytes) -> Entry:
    (l1_off, l1_size, id_len, name_len, sec, nsec, clock, _, extra) = L.SNAPSHOT_HEADER.unpack_from(
        raw
    )
    body = raw[L.SNAPSHOT_HEADER.size :]
    vm, disk_size, icount = EXTRA.unpack_from(body)
    sid = body[extra : extra + id_len].decode()
    name = body[extra + id_len : extra + id_len + name_len].decode()
    return Entry(raw, L.Snapshot(l1_off, l1_size, sid, name, sec, nsec, clock, vm, disk_size),
                 icount)  # fmt: skip


def delete(drv: Qcow2Driver, key: str) -> SnapshotInfo:
    """Delete snapshot ``key`` (id or name): drop its references."""
    with _Operation(drv):
        _prepare(drv)
        entries = drv.snapshot_entries
        e = find(entries, key)
        if e is None:
            raise InvalidRequest(f"{drv.file.path}: no snapshot with id or name {key!r}")
        s = e.snap
        refs = _Refs(drv)
        l1 = decode_u64(drv.file.pread(s.l1_table_offset, s.l1_size * 8))
        refs.add_l1(l1, f"snapshot {s.id!r}")
        if s.l1_size:
            refs.add(s.l1_table_offset, s.l1_size * 8, f"snapshot {s.id!r} L1 table")
        rest = [x for x in entries if x is not e]
        _write_table(drv, [x.raw for x in rest])
        _set_entries(drv, rest)
        drv._wait_for_readers()
        freed = refs.apply(-1)
        _free_clusters(drv, freed)
        drv._write_refcounts()
        drv.file.sync()
        _sync_copied_flags(drv)
        drv._flush_locked()
        drv._forget_inflated()
        return info_of(drv, e)


def apply(drv: Qcow2Driver, key: str) -> SnapshotInfo:
    """Make snapshot ``key`` (id or name) the active layer; the snapshot stays."""
    with _Operation(drv):
        _prepare(drv)
        e = find(drv.snapshot_entries, key)
        if e is None:
            raise InvalidRequest(f"{drv.file.path}: no snapshot with id or name {key!r}")
        s = e.snap
        new_size = snapshot_size(drv, e)
        need = -(-new_size // (drv.l2_entries * drv.cs))
        snap_l1 = decode_u64(drv.file.pread(s.l1_table_offset, s.l1_size * 8))
        new_l1 = array(snap_l1.typecode, (x & ~L.OFLAG_COPIED for x in snap_l1))
        if len(new_l1) < need:
            new_l1.extend([0] * (need - len(new_l1)))
        plus = _Refs(drv)
        plus.add_l1(snap_l1, f"snapshot {s.id!r}")
        minus = _Refs(drv)
        minus.add_l1(drv.l1, "active")
        if drv.h.l1_size:
            minus.add(drv.h.l1_table_offset, drv.h.l1_size * 8, "active L1 table")
        plus.check_increase()
        l1_off = _write_new_l1(drv, new_l1)
        plus.apply(+1)
        drv._write_refcounts()
        drv.file.sync()
        header = {
            L.OFF_SIZE: L.U64.pack(new_size),
            L.OFF_L1_SIZE: L.L1_UPDATE.pack(len(new_l1), l1_off),
        }
        _switch_header(drv, header)
        drv.h.size, drv.h.l1_size, drv.h.l1_table_offset = new_size, len(new_l1), l1_off
        drv.l1 = new_l1
        drv._l1_dirty_lo, drv._l1_dirty_hi = None, 0
        drv._wait_for_readers()
        freed = minus.apply(-1)
        _free_clusters(drv, freed)
        drv._write_refcounts()
        drv.file.sync()
        _sync_copied_flags(drv)
        drv._flush_locked()
        drv._forget_inflated()
        return info_of(drv, e)
