"""Disk: the one object the FUSE layer, the CLI and device emulation hold for an image.

It owns the driver chain and applies what is the same for every format:

* requests are clamped to the virtual size (reads stop at the end, writes past it fail with
  ENOSPC as on a block device);
* the cache mode's writethrough part: with writethrough/directsync every write is flushed
  before it completes;
* flushes are serialised and deduplicated by write generation: a flush that finds no write
  completed since the last successful flush returns at once;
* zero detection (``detect_zeroes``) and the discard mode (``discard_mode``), see
  :mod:`imgfs.block.holes`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

from imgfs.block import chain
from imgfs.block.driver import BlockDriver, CheckResult, ImageInfo, RepairMode
from imgfs.block.extent import Extent
from imgfs.block.holes import AllocationCache, DetectZeroes, DiscardMode, is_zero
from imgfs.block.hostfile import CacheMode
from imgfs.errors import InvalidRequest, NoSpace, ReadOnly
from imgfs.keys import KeyRing


class Disk:
    def __init__(self, top: BlockDriver, cache: CacheMode, name: str | None = None) -> None:
        self.top = top
        self.cache = cache
        self.name = name or os.path.basename(top.file.path)
        self._gen_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._write_gen = 0
        self._flushed_gen = 0
        self._closed = False
        # How the FUSE layer routes requests; fixed for the life of the open chain.
        # Reads go to a worker thread with O_DIRECT (they always wait for the device) or when a
        # layer's reads are CPU-heavy; otherwise they run inline with RWF_NOWAIT.
        self.reads_may_block = cache.direct or not all(n.cheap_reads for n in chain.layers(top))
        # Writes go to a worker thread with O_DIRECT, or with writethrough (each write syncs).
        self.writes_may_block = cache.direct or cache.writethrough
        # A layer on a network file (NBD) waits for the network on every write; its reads
        # raise WouldBlock on the event loop instead, so they need no flag here.
        if any(getattr(getattr(n, "file", None), "remote", False) for n in chain.layers(top)):
            self.writes_may_block = True
        # QEMU's detect-zeroes and discard options (imgfs.block.holes); set by the opener.
        self.detect_zeroes = DetectZeroes.OFF
        self.discard_mode = DiscardMode.UNMAP
        # SEEK_DATA/SEEK_HOLE runs, valid for one write generation.
        self.allocation_cache = AllocationCache()

    # -- properties the FUSE layer uses to route requests ----------------------------------------

    @property
    def size(self) -> int:
        return self.top.virtual_size

    @property
    def read_only(self) -> bool:
        return self.top.read_only

    # -- I/O ------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Up to ``length`` bytes from ``offset``; short (or empty) at the end of the disk."""
        if offset < 0 or length < 0:
            raise InvalidRequest(f"{self.name}: bad read offset {offset} length {length}")
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        return self.top.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset``; returns the bytes written (short at the end of the
        disk, like a block device). With writethrough, durable when it returns."""
        if self.read_only:
            raise ReadOnly(f"{self.name}: read-only")
        if offset < 0:
            raise InvalidRequest(f"{self.name}: bad write offset {offset}")
        size = self.size
        if offset >= size and len(data):
            raise NoSpace(f"{self.name}: write at {offset} is past the end of the disk ({size})")
        n = min(len(data), size - offset)
        if n == 0:
            return 0
        data = data if n == len(data) else memoryview(data)[:n]
        if self.detect_zeroes is not DetectZeroes.OFF and is_zero(data):
            self.top.write_zeroes(offset, n, self.detect_zeroes is DetectZeroes.UNMAP)
        else:
            self.top.write(offset, data)
        self._written()
        if self.cache.writethrough:
            self.flush()
        return n

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Whole compression units (``compressed_write_unit``), for ``imgfs convert -c``."""
        offset, length = self._clamp_for_update(offset, len(data))
        if length:
            self.top.write_compressed(offset, memoryview(data)[:length])
            self._written()
            if self.cache.writethrough:
                self.flush()

    def compressed_write_unit(self) -> int:
        return self.top.compressed_write_unit()

    def discard(self, offset: int, length: int) -> None:
        offset, length = self._clamp_for_update(offset, length)
        if length and self.discard_mode is DiscardMode.UNMAP:
            self.top.discard(offset, length)
            self._written()

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        offset, length = self._clamp_for_update(offset, length)
        if length:
            may_unmap = may_unmap and self.discard_mode is DiscardMode.UNMAP
            self.top.write_zeroes(offset, length, may_unmap)
            self._written()
            if self.cache.writethrough:
                self.flush()

    def _clamp_for_update(self, offset: int, length: int) -> tuple[int, int]:
        if self.read_only:
            raise ReadOnly(f"{self.name}: read-only")
        if offset < 0 or length < 0 or offset > self.size:
            raise InvalidRequest(f"{self.name}: bad range offset {offset} length {length}")
        return offset, min(length, self.size - offset)

    def _written(self) -> None:
        with self._gen_lock:
            self._write_gen += 1

    @property
    def write_generation(self) -> int:
        """Bumped by every write, discard, write-zeroes and resize."""
        return self._write_gen

    @property
    def flush_pending(self) -> bool:
        """A write completed since the last successful flush (so a flush has work to do)."""
        return self._write_gen != self._flushed_gen

    def flush(self) -> None:
        """Make every write that completed before this call durable (per the cache mode)."""
        with self._flush_lock:
            with self._gen_lock:
                target = self._write_gen
            if target == self._flushed_gen:
                return
            self.top.flush()
            self._flushed_gen = target

    def block_status(self, offset: int, length: int) -> Extent:
        if offset < 0 or offset >= self.size or length <= 0:
            raise InvalidRequest(f"{self.name}: bad block-status range {offset}+{length}")
        return chain.chain_block_status(self.top, offset, min(length, self.size - offset))

    def resize(self, new_size: int) -> None:
        if self.read_only:
            raise ReadOnly(f"{self.name}: read-only")
        self.top.resize(new_size)
        self._written()
        self.flush()

    def info(self) -> list[ImageInfo]:
        """Info for each layer, top first (as ``qemu-img info --backing-chain``)."""
        return [node.info() for node in chain.layers(self.top)]

    def check(self, repair: RepairMode = RepairMode.NONE) -> CheckResult:
        return self.top.check(repair)

    def close(self) -> None:
        """Flush (if writable) and close every layer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only:
                self.flush()
        finally:
            chain.close_chain(self.top)


def open_disk(
    path: str,
    fmt: str | None = None,
    *,
    read_only: bool = False,
    cache: CacheMode = CacheMode.WRITEBACK,
    containment: chain.Containment | None = None,
    driver_options: Mapping[str, str] | None = None,
    snapshot: str | None = None,
    keys: KeyRing | None = None,
    locking: bool = True,
    force_share: bool = False,
) -> Disk:
    """Open an image and its backing chain as a Disk (``snapshot``: an internal snapshot of
    it, by id or name, read-only), with QEMU's image locks on every host file unless
    ``locking`` is off; ``force_share`` is qemu-img's -U (read-only opens)."""
    top = chain.open_chain(
        path,
        fmt,
        read_only=read_only,
        cache=cache,
        containment=containment,
        driver_options=driver_options,
        snapshot=snapshot,
        keys=keys,
        locking=locking,
        force_share=force_share,
    )
    return Disk(top, cache, os.path.basename(path))
