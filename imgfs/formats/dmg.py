"""dmg: Apple's Universal Disk Image Format (UDIF), read-only.

Layout (big-endian throughout):

* the 512-byte ``koly`` trailer at the end of the file: where the data fork, the XML property
  list and the resource fork are, and the disk's size in sectors;
* the block tables (``blkx``): one ``mish`` table per partition-map entry, stored as base64
  ``Data`` in the XML plist's ``resource-fork``/``blkx`` array or, in old images without a plist,
  as ``blkx`` resources of a classic Mac resource fork;
* each ``mish`` table lists chunks: a run of sectors (relative to the table's first sector) and
  where its bytes are in the data fork (relative to the table's data offset), with a type:
  zero-fill, raw, ignore, ADC, zlib, bzip2, lzfse or lzma, plus comments and a terminator.

The export is the whole disk: the partition map and every partition are passed through as
stored, and sectors that no table covers read as zeros. Compressed chunks are decoded whole,
once, into a bounded LRU cache (``chunk-cache-size`` run-time option, bytes).
"""

from __future__ import annotations

import bisect
import bz2
import concurrent.futures
import ctypes
import lzma
import os
import plistlib
import struct
import threading
import xml.parsers.expat
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Self

import lzfse

from imgfs.block.driver import (
    BlockDriver,
    CheckResult,
    ImageInfo,
    OpenOptions,
    ProbeInput,
    RepairMode,
)
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, ImgfsError, InvalidRequest, ReadOnly, Unsupported
from imgfs.formats._chunkcache import DEFAULT_CACHE_BYTES, ChunkCache

SECTOR = 512

# The koly trailer (UDIFResourceFile).
KOLY = struct.Struct(
    ">4s I I I"  # signature, version, header size, flags
    " Q Q Q"  # running data fork offset, data fork offset, data fork length
    " Q Q"  # resource fork offset, resource fork length
    " I I 16s"  # segment number, segment count, segment id
    " I I 128s"  # data fork checksum: type, size in bits, value
    " Q Q 120s"  # XML plist offset, length, reserved
    " I I 128s"  # master checksum: type, size in bits, value
    " I Q 12s"  # image variant, sector count, reserved
)
assert KOLY.size == 512
KOLY_MAGIC = b"koly"
# Encrypted images wrap the whole UDIF file: v2 has a header, v1 a trailer.
ENCRYPTED_V2_MAGIC = b"encrcdsa"
ENCRYPTED_V1_MAGIC = b"cdsaencr"
KOLY_VERSION = 4

# A mish block table header (BLKXTable) and its chunk entries (BLKXChunkEntry).
MISH = struct.Struct(
    ">4s I"  # signature, version
    " Q Q Q"  # first sector, sector count, data offset
    " I I 24s"  # buffers needed, block descriptors, reserved
    " I I 128s"  # checksum: type, size in bits, value
    " I"  # number of chunk entries
)
assert MISH.size == 204
MISH_MAGIC = b"mish"
CHUNK = struct.Struct(">I I Q Q Q Q")  # type, comment, sector, sector count, offset, length
assert CHUNK.size == 40

# Classic Mac resource fork: header, map header, type list entry, reference list entry.
RSRC_HEADER = struct.Struct(">I I I I")  # data offset, map offset, data length, map length
RSRC_MAP = struct.Struct(">16x I H H H H")  # next map, file ref, attributes, types, names
RSRC_TYPE = struct.Struct(">4s H H")  # type, count - 1, reference list offset
RSRC_REF = struct.Struct(">h h B 3s I")  # id, name offset, attributes, data offset, handle
assert (RSRC_MAP.size, RSRC_TYPE.size, RSRC_REF.size) == (28, 8, 12)

# Chunk types.
CT_ZERO = 0x00000000
CT_RAW = 0x00000001
CT_IGNORE = 0x00000002
CT_ADC = 0x80000004
CT_ZLIB = 0x80000005
CT_BZIP2 = 0x80000006
CT_LZFSE = 0x80000007
CT_LZMA = 0x80000008
CT_COMMENT = 0x7FFFFFFE
CT_TERMINATOR = 0xFFFFFFFF

CHUNK_TYPE_NAMES = {
    CT_ZERO: "zero",
    CT_RAW: "raw",
    CT_IGNORE: "ignore",
    CT_ADC: "adc",
    CT_ZLIB: "zlib",
    CT_BZIP2: "bzip2",
    CT_LZFSE: "lzfse",
    CT_LZMA: "lzma",
}
COMPRESSED_TYPES = frozenset({CT_ADC, CT_ZLIB, CT_BZIP2, CT_LZFSE, CT_LZMA})

# Limits. hdiutil writes chunks of 2048 sectors (1 MiB) at most; 64 MiB leaves room for other
# producers while keeping one decoded chunk a bounded allocation.
MAX_CHUNK_BYTES = 64 * 1024 * 1024
# A compressed chunk may be a little larger than its data (incompressible input).
MAX_COMPRESSED_BYTES = MAX_CHUNK_BYTES + MAX_CHUNK_BYTES // 8 + 65536
MAX_PLIST_BYTES = 64 * 1024 * 1024
MAX_RSRC_BYTES = 64 * 1024 * 1024
MAX_CHUNKS = 16 * 1024 * 1024
# 2**63 bytes is beyond any real disk; the limit keeps every offset a sane Python int.
MAX_SECTORS = (1 << 63) // SECTOR
LZMA_MEMLIMIT = 256 * 1024 * 1024
# Streaming decode step: a small read decodes up to the next multiple of this, not the chunk.
STREAM_STEP = 64 * 1024
# ... reading the compressed bytes in pieces of this size.
STREAM_INPUT = 128 * 1024
# Sequential reads: chunks decoded ahead on other threads, and the smallest chunk worth the hop.
# Bytes of chunks decoded ahead of a sequential reader (about two of hdiutil's 1 MiB chunks).
# The same -o read-ahead=BYTES means the same to cloop, since one mount option reaches every
# driver.
READ_AHEAD_BYTES = 2 * 1024 * 1024
MAX_READ_AHEAD_BYTES = 64 * 1024 * 1024
MAX_READ_AHEAD_RUNS = 64
READ_AHEAD_MIN_BYTES = 128 * 1024

CHECKSUM_CRC32 = 2
CHECK_READ = 4 * 1024 * 1024
CRC32_POLY = 0xEDB88320  # reflected


def _gf2_apply(matrix: list[int], vector: int) -> int:
    out = 0
    i = 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _zero_byte_operator() -> list[int]:
    """Column i: the CRC register after one zero byte, starting from bit i alone."""
    columns = []
    for i in range(32):
        reg = 1 << i
        for _ in range(8):
            reg = (reg >> 1) ^ (CRC32_POLY if reg & 1 else 0)
        columns.append(reg)
    return columns


_ZERO_BYTE_OP = _zero_byte_operator()


def crc32_zeros(crc: int, count: int) -> int:
    """``zlib.crc32(bytes(count), crc)`` in O(log count): zero bytes act linearly on the CRC
    register, so the operator for ``count`` of them is a power found by squaring. A terabyte
    of zero-fill chunks is checked at once."""
    reg = crc ^ 0xFFFFFFFF
    op = _ZERO_BYTE_OP
    while count:
        if count & 1:
            reg = _gf2_apply(op, reg)
        count >>= 1
        if count:
            op = [_gf2_apply(op, column) for column in op]
    return reg ^ 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Run:
    """One chunk of the disk: ``sectors`` sectors from ``start`` (absolute), stored as ``kind``
    at ``file_offset`` (``file_length`` bytes) in the image file."""

    start: int
    sectors: int
    kind: int
    file_offset: int
    file_length: int

    @property
    def end(self) -> int:
        return self.start + self.sectors


@dataclass(frozen=True, slots=True)
class Partition:
    """One blkx table as the plist names it (a partition-map entry)."""

    name: str
    id: int | None
    first_sector: int
    sectors: int
    runs: tuple[Run, ...]  # in table order
    checksum_type: int
    checksum_bits: int
    checksum: bytes


def adc_decompress(src: bytes | memoryview, expected: int) -> bytes:
    """Decode Apple Data Compression (ADC) into exactly ``expected`` bytes.

    ADC is a byte-oriented LZ77. Each code starts with one byte ``b``:
    * ``b & 0x80``: a literal run of ``(b & 0x7f) + 1`` bytes follows;
    * ``b & 0x40``: a 3-byte match, length ``(b & 0x3f) + 4``, distance 1 + the next two bytes
      (big-endian);
    * otherwise a 2-byte match, length ``((b >> 2) & 0x0f) + 3``, distance 1 + ``(b & 3) << 8 |``
      the next byte.
    A match copies from ``distance`` bytes back in the output and may overlap itself.
    """
    out = bytearray()
    pos = 0
    n = len(src)
    while pos < n and len(out) < expected:
        b = src[pos]
        if b & 0x80:
            count = (b & 0x7F) + 1
            if pos + 1 + count > n:
                raise CorruptImage(f"ADC literal run of {count} bytes at {pos} passes the end")
            out += src[pos + 1 : pos + 1 + count]
            pos += 1 + count
            continue
        if b & 0x40:
            if pos + 3 > n:
                raise CorruptImage(f"ADC code at {pos} is cut short")
            length = (b & 0x3F) + 4
            distance = ((src[pos + 1] << 8) | src[pos + 2]) + 1
            pos += 3
        else:
            if pos + 2 > n:
                raise CorruptImage(f"ADC code at {pos} is cut short")
            length = ((b >> 2) & 0x0F) + 3
            distance = (((b & 0x03) << 8) | src[pos + 1]) + 1
            pos += 2
        start = len(out) - distance
        if start < 0:
            raise CorruptImage(f"ADC match reaches {-start} bytes before the start of the chunk")
        if distance >= length:
            out += out[start : start + length]
        else:
            # An overlapping match repeats the last ``distance`` bytes.
            pattern = bytes(out[start:])
            reps, rest = divmod(length, distance)
            out += pattern * reps + pattern[:rest]
    if len(out) < expected:
        raise CorruptImage(f"ADC chunk decoded to {len(out)} bytes, expected {expected}")
    del out[expected:]
    return bytes(out)


# The lzfse module's decompress() grows its output buffer until the decoder stops filling it,
# and a corrupt stream (the decoder returns 0) makes it grow without bound. Its library's own
# entry point takes a fixed output buffer, so decoding is capped at the declared size.
_lzfse_lib = ctypes.CDLL(lzfse.__file__)
_lzfse_lib.lzfse_decode_buffer.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p
]  # fmt: skip
_lzfse_lib.lzfse_decode_buffer.restype = ctypes.c_size_t


def lzfse_decode(src: bytes, declared: int) -> bytes:
    """Decode an LZFSE stream whose blocks declare ``declared`` bytes in all (checked by
    :func:`lzfse_raw_size` against the chunk first); a stream that decodes to anything else is
    corrupt. One spare byte tells a stream that would run past its declared size."""
    out = ctypes.create_string_buffer(declared + 1)
    got = _lzfse_lib.lzfse_decode_buffer(out, declared + 1, src, len(src), None)
    if got != declared:
        raise CorruptImage(f"LZFSE stream decoded to {got} bytes, its blocks declare {declared}")
    return out.raw[:declared]


def lzfse_raw_size(src: bytes) -> int:
    """The decoded size an LZFSE stream declares, summed over its block headers, so a stream
    that would expand past the chunk's size is refused before it is decoded (the decoder
    itself takes no output limit)."""
    pos = 0
    total = 0
    n = len(src)
    while True:
        if pos + 4 > n:
            raise CorruptImage(f"LZFSE stream ends at {pos} without an end-of-stream block")
        magic = src[pos : pos + 4]
        if magic == b"bvx$":
            return total
        if pos + 8 > n:
            raise CorruptImage(f"LZFSE block header at {pos} is cut short")
        (raw,) = struct.unpack_from("<I", src, pos + 4)
        total += raw
        if magic == b"bvx-":  # stored
            size = 8 + raw
        elif magic == b"bvxn":  # LZVN
            if pos + 12 > n:
                raise CorruptImage(f"LZVN block header at {pos} is cut short")
            size = 12 + struct.unpack_from("<I", src, pos + 8)[0]
        elif magic == b"bvx2":  # LZFSE v2: sizes packed in three 64-bit fields
            if pos + 32 > n:
                raise CorruptImage(f"LZFSE block header at {pos} is cut short")
            f0, f1, f2 = struct.unpack_from("<3Q", src, pos + 8)
            header_size = f2 & 0xFFFFFFFF
            literal_bytes = (f0 >> 20) & 0xFFFFF
            lmd_bytes = (f1 >> 40) & 0xFFFFF
            size = header_size + literal_bytes + lmd_bytes
            if header_size < 32:
                raise CorruptImage(f"LZFSE block at {pos} has header size {header_size}")
        else:
            raise Unsupported(f"LZFSE block type {bytes(magic)!r} at {pos}")
        pos += size


class DecodedChunk:
    """One compressed chunk, decoded front to back only as far as reads have needed.

    A random read decodes on average half a chunk (QEMU decodes all of it) and reads only the
    compressed bytes that takes, in pieces of STREAM_INPUT; the next read further into the
    chunk carries on from where the decoder stopped. zlib, bzip2 and lzma stream; ADC and LZFSE
    decode whole at the first read. The length is the decoded size, so a cache can budget the
    chunk before it is filled (a partly decoded chunk also holds up to one input piece and the
    decoder's state).
    """

    __slots__ = (
        "_lock", "_buf", "_filled", "_size", "_kind", "_decoder", "_tail", "_file", "_offset",
        "_length", "_fed", "_where",
    )  # fmt: skip

    def __init__(self, kind: int, file: HostFile, offset: int, length: int, size: int, where: str):
        self._lock = threading.Lock()
        self._buf: bytes | bytearray = b""
        self._filled = 0
        self._size = size
        self._kind = kind
        self._file = file
        self._offset = offset  # compressed bytes in the image file
        self._length = length
        self._fed = 0  # compressed bytes read so far
        self._tail: bytes | memoryview = b""  # read but not yet consumed (zlib)
        self._where = where
        self._decoder: Any = None
        if kind == CT_ZLIB:
            self._decoder = zlib.decompressobj()
        elif kind == CT_BZIP2:
            self._decoder = bz2.BZ2Decompressor()
        elif kind == CT_LZMA:
            self._decoder = lzma.LZMADecompressor(lzma.FORMAT_AUTO, memlimit=LZMA_MEMLIMIT)

    def __len__(self) -> int:
        return self._size

    def upto(self, end: int) -> bytes | bytearray:
        """The decoded bytes, valid at least up to ``end`` (the buffer may be longer).
        Host read errors pass through; bad compressed data raises CorruptImage."""
        if self._filled >= end:
            return self._buf
        with self._lock:
            if self._filled < end:
                try:
                    self._fill(end)
                except (zlib.error, OSError, EOFError, lzma.LZMAError, lzfse.error) as e:
                    raise CorruptImage(f"{self._where}: cannot decompress: {e}") from None
                except CorruptImage as e:
                    raise CorruptImage(f"{self._where}: {e}") from None
                except Unsupported as e:
                    raise Unsupported(f"{self._where}: {e}") from None
            return self._buf

    def _read_input(self, limit: int) -> bytes | memoryview:
        n = min(limit, self._length - self._fed)
        data = self._file.pread(self._offset + self._fed, n) if n else b""
        self._fed += n
        return data

    def _fill(self, end: int) -> None:
        size = self._size
        if self._decoder is None:  # ADC, LZFSE: all at once
            src = bytes(self._read_input(self._length))
            if self._kind == CT_LZFSE:
                declared = lzfse_raw_size(src)
                if declared > size:
                    raise CorruptImage(f"declares {declared} bytes, more than {size}")
                data: bytes = lzfse_decode(src, declared)
            else:
                data = adc_decompress(src, size)
            self._finish(data)
            return
        # Decode in steps of at least STREAM_STEP so that small reads do not each pay a call.
        target = min(size, -(-end // STREAM_STEP) * STREAM_STEP)
        decoder = self._decoder
        if self._filled == 0 and target == size:  # the whole chunk: one read, one call
            self._finish(decoder.decompress(self._read_input(self._length), size))
            return
        if not self._filled:
            self._buf = bytearray(size)
        buf = self._buf
        assert isinstance(buf, bytearray)
        zlib_stream = self._kind == CT_ZLIB
        stalls = 0
        while self._filled < target:
            if decoder.eof:
                raise CorruptImage(f"decompressed to {self._filled} bytes, expected {size}")
            if zlib_stream:
                if not self._tail:
                    self._tail = self._read_input(STREAM_INPUT)
                fed = bool(self._tail)
                piece = decoder.decompress(self._tail, target - self._filled)
                self._tail = decoder.unconsumed_tail
            else:  # bz2, lzma keep unconsumed input inside the decoder
                data_in = self._read_input(STREAM_INPUT) if decoder.needs_input else b""
                fed = bool(data_in) or not decoder.needs_input
                piece = decoder.decompress(data_in, target - self._filled)
            if not piece:
                stalls += 1
                # No input left and the stream wants more (or a decoder that neither consumes
                # nor produces: never loop on it).
                if not fed or stalls > 2:
                    raise CorruptImage(f"decompressed to {self._filled} bytes, expected {size}")
                continue
            stalls = 0
            buf[self._filled : self._filled + len(piece)] = piece
            self._filled += len(piece)
        if self._filled == size:
            self._release()

    def _finish(self, data: bytes) -> None:
        if len(data) != self._size:
            raise CorruptImage(f"decompressed to {len(data)} bytes, expected {self._size}")
        self._buf = data
        self._filled = self._size
        self._release()

    def _release(self) -> None:
        self._decoder = None
        self._tail = b""


_pool_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _decode_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for read-ahead decoding, shared by every dmg image: one per core."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="imgfs-dmg-decode"
            )
        return _pool


class DmgDriver(BlockDriver):
    format_name = "dmg"
    supports_write = False
    cheap_reads = False  # reads decompress
    runtime_options = {
        "chunk-cache-size": "bytes of decompressed chunks kept per image (default 64M)",
        "read-ahead": "bytes decoded ahead of a sequential reader on other threads "
        "(default 2M, 0 = off)",
    }

    def __init__(
        self,
        file: HostFile,
        options: OpenOptions,
        koly: tuple[Any, ...],
        runs: list[Run],
        partitions: list[Partition],
        source: str,
    ) -> None:
        super().__init__(file, options)
        self.read_only = True
        self._koly = koly
        self._sectors: int = koly[22]
        self._runs = runs
        self._starts = [r.start for r in runs]
        self._partitions = partitions
        self._source = source
        cache_bytes = options.size_option("chunk-cache-size", DEFAULT_CACHE_BYTES)
        self._cache: ChunkCache[DecodedChunk] = ChunkCache(cache_bytes)
        # Read-ahead of sequential reads (see _read_ahead); 0 turns it off.
        self._read_ahead_bytes = options.size_option("read-ahead", READ_AHEAD_BYTES)
        if self._read_ahead_bytes > MAX_READ_AHEAD_BYTES:
            raise InvalidRequest(
                f"option read-ahead: {self._read_ahead_bytes} is more than {MAX_READ_AHEAD_BYTES}"
            )
        self._last_index = -2
        self._ahead_lock = threading.Lock()
        self._ahead: dict[concurrent.futures.Future[None], int] = {}  # queued -> chunk key
        self._closed = False

    # -- discovery ------------------------------------------------------------------------------

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        tail = probe.tail
        if probe.head[:8] == ENCRYPTED_V2_MAGIC or tail[-8:] == ENCRYPTED_V1_MAGIC:
            return 100  # claimed so that open() says why it is not exported
        if len(tail) < KOLY.size or probe.size < KOLY.size:
            return 0
        koly = tail[-KOLY.size :]
        if koly[:4] != KOLY_MAGIC:
            return 0
        version, header_size = struct.unpack_from(">II", koly, 4)
        return 100 if header_size == KOLY.size else 50 if version == KOLY_VERSION else 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        path = file.path
        size = file.size()
        if size < KOLY.size:
            raise CorruptImage(f"{path}: {size} bytes is too small for a dmg trailer")
        if file.pread(0, 8) == ENCRYPTED_V2_MAGIC or file.pread(size - 8, 8) == ENCRYPTED_V1_MAGIC:
            raise Unsupported(f"{path}: encrypted dmg images are not supported")
        koly = KOLY.unpack(file.pread(size - KOLY.size, KOLY.size))
        (magic, version, header_size, _flags, _running, df_off, df_len, rs_off, rs_len) = koly[:9]
        seg_number, seg_count = koly[9], koly[10]
        xml_off, xml_len = koly[15], koly[16]
        sectors = koly[22]
        if magic != KOLY_MAGIC:
            raise CorruptImage(f"{path}: no 'koly' trailer (found {bytes(magic)!r})")
        if version != KOLY_VERSION or header_size != KOLY.size:
            raise Unsupported(f"{path}: dmg trailer version {version} size {header_size}")
        if seg_count > 1 or seg_number > 1:
            raise Unsupported(
                f"{path}: segmented dmg (segment {seg_number} of {seg_count}) is not supported"
            )
        if sectors > MAX_SECTORS:
            raise CorruptImage(f"{path}: sector count {sectors} is out of range")
        body = size - KOLY.size
        for what, off, length in (
            ("data fork", df_off, df_len),
            ("XML plist", xml_off, xml_len),
            ("resource fork", rs_off, rs_len),
        ):
            if off + length > body:
                raise CorruptImage(
                    f"{path}: {what} at {off} length {length} passes the end of the file ({size})"
                )
        if xml_len:
            if xml_len > MAX_PLIST_BYTES:
                raise CorruptImage(f"{path}: XML plist of {xml_len} bytes is too large")
            tables = _blkx_from_plist(path, bytes(file.pread(xml_off, xml_len)))
            source = "xml"
        elif rs_len:
            if rs_len > MAX_RSRC_BYTES:
                raise CorruptImage(f"{path}: resource fork of {rs_len} bytes is too large")
            tables = _blkx_from_rsrc(path, bytes(file.pread(rs_off, rs_len)))
            source = "resource-fork"
        else:
            raise CorruptImage(f"{path}: the dmg has neither an XML plist nor a resource fork")
        runs, partitions = _parse_tables(path, tables, sectors, df_off, df_off + df_len)
        return cls(file, options, koly, runs, partitions, source)

    # -- geometry -------------------------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self._sectors * SECTOR

    # -- data -----------------------------------------------------------------------------------

    def _find(self, offset: int) -> tuple[Run | None, int]:
        """The run holding byte ``offset`` (None in a gap) and where that run or gap ends."""
        run, end, _ = self._locate(offset)
        return run, end

    def _locate(self, offset: int) -> tuple[Run | None, int, int]:
        """As ``_find``, plus the index of the run (or of the run before the gap)."""
        sector = offset // SECTOR
        i = bisect.bisect_right(self._starts, sector) - 1
        if i >= 0 and self._runs[i].end > sector:
            run = self._runs[i]
            return run, run.end * SECTOR, i
        following = i + 1
        end = self._runs[following].start if following < len(self._runs) else self._sectors
        return None, end * SECTOR, i

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        first, end, index = self._locate(offset)
        if offset + length <= end:
            return self._read_in(first, index, offset, length)
        out = bytearray(length)
        done = 0
        while done < length:
            pos = offset + done
            run, end, index = self._locate(pos)
            n = min(length - done, end - pos)
            if run is not None and run.kind not in (CT_ZERO, CT_IGNORE):
                out[done : done + n] = self._read_in(run, index, pos, n)
            done += n
        return out

    def _read_in(
        self, run: Run | None, index: int, offset: int, length: int
    ) -> bytes | bytearray | memoryview:
        """``length`` bytes from ``offset``, all inside ``run`` (or a gap when None)."""
        if run is None or run.kind in (CT_ZERO, CT_IGNORE):
            return bytes(length)
        inner = offset - run.start * SECTOR
        if run.kind == CT_RAW:
            return self.file.pread(run.file_offset + inner, length)
        if index != self._last_index:
            if index == self._last_index + 1 and self._read_ahead_bytes:
                self._read_ahead(index)
            self._last_index = index
        chunk = self._cache.get(run.start, lambda: self._open_chunk(run))
        data = chunk.upto(inner + length)
        if inner == 0 and length == len(data):
            return data
        return memoryview(data)[inner : inner + length]

    def _read_ahead(self, index: int) -> None:
        """A sequential reader moved on to chunk ``index``: decode the chunks after it on the
        decode pool (zlib, bz2 and lzma release the GIL), so both cores work while the reader
        waits for one chunk at a time. Small chunks are left alone: a thread hop (~120 us
        here) would cost more than their decoding."""
        budget = self._read_ahead_bytes
        # Bounded by the budget and by a run count, so tables of tiny runs cost little.
        for ahead in self._runs[index + 1 : index + 1 + MAX_READ_AHEAD_RUNS]:
            if budget <= 0:
                break
            budget -= ahead.sectors * SECTOR
            if ahead.kind not in COMPRESSED_TYPES or ahead.sectors * SECTOR < READ_AHEAD_MIN_BYTES:
                continue
            with self._ahead_lock:
                if self._closed:
                    return
                # Queued, being decoded or decoded: nothing to do. (The queued set keeps a slow
                # pool from collecting the same chunk many times over.)
                if ahead.start in self._ahead.values() or ahead.start in self._cache:
                    continue
                future = _decode_pool().submit(self._decode_ahead, ahead)
                self._ahead[future] = ahead.start
            future.add_done_callback(self._ahead_done)

    def _decode_ahead(self, run: Run) -> None:
        chunk = self._cache.get(run.start, lambda: self._open_chunk(run))
        try:
            chunk.upto(run.sectors * SECTOR)
        except ImgfsError:
            pass  # the reader that needs this chunk gets the error itself

    def _ahead_done(self, future: concurrent.futures.Future[None]) -> None:
        with self._ahead_lock:
            self._ahead.pop(future, None)

    def _open_chunk(self, run: Run) -> DecodedChunk:
        """A chunk, ready to decode as far as reads need."""
        where = f"{self.file.path}: {CHUNK_TYPE_NAMES[run.kind]} chunk at sector {run.start}"
        return DecodedChunk(
            run.kind, self.file, run.file_offset, run.file_length, run.sectors * SECTOR, where
        )

    def _decode(self, run: Run) -> bytes | bytearray:
        """The whole decoded chunk (for check: not cached)."""
        chunk = self._open_chunk(run)
        return chunk.upto(len(chunk))

    def block_status(self, offset: int, length: int) -> Extent:
        run, end = self._find(offset)
        zero = _reads_zero(run)
        limit = offset + length
        # Merge the following runs of the same allocation so a big zero area is one extent;
        # raw runs stay apart (each has its own host offset).
        while end < limit:
            nxt, nxt_end = self._find(end)
            if _reads_zero(nxt) != zero:
                break
            if not zero and CT_RAW in (run.kind, nxt.kind):  # type: ignore[union-attr]
                break
            end = nxt_end
        n = min(end, limit) - offset
        if zero:
            return Extent(offset, n, Allocation.ZERO)
        assert run is not None
        host = None
        if run.kind == CT_RAW:
            host = run.file_offset + offset - run.start * SECTOR
        return Extent(offset, n, Allocation.DATA, host_offset=host)

    # -- management -----------------------------------------------------------------------------

    def info(self) -> ImageInfo:
        info = super().info()
        counts = Counter(CHUNK_TYPE_NAMES[r.kind] for r in self._runs)
        info.format_specific = {
            "blkx-source": self._source,
            "image-variant": self._koly[21],
            "data-fork-length": self._koly[6],
            "chunks": dict(sorted(counts.items())),
            "partitions": [
                {
                    "name": p.name,
                    "id": p.id,
                    "first-sector": p.first_sector,
                    "sectors": p.sectors,
                    "chunks": len(p.runs),
                }
                for p in self._partitions
            ],
        }
        info.notes.append("read-only: imgfs does not write dmg images")
        info.notes.append(
            "the export is the whole disk (partition map included); sectors no blkx table "
            "covers read as zeros; reads do not verify checksums (check does)"
        )
        return info

    def check(self, repair: RepairMode) -> CheckResult:
        """Verify the CRC32 checksums: the data fork's, each blkx table's (over its chunks'
        decoded data, ignore chunks left out) and the master checksum (over the tables')."""
        if repair is not RepairMode.NONE:
            raise ReadOnly(f"{self.file.path}: imgfs cannot repair dmg images")
        result = CheckResult()
        path = self.file.path
        koly = self._koly
        if _is_crc32(koly[12], koly[13]):
            crc = 0
            offset, end = koly[5], koly[5] + koly[6]
            while offset < end:
                n = min(CHECK_READ, end - offset)
                crc = zlib.crc32(self.file.pread(offset, n), crc)
                offset += n
            if crc != _stored_crc(koly[14]):
                result.corruptions += 1
                result.messages.append(
                    f"{path}: data fork CRC32 is {crc:#010x}, the trailer says "
                    f"{_stored_crc(koly[14]):#010x}"
                )
        elif koly[12]:
            result.messages.append(f"data fork checksum type {koly[12]} not verified")
        table_crcs = b""
        for p in self._partitions:
            table_crcs += bytes(p.checksum[:4])
            if not _is_crc32(p.checksum_type, p.checksum_bits):
                if p.checksum_type:
                    result.messages.append(
                        f"blkx table {p.name!r}: checksum type {p.checksum_type} not verified"
                    )
                continue
            crc = 0
            try:
                for run in p.runs:
                    if run.kind == CT_IGNORE:
                        continue
                    crc = self._crc_run(run, crc)
            except (CorruptImage, Unsupported) as e:
                result.corruptions += 1
                result.messages.append(str(e))
                continue
            if crc != _stored_crc(p.checksum):
                result.corruptions += 1
                result.messages.append(
                    f"{path}: blkx table {p.name!r} (sectors {p.first_sector}+{p.sectors}) CRC32 "
                    f"is {crc:#010x}, the table says {_stored_crc(p.checksum):#010x}"
                )
        if _is_crc32(koly[18], koly[19]) and zlib.crc32(table_crcs) != _stored_crc(koly[20]):
            result.corruptions += 1
            result.messages.append(
                f"{path}: master CRC32 is {zlib.crc32(table_crcs):#010x}, the trailer says "
                f"{_stored_crc(koly[20]):#010x}"
            )
        result.total_clusters = len(self._runs)
        result.compressed_clusters = sum(r.kind in COMPRESSED_TYPES for r in self._runs)
        result.image_end_offset = self.file.size()
        return result

    def _crc_run(self, run: Run, crc: int) -> int:
        size = run.sectors * SECTOR
        if run.kind == CT_ZERO:
            return crc32_zeros(crc, size)
        if run.kind == CT_RAW:
            done = 0
            while done < size:
                n = min(CHECK_READ, size - done)
                crc = zlib.crc32(self.file.pread(run.file_offset + done, n), crc)
                done += n
            return crc
        return zlib.crc32(self._decode(run), crc)

    def close(self) -> None:
        with self._ahead_lock:
            self._closed = True
            pending = list(self._ahead)
        for future in pending:
            future.cancel()
        concurrent.futures.wait(pending)
        self._cache.clear()
        super().close()


def _is_crc32(kind: int, bits: int) -> bool:
    return kind == CHECKSUM_CRC32 and bits == 32


def _stored_crc(field: bytes) -> int:
    return int.from_bytes(field[:4], "big")


def _reads_zero(run: Run | None) -> bool:
    return run is None or run.kind in (CT_ZERO, CT_IGNORE)


def _blkx_from_plist(path: str, text: bytes) -> list[tuple[bytes, str, int | None]]:
    """The blkx tables (mish bytes, name, id) of the XML plist."""
    try:
        plist = plistlib.loads(text, fmt=plistlib.FMT_XML)
    except (
        plistlib.InvalidFileException,
        xml.parsers.expat.ExpatError,
        ValueError,
        LookupError,  # an XML declaration naming an unknown encoding
    ) as e:
        raise CorruptImage(f"{path}: bad XML plist: {e}") from None
    fork = plist.get("resource-fork") if isinstance(plist, dict) else None
    blkx = fork.get("blkx") if isinstance(fork, dict) else None
    if not isinstance(blkx, list):
        raise CorruptImage(f"{path}: the XML plist has no resource-fork/blkx array")
    tables = []
    for i, entry in enumerate(blkx):
        data = entry.get("Data") if isinstance(entry, dict) else None
        if not isinstance(data, bytes):
            raise CorruptImage(f"{path}: blkx entry {i} has no Data")
        name = entry.get("CFName") or entry.get("Name") or ""
        ident = entry.get("ID")
        if isinstance(ident, str):
            try:
                ident = int(ident)
            except ValueError:
                ident = None
        tables.append((data, str(name), ident if isinstance(ident, int) else None))
    return tables


def _blkx_from_rsrc(path: str, fork: bytes) -> list[tuple[bytes, str, int | None]]:
    """The 'blkx' resources of a classic resource fork (mish bytes, name, id)."""
    if len(fork) < RSRC_HEADER.size:
        raise CorruptImage(f"{path}: resource fork of {len(fork)} bytes is too small")
    data_off, map_off, data_len, map_len = RSRC_HEADER.unpack_from(fork, 0)
    if data_off + data_len > len(fork) or map_off + map_len > len(fork) or map_len < RSRC_MAP.size:
        raise CorruptImage(
            f"{path}: resource fork data {data_off}+{data_len} or map {map_off}+{map_len} "
            f"passes its end ({len(fork)})"
        )
    rmap = fork[map_off : map_off + map_len]
    _next, _ref, _attrs, types_off, names_off = RSRC_MAP.unpack_from(rmap, 0)
    if types_off + 2 > len(rmap):
        raise CorruptImage(f"{path}: resource type list at {types_off} is outside the map")
    type_count = struct.unpack_from(">H", rmap, types_off)[0] + 1
    if type_count == 0x10000:  # stored as count - 1: 0xffff means an empty list
        type_count = 0
    tables = []
    for t in range(type_count):
        entry_off = types_off + 2 + t * RSRC_TYPE.size
        if entry_off + RSRC_TYPE.size > len(rmap):
            raise CorruptImage(f"{path}: resource type entry {t} is outside the map")
        rtype, count, refs_off = RSRC_TYPE.unpack_from(rmap, entry_off)
        if rtype != b"blkx":
            continue
        for r in range(count + 1):
            ref_off = types_off + refs_off + r * RSRC_REF.size
            if ref_off + RSRC_REF.size > len(rmap):
                raise CorruptImage(f"{path}: blkx resource reference {r} is outside the map")
            ident, name_off, _attr, off3, _handle = RSRC_REF.unpack_from(rmap, ref_off)
            res_off = data_off + int.from_bytes(off3, "big")
            if res_off + 4 > data_off + data_len:
                raise CorruptImage(f"{path}: blkx resource {ident} at {res_off} is outside")
            (res_len,) = struct.unpack_from(">I", fork, res_off)
            if res_off + 4 + res_len > data_off + data_len:
                raise CorruptImage(
                    f"{path}: blkx resource {ident} of {res_len} bytes passes the fork's end"
                )
            name = ""
            if name_off != -1 and names_off + name_off < len(rmap):
                at = names_off + name_off
                name = rmap[at + 1 : at + 1 + rmap[at]].decode("mac_roman")
            tables.append((fork[res_off + 4 : res_off + 4 + res_len], name, ident))
    if not tables:
        raise CorruptImage(f"{path}: the resource fork has no blkx resources")
    return tables


def _parse_tables(
    path: str,
    tables: list[tuple[bytes, str, int | None]],
    disk_sectors: int,
    fork_start: int,
    fork_end: int,
) -> tuple[list[Run], list[Partition]]:
    """Every chunk of every mish table, as runs sorted by sector, validated against the disk
    size and the data fork; and one Partition per table."""
    runs: list[Run] = []
    partitions: list[Partition] = []
    for data, name, ident in tables:
        if len(data) < MISH.size:
            raise CorruptImage(f"{path}: blkx table {name!r} of {len(data)} bytes is too small")
        fields = MISH.unpack_from(data, 0)
        magic, _version, first, count, data_offset = fields[:5]
        n_chunks = fields[-1]
        if magic != MISH_MAGIC:
            raise CorruptImage(f"{path}: blkx table {name!r} has magic {bytes(magic)!r}")
        if first + count > disk_sectors:
            raise CorruptImage(
                f"{path}: blkx table {name!r} covers sectors {first}..{first + count}, past the "
                f"disk's {disk_sectors}"
            )
        if MISH.size + n_chunks * CHUNK.size > len(data) or len(runs) + n_chunks > MAX_CHUNKS:
            raise CorruptImage(
                f"{path}: blkx table {name!r} claims {n_chunks} chunks in {len(data)} bytes"
            )
        table_runs: list[Run] = []
        for i in range(n_chunks):
            kind, _comment, sector, sectors, offset, length = CHUNK.unpack_from(
                data, MISH.size + i * CHUNK.size
            )
            if kind == CT_TERMINATOR:
                break
            if kind == CT_COMMENT or sectors == 0:
                continue
            if kind not in CHUNK_TYPE_NAMES:
                raise Unsupported(
                    f"{path}: blkx table {name!r} chunk {i} has unknown type {kind:#010x}"
                )
            if sector + sectors > count:
                raise CorruptImage(
                    f"{path}: blkx table {name!r} chunk {i} covers sectors {sector}..."
                    f"{sector + sectors}, past the table's {count}"
                )
            size = sectors * SECTOR
            host = fork_start + data_offset + offset
            if kind in COMPRESSED_TYPES:
                if size > MAX_CHUNK_BYTES:
                    raise CorruptImage(
                        f"{path}: {CHUNK_TYPE_NAMES[kind]} chunk {i} of table {name!r} "
                        f"decompresses to {size} bytes (limit {MAX_CHUNK_BYTES})"
                    )
                if length > MAX_COMPRESSED_BYTES:
                    raise CorruptImage(
                        f"{path}: {CHUNK_TYPE_NAMES[kind]} chunk {i} of table {name!r} is "
                        f"{length} bytes compressed (limit {MAX_COMPRESSED_BYTES})"
                    )
            elif kind == CT_RAW and length < size:
                raise CorruptImage(
                    f"{path}: raw chunk {i} of table {name!r} holds {length} bytes for "
                    f"{sectors} sectors"
                )
            if kind in COMPRESSED_TYPES or kind == CT_RAW:
                if host + length > fork_end:
                    raise CorruptImage(
                        f"{path}: chunk {i} of table {name!r} at {host} length {length} passes "
                        f"the end of the data fork ({fork_end})"
                    )
            table_runs.append(Run(first + sector, sectors, kind, host, length))
        runs += table_runs
        partitions.append(Partition(name, ident, first, count, tuple(table_runs), *fields[8:11]))
    runs.sort(key=lambda r: r.start)
    for previous, run in zip(runs, runs[1:], strict=False):
        if run.start < previous.end:
            raise CorruptImage(
                f"{path}: chunks overlap at sector {run.start} (one runs "
                f"{previous.start}..{previous.end})"
            )
    return runs, partitions


register(DmgDriver)
