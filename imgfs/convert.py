"""``imgfs convert``: copy a disk from any readable format into a new image of a writable one.

The source's allocation map drives the copy: ranges that read as zeros (zero or unallocated at
the bottom of the chain) are skipped, and data that turns out to be all zeros is skipped too, so
the new image is as thin as the data allows. A new image without a backing file reads as zeros
everywhere, which is what makes skipping safe. A failed conversion removes the half-written
image instead of leaving a corrupt one behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from imgfs.block.chain import Containment
from imgfs.block.disk import Disk, open_disk
from imgfs.block.extent import Allocation
from imgfs.create import create_image
from imgfs.errors import InvalidRequest
from imgfs.keys import KeyRing

# Big enough that per-request overhead vanishes, small enough to stay cache-friendly.
COPY_CHUNK = 2 * 1024 * 1024
# Zero detection granularity for uncompressed copies (qemu-img convert's default -S is 4 KiB).
ZERO_GRANULE = 4096


def convert(
    src: str,
    dst: str,
    *,
    src_fmt: str | None,
    dst_fmt: str,
    options: dict[str, str],
    compress: bool = False,
    progress: Callable[[int, int], None] | None = None,
    keys: KeyRing | None = None,
    containment: Containment | None = None,
    force_share: bool = False,
) -> None:
    """Convert ``src`` into a new image ``dst``. ``progress(n, total)`` is told of every ``n``
    bytes of the ``total``-byte disk done (copied or skipped)."""
    if "backing_file" in options:
        raise InvalidRequest("convert does not take -o backing_file (the copy is complete)")
    # src may be a URL (no local file to compare)
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise InvalidRequest(f"{dst} is the source image itself")
    source = open_disk(
        src,
        src_fmt,
        read_only=True,
        keys=keys,
        containment=containment,
        force_share=force_share,
    )
    try:
        create_image(dst, dst_fmt, source.size, options)
        try:
            target_keys = (
                KeyRing.single(dst, options["key-file"]) if "key-file" in options else None
            )
            target = open_disk(dst, dst_fmt, read_only=False, keys=target_keys)
            try:
                size = source.size
                _copy(source, target, compress, lambda n: progress(n, size) if progress else None)
                target.flush()
            finally:
                target.close()
        except BaseException:
            # Never leave a half-written image that looks like a finished one.
            os.unlink(dst)
            raise
    finally:
        source.close()


def _copy(source: Disk, target: Disk, compress: bool, progress: Callable[[int], None]) -> None:
    unit = target.compressed_write_unit() if compress else ZERO_GRANULE
    chunk = max(unit, COPY_CHUNK - COPY_CHUNK % unit)
    size = source.size
    offset = 0
    # A target whose fresh image does not read as zeros (LUKS) is written everywhere.
    dense = not target.top.zero_init
    while offset < size:
        extent = source.block_status(offset, min(size - offset, 1 << 30))
        end = offset + extent.length
        if extent.allocation is not Allocation.DATA and not dense:
            progress(end - offset)
            offset = end
            continue
        # Whole compression units: widen the run to unit boundaries (re-reading a little is
        # cheaper than writing a partial cluster uncompressed).
        start = offset - offset % unit
        stop = min(size, -(-end // unit) * unit)
        pos = start
        while pos < stop:
            n = min(chunk, stop - pos)
            data = source.read(pos, n)
            if compress:
                _write_compressed(target, pos, data, unit)
            elif dense:
                target.write(pos, data)
            else:
                _write_nonzero(target, pos, data)
            pos += n
        done = max(end, stop)
        progress(done - offset)
        offset = done


def _write_nonzero(target: Disk, offset: int, data: bytes | bytearray | memoryview) -> None:
    """Write the data in runs, leaving out granules that are all zeros."""
    view = memoryview(data)
    zero = bytes(ZERO_GRANULE)
    run_start: int | None = None
    for pos in range(0, len(view), ZERO_GRANULE):
        piece = view[pos : pos + ZERO_GRANULE]
        if piece == zero[: len(piece)]:
            if run_start is not None:
                target.write(offset + run_start, view[run_start:pos])
                run_start = None
        elif run_start is None:
            run_start = pos
    if run_start is not None:
        target.write(offset + run_start, view[run_start:])


def _write_compressed(
    target: Disk, offset: int, data: bytes | bytearray | memoryview, unit: int
) -> None:
    view = memoryview(data)
    zero = bytes(unit)
    for pos in range(0, len(view), unit):
        piece = view[pos : pos + unit]
        if piece != zero[: len(piece)]:
            target.write_compressed(offset + pos, piece)
