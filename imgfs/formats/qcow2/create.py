"""Creating qcow2 images with qemu-img's ``-o`` options.

The new image is laid out as QEMU lays it out: the header cluster, the refcount table, the
refcount blocks describing these first clusters, then the L1 table. Preallocation then goes
through the driver's own allocator.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from imgfs.block.driver import OpenOptions
from imgfs.block.hostfile import CacheMode, HostFile
from imgfs.errors import InvalidRequest
from imgfs.formats.qcow2 import layout as L
from imgfs.formats.qcow2.cache import RefcountBlock, encode_u64
from imgfs.formats.qcow2.encryption import (
    CRYPT_LUKS,
    CRYPT_NONE,
    ENCRYPT_OPTIONS,
    FDE_EXT,
    create_key,
    create_params,
)
from imgfs.units import bool_option, choice_option, size_option

CREATE_OPTIONS: dict[str, str] = {
    "size": "virtual disk size in bytes (K/M/G/T suffixes allowed)",
    "compat": "qcow2 compatibility level: 0.10 (v2) or 1.1 (v3, default)",
    "cluster_size": "cluster size in bytes, a power of two from 512 to 2M (default 64K)",
    "backing_file": "file name of the backing image (relative to this image)",
    "backing_fmt": "format of the backing image",
    "compression_type": "compression of compressed clusters: zlib (default) or zstd",
    "extended_l2": "on/off: 32 subclusters per cluster (clusters of 16K or more)",
    "refcount_bits": "width of a reference count: 1, 2, 4, 8, 16 (default), 32 or 64",
    "lazy_refcounts": "on/off: set the lazy refcounts feature bit (v3)",
    "data_file": "file name of an external data file holding the guest data",
    "data_file_raw": "on/off: the data file is also a valid raw image",
    "preallocation": "off (default), metadata, falloc or full",
} | ENCRYPT_OPTIONS


# The feature name table QEMU writes, so tools that do not know a bit can still name it.
FEATURE_NAMES = [
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"), (2, 1, "raw external data"),
]  # fmt: skip


def _feature_table() -> bytes:
    return b"".join(
        bytes([kind, bit]) + name.encode().ljust(46, b"\0") for kind, bit, name in FEATURE_NAMES
    )


def create_image(path: str, size: int, options: Mapping[str, str]) -> None:
    from imgfs.formats.qcow2.driver import Qcow2Driver

    unknown = sorted(set(options) - set(CREATE_OPTIONS))
    if unknown:
        raise InvalidRequest(f"unknown qcow2 option(s): {', '.join(unknown)}")
    size = size_option(options, "size", size)
    size = -(-size // 512) * 512
    compat = choice_option(options, "compat", ("0.10", "1.1", "v2", "v3"), "1.1")
    version = 2 if compat in ("0.10", "v2") else 3
    cs = size_option(options, "cluster_size", 65536)
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise InvalidRequest(f"qcow2 option cluster_size={cs}: a power of two, 512 to 2M")
    cb = cs.bit_length() - 1
    refcount_choices = ("1", "2", "4", "8", "16", "32", "64")
    refcount_bits = int(choice_option(options, "refcount_bits", refcount_choices, "16"))
    if version == 2 and refcount_bits != 16:
        raise InvalidRequest("qcow2 compat=0.10 images need refcount_bits=16")
    extl2 = bool_option(options, "extended_l2")
    lazy = bool_option(options, "lazy_refcounts")
    data_file = options.get("data_file") or None
    data_file_raw = bool_option(options, "data_file_raw")
    backing = options.get("backing_file") or None
    backing_fmt = options.get("backing_fmt") or None
    ctypes = {v: k for k, v in L.COMPRESSION_NAMES.items()}
    ctype = ctypes[choice_option(options, "compression_type", list(ctypes), "zlib")]
    prealloc = choice_option(options, "preallocation", ("off", "metadata", "falloc", "full"), "off")
    if version == 2 and (extl2 or lazy or data_file or ctype):
        raise InvalidRequest(
            "qcow2 compat=0.10 cannot have extended_l2, lazy_refcounts, data_file or zstd"
        )
    if extl2 and cs < 16384:
        raise InvalidRequest("qcow2 extended_l2 needs cluster_size of at least 16K")
    if data_file_raw and not data_file:
        raise InvalidRequest("qcow2 data_file_raw needs data_file")
    if data_file_raw and backing:
        raise InvalidRequest("qcow2 data_file_raw cannot be used with a backing file")
    if backing_fmt and not backing:
        raise InvalidRequest("qcow2 backing_fmt needs backing_file")
    if backing and len(backing.encode()) > L.MAX_BACKING_NAME:
        raise InvalidRequest("qcow2 backing_file name is longer than 1023 bytes")
    if backing and prealloc != "off":
        raise InvalidRequest("qcow2 preallocation cannot be used with a backing file")
    crypt_method, luks_spec, luks_hash, iter_time = create_params(options)
    luks_area = b""
    if crypt_method != CRYPT_NONE:
        if prealloc != "off" or data_file:
            raise InvalidRequest("qcow2 encryption cannot be used with preallocation or data_file")
        key = create_key(options, "an encrypted qcow2 image")
        if crypt_method == CRYPT_LUKS:
            from imgfs.crypto import luks1

            assert luks_spec is not None
            _, luks_area, _ = luks1.build(luks_spec, luks_hash, key, iter_time)

    l2_entries = cs // (16 if extl2 else 8)
    l1_size = -(-size // (l2_entries * cs))
    if l1_size * 8 > L.MAX_L1_BYTES:
        raise InvalidRequest(f"qcow2 size {size} is too large for cluster_size {cs}")
    l1_clusters = -(-l1_size * 8 // cs)
    crypt_clusters = -(-len(luks_area) // cs)
    rb_entries = cs * 8 // refcount_bits
    # header, refcount table, refcount blocks, L1: solve for the counts together.
    rt_clusters, blocks = 1, 1
    while True:
        total = 1 + rt_clusters + blocks + l1_clusters + crypt_clusters
        need_blocks = -(-total // rb_entries)
        need_rt = max(1, -(-need_blocks * 8 // cs))
        if (need_blocks, need_rt) == (blocks, rt_clusters):
            break
        blocks, rt_clusters = need_blocks, need_rt

    incompatible = 0
    autoclear = 0
    if data_file:
        incompatible |= L.INCOMPAT_DATA_FILE
    if ctype:
        incompatible |= L.INCOMPAT_COMPRESSION
    if extl2:
        incompatible |= L.INCOMPAT_EXTL2
    if data_file_raw:
        autoclear |= L.AUTOCLEAR_DATA_FILE_RAW
    h = L.Header(
        version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb,
        size=size, crypt_method=crypt_method, l1_size=l1_size,
        l1_table_offset=(1 + rt_clusters + blocks) * cs, refcount_table_offset=cs,
        refcount_table_clusters=rt_clusters, nb_snapshots=0, snapshots_offset=0,
        incompatible=incompatible, compatible=L.COMPAT_LAZY_REFCOUNTS if lazy else 0,
        autoclear=autoclear, refcount_order=refcount_bits.bit_length() - 1,
        header_length=L.V3_HEADER_LENGTH if version == 3 else L.V2_HEADER_LENGTH,
        compression_type=ctype,
    )  # fmt: skip
    if backing_fmt:
        h.extensions.append((L.EXT_BACKING_FORMAT, backing_fmt.encode()))
    if version == 3:
        h.extensions.append((L.EXT_FEATURE_TABLE, _feature_table()))
    if data_file:
        h.extensions.append((L.EXT_DATA_FILE, data_file.encode()))
    crypt_offset = (1 + rt_clusters + blocks + l1_clusters) * cs
    if luks_area:
        h.extensions.append((L.EXT_CRYPTO, FDE_EXT.pack(crypt_offset, len(luks_area))))
    fixed = h.pack_fixed()
    exts = h.pack_extensions()
    header = bytearray(fixed + exts)
    if backing:
        name = backing.encode()
        h.backing_file_offset = len(header)
        h.backing_file_size = len(name)
        header = bytearray(h.pack_fixed() + exts) + name
    if len(header) > cs:
        raise InvalidRequest("qcow2 header, extensions and backing file name exceed a cluster")
    header += bytes(cs - len(header))

    used = 1 + rt_clusters + blocks + l1_clusters + crypt_clusters
    table = [0] * (rt_clusters * cs // 8)
    block_data = bytearray()
    for j in range(blocks):
        block = RefcountBlock(bytes(cs), refcount_bits)
        for c in range(j * rb_entries, min(used, (j + 1) * rb_entries)):
            block.set(c - j * rb_entries, 1)
        block_data += block.to_bytes()
        table[j] = (1 + rt_clusters + j) * cs
    from array import array

    from imgfs.formats.qcow2.cache import U64_CODE

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, bytes(header), 0)
        os.pwrite(fd, encode_u64(array(U64_CODE, table)), cs)
        os.pwrite(fd, bytes(block_data), (1 + rt_clusters) * cs)
        os.ftruncate(fd, used * cs)  # the L1 table: zeros
        if luks_area:
            os.pwrite(fd, luks_area, crypt_offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    data_path = None
    if data_file:
        data_path = (
            data_file
            if os.path.isabs(data_file)
            else os.path.join(os.path.dirname(os.path.abspath(path)), data_file)
        )
        dfd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            if data_file_raw or prealloc != "off":
                os.ftruncate(dfd, size)
        finally:
            os.close(dfd)
    if prealloc == "off":
        return

    def open_file(name: str, want_write: bool) -> HostFile:
        assert data_path is not None
        return HostFile(data_path, writable=want_write)

    file = HostFile(path, writable=True)
    drv = Qcow2Driver.open(
        file, OpenOptions(read_only=False, cache=CacheMode.WRITEBACK, open_file=open_file)
    )
    try:
        drv.preallocate(prealloc)
        drv.flush()
    finally:
        drv.close()
