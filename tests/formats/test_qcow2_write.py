"""qcow2 writes through the driver: qemu-img check stays clean and qemu-img compare agrees."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.block.hostfile import CacheMode
from tests.formats.qcow2_util import (
    KiB,
    MiB,
    create,
    qemu_convert_raw,
    qemu_io,
    random_io_commands,
    run,
)
from tests.oracle import qemu_check


def assert_check_clean(img: Path) -> dict:
    out = run("qemu-img", "check", "--output=json", img.name, cwd=img.parent)
    data = json.loads(out)
    assert data.get("leaks", 0) == 0 and data.get("corruptions", 0) == 0, data
    return data


def assert_compare(img: Path, expected: bytes, scratch: Path) -> None:
    raw = scratch / (img.name + ".expected")
    raw.write_bytes(expected)
    run("qemu-img", "compare", "-F", "raw", img.name, str(raw.resolve()), cwd=img.parent)
    got = qemu_convert_raw(img, scratch / (img.name + ".got")).read_bytes()
    assert got == expected


def random_writes(disk, model: bytearray, rng: random.Random, count: int) -> None:
    size = len(model)
    for _ in range(count):
        length = rng.choice([1, 7, 511, 512, 4097, 65536, 65537, 200_000, 1_100_000])
        offset = rng.randrange(0, size)
        length = min(length, size - offset)
        data = rng.randbytes(length)
        disk.write(offset, data)
        model[offset : offset + length] = data
        if rng.random() < 0.1:
            disk.flush()


WRITE_SETTINGS = [
    "compat=0.10,cluster_size=512",
    "compat=0.10",
    "compat=1.1,cluster_size=512,refcount_bits=64",
    "compat=1.1,cluster_size=1024,refcount_bits=1",
    "compat=1.1,cluster_size=4096,refcount_bits=2",
    "compat=1.1,cluster_size=65536,refcount_bits=8",
    "compat=1.1,cluster_size=16384,extended_l2=on",
    "compat=1.1,cluster_size=65536,extended_l2=on,refcount_bits=32",
    pytest.param("compat=1.1,cluster_size=2097152", marks=pytest.mark.slow),
    pytest.param("compat=1.1,lazy_refcounts=on", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("opts", WRITE_SETTINGS)
def test_random_writes_check_and_compare(tmp_path: Path, opts: str) -> None:
    size = 7 * MiB + 1536
    img = create(tmp_path / "w.qcow2", size, opts)
    rng = random.Random(opts)
    qemu_io(img, *random_io_commands(rng, size, 10))
    model = bytearray(qemu_convert_raw(img, tmp_path / "start.raw").read_bytes())
    disk = open_disk(str(img))
    try:
        random_writes(disk, model, rng, 60)
        assert bytes(disk.read(0, size)) == model
        disk.flush()
    finally:
        disk.close()
    assert_check_clean(img)
    assert_compare(img, bytes(model), tmp_path)


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "extended_l2=on"])
def test_writes_over_backing_chain(tmp_path: Path, opts: str) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(5).randbytes(2 * MiB + 512))
    mid = create(tmp_path / "mid.qcow2", 5 * MiB, opts, backing=base, bfmt="raw")
    qemu_io(mid, *random_io_commands(random.Random(6), 5 * MiB, 10))
    top = create(tmp_path / "top.qcow2", 6 * MiB, opts, backing=mid)
    model = bytearray(qemu_convert_raw(top, tmp_path / "start.raw").read_bytes())
    disk = open_disk(str(top))
    try:
        random_writes(disk, model, random.Random(opts), 50)
    finally:
        disk.flush()
        disk.close()
    assert_check_clean(top)
    assert_compare(top, bytes(model), tmp_path)
    assert_check_clean(mid)


def test_writes_into_compressed_image(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(b"compressible %08d " % i * 100 for i in range(3000))[: 4 * MiB])
    for ctype in ("zlib", "zstd"):
        img = tmp_path / f"c-{ctype}.qcow2"
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}",
            str(src), str(img))  # fmt: skip
        model = bytearray(src.read_bytes())
        disk = open_disk(str(img))
        try:
            random_writes(disk, model, random.Random(ctype), 40)
            disk.flush()
        finally:
            disk.close()
        assert_check_clean(img)
        assert_compare(img, bytes(model), tmp_path)


def test_data_file_writes(tmp_path: Path) -> None:
    for opts in ("data_file=d.bin", "data_file=r.bin,data_file_raw=on"):
        img = create(tmp_path / "d.qcow2", 3 * MiB, opts)
        model = bytearray(3 * MiB)
        disk = open_disk(str(img))
        try:
            random_writes(disk, model, random.Random(opts), 30)
            disk.flush()
        finally:
            disk.close()
        assert_check_clean(img)
        assert_compare(img, bytes(model), tmp_path)
        if "raw" in opts:
            assert (tmp_path / "r.bin").read_bytes()[: 3 * MiB].ljust(3 * MiB, b"\0") == model
        os.unlink(img)


def test_refcount_table_grows(tmp_path: Path) -> None:
    # 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB, and the
    # initial one-cluster refcount table only 2 MiB of host file.
    img = create(tmp_path / "g.qcow2", 12 * MiB, "cluster_size=512,refcount_bits=64")
    model = bytearray(12 * MiB)
    disk = open_disk(str(img))
    try:
        data = random.Random(1).randbytes(12 * MiB)
        for off in range(0, 12 * MiB, 1 * MiB):
            disk.write(off, data[off : off + MiB])
        model[:] = data
        disk.flush()
    finally:
        disk.close()
    check = assert_check_clean(img)
    assert check["image-end-offset"] > 12 * MiB
    header = img.read_bytes()[:64]
    assert int.from_bytes(header[56:60], "big") > 1  # refcount_table_clusters grew
    assert_compare(img, bytes(model), tmp_path)


def test_concurrent_writers(tmp_path: Path) -> None:
    img = create(tmp_path / "t.qcow2", 8 * MiB, "cluster_size=4096")
    model = bytearray(8 * MiB)
    disk = open_disk(str(img))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        rng = random.Random(n)
        base = n * 2 * MiB
        try:
            for _ in range(60):
                off = base + rng.randrange(0, 2 * MiB - 70_000)
                data = rng.randbytes(rng.choice([100, 4096, 70_000]))
                disk.write(off, data)
                model[off : off + len(data)] = data
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    disk.flush()
    disk.close()
    assert not errors
    assert_check_clean(img)
    assert_compare(img, bytes(model), tmp_path)


def test_write_unaligned_tail_of_odd_sized_disk(tmp_path: Path) -> None:
    img = create(tmp_path / "o.qcow2", 1 * MiB + 1536, "cluster_size=65536")
    disk = open_disk(str(img))
    size = disk.size
    try:
        disk.write(size - 100, b"z" * 100)
        disk.flush()
    finally:
        disk.close()
    model = bytearray(size)
    model[size - 100 :] = b"z" * 100
    status, _ = qemu_check(img)
    assert status == 0
    assert_compare(img, bytes(model), tmp_path)


def test_cluster_granular_write_allocates_once(tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", 4 * MiB, "cluster_size=65536")
    disk = open_disk(str(img))
    try:
        disk.write(0, b"x" * (64 * KiB))
        disk.write(100, b"y")
        disk.flush()
    finally:
        disk.close()
    check = assert_check_clean(img)
    assert check["allocated-clusters"] == 1


def test_persistent_bitmaps_marked_in_use(tmp_path: Path) -> None:
    img = create(tmp_path / "b.qcow2", 4 * MiB)
    run("qemu-img", "bitmap", "--add", str(img), "bm0")
    qemu_io(img, "write -P 1 0 64k")
    disk = open_disk(str(img))
    try:
        assert disk.top.info().format_specific["bitmaps"][0]["flags"] == ["auto"]
        disk.write(100_000, b"x" * 1000)
        disk.flush()
    finally:
        disk.close()
    info = json.loads(run("qemu-img", "info", "--output=json", str(img)))
    assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
    assert_check_clean(img)
    qemu_io(img, "read -P 1 0 64k", "read -P 0x78 100000 1000")


def test_unknown_autoclear_bits_cleared_on_writable_open(tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", 1 * MiB)
    with open(img, "r+b") as f:
        f.seek(88)
        f.write((1 << 40).to_bytes(8, "big"))
    disk = open_disk(str(img), read_only=True)
    disk.close()
    assert int.from_bytes(img.read_bytes()[88:96], "big") == 1 << 40  # read-only: untouched
    disk = open_disk(str(img))
    try:
        assert any("auto-clear" in n for n in disk.top.info().notes)
    finally:
        disk.close()
    assert int.from_bytes(img.read_bytes()[88:96], "big") == 0
    assert_check_clean(img)


def test_extended_l2_with_data_file(tmp_path: Path) -> None:
    img = create(tmp_path / "x.qcow2", 3 * MiB, "extended_l2=on,data_file=x.bin")
    model = bytearray(3 * MiB)
    disk = open_disk(str(img))
    try:
        random_writes(disk, model, random.Random(9), 30)
        disk.write_zeroes(65536 + 2048, 4096, may_unmap=False)
        model[65536 + 2048 : 65536 + 2048 + 4096] = bytes(4096)
        disk.flush()
    finally:
        disk.close()
    assert_check_clean(img)
    assert_compare(img, bytes(model), tmp_path)


def test_reads_never_see_a_freed_cluster_reused(tmp_path: Path) -> None:
    # One thread keeps freeing guest cluster 0 and reusing host clusters for cluster 1;
    # readers of cluster 0 must see its old data or zeros, never cluster 1's.
    img = create(tmp_path / "r.qcow2", 1 * MiB, "cluster_size=4096")
    disk = open_disk(str(img), cache=CacheMode.UNSAFE)  # flushes without fdatasync: fast
    stop = threading.Event()
    bad: list[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            data = bytes(disk.read(0, 4096))
            if data not in (b"A" * 4096, bytes(4096)):
                bad.append(data[:16])

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for _ in range(200):
            disk.write(0, b"A" * 4096)
            disk.discard(0, 4096)
            disk.flush()
            disk.write(4096, b"B" * 4096)
            disk.discard(4096, 4096)
            disk.flush()
    finally:
        stop.set()
        for t in readers:
            t.join()
        disk.close()
    assert not bad
    assert_check_clean(img)


@pytest.mark.parametrize("cache", [CacheMode.NONE, CacheMode.WRITETHROUGH, CacheMode.DIRECTSYNC])
def test_writes_under_direct_and_writethrough_cache(tmp_path: Path, cache: CacheMode) -> None:
    img = create(tmp_path / "d.qcow2", 4 * MiB, "cluster_size=4096")
    model = bytearray(4 * MiB)
    disk = open_disk(str(img), cache=cache)
    try:
        random_writes(disk, model, random.Random(cache.value), 25)
        disk.discard(0, 1 * MiB)
        model[: 1 * MiB] = bytes(1 * MiB)
        disk.write_zeroes(2 * MiB + 100, 100_000, may_unmap=True)
        model[2 * MiB + 100 : 2 * MiB + 100_100] = bytes(100_000)
        assert bytes(disk.read(0, 4 * MiB)) == model
        disk.flush()
    finally:
        disk.close()
    assert_check_clean(img)
    assert_compare(img, bytes(model), tmp_path)


def test_allocating_writes_with_host_zeroed_padding(tmp_path: Path) -> None:
    """Partial-cluster allocating writes leave the padding to the host: at EOF (the file
    grows) and into free space below EOF that holds stale bytes (fallocate zeroes it)."""
    img = create(tmp_path / "z.qcow2", 8 * MiB, "cluster_size=65536")
    # Junk past the image's last cluster: free (refcount 0) space below the new EOF.
    with open(img, "ab") as f:
        f.seek(0, os.SEEK_END)
        pad = -f.tell() % (64 * KiB)
        f.write(b"\0" * pad + b"\xa5" * (6 * 64 * KiB))
    model = bytearray(8 * MiB)
    rng = random.Random(7)
    disk = open_disk(str(img), "qcow2")
    try:
        for _ in range(40):
            off = rng.randrange(8 * MiB - 70000)
            data = rng.randbytes(rng.choice([1, 511, 4096, 16384, 16385, 70000]))
            disk.write(off, data)
            model[off : off + len(data)] = data
            at = off - off % 65536
            assert disk.read(at, 65536) == model[at : at + 65536]
        disk.flush()
    finally:
        disk.close()
    assert_check_clean(img)
    assert_compare(img, bytes(model), tmp_path)


@pytest.mark.parametrize("unmap", [False, True])
def test_partial_write_into_zero_clusters(tmp_path: Path, unmap: bool) -> None:
    """A partial write into a zero-flagged cluster (with or without its host cluster kept):
    the rest of the new cluster reads as zeros, and the old host cluster is released."""
    img = create(tmp_path / "zc.qcow2", 4 * MiB, "cluster_size=65536")
    qemu_io(img, "write -P 0x5c 0 1M", "write -z " + ("-u " if unmap else "") + "0 1M")
    model = bytearray(4 * MiB)
    disk = open_disk(str(img), "qcow2")
    try:
        for off, n in ((100, 3000), (65536 + 4096, 16384), (3 * 65536 - 7, 14), (900000, 70000)):
            data = bytes([n & 0xFF or 1]) * n
            disk.write(off, data)
            model[off : off + n] = data
        assert disk.read(0, MiB) == model[:MiB]
        disk.flush()
    finally:
        disk.close()
    assert_check_clean(img)
    assert_compare(img, bytes(model), tmp_path)
