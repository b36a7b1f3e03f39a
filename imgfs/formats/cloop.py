"""cloop: the compressed loopback images of Knoppix and friends (``create_compressed_fs``).

Read-only. Version 2 layout, every number big-endian:

* bytes 0..127: a shell-script preamble (``#!/bin/sh`` / ``#V2.0 Format`` / modprobe ...);
* at 128: the block size (u32, a multiple of 512) and the block count (u32);
* at 136: ``count + 1`` u64 file offsets; block ``i`` is the zlib stream at
  ``[offsets[i], offsets[i+1])`` and inflates to exactly one block.

The disk is ``count * block_size`` bytes. Inflated blocks are kept in a small LRU.
"""

from __future__ import annotations

import itertools
import operator
import re
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from typing import Self

from imgfs.block.driver import BlockDriver, OpenOptions, ProbeInput
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, Unsupported

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


class _BlockCache:
    """A bounded LRU of inflated blocks, by block index."""

    def __init__(self, max_entries: int) -> None:
        self._max = max(2, max_entries)
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, index: int) -> bytes | None:
        with self._lock:
            block = self._blocks.get(index)
            if block is not None:
                self._blocks.move_to_end(index)
            return block

    def put(self, index: int, block: bytes) -> None:
        with self._lock:
            self._blocks[index] = block
            self._blocks.move_to_end(index)
            while len(self._blocks) > self._max:
                self._blocks.popitem(last=False)


class CloopDriver(BlockDriver):
    format_name = "cloop"
    supports_write = False
    cheap_reads = False  # every read inflates
    runtime_options = {"block-cache-size": "bytes of inflated blocks kept per image (default 16M)"}

    def __init__(
        self, file: HostFile, options: OpenOptions, block_size: int, offsets: array
    ) -> None:
        super().__init__(file, options)
        self.read_only = True
        self.block_size = block_size
        self.block_count = len(offsets) - 1
        self._offsets = offsets
        cache_bytes = options.size_option("block-cache-size", DEFAULT_CACHE_BYTES)
        self._cache = _BlockCache(cache_bytes // block_size)

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

    def _block(self, index: int) -> bytes:
        cached = self._cache.get(index)
        if cached is not None:
            return cached
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
        self._cache.put(index, block)
        return block

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        if first == last:
            start = offset - first * bs
            return memoryview(self._block(first))[start : start + length]
        out = bytearray(length)
        done = 0
        for index in range(first, last + 1):
            block = self._block(index)
            start = offset + done - index * bs
            n = min(bs - start, length - done)
            out[done : done + n] = memoryview(block)[start : start + n]
            done += n
        return out

    def block_status(self, offset: int, length: int) -> Extent:
        # Every block is stored (compressed): data with no single host offset.
        return Extent(offset, length, Allocation.DATA)


register(CloopDriver)
