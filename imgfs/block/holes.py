"""Zeros and holes above the drivers: zero detection for writes, SEEK_DATA/SEEK_HOLE answers
from the chain's block status, and fallocate(2) modes mapped onto discard/write-zeroes.

Everything here works on a :class:`~imgfs.block.disk.Disk` (any format, any chain), so no
driver needs to know about it.
"""

from __future__ import annotations

import bisect
import enum
import errno
import os
import threading
from typing import TYPE_CHECKING

from imgfs.block.extent import Allocation
from imgfs.errors import InvalidRequest, ReadOnly, Unsupported

if TYPE_CHECKING:
    from imgfs.block.disk import Disk


class DetectZeroes(enum.Enum):
    """QEMU's ``detect-zeroes``: what to do with a write whose data is all zeros.

    OFF: write it as data. ON: turn it into write_zeroes (the format records zeros instead of
    allocating, where it can). UNMAP: write_zeroes with unmapping allowed (the range may be
    deallocated); only allowed with discard enabled.
    """

    OFF = "off"
    ON = "on"
    UNMAP = "unmap"


class DiscardMode(enum.Enum):
    """QEMU's ``discard``: whether discard requests (guest TRIM/UNMAP, fallocate punch-hole,
    write-zeroes with unmap allowed) may free space in the image. IGNORE still zeroes what a
    request promises to zero; it only never deallocates."""

    IGNORE = "ignore"
    UNMAP = "unmap"

    @classmethod
    def parse(cls, text: str) -> DiscardMode:
        # QEMU's aliases: discard=on is unmap, discard=off is ignore.
        aliases = {"on": cls.UNMAP, "off": cls.IGNORE}
        try:
            return aliases.get(text) or cls(text)
        except ValueError:
            raise InvalidRequest(f"bad discard mode {text!r} (ignore, unmap)") from None


def check_zero_policy(detect: DetectZeroes, discard: DiscardMode) -> None:
    """QEMU's rule: detect-zeroes=unmap needs discard=unmap."""
    if detect is DetectZeroes.UNMAP and discard is not DiscardMode.UNMAP:
        raise InvalidRequest("detect-zeroes=unmap needs discard=unmap")


# Mount options (``-o KEY=VALUE``) this module reads; the CLI sets them apart from FUSE's own.
MOUNT_OPTION_KEYS = ("detect-zeroes", "discard", "seek-holes")


def mount_policy(
    detect_zeroes: str | None,
    discard: str | None,
    seek_holes: bool | None,
    options: dict[str, str],
) -> tuple[DetectZeroes, DiscardMode, bool]:
    """The mount's zero/discard/hole policy from the command-line flags and ``-o`` options
    (popped from ``options``; a flag wins over ``-o``). Defaults: detect-zeroes=off,
    discard=unmap, seek-holes=on."""
    o_detect = options.pop("detect-zeroes", None)
    o_discard = options.pop("discard", None)
    o_seek = options.pop("seek-holes", None)
    text = detect_zeroes or o_detect or "off"
    try:
        detect = DetectZeroes(text)
    except ValueError:
        raise InvalidRequest(f"bad detect-zeroes mode {text!r} (off, on, unmap)") from None
    mode = DiscardMode.parse(discard or o_discard or "unmap")
    if seek_holes is None:
        seek_holes = True
        if o_seek is not None:
            if o_seek not in ("on", "off"):
                raise InvalidRequest(f"bad seek-holes value {o_seek!r} (on, off)")
            seek_holes = o_seek == "on"
    check_zero_policy(detect, mode)
    return detect, mode, seek_holes


# -- zero detection ----------------------------------------------------------------------------

_ZERO_CHUNK = 1 << 20
_ZEROS = bytes(_ZERO_CHUNK)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` (non-empty) is all zero bytes. C-speed: ``bytes.startswith`` compares a
    slice of a shared zero buffer without copying (a memoryview ``==`` would go byte by byte)."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    n = len(view)
    if n == 0:
        return False
    # Most data is not zero: three probes reject it before any full comparison.
    if view[0] or view[n - 1] or view[n >> 1]:
        return False
    for start in range(0, n, _ZERO_CHUNK):
        if not _ZEROS.startswith(view[start : start + _ZERO_CHUNK]):
            return False
    return True


# -- SEEK_DATA / SEEK_HOLE --------------------------------------------------------------------

# Runs remembered per disk: enough for a copy tool's walk over a fragmented image, small enough
# to be nothing next to a driver's own metadata cache (three ints per run).
MAX_CACHED_RUNS = 4096
# The first block-status query of a walk covers this much; each answer that fills its whole
# window doubles the next one. Some drivers scan every cluster of the range they are asked about
# (not only up to the first change), so asking for the rest of the disk at once would cost a
# full table scan per short run.
FIRST_WINDOW = 1 << 20
# How many block-status answers one lseek may ask for before it answers conservatively (data):
# a pathological image with millions of tiny extents must not stall a request for long.
MAX_STATUS_CALLS = 65536


class AllocationCache:
    """Runs of data / hole learnt from block-status walks, dropped whenever the disk changes.

    A run is remembered only when its whole extent was seen (both ends), so a lookup inside it
    answers at once. Bounded: when full, it is cleared (walks are cheap to redo).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._runs: list[tuple[int, int, bool]] = []  # (start, end, is_data), sorted by start
        self._generation = -1

    def lookup(self, generation: int, offset: int) -> tuple[int, bool] | None:
        """(end, is_data) of the cached run holding ``offset``, if any and still valid."""
        with self._lock:
            if generation != self._generation:
                return None
            i = bisect.bisect_right(self._starts, offset) - 1
            if i >= 0:
                start, end, is_data = self._runs[i]
                if start <= offset < end:
                    return end, is_data
        return None

    def add(self, generation: int, start: int, end: int, is_data: bool) -> None:
        with self._lock:
            if generation != self._generation:
                self._starts.clear()
                self._runs.clear()
                self._generation = generation
            if len(self._runs) >= MAX_CACHED_RUNS:
                self._starts.clear()
                self._runs.clear()
            i = bisect.bisect_right(self._starts, start) - 1
            if i >= 0 and self._runs[i][1] > start:
                return  # overlaps a known run (a concurrent walk added it): keep that one
            j = i + 1
            if j < len(self._starts) and self._starts[j] < end:
                return
            self._starts.insert(j, start)
            self._runs.insert(j, (start, end, is_data))


def _run_at(disk: Disk, offset: int, calls: list[int]) -> tuple[int, bool]:
    """(end, is_data) of the run of one kind starting at ``offset``: consecutive block-status
    extents of the same kind are merged. A ZERO range is a hole, as is an unallocated range
    at the bottom of the chain (it reads as zeros)."""
    size = disk.size
    generation = disk.write_generation
    cached = disk.allocation_cache.lookup(generation, offset)
    if cached is not None:
        return cached
    start = offset
    is_data: bool | None = None
    complete = True
    window = FIRST_WINDOW
    while offset < size:
        if calls[0] >= MAX_STATUS_CALLS:
            complete = False
            break
        calls[0] += 1
        asked = min(window, size - offset)
        ext = disk.block_status(offset, asked)
        ext_data = ext.allocation is Allocation.DATA
        if is_data is None:
            is_data = ext_data
        elif ext_data != is_data:
            break
        offset = ext.offset + max(ext.length, 1)
        if ext.length >= asked:
            window *= 2
    offset = min(offset, size)
    assert is_data is not None
    if complete:
        disk.allocation_cache.add(generation, start, offset, is_data)
    return offset, is_data


def seek_data(disk: Disk, offset: int) -> int:
    """lseek(SEEK_DATA): the first offset at or after ``offset`` that holds data. ENXIO (as
    an OSError) when ``offset`` is at or past the end, or only holes follow it."""
    size = disk.size
    if offset < 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    calls = [0]
    while offset < size:
        end, is_data = _run_at(disk, offset, calls)
        if is_data or calls[0] >= MAX_STATUS_CALLS:
            return offset  # out of budget: call it data, which is never wrong
        offset = end
    raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))


def seek_hole(disk: Disk, offset: int) -> int:
    """lseek(SEEK_HOLE): the first offset at or after ``offset`` in a hole; the end of the disk
    counts as one. ENXIO when ``offset`` is at or past the end."""
    size = disk.size
    if offset < 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if offset >= size:
        raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
    calls = [0]
    while offset < size:
        end, is_data = _run_at(disk, offset, calls)
        if not is_data:
            return offset
        if calls[0] >= MAX_STATUS_CALLS:
            return size  # out of budget: the rest is data as far as the caller knows
        offset = end
    return size


def seek_cached(disk: Disk, offset: int, whence: int) -> int | None:
    """The SEEK_DATA/SEEK_HOLE answer from the allocation cache alone (no block-status call,
    so it can run on the event loop), or None when a walk is needed. A cached run always ends
    where the other kind (or the end of the disk) begins."""
    size = disk.size
    if offset >= size or offset < 0:
        return None  # let the walk give the error
    cached = disk.allocation_cache.lookup(disk.write_generation, offset)
    if cached is None:
        return None
    end, is_data = cached
    if whence == os.SEEK_DATA:
        if is_data:
            return offset
        if end >= size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return end
    if whence == os.SEEK_HOLE:
        return end if is_data else offset
    return None


# -- fallocate(2) ------------------------------------------------------------------------------

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(disk: Disk, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on an exported disk.

    * PUNCH_HOLE|KEEP_SIZE: the range reads as zeros afterwards, deallocated where the format
      and the discard mode allow (write_zeroes with unmap allowed; never the backing image's
      data showing through);
    * ZERO_RANGE[|KEEP_SIZE]: the range reads as zeros, kept allocated where the format can
      (write_zeroes without unmap);
    * 0 or KEEP_SIZE (preallocate): nothing to do inside the disk; the disk never grows
      through fallocate (resize it with truncate), so a range past the end without KEEP_SIZE
      fails with EOPNOTSUPP.

    Ranges past the end are cut at it (KEEP_SIZE). Other modes (collapse, insert, unshare) are
    EOPNOTSUPP. Alignment: any byte range; partial clusters are zeroed in place by the driver.
    """
    if offset < 0 or length <= 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    size = disk.size
    end = offset + length
    keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
    kind = mode & ~FALLOC_FL_KEEP_SIZE
    if kind not in (0, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE):
        raise Unsupported(f"{disk.name}: fallocate mode {mode:#x} is not supported")
    if kind == FALLOC_FL_PUNCH_HOLE and not keep_size:
        raise OSError(errno.EOPNOTSUPP, "punch hole needs FALLOC_FL_KEEP_SIZE")
    if end > size and not keep_size:
        raise Unsupported(
            f"{disk.name}: fallocate to {end} would grow the disk ({size} bytes); "
            "resize it with truncate instead"
        )
    if disk.read_only:
        raise ReadOnly(f"{disk.name}: read-only")
    if kind == 0 or offset >= size:
        return
    end = min(end, size)
    # Only the data in the range needs zeroing: a hole of the whole chain already reads as
    # zeros, and a format that cannot record zeros cheaply would otherwise allocate for it.
    may_unmap = kind == FALLOC_FL_PUNCH_HOLE
    data_start: int | None = None
    while offset < end:
        ext = disk.block_status(offset, end - offset)
        run_end = min(end, ext.offset + max(ext.length, 1))
        if ext.allocation is Allocation.DATA:
            data_start = offset if data_start is None else data_start
        elif data_start is not None:
            disk.write_zeroes(data_start, offset - data_start, may_unmap)
            data_start = None
        offset = run_end
    if data_start is not None:
        disk.write_zeroes(data_start, end - data_start, may_unmap)


__all__ = [
    "DetectZeroes",
    "DiscardMode",
    "check_zero_policy",
    "fallocate",
    "is_zero",
    "seek_data",
    "seek_hole",
]
