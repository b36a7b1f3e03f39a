"""What a device model runs its requests against: an opened Disk or an exported file.

Both implementations take byte offsets and lengths already checked by the device against
``size``. Host failures are raised as :class:`TargetError` with a host errno, which each device
turns into its own medium-error status.
"""

from __future__ import annotations

import errno
import os

from imgfs.block.disk import Disk, open_disk
from imgfs.block.driver import BlockDriver
from imgfs.block.hostfile import CacheMode, HostFile
from imgfs.errors import ImgfsError

ZERO_CHUNK = 1 << 20
_ZEROS = bytes(ZERO_CHUNK)


class TargetError(ImgfsError):
    """The image or host file failed a request."""

    def __init__(self, message: str, host_errno: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = host_errno


class Target:
    """The small interface the device models need.

    ``writethrough`` is the device's view of its write cache: cleared WCE (SCSI), SET FEATURES
    disable write cache (ATA) or virtio writeback=0 set it, and then every write is flushed
    before it completes. ``discard`` must leave the range reading as zeros, because every device
    here advertises deterministic zeroes after TRIM/UNMAP.
    """

    name: str
    size: int
    read_only: bool
    can_discard: bool
    writethrough: bool

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        raise NotImplementedError

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, True)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class DiskTarget(Target):
    """A Disk opened through the driver contract (any format, any cache mode)."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.name = disk.name
        self.size = disk.size
        self.read_only = disk.read_only
        # The Disk already flushes after each write in writethrough/directsync modes.
        self._disk_writethrough = disk.cache.writethrough
        self._writethrough = self._disk_writethrough
        top = type(disk.top)
        self.can_discard = not self.read_only and (
            top.discard is not BlockDriver.discard
            or top.write_zeroes is not BlockDriver.write_zeroes
        )

    @property
    def writethrough(self) -> bool:
        return self._writethrough

    @writethrough.setter
    def writethrough(self, value: bool) -> None:
        # A Disk opened writethrough/directsync flushes every write whatever the device says:
        # turning the write cache on cannot make it less durable, so the device reports it off.
        self._writethrough = value or self._disk_writethrough

    @classmethod
    def open(
        cls, path: str, fmt: str | None, cache: CacheMode, read_only: bool = False
    ) -> DiskTarget:
        try:
            return cls(open_disk(path, fmt, cache=cache, read_only=read_only))
        except ImgfsError as e:
            raise TargetError(str(e), e.errno) from None

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        try:
            return self.disk.read(offset, length)
        except Exception as e:  # a driver bug too: a medium error, not a crash
            raise TargetError(f"{self.name}: read at {offset}: {e}", _errno(e)) from None

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        try:
            self.disk.write(offset, data)
            if (fua or self._writethrough) and not self._disk_writethrough:
                self.disk.flush()
        except Exception as e:
            raise TargetError(f"{self.name}: write at {offset}: {e}", _errno(e)) from None

    def flush(self) -> None:
        try:
            self.disk.flush()
        except Exception as e:
            raise TargetError(f"{self.name}: flush: {e}", _errno(e)) from None

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        try:
            self.disk.write_zeroes(offset, length, unmap)
            if self._writethrough and not self._disk_writethrough:
                self.disk.flush()
        except Exception as e:
            raise TargetError(f"{self.name}: write zeroes at {offset}: {e}", _errno(e)) from None

    def close(self) -> None:
        try:
            self.disk.close()
        except Exception as e:
            raise TargetError(f"{self.name}: close: {e}", _errno(e)) from None


class FileTarget(Target):
    """An exported raw file (for example ``disk.qcow2.raw`` in an imgfs mount), used as qemu's
    file driver would: O_DIRECT for cache=none/directsync, fdatasync per write for
    writethrough/directsync, never for unsafe."""

    def __init__(
        self, path: str, cache: CacheMode = CacheMode.WRITEBACK, read_only: bool = False
    ) -> None:
        writable = not read_only and os.access(path, os.W_OK)
        try:
            self.file = HostFile(
                path, writable=writable, direct=cache.direct, no_flush=cache.no_flush
            )
        except ImgfsError as e:
            raise TargetError(str(e), e.errno) from None
        self.name = os.path.basename(path)
        self.size = self.file.size()
        self.read_only = not writable
        self.can_discard = writable
        self._file_writethrough = cache.writethrough
        self.writethrough = cache.writethrough

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        try:
            return self.file.pread(offset, length)
        except (ImgfsError, OSError) as e:
            raise TargetError(f"{self.name}: read at {offset}: {e}", _errno(e)) from None

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        try:
            self.file.pwrite(offset, data)
            if fua or self.writethrough:
                self.file.sync()
        except (ImgfsError, OSError) as e:
            raise TargetError(f"{self.name}: write at {offset}: {e}", _errno(e)) from None

    def flush(self) -> None:
        try:
            self.file.sync()
        except (ImgfsError, OSError) as e:
            raise TargetError(f"{self.name}: flush: {e}", _errno(e)) from None

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        try:
            done = (unmap and self.file.punch_hole(offset, length)) or self.file.zero_range(
                offset, length
            )
            if not done:
                end = offset + length
                while offset < end:
                    n = min(ZERO_CHUNK, end - offset)
                    self.file.pwrite(offset, _ZEROS[:n])
                    offset += n
            if self.writethrough:
                self.file.sync()
        except (ImgfsError, OSError) as e:
            raise TargetError(f"{self.name}: write zeroes at {offset}: {e}", _errno(e)) from None

    def close(self) -> None:
        self.file.close()


def _errno(e: BaseException) -> int:
    return getattr(e, "errno", None) or errno.EIO
