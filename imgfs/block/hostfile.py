"""The host-file backend: positioned I/O on the files that hold an image, under a cache mode.

Only ``os.pread``/``os.pwrite``/``os.preadv``/``os.pwritev`` are used, never a shared file
position, so one HostFile is safe to use from several threads at once.

Cache modes follow QEMU's ``-drive cache=`` definitions:

========== ========= ========== ==========================================================
mode       O_DIRECT  no-flush   write cache seen by the guest
========== ========= ========== ==========================================================
writeback  no        no         on: data is durable once the guest flushes (fsync)
none       yes       no         on: as writeback, but the host page cache is bypassed
writethrough no      no         off: the Disk flushes after every write
directsync yes       no         off: O_DIRECT and a flush after every write
unsafe     no        yes        on, but a flush never reaches the disk (fdatasync skipped)
========== ========= ========== ==========================================================

The writethrough part is the Disk's business (it knows when a guest write ends); this module
only provides ``direct`` and ``no_flush``.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

from imgfs.block import locking
from imgfs.errors import HostIOError, InvalidRequest, UsageError


class CacheMode(enum.Enum):
    WRITEBACK = "writeback"
    NONE = "none"
    WRITETHROUGH = "writethrough"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"

    @property
    def direct(self) -> bool:
        """Bypass the host page cache (O_DIRECT)."""
        return self in (CacheMode.NONE, CacheMode.DIRECTSYNC)

    @property
    def writethrough(self) -> bool:
        """Every guest write is durable before it completes."""
        return self in (CacheMode.WRITETHROUGH, CacheMode.DIRECTSYNC)

    @property
    def no_flush(self) -> bool:
        """Flushes write dirty metadata but never sync the host file."""
        return self is CacheMode.UNSAFE


class WouldBlock(Exception):
    """A read in non-blocking mode found data that is not in the page cache (or, raised by a
    driver that checks :func:`in_nowait_mode`, would need slow CPU work such as inflating).

    Raised only inside :func:`call_nowait`; the caller retries the whole request on a thread.
    """


_thread_state = threading.local()
T = TypeVar("T")


def call_nowait(fn: Callable[..., T], *args: object) -> T:
    """Call ``fn(*args)`` with buffered host reads on this thread in non-blocking mode: they use
    RWF_NOWAIT and raise WouldBlock instead of waiting for the disk.

    This lets the trio thread serve page-cache hits inline (a thread hop costs ~120 us here)
    while a cold read is retried on a worker thread. Drivers must be exception-safe for reads
    (a read may fail at any host access and be retried), which the driver contract requires.
    A plain function rather than a context manager: it runs once per FUSE read.
    """
    state = _thread_state
    previous = getattr(state, "nowait", False)
    state.nowait = True
    try:
        return fn(*args)
    finally:
        state.nowait = previous


def in_nowait_mode() -> bool:
    """Whether this thread is inside :func:`call_nowait`. A driver with CPU-heavy reads that
    declares ``cheap_reads`` serves what it has cached and raises WouldBlock for the rest, so
    only those requests take the hop to a worker thread."""
    return getattr(_thread_state, "nowait", False)


def aligned_buffer(size: int, alignment: int) -> memoryview:
    """A writable, zero-filled buffer of ``size`` bytes whose address is a multiple of
    ``alignment``, as O_DIRECT requires. The memoryview keeps its storage alive."""
    raw = bytearray(size + alignment)
    address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    start = (-address) % alignment
    return memoryview(raw)[start : start + size]


# FALLOC_FL_* from linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class HostFile:
    """One open host file. ``direct`` opens it with O_DIRECT; ``no_flush`` makes sync() a no-op.

    Reads past the end of the file return zeros, as QEMU's file driver does, so a format driver
    never has to special-case a short final cluster.
    """

    def __init__(
        self,
        path: str,
        *,
        writable: bool,
        direct: bool = False,
        no_flush: bool = False,
        lock: bool = True,
        force_share: bool = False,
    ) -> None:
        """``lock`` takes QEMU's image locks (see imgfs.block.locking) and raises ImageLocked
        when another process's open excludes this one; ``force_share`` (read-only opens only)
        is qemu-img's -U: hold consistent read and refuse nobody."""
        self.path = path
        self.writable = writable
        self.direct = direct
        self.no_flush = no_flush
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                raise UsageError(
                    f"{path}: the host file system does not support O_DIRECT, which "
                    "cache=none and cache=directsync need; use --cache writeback or writethrough"
                ) from None
            raise HostIOError(f"{path}: cannot open: {e.strerror}", e.errno or errno.EIO) from None
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            raise HostIOError(f"{path}: is a directory", errno.EISDIR)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self.lock: locking.FileLock | None = None
        if lock:
            try:
                self.lock = locking.acquire(
                    self.fd, path, writable=writable, force_share=force_share and not writable
                )
            except BaseException:
                os.close(self.fd)
                raise
        self._rmw_lock = threading.Lock()
        self._nowait_supported = True
        self.alignment = self._probe_alignment() if direct else 1

    # -- geometry -------------------------------------------------------------------------------

    def size(self) -> int:
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def allocated_size(self) -> int:
        """Bytes the host file system really uses for this file (st_blocks)."""
        return os.fstat(self.fd).st_blocks * 512

    def _probe_alignment(self) -> int:
        """The smallest request alignment O_DIRECT accepts on this file: 512 or 4096."""
        for alignment in (512, 4096):
            buf = aligned_buffer(alignment, 4096)
            try:
                os.preadv(self.fd, [buf], 0)
                return alignment
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        return 4096

    # -- reads ----------------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes | memoryview:
        """Exactly ``length`` bytes from ``offset``; past the end of the file reads zeros."""
        if offset < 0 or length < 0:
            raise InvalidRequest(f"{self.path}: bad read offset {offset} length {length}")
        if length == 0:
            return b""
        if self.direct:
            return self._pread_direct(offset, length)
        if in_nowait_mode():
            return self._pread_nowait(offset, length)
        try:
            data = os.pread(self.fd, length, offset)
            if len(data) < length:
                data = self._fill_short(data, offset, length)
            return data
        except OSError as e:
            raise HostIOError(f"{self.path}: read at {offset}: {e.strerror}", e.errno) from None

    def _fill_short(self, data: bytes, offset: int, length: int) -> bytes:
        # A short read is either EOF (pad with zeros) or an interrupted read (read the rest).
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self.fd, length - got, offset + got)
            if not more:
                parts.append(bytes(length - got))
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _pread_nowait(self, offset: int, length: int) -> memoryview:
        if not self._nowait_supported:
            raise WouldBlock
        buf = bytearray(length)
        try:
            got = os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                self._nowait_supported = False  # this file system has no RWF_NOWAIT reads
                raise WouldBlock from None
            if e.errno == errno.EAGAIN:
                raise WouldBlock from None
            raise HostIOError(f"{self.path}: read at {offset}: {e.strerror}", e.errno) from None
        if got < length and offset + got < self.size():
            raise WouldBlock  # part of the range is not cached
        return memoryview(buf)  # the tail past EOF is already zero

    def _pread_direct(self, offset: int, length: int) -> memoryview:
        align = self.alignment
        start = offset - offset % align
        end = -(-(offset + length) // align) * align
        buf = aligned_buffer(end - start, 4096)
        done = 0
        try:
            while done < end - start:
                got = os.preadv(self.fd, [buf[done:]], start + done)
                if got <= 0:
                    break  # EOF: the rest of buf stays zero
                done += got
                if done % align:
                    break  # a short unaligned read only happens at EOF
        except OSError as e:
            raise HostIOError(f"{self.path}: read at {offset}: {e.strerror}", e.errno) from None
        head = offset - start
        return buf[head : head + length]

    # -- writes ---------------------------------------------------------------------------------

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset`` (the file grows if needed)."""
        if not self.writable:
            raise HostIOError(f"{self.path}: opened read-only", errno.EBADF)
        if offset < 0:
            raise InvalidRequest(f"{self.path}: bad write offset {offset}")
        if self.direct:
            self._pwrite_direct(offset, memoryview(data).cast("B"))
            return
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as e:
            raise HostIOError(f"{self.path}: write at {offset}: {e.strerror}", e.errno) from None

    def _pwrite_direct(self, offset: int, data: memoryview) -> None:
        align = self.alignment
        length = len(data)
        if length == 0:
            return
        start = offset - offset % align
        end = -(-(offset + length) // align) * align
        if start == offset and end == offset + length:
            buf = aligned_buffer(length, 4096)
            buf[:] = data
            self._pwritev_all(start, buf)
            return
        # Read-modify-write of the partial edge blocks. The lock keeps two unaligned writes to
        # different bytes of one block from losing each other's update.
        with self._rmw_lock:
            buf = aligned_buffer(end - start, 4096)
            file_size = self.size()
            if offset != start:
                buf[:align] = self._pread_direct(start, align)
            if offset + length != end:
                buf[len(buf) - align :] = self._pread_direct(end - align, align)
            buf[offset - start : offset - start + length] = data
            self._pwritev_all(start, buf)
            # O_DIRECT writes whole blocks; do not let the file grow past the requested end.
            if end > file_size:
                self.truncate(max(file_size, offset + length))

    def _pwritev_all(self, offset: int, buf: memoryview) -> None:
        try:
            done = 0
            while done < len(buf):
                done += os.pwritev(self.fd, [buf[done:]], offset + done)
        except OSError as e:
            raise HostIOError(f"{self.path}: write at {offset}: {e.strerror}", e.errno) from None

    # -- space management -----------------------------------------------------------------------

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range, keeping the size; it reads back as zeros. False when the host
        file system cannot punch holes (the caller then writes zeros if it must)."""
        return self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, "punch")

    def zero_range(self, offset: int, length: int) -> bool:
        """Make a range read as zeros with its blocks kept allocated; False when unsupported."""
        return self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length, "zero")

    def _fallocate(self, mode: int, offset: int, length: int, what: str) -> bool:
        try:
            _fallocate(self.fd, mode, offset, length)
            return True
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False  # the file system cannot do it
            raise HostIOError(
                f"{self.path}: {what} range at {offset}: {e.strerror}", e.errno
            ) from None

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise HostIOError(f"{self.path}: truncate to {size}: {e.strerror}", e.errno) from None

    def data_extents(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether ``offset`` is in data (True) or a hole (False), and how many bytes from
        ``offset`` (at most ``length``) have that state, from SEEK_DATA/SEEK_HOLE."""
        end = offset + length
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset: a hole up to EOF (or beyond)
                return False, length
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return True, length  # no hole reporting: everything is data
            raise HostIOError(
                f"{self.path}: SEEK_DATA at {offset}: {e.strerror}", e.errno
            ) from None
        if data > offset:
            return False, min(data, end) - offset
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError as e:
            raise HostIOError(
                f"{self.path}: SEEK_HOLE at {offset}: {e.strerror}", e.errno
            ) from None
        return True, min(hole, end) - offset

    # -- durability -----------------------------------------------------------------------------

    def sync(self) -> None:
        """Make every completed write durable (fdatasync), unless the cache mode is unsafe."""
        if self.no_flush or not self.writable:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise HostIOError(f"{self.path}: fdatasync: {e.strerror}", e.errno) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the image locks with the open file description
            self.fd = -1
            if self.lock is not None:
                self.lock.release()
