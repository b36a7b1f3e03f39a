"""cloop: the compressed loopback images of Knoppix and friends (``create_compressed_fs``).

Read-only. Version 2 layout, every number big-endian:

* bytes 0..127: a shell-script preamble (``#!/bin/sh`` / ``#V2.0 Format`` / modprobe ...);
* at 128: the block size (u32, a multiple of 512) and the block count (u32);
* at 136: ``count + 1`` u64 file offsets; block ``i`` is the zlib stream at
  ``[offsets[i], offsets[i+1])`` and inflates to exactly one block.

The disk is ``count * block_size`` bytes. Inflated blocks are kept in a bounded LRU that
loads each block once however many threads want it. A sequential reader gets the blocks after
its read inflated ahead on a small pool (zlib releases the GIL). On the FUSE thread (non-blocking
mode) a read whose blocks are cached, or that needs one small block inflated, is served there;
anything more raises WouldBlock and hops to a worker thread (bench/RESULTS-formats-cloop.md).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import operator
import os
import re
import struct
import sys
import threading
import zlib
from array import array
from typing import Self

from imgfs.block.driver import BlockDriver, OpenOptions, ProbeInput
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile, WouldBlock, in_nowait_mode
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, ImgfsError, InvalidRequest, Unsupported
from imgfs.formats._chunkcache import ChunkCache

PREAMBLE_SIZE = 128
BLOCK_HEADER = struct.Struct(">II")  # block_size, block count
assert BLOCK_HEADER.size == 8
OFFSETS_START = PREAMBLE_SIZE + BLOCK_HEADER.size
OFFSET = struct.Struct(">Q")

# Limits: qemu takes blocks of up to 64 MiB; create_compressed_fs makes at most 1 MiB.
MAX_BLOCK_SIZE = 64 * 1024 * 1024
# The offsets table is loaded whole: 8 M entries is 64 MiB of table (512 GiB of 64 KiB blocks).
MAX_BLOCKS = 8 * 1024 * 1024
# Memory for inflated blocks (at least two blocks are always kept); run-time option
# ``-o block-cache-size=BYTES``.
DEFAULT_CACHE_BYTES = 16 * 1024 * 1024
# Bytes inflated ahead of a sequential reader on the decode pool (``-o read-ahead=BYTES``).
DEFAULT_READ_AHEAD = 2 * 1024 * 1024
# Read-ahead is queued in tasks of at least this many bytes, so the hop to a pool thread
# (~120 us) stays small beside the inflating (~0.35 ms per 64 KiB) it buys.
READ_AHEAD_TASK_BYTES = 256 * 1024
# On the FUSE thread (non-blocking mode) a read may inflate one block of at most this many
# bytes itself rather than hop to a worker (``-o inline-decode=BYTES``).
DEFAULT_INLINE_DECODE = 64 * 1024

_VERSION_RE = re.compile(rb"#V(\d+\.\d+) Format")


def _max_compressed_size(block_size: int) -> int:
    # zlib's compressBound plus slack for other deflate encoders (7-zip's stored blocks).
    return block_size + (block_size >> 12) + (block_size >> 14) + (block_size >> 25) + 13 + 1024


def _preamble_version(head: bytes) -> bytes | None:
    """The ``#Vx.y Format`` version in a cloop preamble, or None if this is not one."""
    if not head.startswith(b"#!/bin/sh"):
        return None
    preamble = head[:PREAMBLE_SIZE]
    match = _VERSION_RE.search(preamble)
    if match is None or b"cloop" not in preamble:
        return None
    return match.group(1)


_pool_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _decode_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that inflate blocks beside the reader, shared by every cloop image: one per
    core (zlib releases the GIL while it inflates)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="imgfs-cloop-decode"
            )
        return _pool


def _switch_option(options: OpenOptions, key: str, default: bool) -> bool:
    text = options.driver_options.get(key)
    if text is None:
        return default
    if text.lower() in ("on", "yes", "true", "1"):
        return True
    if text.lower() in ("off", "no", "false", "0"):
        return False
    raise InvalidRequest(f"-o {key}: bad value {text!r} (on or off)")


class CloopDriver(BlockDriver):
    format_name = "cloop"
    supports_write = False
    # Reads inflate, but only what is not cached: in non-blocking mode (the FUSE thread) a read
    # serves cached blocks inline and raises WouldBlock when it would inflate much, so only
    # those requests hop to a worker thread. ``-o inline-reads=off`` sends every read there.
    cheap_reads = True
    runtime_options = {
        "block-cache-size": "bytes of inflated blocks kept per image (default 16M)",
        "read-ahead": "bytes inflated ahead of a sequential reader on other threads "
        "(default 2M, 0 = off)",
        "inline-reads": "serve cached blocks on the FUSE thread without a hop (default on)",
        "inline-decode": "largest block a read may inflate on the FUSE thread (default 64K, "
        "0 = none)",
    }

    def __init__(
        self, file: HostFile, options: OpenOptions, block_size: int, offsets: array
    ) -> None:
        super().__init__(file, options)
        self.read_only = True
        self.block_size = block_size
        self.block_count = len(offsets) - 1
        self._offsets = offsets
        cache_bytes = options.size_option("block-cache-size", DEFAULT_CACHE_BYTES)
        cache_bytes = max(cache_bytes, 2 * block_size)
        self._cache: ChunkCache[bytes] = ChunkCache(cache_bytes)
        # Read-ahead never takes more than half the cache, or it would evict what it is for.
        read_ahead = options.size_option("read-ahead", DEFAULT_READ_AHEAD)
        self._read_ahead_blocks = min(-(-read_ahead // block_size), cache_bytes // 2 // block_size)
        self._task_blocks = max(1, READ_AHEAD_TASK_BYTES // block_size)
        # An instance attribute: the Disk reads it from each layer.
        self.cheap_reads = _switch_option(options, "inline-reads", True)
        self._inline_decode = options.size_option("inline-decode", DEFAULT_INLINE_DECODE)
        self._last_block = -2  # the last block of the previous read (sequential detection)
        self._work_lock = threading.Lock()
        self._work: set[concurrent.futures.Future[None]] = set()  # queued or running
        self._queued: set[int] = set()  # blocks queued for read-ahead, not yet started
        self._closed = False

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        return 100 if _preamble_version(probe.head) is not None else 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        path = file.path
        file_size = file.size()
        if file_size < OFFSETS_START:
            raise CorruptImage(f"{path}: cloop header truncated (file is {file_size} bytes)")
        head = bytes(file.pread(0, OFFSETS_START))
        version = _preamble_version(head)
        if version is None:
            raise CorruptImage(f"{path}: no cloop preamble (starts {head[:16]!r})")
        if version != b"2.0":
            raise Unsupported(
                f"{path}: cloop version {version.decode()!r} (only V2.0 images are supported)"
            )
        block_size, count = BLOCK_HEADER.unpack_from(head, PREAMBLE_SIZE)
        if block_size == 0 or block_size % 512 or block_size > MAX_BLOCK_SIZE:
            raise CorruptImage(
                f"{path}: cloop block size {block_size} is not a multiple of 512 "
                f"between 512 and {MAX_BLOCK_SIZE}"
            )
        if count > MAX_BLOCKS:
            raise Unsupported(f"{path}: cloop block count {count} exceeds {MAX_BLOCKS}")
        table_end = OFFSETS_START + (count + 1) * OFFSET.size
        if table_end > file_size:
            raise CorruptImage(
                f"{path}: cloop block count {count} needs an offsets table up to byte "
                f"{table_end}, past the end of the file ({file_size})"
            )
        offsets = array("Q")
        offsets.frombytes(bytes(file.pread(OFFSETS_START, table_end - OFFSETS_START)))
        if sys.byteorder == "little":
            offsets.byteswap()
        cls._validate_offsets(path, offsets, table_end, file_size, block_size)
        return cls(file, options, block_size, offsets)

    @staticmethod
    def _validate_offsets(
        path: str, offsets: array, table_end: int, file_size: int, block_size: int
    ) -> None:
        if offsets[0] < table_end:
            raise CorruptImage(
                f"{path}: cloop block 0 starts at {offsets[0]}, inside the header "
                f"(which ends at {table_end})"
            )
        if offsets[-1] > file_size:
            raise CorruptImage(
                f"{path}: cloop data ends at {offsets[-1]}, past the end of the file ({file_size})"
            )
        limit = _max_compressed_size(block_size)
        # One pass in C over the block sizes; the slow loop only runs to name a bad block.
        sizes = map(operator.sub, itertools.islice(offsets, 1, None), offsets)
        if all(0 < size <= limit for size in sizes):
            return
        for index, (start, end) in enumerate(itertools.pairwise(offsets)):
            if not start < end <= start + limit:
                raise CorruptImage(
                    f"{path}: cloop block {index} spans bytes {start}..{end}: not a compressed "
                    f"block of at most {limit} bytes"
                )

    @property
    def virtual_size(self) -> int:
        return self.block_count * self.block_size

    def _inflate(self, index: int) -> bytes:
        start, end = self._offsets[index], self._offsets[index + 1]
        compressed = self.file.pread(start, end - start)
        inflater = zlib.decompressobj()
        try:
            block = inflater.decompress(compressed, self.block_size)
        except zlib.error as e:
            raise CorruptImage(
                f"{self.file.path}: cloop block {index} does not inflate: {e}"
            ) from None
        if len(block) != self.block_size or not inflater.eof:
            raise CorruptImage(
                f"{self.file.path}: cloop block {index} inflates to "
                f"{'more than ' if not inflater.eof and len(block) == self.block_size else ''}"
                f"{len(block)} bytes, not one block of {self.block_size}"
            )
        return block

    def _block(self, index: int) -> bytes:
        """Block ``index``, from the cache or inflated (once, however many threads want it)."""
        while True:
            try:
                return self._cache.get(index, lambda: self._inflate(index))
            except WouldBlock:
                if in_nowait_mode():
                    raise
                # Another thread's non-blocking inflate gave up (its host read would have
                # waited): this thread may wait, so it loads the block itself.

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        blocks = self._blocks_without_waiting(first, last) if in_nowait_mode() else None
        if self._read_ahead_blocks and self._last_block <= first <= self._last_block + 1:
            self._read_ahead(last + 1)
        self._last_block = last
        if first == last:
            block = blocks[0] if blocks else self._block(first)
            start = offset - first * bs
            return memoryview(block)[start : start + length]
        out = bytearray(length)
        done = 0
        for index in range(first, last + 1):
            block = blocks[index - first] if blocks else self._block(index)
            start = offset + done - index * bs
            n = min(bs - start, length - done)
            out[done : done + n] = memoryview(block)[start : start + n]
            done += n
        return out

    def _blocks_without_waiting(self, first: int, last: int) -> list[bytes]:
        """On the FUSE thread: the blocks if they are cached, with at most one small block
        inflated here; otherwise WouldBlock (the request is retried on a worker thread)."""
        blocks: list[bytes] = []
        missing = -1
        for index in range(first, last + 1):
            block = self._cache.peek(index)
            if block is None:
                # Inflating more than one small block, or waiting for another thread's
                # inflate, would stall every other request on the event loop.
                if missing >= 0 or self.block_size > self._inline_decode or index in self._cache:
                    raise WouldBlock
                missing = index - first
                block = b""
            blocks.append(block)
        if missing >= 0:
            blocks[missing] = self._block(first + missing)  # host reads stay RWF_NOWAIT
        return blocks

    def _read_ahead(self, start: int) -> None:
        """A sequential reader will want the blocks from ``start`` next: inflate the ones not
        yet cached or queued on the pool, in tasks of several blocks (one hop each)."""
        end = min(self.block_count, start + self._read_ahead_blocks)
        with self._work_lock:
            wanted = [
                i for i in range(start, end) if i not in self._queued and i not in self._cache
            ]
        for at in range(0, len(wanted), self._task_blocks):
            task = wanted[at : at + self._task_blocks]
            self._submit(task)

    def _inflate_ahead(self, indexes: list[int]) -> None:
        for index in indexes:
            with self._work_lock:
                self._queued.discard(index)
            if self._closed or index in self._cache:
                continue
            try:
                self._block(index)
            except ImgfsError:
                pass  # the reader that needs the block gets the error itself

    def _submit(self, indexes: list[int]) -> None:
        with self._work_lock:
            if self._closed:
                return
            self._queued.update(indexes)
            future = _decode_pool().submit(self._inflate_ahead, indexes)
            self._work.add(future)
        future.add_done_callback(self._work_done)

    def _work_done(self, future: concurrent.futures.Future[None]) -> None:
        with self._work_lock:
            self._work.discard(future)

    def close(self) -> None:
        # In-flight inflates read the host file: wait for them before it is closed.
        with self._work_lock:
            self._closed = True
            pending = list(self._work)
        for future in pending:
            future.cancel()
        concurrent.futures.wait(pending)
        self._cache.clear()
        super().close()

    def block_status(self, offset: int, length: int) -> Extent:
        # Every block is stored (compressed): data with no single host offset.
        return Extent(offset, length, Allocation.DATA)


register(CloopDriver)
