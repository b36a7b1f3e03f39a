"""Image locking that QEMU understands: byte-range OFD locks on every host file imgfs opens.

QEMU's file driver (``locking=auto``, the default) announces what it does with an image through
shared (read) open-file-description locks on single bytes of the file:

* byte ``100 + i`` while it holds permission ``i``;
* byte ``200 + i`` while it does not let others hold permission ``i``.

The permissions, as QEMU 7.2 numbers them (``/proc/locks`` of a running ``qemu-io`` shows
them): 0 consistent read, 1 write, 2 write unchanged, 3 resize. (QEMU before 6.2 had a fifth,
"graph mod", at bit 4: it took and refused it only between its own nodes, so imgfs neither takes
nor tests bytes 104 and 204.)

A new user first takes its bytes, then tests, with ``F_OFD_GETLK`` and an exclusive lock, the
bytes that would conflict: ``200 + i`` for each permission it wants (someone refuses it) and
``100 + i`` for each permission it refuses (someone holds it). What QEMU itself holds:

=============================== ================== =============================
open                            holds              refuses to share
=============================== ================== =============================
format image, read-write        read, write, resize write, resize
format image, read-only         read               write, resize
backing image                   read               write, resize
``-U`` (force share), read-only read               nothing
=============================== ================== =============================

imgfs takes the same: a writable open holds read, write and resize and shares neither write nor
resize (for raw images too, as QEMU's disk devices do), a read-only open holds read and refuses
write and resize, and a force-share open (``imgfs info -U``) holds read only. So an image imgfs
has open for writing cannot be opened by QEMU at all without ``-U`` ("Failed to get shared
"write" lock"), an image imgfs reads cannot be opened for writing, and the other way round.

Locks are per open file description, so two opens of one file in this process conflict as two
processes would; :func:`held_here` tells which files this process holds, so the mount's scanner
does not mistake its own locks for another program's.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
import threading

from imgfs.errors import ImgfsError


class Perm(enum.IntFlag):
    CONSISTENT_READ = 1 << 0
    WRITE = 1 << 1
    WRITE_UNCHANGED = 1 << 2
    RESIZE = 1 << 3


ALL_PERMS = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
PERM_BITS = 4
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
# QEMU's names, as its messages quote them.
PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}

# struct flock on Linux (x86_64, aarch64): l_type, l_whence, l_start, l_len, l_pid, padded to 32.
FLOCK = struct.Struct("@hhqqi4x")
# errno values that mean "this file system has no OFD locks": lock nothing, as QEMU's
# locking=auto does.
NO_LOCK_SUPPORT = (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class ImageLocked(ImgfsError):
    """Another process (QEMU, or another imgfs) uses the image in a way that excludes us."""

    errno = errno.EBUSY


def wanted(writable: bool, force_share: bool = False) -> tuple[Perm, Perm]:
    """(held, shared) permissions for an open of a host file, as QEMU takes them."""
    if writable:
        return (Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE,
                Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)  # fmt: skip
    if force_share:
        return Perm.CONSISTENT_READ, ALL_PERMS
    return Perm.CONSISTENT_READ, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


def _flock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One fcntl on one byte; returns the l_type the kernel hands back."""
    arg = FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)
    return FLOCK.unpack(fcntl.fcntl(fd, cmd, arg))[0]


def _bytes_for(held: Perm, shared: Perm) -> list[int]:
    out = []
    for bit in range(PERM_BITS):
        perm = Perm(1 << bit)
        if held & perm:
            out.append(LOCK_PERM_BASE + bit)
        if not shared & perm:
            out.append(LOCK_SHARED_BASE + bit)
    return out


def conflict(fd: int, held: Perm, shared: Perm) -> str | None:
    """QEMU's message for the first permission another open file description of the file
    stands in the way of, or None. Locks taken through ``fd`` itself never conflict."""
    for bit in range(PERM_BITS):
        perm = Perm(1 << bit)
        if held & perm and _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK,
                                  LOCK_SHARED_BASE + bit) != fcntl.F_UNLCK:  # fmt: skip
            return f'Failed to get "{PERM_NAMES[perm]}" lock'
        if not shared & perm and _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK,
                                        LOCK_PERM_BASE + bit) != fcntl.F_UNLCK:  # fmt: skip
            return f'Failed to get shared "{PERM_NAMES[perm]}" lock'
    return None


_held_lock = threading.Lock()
_held: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> opens holding locks


def held_here(path: str) -> bool:
    """Whether this process holds image locks on ``path`` (through any open)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    with _held_lock:
        return (st.st_dev, st.st_ino) in _held


class FileLock:
    """The locks one open of a host file holds; they go when its descriptor is closed."""

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key
        self._released = False

    def release(self) -> None:
        """Forget this open in the process registry (closing the descriptor drops the locks)."""
        if self._released:
            return
        self._released = True
        with _held_lock:
            left = _held.get(self.key, 0) - 1
            if left > 0:
                _held[self.key] = left
            else:
                _held.pop(self.key, None)


def acquire(fd: int, path: str, *, writable: bool, force_share: bool = False) -> FileLock | None:
    """Take QEMU's lock bytes for an open of ``path`` on ``fd``, then test for conflicts.

    Raises ImageLocked when another open of the file excludes this one (the bytes already taken
    stay until the caller closes ``fd``). Returns None when the file system cannot lock."""
    held, shared = wanted(writable, force_share)
    try:
        for byte in _bytes_for(held, shared):
            try:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    # An exclusive lock on the byte: not QEMU, but someone who wants it alone.
                    raise ImageLocked(
                        f"{path}: cannot lock byte {byte}: another process holds it exclusively"
                    ) from None
                raise
        problem = conflict(fd, held, shared)
    except OSError as e:
        if e.errno in NO_LOCK_SUPPORT:
            return None
        raise ImageLocked(f"{path}: cannot lock: {e.strerror}") from None
    if problem is not None:
        raise ImageLocked(f"{path}: {problem}: is another process (QEMU?) using the image?")
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _held_lock:
        _held[key] = _held.get(key, 0) + 1
    return FileLock(key)


def test(path: str, *, writable: bool) -> str | None:
    """Whether an open of ``path`` (read-write or read-only) would be refused because of another
    process's locks: QEMU's message, or None. Takes no lock; a file this process holds itself is
    never refused (its locks already keep out whatever would conflict with them)."""
    if held_here(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # the open itself will say what is wrong
    try:
        held, shared = wanted(writable)
        return conflict(fd, held, shared)
    except OSError:
        return None
    finally:
        os.close(fd)
