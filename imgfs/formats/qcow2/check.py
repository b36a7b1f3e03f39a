"""qcow2 consistency check: rebuild the refcounts from every structure that references
clusters, compare them with the image's refcounts, and count (and optionally repair) the
differences the way ``qemu-img check`` counts them:

* image refcount < references: a corruption (``-r all`` raises the refcount);
* image refcount > references: a leak (``-r leaks`` lowers it);
* an L2/L1 entry whose COPIED flag disagrees with a refcount of exactly one: a corruption
  (``-r all`` fixes the flag).
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from imgfs.block.driver import CheckResult, RepairMode
from imgfs.errors import CorruptImage
from imgfs.formats.qcow2 import layout as L
from imgfs.formats.qcow2.cache import U64_CODE, RefcountBlock, decode_u64, encode_u64

if TYPE_CHECKING:
    from imgfs.formats.qcow2.driver import Qcow2Driver

# Refcounts are rebuilt in memory, four bytes per host cluster: cap that.
MAX_CHECK_CLUSTERS = 1 << 28


class _Counter:
    def __init__(self, drv: Qcow2Driver, nb_clusters: int, res: CheckResult) -> None:
        self.drv = drv
        self.cs = drv.cs
        self.cb = drv.cb
        self.res = res
        self.counts = array("I", bytes(4 * nb_clusters))
        self.file_size = drv.file.size()
        # qemu-img check's statistics of the active L1 table.
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0

    def add(self, offset: int, size: int, what: str) -> None:
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            # As qemu-img check: a reference a cluster or more past the end of the file is a
            # corruption and is not counted (which also bounds the counts array).
            self.res.corruptions += 1
            self.res.messages.append(
                f"ERROR {what} at offset {offset} size {size} exceeds the end of the file"
            )
            return
        first = offset >> self.cb
        last = (offset + size - 1) >> self.cb
        counts = self.counts
        if last >= len(counts):
            counts.extend(bytes(4 * (last + 1 - len(counts))))
        for c in range(first, last + 1):
            counts[c] += 1


def check_image(drv: Qcow2Driver, repair: RepairMode, *, rebuilt: bool = False) -> CheckResult:
    res = CheckResult()
    h = drv.h
    cs = drv.cs
    file_size = drv.file.size()
    nb_clusters = -(-file_size // cs)
    if nb_clusters > MAX_CHECK_CLUSTERS:
        res.check_errors += 1
        res.messages.append(f"image of {file_size} bytes is too big to check")
        return res
    counter = _Counter(drv, nb_clusters, res)
    add = counter.add
    fix_copied = repair is RepairMode.ALL
    # Header cluster (with extensions and backing name).
    add(0, cs, "header")
    # Active L1 and everything under it.
    _count_l1(drv, counter, h.l1_table_offset, h.l1_size, active=True)
    # Snapshots: their L1 tables and what those reference, then the snapshot table.
    for entry in drv.snapshot_entries:
        snap = entry.snap
        _count_l1(drv, counter, snap.l1_table_offset, snap.l1_size, active=False)
    if h.nb_snapshots:
        add(h.snapshots_offset, drv.snapshot_table_size, "snapshot table")
    # The refcount table.
    add(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    refcount_structures = [(h.refcount_table_offset, h.refcount_table_clusters * cs)]
    # Bitmaps: the directory, each bitmap table and its data clusters.
    if drv.bitmaps:
        ext = h.extension(L.EXT_BITMAPS)
        assert ext is not None
        _, _, dir_size, dir_off = L.BITMAPS_EXT.unpack_from(ext)
        add(dir_off, dir_size, "bitmap directory")
        for b in drv.bitmaps:
            add(b.table_offset, b.table_size * 8, "bitmap table")
            if b.table_size * 8 > L.MAX_L1_BYTES:
                continue
            table = decode_u64(drv.file.pread(b.table_offset, b.table_size * 8))
            for e in table:
                off = e & L.L1E_OFFSET_MASK
                if off:
                    add(off, cs, "bitmap data")
    # Encryption header clusters.
    crypt = h.extension(L.EXT_CRYPTO)
    if crypt is not None and len(crypt) >= 16:
        add(int.from_bytes(crypt[:8], "big"), int.from_bytes(crypt[8:16], "big"), "crypto")
    # Refcount blocks: each must be referenced exactly once (by the table).
    need_rebuild = False
    for t, entry in enumerate(drv.reftable):
        off = entry & L.REFT_OFFSET_MASK
        if entry & ~L.REFT_OFFSET_MASK or off % cs:
            res.corruptions += 1
            res.messages.append(f"ERROR refcount table entry {t} is invalid: {entry:#x}")
            need_rebuild = True
            continue
        if (off >> drv.cb) >= nb_clusters:
            res.corruptions += 1
            res.messages.append(f"ERROR refcount block {t} is outside the image")
            need_rebuild = True
            continue
        if off:
            add(off, cs, "refcount block")
            refcount_structures.append((off, cs))
            if counter.counts[off >> drv.cb] != 1:
                res.corruptions += 1
                res.messages.append(f"ERROR refcount block {t} overlaps other data")
                need_rebuild = True

    # Compare with the image's refcounts.
    counts = counter.counts
    total = nb_clusters  # references just past the end are not compared (as qemu-img)
    highest = -1
    changed = False
    rb = drv.rb_entries
    limit = len(drv.reftable) * rb
    for c in range(max(total, 0)):
        want = counts[c] if c < len(counts) else 0
        have = _image_refcount(drv, c) if c < limit else 0
        if have is None:
            res.check_errors += 1
            res.messages.append(f"Can't get refcount for cluster {c}")
            continue
        if have or want:
            highest = c
        if have == want:
            continue
        if have > want:
            if repair in (RepairMode.LEAKS, RepairMode.ALL):
                if _set_refcount(drv, c, want):
                    res.leaks_fixed += 1
                    changed = True
                    continue
            res.leaks += 1
            res.messages.append(f"Leaked cluster {c} refcount={have} reference={want}")
        else:
            if repair is RepairMode.ALL:
                if _set_refcount(drv, c, want):
                    res.corruptions_fixed += 1
                    changed = True
                    continue
                need_rebuild = True  # no usable refcount block for this cluster
            res.corruptions += 1
            res.messages.append(f"ERROR cluster {c} refcount={have} reference={want}")
    if need_rebuild and repair is RepairMode.ALL and not rebuilt:
        drv._write_refcounts()
        drv._flush_locked()
        _rebuild_refcounts(drv, counts, refcount_structures)
        again = check_image(drv, RepairMode.ALL, rebuilt=True)
        again.corruptions_fixed += res.corruptions + res.corruptions_fixed
        again.leaks_fixed += res.leaks + res.leaks_fixed
        again.messages[:0] = res.messages + ["refcount structures rebuilt"]
        return again
    # COPIED flags are checked against the refcounts as repaired.
    changed = _check_copied(drv, res, fix_copied) or changed
    if changed:
        drv._write_refcounts()
        drv._flush_locked()
    if repair is not RepairMode.NONE and h.incompatible & L.INCOMPAT_DIRTY and not res.corruptions:
        h.incompatible &= ~L.INCOMPAT_DIRTY
        drv.file.sync()
        drv._write_header_field(L.OFF_INCOMPAT, L.U64.pack(h.incompatible))
    res.image_end_offset = (highest + 1) * cs
    res.total_clusters = -(-h.size // cs)
    res.allocated_clusters = counter.allocated
    res.fragmented_clusters = counter.fragmented
    res.compressed_clusters = counter.compressed
    return res


def _image_refcount(drv: Qcow2Driver, cluster: int) -> int | None:
    try:
        return drv.refcount(cluster)
    except CorruptImage:
        return None  # an unusable refcount block


def _rebuild_refcounts(drv: Qcow2Driver, counts: array, old: list[tuple[int, int]]) -> None:
    """Write a new refcount table and blocks from the rebuilt counts, past the end of
    everything in use, then switch the header to them. The old structures become free."""
    cs, cb, rb = drv.cs, drv.cb, drv.rb_entries
    counts = array("I", counts)
    for off, size in old:
        for c in range(off >> cb, (off + size - 1 >> cb) + 1):
            if c < len(counts) and counts[c]:
                counts[c] -= 1
    start = max(len(counts), -(-drv.file.size() // cs))
    table_clusters, ranges = 1, []
    while True:
        end = start + table_clusters + len(ranges)
        nranges = -(-end // rb)
        want = [
            r for r in range(nranges)
            if (r + 1) * rb > start or any(counts[r * rb : (r + 1) * rb])
        ]  # fmt: skip
        want_clusters = max(1, -(-nranges * 8 // cs))
        if (want, want_clusters) == (ranges, table_clusters):
            break
        ranges, table_clusters = want, want_clusters
    end = start + table_clusters + len(ranges)
    if table_clusters * cs > L.MAX_REFTABLE_BYTES:
        raise CorruptImage(f"{drv.file.path}: rebuilt refcount table would be too large")
    counts.extend(bytes(4 * (end - len(counts))))
    for c in range(start, end):
        counts[c] = 1
    table = array(U64_CODE, bytes(table_clusters * cs))
    for j, r in enumerate(ranges):
        block = RefcountBlock(bytes(cs), drv.refcount_bits)
        for i in range(rb):
            c = r * rb + i
            if c < len(counts) and counts[c]:
                block.set(i, min(counts[c], block.max_value))
        block_off = (start + table_clusters + j) << cb
        drv.file.pwrite(block_off, block.to_bytes())
        table[r] = block_off
    drv.file.pwrite(start << cb, encode_u64(table))
    drv.file.sync()
    drv.file.pwrite(L.OFF_REFCOUNT_TABLE, L.REFTABLE_UPDATE.pack(start << cb, table_clusters))
    drv.file.sync()
    drv.h.refcount_table_offset, drv.h.refcount_table_clusters = start << cb, table_clusters
    drv.reftable = table
    drv.rc_cache.clear()
    drv._reftable_dirty.clear()
    drv._host_end = max(drv._host_end, end << cb)
    drv._free_hint = 0


def _set_refcount(drv: Qcow2Driver, cluster: int, value: int) -> bool:
    try:
        block, i = drv._refblock_for(cluster)
    except CorruptImage:
        return False
    if block is None:
        return False
    if value > block.max_value:
        return False
    block.set(i, value)
    return True


def _count_l1(
    drv: Qcow2Driver, counter: _Counter, l1_offset: int, l1_size: int, *, active: bool
) -> None:
    """Count one L1 table, its L2 tables and their clusters, with qemu-img check's rules."""
    res = counter.res
    cs = drv.cs
    add = counter.add
    add(l1_offset, l1_size * 8, "L1 table")
    l1 = drv.l1 if active else decode_u64(drv.file.pread(l1_offset, l1_size * 8))
    # One L1 table never references an L2 table twice (snapshots share tables between L1
    # tables, not inside one). A corrupt one may point all its entries at the same table: its
    # entries are counted once, so the work stays bounded by the file's size, not by
    # L1 entries x L2 entries.
    walked: set[int] = set()
    file_end = drv.file.size()
    for l1e in l1:
        if l1e & L.L1E_RESERVED:
            res.corruptions += 1
            res.messages.append(f"ERROR found L1 entry with reserved bits set: {l1e:x}")
        l2_off = l1e & L.L1E_OFFSET_MASK
        if not l2_off:
            continue
        add(l2_off, cs, "L2 table")
        if l2_off % cs:
            # Not walked (qemu-img walks it): a corrupt L1 can name a table at every sector of
            # the file, and walking each would cost file size x entries per table.
            res.corruptions += 1
            res.messages.append(
                f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; not walked"
            )
            continue
        if l2_off + cs > file_end:
            # Reads as zeros; walking its entries would cost as much as a real table, for each
            # of the (up to millions of) offsets a corrupt L1 can name past the end.
            res.corruptions += 1
            res.messages.append(
                f"ERROR l2_offset={l2_off:x}: Table is past the end of the file; not walked"
            )
            continue
        if l2_off in walked:
            res.corruptions += 1
            res.messages.append(
                f"ERROR l2_offset={l2_off:x}: L2 table referenced twice by one L1 table "
                "(its clusters are counted once)"
            )
            continue
        walked.add(l2_off)
        if active:
            words = drv.l2_cache.get(l2_off).words
        else:
            words = decode_u64(drv.file.pread(l2_off, cs))
        _count_l2(drv, counter, words, active)


def _count_l2(drv: Qcow2Driver, counter: _Counter, words: array, active: bool) -> None:
    res = counter.res
    cs = drv.cs
    add = counter.add
    step = drv.l2_words
    has_data_file = drv.data_file is not None
    next_contiguous = 0  # qemu-img counts fragmentation within each L2 table
    for j in range(0, len(words), step):
        e = words[j]
        bitmap = words[j + 1] if step == 2 else 0
        if e & L.OFLAG_COMPRESSED:
            if e & L.OFLAG_COPIED:
                res.corruptions += 1
                res.messages.append(f"ERROR: compressed L2 entry {e:x} has the copied flag")
            if has_data_file:
                res.corruptions += 1
                res.messages.append(f"ERROR compressed cluster with a data file: {e:x}")
                continue
            if bitmap:
                res.corruptions += 1
                res.messages.append(f"ERROR compressed cluster with a subcluster bitmap: {e:x}")
                continue
            x = 62 - (drv.cb - 8)
            coff = e & ((1 << x) - 1)
            nsec = (e >> x) & ((1 << (62 - x)) - 1)
            add(coff, (nsec + 1) * 512 - (coff & 511), "compressed cluster")
            if active:
                counter.allocated += 1
                counter.compressed += 1
                counter.fragmented += 1
            continue
        if e & L.L2E_STD_RESERVED:
            res.corruptions += 1
            res.messages.append(f"ERROR found l2 entry with reserved bits set: {e:x}")
        host = e & L.L2E_OFFSET_MASK
        if not host and not (has_data_file and e & L.OFLAG_COPIED):
            if step == 2 and bitmap & L.SUBCLUSTER_ALL:
                res.corruptions += 1
                res.messages.append("ERROR: Unallocated cluster has a subcluster allocation map")
            continue  # unallocated, or zero without preallocation
        if host % cs:
            res.corruptions += 1
            res.messages.append(f"ERROR offset={host:x}: cluster is not properly aligned")
        if active:
            counter.allocated += 1
            if next_contiguous and host != next_contiguous:
                counter.fragmented += 1
            next_contiguous = host + cs
        if not has_data_file:
            add(host, cs, "data cluster")


def _check_copied(drv: Qcow2Driver, res: CheckResult, fix: bool) -> bool:
    """Active L1/L2 entries must have COPIED set exactly when the refcount is one."""
    cb = drv.cb
    changed = False
    walked: set[int] = set()  # an L2 table the L1 points at twice is looked at once
    for i, l1e in enumerate(drv.l1):
        l2_off = l1e & L.L1E_OFFSET_MASK
        if not l2_off or l2_off % drv.cs:
            continue
        rc = _image_refcount(drv, l2_off >> cb)
        if rc is None:
            continue
        if (rc == 1) != bool(l1e & L.OFLAG_COPIED):
            if fix:
                drv._set_l1(i, l2_off | (L.OFLAG_COPIED if rc == 1 else 0))
                res.corruptions_fixed += 1
                changed = True
            else:
                res.corruptions += 1
                res.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} refcount={rc}")
        if l2_off in walked:
            continue
        walked.add(l2_off)
        table = drv.l2_cache.get(l2_off)
        words = table.words
        has_data_file = drv.data_file is not None
        for j in range(0, len(words), drv.l2_words):
            e = words[j]
            host = e & L.L2E_OFFSET_MASK
            if e & L.OFLAG_COMPRESSED or not (host or (has_data_file and e & L.OFLAG_COPIED)):
                continue
            rc = 1 if has_data_file else _image_refcount(drv, host >> cb)
            if rc is None:
                continue
            if (rc == 1) != bool(e & L.OFLAG_COPIED):
                if fix:
                    words[j] = (e & ~L.OFLAG_COPIED) | (L.OFLAG_COPIED if rc == 1 else 0)
                    table.dirty = True
                    res.corruptions_fixed += 1
                    changed = True
                else:
                    res.corruptions += 1
                    res.messages.append(
                        f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                    )
    return changed
