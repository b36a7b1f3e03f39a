"""qcow2 on-disk structures (QEMU docs/interop/qcow2.txt), declared once.

Everything is big-endian. The header is parsed into :class:`Header`; header extensions are kept
as (type, payload) pairs so an image is rewritten with the extensions it came with.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from imgfs.errors import CorruptImage, Unsupported

MAGIC = b"QFI\xfb"

# Bytes 0..71: the version 2 header.
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
assert HEADER_V2.size == 72
# Bytes 72..103: the version 3 additions up to header_length.
HEADER_V3 = struct.Struct(">QQQII")
assert HEADER_V3.size == 32
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 112  # with compression_type (byte 104) and its padding
COMPRESSION_TYPE_OFFSET = 104

EXTENSION = struct.Struct(">II")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Incompatible features.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
INCOMPAT_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type",
                  4: "extended L2 entries"}  # fmt: skip
# Compatible features.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear features.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Field offsets used for in-place header updates.
OFF_SIZE = 24
OFF_L1_SIZE = 36  # l1_size (u32) then l1_table_offset (u64)
OFF_REFCOUNT_TABLE = 48  # refcount_table_offset (u64) then refcount_table_clusters (u32)
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
L1_UPDATE = struct.Struct(">IQ")
REFTABLE_UPDATE = struct.Struct(">QI")

# Table entries.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_RESERVED = 0x7F000000000001FF
L2E_STD_RESERVED = 0x3F000000000001FE
SUBCLUSTERS = 32
SUBCLUSTER_ALL = 0xFFFFFFFF

# Limits (QEMU's implementation limits, which bound memory for hostile images).
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_BACKING_NAME = 1023
MAX_HOST_OFFSET = 1 << 56
MAX_SNAPSHOTS = 65536
MAX_EXTENSION_AREA = 2 * 1024 * 1024

SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
assert SNAPSHOT_HEADER.size == 40
BITMAPS_EXT = struct.Struct(">IIQQ")
BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")
assert BITMAP_DIR_ENTRY.size == 24
BITMAP_IN_USE = 1


@dataclass(slots=True)
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def extension(self, ext_type: int) -> bytes | None:
        for t, payload in self.extensions:
            if t == ext_type:
                return payload
        return None

    def pack_fixed(self) -> bytes:
        """The header fields (not the extensions), ``header_length`` bytes."""
        out = bytearray(
            HEADER_V2.pack(
                MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
                self.cluster_bits, self.size, self.crypt_method, self.l1_size,
                self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
                self.nb_snapshots, self.snapshots_offset,
            )
        )  # fmt: skip
        if self.version >= 3:
            out += HEADER_V3.pack(
                self.incompatible, self.compatible, self.autoclear, self.refcount_order,
                self.header_length,
            )  # fmt: skip
            if self.header_length > COMPRESSION_TYPE_OFFSET:
                out += bytes([self.compression_type])
            out += bytes(self.header_length - len(out))
        return bytes(out)

    def pack_extensions(self) -> bytes:
        out = bytearray()
        for t, payload in self.extensions:
            out += EXTENSION.pack(t, len(payload)) + payload + bytes(-len(payload) % 8)
        out += EXTENSION.pack(EXT_END, 0)
        return bytes(out)


def parse_header(buf: bytes, path: str) -> Header:
    """Parse and validate the header and its extensions from the image's first bytes."""
    if len(buf) < HEADER_V2.size or buf[:4] != MAGIC:
        raise CorruptImage(f"{path}: not a qcow2 image (bad magic {bytes(buf[:4])!r})")
    f = HEADER_V2.unpack_from(buf)
    h = Header(*f[1:])
    if h.version not in (2, 3):
        raise Unsupported(f"{path}: qcow2 version {h.version} is not supported (2 and 3 are)")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(f"{path}: qcow2 cluster_bits {h.cluster_bits} outside 9..21")
    if h.version >= 3:
        if len(buf) < V2_HEADER_LENGTH + HEADER_V3.size:
            raise CorruptImage(f"{path}: qcow2 v3 header truncated")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length) = (
            HEADER_V3.unpack_from(buf, V2_HEADER_LENGTH)
        )
        if h.header_length < 104 or h.header_length % 8:
            raise CorruptImage(f"{path}: qcow2 header_length {h.header_length} is invalid")
        if h.header_length > h.cluster_size or h.header_length > len(buf):
            raise CorruptImage(f"{path}: qcow2 header_length {h.header_length} is too large")
        if h.header_length > COMPRESSION_TYPE_OFFSET:
            h.compression_type = buf[COMPRESSION_TYPE_OFFSET]
    if h.refcount_order > 6:
        raise CorruptImage(f"{path}: qcow2 refcount_order {h.refcount_order} exceeds 6")
    if h.crypt_method not in (0, 1, 2):
        raise Unsupported(f"{path}: qcow2 crypt_method {h.crypt_method} is unknown")
    if bool(h.incompatible & INCOMPAT_COMPRESSION) != (h.compression_type != COMPRESSION_ZLIB):
        raise CorruptImage(
            f"{path}: qcow2 compression_type {h.compression_type} does not match the "
            "compression type feature bit"
        )
    if h.compression_type not in COMPRESSION_NAMES:
        raise Unsupported(f"{path}: qcow2 compression_type {h.compression_type} is unknown")
    if h.incompatible & INCOMPAT_EXTL2 and h.cluster_bits < 14:
        raise CorruptImage(
            f"{path}: qcow2 extended L2 entries need 16 KiB clusters, not {h.cluster_size}"
        )
    cs = h.cluster_size
    for name, value in (
        ("l1_table_offset", h.l1_table_offset),
        ("refcount_table_offset", h.refcount_table_offset),
    ):
        if value % cs or value >= MAX_HOST_OFFSET:
            raise CorruptImage(f"{path}: qcow2 {name} {value} is not a valid cluster offset")
    if h.refcount_table_offset == 0:
        raise CorruptImage(f"{path}: qcow2 refcount_table_offset is 0")
    if h.snapshots_offset % cs or (h.nb_snapshots and h.snapshots_offset >= MAX_HOST_OFFSET):
        raise CorruptImage(f"{path}: qcow2 snapshots_offset {h.snapshots_offset} is invalid")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage(f"{path}: qcow2 nb_snapshots {h.nb_snapshots} exceeds {MAX_SNAPSHOTS}")
    if h.refcount_table_clusters == 0 or h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise CorruptImage(
            f"{path}: qcow2 refcount_table_clusters {h.refcount_table_clusters} is invalid"
        )
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise CorruptImage(f"{path}: qcow2 l1_size {h.l1_size} exceeds the 32 MiB limit")
    if h.size >= 1 << 63:
        raise CorruptImage(f"{path}: qcow2 size {h.size} is too large")
    entries_per_l2 = cs // (16 if h.incompatible & INCOMPAT_EXTL2 else 8)
    needed_l1 = -(-h.size // (cs * entries_per_l2))
    if h.l1_size < needed_l1:
        raise CorruptImage(
            f"{path}: qcow2 l1_size {h.l1_size} too small for size {h.size} (needs {needed_l1})"
        )
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_size == 0:
            raise CorruptImage(f"{path}: qcow2 backing_file_size {h.backing_file_size} invalid")
        if h.backing_file_offset + h.backing_file_size > cs:
            raise CorruptImage(
                f"{path}: qcow2 backing file name at {h.backing_file_offset} is outside the "
                "first cluster"
            )
    # Header extensions, up to the end of the first cluster (or the backing file name).
    pos = V2_HEADER_LENGTH if h.version == 2 else h.header_length
    end = min(cs, len(buf))
    if h.backing_file_offset:
        end = min(end, h.backing_file_offset)
    while pos + EXTENSION.size <= end:
        ext_type, length = EXTENSION.unpack_from(buf, pos)
        pos += EXTENSION.size
        if ext_type == EXT_END:
            break
        if pos + length > end:
            raise CorruptImage(
                f"{path}: qcow2 header extension 0x{ext_type:08x} length {length} overruns "
                "the header cluster"
            )
        h.extensions.append((ext_type, bytes(buf[pos : pos + length])))
        pos += length + (-length % 8)
    unknown = h.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        name = feature_name(h, 0, bit)
        raise Unsupported(
            f"{path}: qcow2 incompatible feature bit {bit}"
            + (f" ({name!r})" if name else "")
            + f" (mask 0x{unknown:x}) is not supported"
        )
    return h


def feature_name(h: Header, kind: int, bit: int) -> str | None:
    """The name the image's feature name table gives a feature bit, if any."""
    table = h.extension(EXT_FEATURE_TABLE) or b""
    for i in range(0, len(table) - 47, 48):
        if table[i] == kind and table[i + 1] == bit:
            return table[i + 2 : i + 48].rstrip(b"\0").decode("utf-8", "replace")
    return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot table entry's fields (parsed and validated in :mod:`.snapshot`)."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None


@dataclass(frozen=True, slots=True)
class BitmapEntry:
    """One bitmap directory entry; ``entry_offset`` is its position inside the directory."""

    entry_offset: int
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str


def parse_bitmap_directory(buf: bytes, count: int, path: str) -> list[BitmapEntry]:
    out: list[BitmapEntry] = []
    pos = 0
    for i in range(count):
        if pos + BITMAP_DIR_ENTRY.size > len(buf):
            raise CorruptImage(f"{path}: qcow2 bitmap directory truncated at entry {i}")
        (table_off, table_size, flags, btype, gran, name_size, extra) = (
            BITMAP_DIR_ENTRY.unpack_from(buf, pos)
        )
        start = pos
        pos += BITMAP_DIR_ENTRY.size + extra
        name = bytes(buf[pos : pos + name_size]).decode("utf-8", "replace")
        pos += name_size
        pos += -pos % 8
        if pos > len(buf):
            raise CorruptImage(f"{path}: qcow2 bitmap directory truncated at entry {i}")
        out.append(BitmapEntry(start, table_off, table_size, flags, btype, gran, name))
    return out
