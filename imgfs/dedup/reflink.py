"""Deduplication by shared host extents: FIDEDUPERANGE between image files on file systems
with reflink (XFS with reflink=1, btrfs).

The guest block hashes say which blocks are equal; a block can share host storage when each
copy is one contiguous, file-system-block-aligned range of its image file (raw images, and the
uncompressed, unencrypted data clusters of the formats whose block status gives host offsets).
The kernel compares the two ranges itself under its locks and shares them only if they are
equal, so a stale hash can cost an ioctl but never corrupt anything. Image files are opened
read-only for this (FIDEDUPERANGE does not need write access for the file's owner or root).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from dataclasses import dataclass, field

from imgfs.block import chain
from imgfs.block.disk import open_disk
from imgfs.block.extent import Allocation
from imgfs.dedup.control import Control
from imgfs.dedup.index import DedupIndex, FileKey
from imgfs.dedup.scan import Image

# linux/fs.h: struct file_dedupe_range {u64 src_offset, src_length; u16 dest_count, reserved1;
# u32 reserved2; struct file_dedupe_range_info info[]}, and each info {s64 dest_fd;
# u64 dest_offset, bytes_deduped; s32 status; u32 reserved}.
DEDUPE_RANGE = struct.Struct("=QQHHI")
DEDUPE_INFO = struct.Struct("=qQQiI")
FIDEDUPERANGE = (3 << 30) | (DEDUPE_RANGE.size << 16) | (0x94 << 8) | 54  # _IOWR(0x94, 54, ...)
RANGE_SAME, RANGE_DIFFERS = 0, 1
# One call shares at most this much (btrfs caps a dedupe call at 16 MiB; short calls also let
# a signal stop the run soon).
MAX_RANGE = 16 * 1024 * 1024
FS_BLOCK = 4096


class DedupeUnsupported(Exception):
    """The file system (or the pair of files) cannot share extents."""


def dedupe_range(
    src_fd: int, src_offset: int, length: int, dests: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """One FIDEDUPERANGE call: share ``length`` bytes at ``src_offset`` of ``src_fd`` into each
    (fd, offset) of ``dests``. Returns (status, bytes shared) per destination."""
    buf = bytearray(DEDUPE_RANGE.pack(src_offset, length, len(dests), 0, 0))
    for fd, offset in dests:
        buf += DEDUPE_INFO.pack(fd, offset, 0, 0, 0)
    try:
        fcntl.ioctl(src_fd, FIDEDUPERANGE, buf, True)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV):
            raise DedupeUnsupported(os.strerror(e.errno)) from None
        raise
    out = []
    for k in range(len(dests)):
        _, _, deduped, status, _ = DEDUPE_INFO.unpack_from(
            buf, DEDUPE_RANGE.size + k * DEDUPE_INFO.size
        )
        out.append((status, deduped))
    return out


@dataclass(slots=True)
class ReflinkResult:
    ranges_shared: int = 0
    bytes_shared: int = 0
    ranges_differ: int = 0
    errors: list[str] = field(default_factory=list)
    unsupported: str | None = None
    seconds: float = 0.0  # finding host ranges and sharing them


def host_locations(img: Image, block_size: int, directory: str) -> dict[int, int]:
    """Guest block index -> host offset in the image file, for blocks stored as one aligned
    contiguous range of the image's own file."""
    out: dict[int, int] = {}
    disk = open_disk(img.path, img.format, read_only=True,
                     containment=chain.Containment(directory))  # fmt: skip
    try:
        size = disk.size
        top = disk.top
        for i in img.hashes:
            start = i * block_size
            n = min(block_size, size - start)
            if n != block_size:
                continue  # a short last block: its host range ends mid file-system block
            ext = top.block_status(start, n)
            if (
                ext.allocation is Allocation.DATA
                and ext.length == n
                and ext.host_offset is not None
                and ext.host_offset % FS_BLOCK == 0
            ):
                out[i] = ext.host_offset
    finally:
        disk.close()
    return out


def execute(
    directory: str, images: list[Image], block_size: int, index: DedupIndex, control: Control,
    dry_run: bool,
) -> ReflinkResult:  # fmt: skip
    started = time.monotonic()
    result = _execute(directory, images, block_size, index, control, dry_run)
    result.seconds = time.monotonic() - started
    return result


def _execute(
    directory: str, images: list[Image], block_size: int, index: DedupIndex, control: Control,
    dry_run: bool,
) -> ReflinkResult:  # fmt: skip
    result = ReflinkResult()
    # hash -> [(image, host offset)], images in name order so the first copy is the source
    copies: dict[bytes, list[tuple[Image, int]]] = {}
    dest_images: set[str] = set()
    for img in images:
        if not index.dedupe_done(img.name, img.key):
            dest_images.add(img.name)
        try:
            where = host_locations(img, block_size, directory)
        except Exception as e:  # an image imgfs cannot map is skipped, not fatal
            result.errors.append(f"{img.name}: {e}")
            continue
        for i, host in where.items():
            copies.setdefault(img.hashes[i], []).append((img, host))
    for locs in copies.values():
        # A copy shared by an earlier run is the source, so new copies join it.
        locs.sort(key=lambda loc: loc[0].name in dest_images)
    ranges = _merged_ranges(copies, dest_images, block_size)
    if dry_run:
        result.ranges_shared = len(ranges)
        result.bytes_shared = sum(r[4] for r in ranges)
        return result
    by_name = {img.name: img for img in images}
    fds: dict[str, int] = {}
    bar = control.bar(sum(r[4] for r in ranges), "fideduperange")
    try:
        for src, src_off, dst, dst_off, length in ranges:
            control.check("dedupe-range")
            try:
                ((status, shared),) = dedupe_range(
                    _fd(fds, by_name[src]), src_off, length, [(_fd(fds, by_name[dst]), dst_off)]
                )
            except DedupeUnsupported as e:
                result.unsupported = f"FIDEDUPERANGE is not available here: {e}"
                return result
            except OSError as e:
                result.errors.append(f"{dst}: FIDEDUPERANGE from {src}: {e.strerror}")
                continue
            if status == RANGE_SAME:
                result.ranges_shared += 1
                result.bytes_shared += shared
            elif status == RANGE_DIFFERS:
                result.ranges_differ += 1
            else:
                result.errors.append(f"{dst}: FIDEDUPERANGE from {src}: {os.strerror(-status)}")
            bar.update(length)
        for img in images:
            # FIDEDUPERANGE leaves the content (and here the identity) as it was.
            if img.name in dest_images and FileKey.of(img.path) == img.key:
                index.set_dedupe_done(img.name, img.key)
    finally:
        bar.close()
        for fd in fds.values():
            os.close(fd)
    return result


def _merged_ranges(
    copies: dict[bytes, list[tuple[Image, int]]], dest_images: set[str], block_size: int
) -> list[tuple[str, int, str, int, int]]:
    """(source, offset, destination, offset, length) to share: each destination block joins
    the first copy of its content, and runs that continue in both files become one range (one
    ioctl instead of one per block)."""
    pairs: list[tuple[str, int, str, int]] = []
    for locs in copies.values():
        if len(locs) < 2:
            continue
        src, src_off = locs[0]
        pairs += [(src.name, src_off, img.name, off) for img, off in locs[1:]
                  if img.name in dest_images]  # fmt: skip
    pairs.sort(key=lambda p: (p[0], p[2], p[1], p[3]))
    out: list[tuple[str, int, str, int, int]] = []
    for src, src_off, dst, dst_off in pairs:
        if out:
            ps, pso, pd, pdo, length = out[-1]
            if (ps, pd) == (src, dst) and pso + length == src_off and pdo + length == dst_off \
                    and length < MAX_RANGE:  # fmt: skip
                out[-1] = (ps, pso, pd, pdo, length + block_size)
                continue
        out.append((src, src_off, dst, dst_off, block_size))
    return out


def _fd(fds: dict[str, int], img: Image) -> int:
    fd = fds.get(img.name)
    if fd is None:
        fd = fds[img.name] = os.open(img.path, os.O_RDONLY)
    return fd
