"""Shared machinery for formats that map fixed-size guest blocks through one flat table of
32-bit little-endian entries (VDI's block map, Parallels' BAT).

Not a driver (it registers nothing). A subclass says how an entry turns into a host offset,
how a new block is allocated, and how its header is written; this class does the reads,
writes, zeroing, block status and the crash-safe flush order:

1. new blocks are appended past the end of the data area; the host file is extended first
   (a sparse extension reads as zeros), so an entry never points at unwritten garbage;
2. the data is written at once, and only then the table entry changes, in memory; its
   512-byte table sector is marked dirty;
3. ``flush`` syncs the data, then writes the dirty table sectors and the header (the header
   first, synced on its own, when ``header_before_table``), then syncs again. A crash before
   the table is written leaves the on-disk table pointing at old blocks only; the appended
   block is unreferenced space that the next allocation overwrites.
"""

from __future__ import annotations

import sys
import threading
from array import array

from imgfs.block.driver import BlockDriver, OpenOptions
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.errors import CorruptImage

SECTOR = 512
# Largest table we hold in memory: 32 Mi entries = 128 MiB (32 TiB at 1 MiB blocks).
MAX_TABLE_ENTRIES = 32 * 1024 * 1024
_ENTRIES_PER_SECTOR = SECTOR // 4


def load_table(file: HostFile, offset: int, count: int, what: str) -> array:
    """Read ``count`` little-endian u32 entries at ``offset``, refusing tables that do not fit
    in the file or in memory."""
    if count > MAX_TABLE_ENTRIES:
        raise CorruptImage(f"{file.path}: {what} has {count} entries (limit {MAX_TABLE_ENTRIES})")
    if offset + 4 * count > file.size():
        raise CorruptImage(
            f"{file.path}: {what} ({count} entries at {offset}) runs past the end of the file"
        )
    table = array("I")
    table.frombytes(bytes(file.pread(offset, 4 * count)))
    if sys.byteorder != "little":
        table.byteswap()
    return table


class BlockTableDriver(BlockDriver):
    """A driver whose guest blocks of ``block_size`` bytes are found through ``self.table``."""

    supports_write = True
    #: Write (and sync) a dirty header before the table sectors: for formats whose header
    #: counts allocated blocks and whose readers allocate at that count (VDI), so a crash
    #: between the two can never make a new block collide with one the table names.
    header_before_table = False

    def __init__(self, file: HostFile, options: OpenOptions) -> None:
        super().__init__(file, options)
        self.lock = threading.Lock()
        self.table: array = array("I")
        self.table_offset = 0
        self.block_size = 1
        self._dirty_sectors: set[int] = set()
        self._header_dirty = False
        self._known_end = 0  # the host file's size when last looked at (it only grows)

    # -- what a format supplies -----------------------------------------------------------------

    def entry_state(self, entry: int) -> tuple[Allocation, int | None]:
        """(allocation, host offset of the block's data) for a table entry."""
        raise NotImplementedError

    def allocate_block(self, block: int) -> tuple[int, int]:
        """Called with ``self.lock`` held: reserve host space for ``block`` (extending the file
        so the block reads as zeros) and return (host offset of its data, table entry). The
        caller writes the data and then sets the entry."""
        raise NotImplementedError

    def write_header(self) -> None:
        """Write the header; flush calls it when ``mark_header_dirty`` was called since the
        last flush (after the table, or before it with ``header_before_table``)."""
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------------

    def set_entry(self, block: int, value: int) -> None:
        self.table[block] = value
        self._dirty_sectors.add(block // _ENTRIES_PER_SECTOR)

    def mark_header_dirty(self) -> None:
        self._header_dirty = True

    def _host(self, block: int) -> tuple[Allocation, int | None]:
        if block >= len(self.table):
            return Allocation.UNALLOCATED, None
        return self.entry_state(self.table[block])

    # -- data -----------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        bs = self.block_size
        pieces: list[bytes | bytearray | memoryview] = []
        end = offset + length
        # Consecutive blocks that are contiguous in the host file are read with one pread.
        run_host: int | None = None
        run_len = 0
        pos = offset
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            state, host = self._host(block)
            if state is Allocation.DATA and host is not None:
                if run_host is not None and run_host + run_len == host + within:
                    run_len += n
                else:
                    if run_host is not None:
                        pieces.append(self.file.pread(run_host, run_len))
                    run_host, run_len = host + within, n
            else:
                if run_host is not None:
                    pieces.append(self.file.pread(run_host, run_len))
                    run_host, run_len = None, 0
                pieces.append(
                    self.read_backing(pos, n) if state is Allocation.UNALLOCATED else bytes(n)
                )
            pos += n
        if run_host is not None:
            pieces.append(self.file.pread(run_host, run_len))
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_writable()
        view = memoryview(data).cast("B")
        bs = self.block_size
        # Pieces for blocks already allocated and contiguous on the host go in one pwrite.
        run_host: int | None = None
        run_start = run_len = 0
        pos = 0
        while pos < len(view):
            block, within = divmod(offset + pos, bs)
            n = min(bs - within, len(view) - pos)
            state, host = self._host(block)
            if state is Allocation.DATA and host is not None:
                self._check_inside_file(block, host)
                if run_host is not None and run_host + run_len == host + within:
                    run_len += n
                else:
                    if run_host is not None:
                        self.file.pwrite(run_host, view[run_start : run_start + run_len])
                    run_host, run_start, run_len = host + within, pos, n
            else:
                if run_host is not None:
                    self.file.pwrite(run_host, view[run_start : run_start + run_len])
                    run_host = None
                self._write_new_block(block, within, view[pos : pos + n])
            pos += n
        if run_host is not None:
            self.file.pwrite(run_host, view[run_start : run_start + run_len])

    def _check_inside_file(self, block: int, host: int) -> None:
        """A table entry whose data starts past the end of the file is corrupt: writing there
        would grow the image to wherever a hostile entry points (terabytes). Reads of such a
        block see zeros, as the host file does."""
        if host < self._known_end:
            return
        self._known_end = self.file.size()
        if host >= self._known_end:
            raise CorruptImage(
                f"{self.file.path}: block {block} points past the end of the file "
                f"({host:#x} >= {self._known_end:#x})"
            )

    def _write_new_block(self, block: int, within: int, piece: memoryview) -> None:
        """Write into a block that has no data yet: reserve space, write the data (merged with
        the backing image's block when there is one), and only then publish the table entry,
        so no reader and no flush ever sees an entry whose data is not in place."""
        with self.lock:
            state, host = self._host(block)
            if state is Allocation.DATA and host is not None:  # another writer got here first
                self.file.pwrite(host + within, piece)
                return
            host, entry = self.allocate_block(block)
            if state is Allocation.UNALLOCATED and self.backing is not None:
                start = block * self.block_size
                n = min(self.block_size, self.virtual_size - start)
                buf = bytearray(self.read_backing(start, n))
                buf[within : within + len(piece)] = piece
                self.file.pwrite(host, buf)
            else:
                self.file.pwrite(host + within, piece)  # the rest of the block is a hole
            self.set_entry(block, entry)

    def discard(self, offset: int, length: int) -> None:
        """Whole allocated blocks give their host space back (hole punched); the block stays
        mapped and reads as zeros. Partial blocks keep their data, as the contract allows."""
        self.check_writable()
        self._punch_whole_blocks(offset, length, zero_partial=False)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.check_writable()
        self._punch_whole_blocks(offset, length, zero_partial=True, may_unmap=may_unmap)

    def _punch_whole_blocks(
        self, offset: int, length: int, zero_partial: bool, may_unmap: bool = True
    ) -> None:
        bs = self.block_size
        end = offset + length
        pos = offset
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            state, host = self._host(block)
            if state is Allocation.DATA and host is not None:
                whole = n == bs or (within == 0 and pos + n == self.virtual_size)
                if whole and may_unmap and self.file.punch_hole(host, n):
                    pass
                elif zero_partial:
                    if not self.file.zero_range(host + within, n):
                        self.file.pwrite(host + within, bytes(n))
            elif zero_partial and state is Allocation.UNALLOCATED and self.backing is not None:
                self.write(pos, bytes(n))  # must hide the backing image's data
            pos += n

    def block_status(self, offset: int, length: int) -> Extent:
        bs = self.block_size
        first, within = divmod(offset, bs)
        state, host = self._host(first)
        n = min(bs - within, length)
        block = first + 1
        # Extend over following blocks in the same state (and contiguous on the host for DATA);
        # capped so one call stays cheap.
        while n < length and block - first < 65536:
            if block >= len(self.table):
                # Past a table shorter than the disk everything is unallocated: one extent, so
                # a walk over a huge disk with a short table takes one call, not millions.
                if state is Allocation.UNALLOCATED:
                    n = length
                break
            try:
                nstate, nhost = self._host(block)
            except CorruptImage:
                # The run ends before a bad entry; a request starting there reports it. (Raising
                # here made a walk that skips past errors rescan the same entries every call.)
                break
            if nstate is not state:
                break
            if state is Allocation.DATA and (host is None or nhost != host + (block - first) * bs):
                break
            n = min(n + bs, length)
            block += 1
        if state is Allocation.DATA and host is not None:
            # A block whose host range is a hole (discarded, or never written since its sparse
            # allocation) reads as zeros: say so, as qemu's file layer does.
            is_data, run = self.file.data_extents(host + within, n)
            if not is_data:  # (the host offset still says where the block is: qemu-img map)
                return Extent(offset, run, Allocation.ZERO, host_offset=host + within)
            return Extent(offset, run, state, host_offset=host + within)
        return Extent(offset, n, state)

    # -- durability -----------------------------------------------------------------------------

    def flush(self) -> None:
        with self.lock:
            if self._dirty_sectors or self._header_dirty:
                self.file.sync()  # the data that new entries point at is durable first
                if self._header_dirty and self.header_before_table:
                    self.write_header()
                    self._header_dirty = False
                    self.file.sync()
                self._write_dirty_table()
                if self._header_dirty:
                    self.write_header()
                    self._header_dirty = False
        self.file.sync()

    def _write_dirty_table(self) -> None:
        sectors = sorted(self._dirty_sectors)
        i = 0
        while i < len(sectors):
            j = i
            while j + 1 < len(sectors) and sectors[j + 1] == sectors[j] + 1:
                j += 1
            first = sectors[i] * _ENTRIES_PER_SECTOR
            last = min((sectors[j] + 1) * _ENTRIES_PER_SECTOR, len(self.table))
            chunk = self.table[first:last]
            if sys.byteorder != "little":
                chunk.byteswap()
            self.file.pwrite(self.table_offset + 4 * first, chunk.tobytes())
            i = j + 1
        self._dirty_sectors.clear()
