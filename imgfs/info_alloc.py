"""The allocation summary ``imgfs info`` adds to qemu-img's fields: how much of an image's
guest data the image stores itself, how much it marks as zeros, how much it shares with (reads
from) its backing chain, and how many of its host bytes the file shares with other files
through reflinks (FIEMAP's shared flag, on XFS/btrfs)."""

from __future__ import annotations

import errno
import fcntl
import logging
import struct
from dataclasses import dataclass

from imgfs.block.chain import chain_block_status
from imgfs.block.driver import BlockDriver
from imgfs.block.extent import Allocation
from imgfs.block.hostfile import HostFile
from imgfs.errors import ImgfsError

log = logging.getLogger(__name__)

STEP = 1 << 30

# linux/fiemap.h: struct fiemap {u64 fm_start, fm_length; u32 fm_flags, fm_mapped_extents,
# fm_extent_count, fm_reserved}, then fm_extent_count of struct fiemap_extent {u64 fe_logical,
# fe_physical, fe_length, fe_reserved64[2]; u32 fe_flags, fe_reserved[3]}.
FIEMAP = struct.Struct("=QQIIII")
FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")
FS_IOC_FIEMAP = (3 << 30) | (FIEMAP.size << 16) | (ord("f") << 8) | 11  # _IOWR('f', 11, ...)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
EXTENTS_PER_CALL = 256


@dataclass(slots=True)
class AllocationSummary:
    data: int = 0  # guest bytes this image stores itself
    zero: int = 0  # guest bytes this image marks as zeros (zero clusters, holes)
    backing: int = 0  # guest bytes read from the backing chain, where it holds data or zeros
    unallocated: int = 0  # guest bytes nothing in the chain holds (read as zeros)
    host_shared: int | None = None  # host bytes shared with other files; None: not known

    def to_json(self) -> dict[str, int | None]:
        return {
            "data": self.data, "zero": self.zero, "backing": self.backing,
            "unallocated": self.unallocated, "host-shared": self.host_shared,
        }  # fmt: skip


def summarize_or_none(layer: BlockDriver) -> AllocationSummary | None:
    """The summary, or None when the layer cannot say (its block status fails): info still
    shows the rest."""
    try:
        return summarize(layer)
    except ImgfsError as e:
        log.warning("%s: no allocation summary: %s", layer.file.path, e)
        return None


def summarize(layer: BlockDriver) -> AllocationSummary:
    """The summary for one layer (its own allocation, and what its backing chain supplies)."""
    out = AllocationSummary()
    size = layer.virtual_size
    offset = 0
    while offset < size:
        ext = layer.block_status(offset, min(STEP, size - offset))
        n = ext.length
        if ext.allocation is Allocation.DATA:
            out.data += n
        elif ext.allocation is Allocation.ZERO:
            out.zero += n
        else:
            _below(layer, offset, n, out)
        offset += n
    out.host_shared = shared_host_bytes(layer.file)
    return out


def _below(layer: BlockDriver, offset: int, length: int, out: AllocationSummary) -> None:
    backing = layer.backing
    end = offset + length
    while offset < end:
        if backing is None or offset >= backing.virtual_size:
            out.unallocated += end - offset
            return
        ext = chain_block_status(backing, offset, min(end, backing.virtual_size) - offset)
        if ext.allocation is Allocation.UNALLOCATED:
            out.unallocated += ext.length
        else:
            out.backing += ext.length
        offset += ext.length


def shared_host_bytes(file: HostFile) -> int | None:
    """Bytes of the file whose extents FIEMAP marks shared (reflinked with another file or a
    snapshot); None when the file system does not answer FIEMAP."""
    fd = getattr(file, "fd", -1)  # remote files (HTTP, NBD) and vvfat have no host fd
    if fd < 0:
        return None
    shared = 0
    start = 0
    while True:
        buf = bytearray(FIEMAP.pack(start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0,
                                    EXTENTS_PER_CALL, 0))  # fmt: skip
        buf += bytes(FIEMAP_EXTENT.size * EXTENTS_PER_CALL)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                return None
            raise
        mapped = FIEMAP.unpack_from(buf)[3]
        if mapped == 0:
            return shared
        last = False
        for k in range(mapped):
            logical, _physical, length, flags = FIEMAP_EXTENT.unpack_from(
                buf, FIEMAP.size + k * FIEMAP_EXTENT.size
            )
            if flags & FIEMAP_EXTENT_SHARED:
                shared += length
            start = logical + length
            last = last or bool(flags & FIEMAP_EXTENT_LAST)
        if last:
            return shared
