"""qcow2 reads: images made by qemu-img/qemu-io at many settings, and the corpus."""

from __future__ import annotations

import gzip
import hashlib
import random
import shutil
import struct
from pathlib import Path

import pytest

from imgfs.block.chain import chain_block_status
from imgfs.block.disk import open_disk
from imgfs.block.extent import Allocation
from imgfs.errors import CorruptImage, KeyRequired, Unsupported
from tests.conftest import SHARED
from tests.formats.qcow2_util import (
    KiB,
    MiB,
    assert_reads_like_qemu,
    create,
    qemu_io,
    random_io_commands,
    read_all,
    run,
)
from tests.oracle import qemu_raw

CORPUS = SHARED / "corpus" / "qcow2"

SETTINGS = [
    pytest.param("compat=0.10,cluster_size=512", marks=pytest.mark.slow),
    "compat=0.10,cluster_size=65536",
    pytest.param("compat=1.1,cluster_size=512,refcount_bits=1", marks=pytest.mark.slow),
    "compat=1.1,cluster_size=1024,refcount_bits=64",
    "compat=1.1,cluster_size=4096,refcount_bits=2",
    "compat=1.1,cluster_size=16384,refcount_bits=32,extended_l2=on",
    "compat=1.1,cluster_size=65536,refcount_bits=8",
    "compat=1.1,cluster_size=65536,extended_l2=on",
    "compat=1.1,cluster_size=2097152,refcount_bits=4",
    "compat=1.1,cluster_size=131072,lazy_refcounts=on",
]


@pytest.mark.parametrize("opts", SETTINGS)
def test_random_qemu_writes_read_back(tmp_path: Path, opts: str) -> None:
    size = 9 * MiB + 3 * 512
    img = create(tmp_path / "a.qcow2", size, opts)
    rng = random.Random(opts)
    qemu_io(img, *random_io_commands(rng, size, 40))
    assert_reads_like_qemu(img, tmp_path)


@pytest.mark.parametrize(
    "opts",
    ["compat=1.1", "compat=0.10,cluster_size=4096", "compat=1.1,extended_l2=on,cluster_size=32768"],
)
def test_backing_chain_three_deep_with_raw_base(tmp_path: Path, opts: str) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(1).randbytes(3 * MiB + 512))  # shorter than the overlays
    mid = create(tmp_path / "mid.qcow2", 6 * MiB, opts, backing=base, bfmt="raw")
    top = create(tmp_path / "top.qcow2", 8 * MiB, opts, backing=mid)
    rng = random.Random(opts)
    qemu_io(mid, *random_io_commands(rng, 6 * MiB, 15))
    qemu_io(top, *random_io_commands(rng, 8 * MiB, 15))
    assert_reads_like_qemu(top, tmp_path)
    disk = open_disk(str(top), read_only=True)
    try:
        info = disk.top.info()
        assert info.backing_filename == "mid.qcow2"
        assert info.backing_filename_format == "qcow2"
        assert disk.top.backing is not None and disk.top.backing.backing is not None
    finally:
        disk.close()


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_images(tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "src.raw"
    rng = random.Random(ctype)
    data = bytearray()
    for i in range(5 * MiB // 4096):
        data += (b"block %d " % i) * 400 + bytes(4096 - len(b"block %d " % i) * 400 % 4096)
    data = data[: 5 * MiB]
    data[2 * MiB : 2 * MiB + 65536] = rng.randbytes(65536)  # one incompressible cluster
    src.write_bytes(data)
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}",
        str(src), str(img))  # fmt: skip
    qemu_io(img, "write -P 7 100000 5000")  # a COW out of a compressed cluster by qemu
    assert_reads_like_qemu(img, tmp_path)
    disk = open_disk(str(img), read_only=True)
    try:
        assert disk.top.info().format_specific["compression-type"] == ctype
        ext = disk.block_status(0, 65536)
        assert ext.allocation is Allocation.DATA and ext.host_offset is None
    finally:
        disk.close()


def test_external_data_file(tmp_path: Path) -> None:
    img = create(tmp_path / "d.qcow2", 4 * MiB, "data_file=d.bin")
    qemu_io(img, *random_io_commands(random.Random(3), 4 * MiB, 20))
    assert_reads_like_qemu(img, tmp_path)
    img2 = create(tmp_path / "r.qcow2", 4 * MiB, "data_file=r.bin,data_file_raw=on")
    qemu_io(img2, "write -P 9 12345 100000")
    assert_reads_like_qemu(img2, tmp_path)
    disk = open_disk(str(img2), read_only=True)
    try:
        spec = disk.top.info().format_specific
        assert spec["data-file"] == "r.bin" and spec["data-file-raw"] is True
    finally:
        disk.close()


def test_block_status_merges_runs(tmp_path: Path) -> None:
    img = create(tmp_path / "m.qcow2", 4 * MiB, "cluster_size=65536")
    qemu_io(img, "write -P 1 0 256k", "write -z 256k 128k", "write -P 2 1M 64k")
    disk = open_disk(str(img), read_only=True)
    try:
        e = disk.block_status(0, 4 * MiB)
        assert (e.allocation, e.length) == (Allocation.DATA, 256 * KiB)
        assert e.host_offset is not None
        e = disk.block_status(256 * KiB, 4 * MiB)
        assert (e.allocation, e.length) == (Allocation.ZERO, 128 * KiB)
        e = chain_block_status(disk.top, 384 * KiB, 4 * MiB)
        assert e.allocation is Allocation.UNALLOCATED and e.length == 1 * MiB - 384 * KiB
    finally:
        disk.close()


def test_extended_l2_subcluster_status(tmp_path: Path) -> None:
    img = create(tmp_path / "x.qcow2", 2 * MiB, "cluster_size=65536,extended_l2=on")
    qemu_io(img, "write -P 1 2048 2048", "write -z 8192 2048")
    disk = open_disk(str(img), read_only=True)
    try:
        assert disk.block_status(0, 65536).allocation is Allocation.UNALLOCATED
        assert disk.block_status(0, 65536).length == 2048
        assert disk.block_status(2048, 65536).length == 2048
        assert disk.block_status(8192, 65536).allocation is Allocation.ZERO
    finally:
        disk.close()


def test_l2_cache_size_option_is_bounded_and_reported(tmp_path: Path) -> None:
    img = create(tmp_path / "c.qcow2", 64 * MiB, "cluster_size=4096")
    qemu_io(img, *[f"write -P {i % 250 + 1} {i * 2 * MiB} 4k" for i in range(32)])
    ours = read_all(img, driver_options={"l2-cache-size": "8k"})
    assert ours == qemu_raw(img, tmp_path / "ref.raw").read_bytes()
    disk = open_disk(str(img), read_only=True, driver_options={"l2-cache-size": "8k"})
    try:
        assert disk.top.info().format_specific["l2-cache-size"] == 8192
        assert len(disk.top.l2_cache.tables) <= 2
    finally:
        disk.close()


# -- corpus ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    [
        "dfvfs/ext2.qcow2",
        "dfvfs/image.qcow2",
        pytest.param("dfvfs/vsstest.qcow2", marks=pytest.mark.slow),  # 1 GiB to hash
        pytest.param("dissect-hypervisor/basic.qcow2", marks=pytest.mark.slow),  # zlib: as above
        "dissect-hypervisor/basic-zstd.qcow2",
        "dissect-hypervisor/backing-chain/backing-chain-1.qcow2",
    ],
)
def test_corpus(tmp_path: Path, rel: str) -> None:
    assert sha256_export(CORPUS / rel) == manifest_sha256(f"qcow2/{rel}")


def manifest_sha256(rel: str) -> str:
    for line in (SHARED / "corpus" / "MANIFEST.tsv").read_text().splitlines():
        fields = line.split("\t")
        if fields[0] == rel:
            return fields[6]
    raise AssertionError(f"{rel} not in MANIFEST.tsv")


def sha256_export(path: Path) -> str:
    disk = open_disk(str(path), read_only=True)
    try:
        h = hashlib.sha256()
        pos = 0
        while pos < disk.size:
            n = min(8 * MiB, disk.size - pos)
            h.update(disk.read(pos, n))
            pos += n
        return h.hexdigest()
    finally:
        disk.close()


def test_corpus_data_file(tmp_path: Path) -> None:
    d = CORPUS / "dissect-hypervisor" / "data-file"
    shutil.copy(d / "data-file.qcow2", tmp_path / "data-file.qcow2")
    with gzip.open(d / "data-file.bin.gz") as fin, open(tmp_path / "data-file.bin", "wb") as fo:
        shutil.copyfileobj(fin, fo)
    assert sha256_export(tmp_path / "data-file.qcow2") == manifest_sha256(
        "qcow2/dissect-hypervisor/data-file/data-file.qcow2"
    )


def test_corpus_snapshots_listed(tmp_path: Path) -> None:
    img = tmp_path / "snapshot.qcow2"
    with gzip.open(CORPUS / "dissect-hypervisor" / "snapshot.qcow2.gz") as fin:
        img.write_bytes(fin.read())
    assert sha256_export(img) == manifest_sha256("qcow2/dissect-hypervisor/snapshot.qcow2.gz")
    disk = open_disk(str(img))  # images with snapshots open writable (shared clusters COW)
    try:
        info = disk.top.info()
        assert len(info.snapshots) == 2
        assert not disk.read_only
    finally:
        disk.close()


# -- hostile and unusual headers ------------------------------------------------------------


def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "error", "needle"),
    [
        (0, ">I", 0x12345678, CorruptImage, "magic"),
        (4, ">I", 4, Unsupported, "version 4"),
        (20, ">I", 8, CorruptImage, "cluster_bits 8"),
        (20, ">I", 30, CorruptImage, "cluster_bits 30"),
        (32, ">I", 1, KeyRequired, "encrypted \\(aes\\); no key given"),
        (32, ">I", 3, Unsupported, "crypt_method 3"),
        (36, ">I", 0, CorruptImage, "l1_size 0"),
        (36, ">I", 0x7FFFFFFF, CorruptImage, "l1_size"),
        (40, ">Q", 12345, CorruptImage, "l1_table_offset 12345"),
        (48, ">Q", 0, CorruptImage, "refcount_table_offset"),
        (56, ">I", 0xFFFFFFF, CorruptImage, "refcount_table_clusters"),
        (72, ">Q", 1 << 20, Unsupported, "bit 20"),
        (96, ">I", 7, CorruptImage, "refcount_order 7"),
        (100, ">I", 99, CorruptImage, "header_length 99"),
    ],
)
def test_hostile_headers(tmp_path: Path, offset, fmt, value, error, needle) -> None:
    img = create(tmp_path / "h.qcow2", 4 * MiB)
    _patch(img, offset, fmt, value)
    with pytest.raises(error, match=needle):
        open_disk(str(img), "qcow2", read_only=True)


def test_hostile_l2_offset_is_corrupt_not_a_crash(tmp_path: Path) -> None:
    img = create(tmp_path / "h.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 0 4k")
    l1_off = struct.unpack(">Q", img.read_bytes()[40:48])[0]
    _patch(img, l1_off, ">Q", (1 << 63) | (1 << 50))  # past the end of the file
    disk = open_disk(str(img), read_only=True)
    try:
        with pytest.raises(CorruptImage, match="L2 table offset"):
            disk.read(0, 4096)
    finally:
        disk.close()


def test_corrupt_bit_opens_read_only(tmp_path: Path) -> None:
    img = create(tmp_path / "c.qcow2", 1 * MiB)
    _patch(img, 72, ">Q", 2)
    disk = open_disk(str(img))
    try:
        assert disk.read_only
        info = disk.top.info()
        assert info.format_specific["corrupt"] is True
        assert any("corrupt" in n for n in info.notes)
    finally:
        disk.close()


def test_info_matches_qemu_format_specific(tmp_path: Path) -> None:
    import json

    for opts in ["compat=0.10", "compat=1.1,lazy_refcounts=on,refcount_bits=32,extended_l2=on"]:
        img = create(tmp_path / "i.qcow2", 3 * MiB, opts)
        q = json.loads(run("qemu-img", "info", "--output=json", str(img)))
        disk = open_disk(str(img), read_only=True)
        try:
            ours = disk.top.info().to_qemu_json()
        finally:
            disk.close()
        spec = dict(ours["format-specific"]["data"])
        spec.pop("l2-cache-size")
        assert spec == q["format-specific"]["data"]
        assert ours["cluster-size"] == q["cluster-size"]
        assert ours["virtual-size"] == q["virtual-size"]


def test_cheap_reads_off_when_reads_decompress(tmp_path: Path) -> None:
    plain = create(tmp_path / "p.qcow2", 1 * MiB)
    qemu_io(plain, "write -P 1 0 64k")
    src = tmp_path / "s.raw"
    src.write_bytes(b"abc" * 100_000)
    packed = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(packed))
    for img, cheap in ((plain, True), (packed, False)):
        disk = open_disk(str(img), read_only=True)
        try:
            assert disk.top.cheap_reads is cheap
        finally:
            disk.close()


def test_unknown_incompatible_bit_named_from_feature_table(tmp_path: Path) -> None:
    img = create(tmp_path / "f.qcow2", 1 * MiB)
    data = bytearray(img.read_bytes())
    # qemu-img writes a feature name table; rename the entry for incompatible bit 4 to bit 9.
    pos = data.index(b"extended L2")
    assert data[pos - 2] == 0 and data[pos - 1] == 4
    data[pos - 1] = 9
    data[72:80] = (1 << 9).to_bytes(8, "big")
    img.write_bytes(data)
    with pytest.raises(Unsupported, match=r"bit 9 \(.extended L2 entries.\)"):
        open_disk(str(img), read_only=True)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_garbage_compressed_cluster_is_corrupt(tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "s.raw"
    src.write_bytes(b"hello " * 20000)
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}",
        str(src), str(img))  # fmt: skip
    disk = open_disk(str(img), read_only=True)
    try:
        entry = disk.top._entry(0)[0]
        start, size = disk.top._compressed_range(entry)
    finally:
        disk.close()
    with open(img, "r+b") as f:
        f.seek(start)
        f.write(bytes(range(256)) * (size // 256 + 1))
    disk = open_disk(str(img), read_only=True)
    try:
        with pytest.raises(CorruptImage, match="compressed cluster"):
            disk.read(0, 4096)
    finally:
        disk.close()


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_partial_inflate_at_odd_offsets(tmp_path: Path, ctype: str) -> None:
    """Reads stop inflating at the end of the requested range; later reads of the same
    cluster that need more (or other parts) still get the right bytes."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(b"row %09d|" % i for i in range(2 * MiB // 14 + 1))[: 2 * MiB])
    img = tmp_path / f"c-{ctype}.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}",
        str(src), str(img))  # fmt: skip
    want = src.read_bytes()
    disk = open_disk(str(img))
    try:
        rng = random.Random(ctype)
        for _ in range(200):
            off = rng.randrange(2 * MiB - 1)
            n = min(rng.choice([1, 3, 511, 4096, 5000, 65536, 70001]), 2 * MiB - off)
            assert disk.read(off, n) == want[off : off + n], (off, n)
        for off in range(0, 2 * MiB, 4096):  # sequential small reads
            assert disk.read(off, 4096) == want[off : off + 4096]
        assert disk.top._inflated_bytes <= max(4 * MiB, 65536)
    finally:
        disk.close()


def test_inflated_cache_forgets_rewritten_and_freed_clusters(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"abcdefgh" * (MiB // 8))
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(img))
    model = bytearray(src.read_bytes())
    disk = open_disk(str(img))
    try:
        assert disk.read(100, 10) == model[100:110]  # cluster 0 inflated and cached
        disk.top.write_compressed(0, b"Z" * 65536)  # rewritten compressed
        model[0:65536] = b"Z" * 65536
        assert disk.read(100, 10) == model[100:110]
        assert disk.read(65536 + 7, 9) == model[65543:65552]
        disk.discard(65536, 65536)  # freed; its space may be reused
        disk.flush()
        model[65536:131072] = bytes(65536)
        disk.top.write_compressed(65536, b"Q" * 65536)
        model[65536:131072] = b"Q" * 65536
        assert disk.read(65536, 65536) == model[65536:131072]
        disk.flush()
    finally:
        disk.close()
    got = qemu_raw(img, tmp_path / "got.raw").read_bytes()
    assert got == bytes(model)
