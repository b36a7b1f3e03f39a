"""cloop: images made by create_compressed_fs, read against qemu-img and extract_compressed_fs."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.block.hostfile import CacheMode, WouldBlock, call_nowait
from imgfs.errors import CorruptImage, ImgfsError, InvalidRequest, ReadOnly, Unsupported
from imgfs.formats.cloop import CloopDriver
from tests.conftest import SHARED
from tests.oracle import assert_export_matches_qemu, qemu_info, qemu_raw

KiB = 1024
MiB = 1024 * KiB
CORPUS = SHARED / "corpus" / "cloop"
PREAMBLE = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
    b"exit $?\n"
)


def mixed_data(size: int, seed: int) -> bytes:
    """Random, repetitive and zero stretches, so blocks compress to very different sizes."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(3)
        n = rng.randrange(1, 200 * KiB)
        if kind == 0:
            out += rng.randbytes(n)
        elif kind == 1:
            out += (f"seed {seed} at {len(out)} ".encode() * (n // 20 + 1))[:n]
        else:
            out += bytes(n)
    return bytes(out[:size])


def make_cloop(tmp: Path, name: str, data: bytes, *args: str) -> Path:
    src = tmp / f"{name}.src"
    src.write_bytes(data)
    out = tmp / name
    subprocess.run(
        ["create_compressed_fs", "-q", *args, str(src), str(out)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    src.unlink()
    return out


def hand_cloop(path: Path, block_size: int, blocks: list[bytes], preamble: bytes = PREAMBLE):
    """A v2 cloop assembled from the layout, for malformed variants."""
    head = preamble.ljust(128, b"\0") + struct.pack(">II", block_size, len(blocks))
    offset = len(head) + 8 * (len(blocks) + 1)
    table, body = [], bytearray()
    for b in blocks:
        table.append(offset + len(body))
        body += zlib.compress(b)
    table.append(offset + len(body))
    path.write_bytes(head + b"".join(struct.pack(">Q", o) for o in table) + body)


def read_all(path: Path, fmt: str | None = "cloop") -> bytes:
    disk = open_disk(str(path), fmt, read_only=True)
    try:
        return bytes(disk.read(0, disk.size))
    finally:
        disk.close()


# create_compressed_fs takes block sizes from 512 to 1 MiB; it rounds 3000 down to 2560.
@pytest.mark.parametrize("block_size", [512, 3000, 4096, 65536, MiB])
def test_create_compressed_fs_block_sizes_match_qemu_and_extract(
    tmp_path: Path, block_size: int
) -> None:
    data = mixed_data(1 * MiB + 12345, seed=block_size)
    image = make_cloop(tmp_path, "disk.cloop", data, "-B", str(block_size))
    exported = read_all(image, None)  # probed
    assert exported[: len(data)] == data
    assert not any(exported[len(data) :])
    reference = qemu_raw(image, tmp_path / "qemu.raw")
    assert exported == reference.read_bytes()
    extracted = tmp_path / "extract.raw"
    result = subprocess.run(
        ["extract_compressed_fs", str(image), str(extracted)], capture_output=True, timeout=60
    )
    # extract_compressed_fs 3.14 dies with SIGFPE on 1 MiB blocks; qemu-img is the oracle there.
    if block_size < MiB:
        assert result.returncode == 0, result.stderr
        assert exported == extracted.read_bytes()
    assert qemu_info(image)["virtual-size"] == len(exported)


@pytest.mark.parametrize("cache", [CacheMode.WRITEBACK, CacheMode.NONE])
def test_reads_at_odd_offsets_across_blocks(tmp_path: Path, cache: CacheMode) -> None:
    data = mixed_data(600 * KiB, seed=7)
    image = make_cloop(tmp_path, "disk.cloop", data, "-B", "4096")
    disk = open_disk(str(image), "cloop", cache=cache)  # opens read-only by itself
    try:
        assert disk.read_only
        rng = random.Random(1)
        for _ in range(300):
            off = rng.randrange(len(data))
            n = rng.randrange(1, 40 * KiB)
            assert bytes(disk.read(off, n)) == data[off : off + n]
        with pytest.raises(ReadOnly):
            disk.write(0, b"x")
    finally:
        disk.close()


def test_compression_levels_and_best_of(tmp_path: Path) -> None:
    data = mixed_data(300 * KiB, seed=3)
    for args in (["-L", "0"], ["-L", "1"], ["-L", "-1"], ["-b"]):
        image = make_cloop(tmp_path, "disk.cloop", data, "-B", "8192", *args)
        assert read_all(image)[: len(data)] == data, args
        assert read_all(image) == qemu_raw(image, tmp_path / "q.raw").read_bytes()


def test_block_cache_is_bounded(tmp_path: Path) -> None:
    data = mixed_data(2 * MiB, seed=9)
    image = make_cloop(tmp_path, "disk.cloop", data, "-B", "65536")
    disk = open_disk(
        str(image), "cloop", read_only=True, driver_options={"block-cache-size": "262144"}
    )
    try:
        assert bytes(disk.read(0, len(data))) == data
        driver = disk.top
        assert isinstance(driver, CloopDriver)
        assert driver._cache.cached_bytes <= 262144
    finally:
        disk.close()


def wait_idle(driver: CloopDriver) -> None:
    """Until the decode pool has finished this image's queued work."""
    deadline = time.monotonic() + 30
    while driver._work and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not driver._work


def test_sequential_reads_inflate_ahead(tmp_path: Path) -> None:
    data = mixed_data(3 * MiB, seed=21)
    image = make_cloop(tmp_path, "disk.cloop", data, "-B", "65536")
    disk = open_disk(str(image), "cloop", read_only=True, driver_options={"read-ahead": "512K"})
    try:
        driver = disk.top
        assert isinstance(driver, CloopDriver)
        assert bytes(disk.read(0, 100 * KiB)) == data[: 100 * KiB]  # blocks 0-1
        assert bytes(disk.read(100 * KiB, 100 * KiB)) == data[100 * KiB : 200 * KiB]  # 1-3
        wait_idle(driver)
        # The second read continued the first: the 8 blocks after block 3 were inflated ahead.
        assert all(i in driver._cache for i in range(4, 12))
        assert 12 not in driver._cache
        misses = driver._cache.misses
        assert bytes(disk.read(256 * KiB, 512 * KiB)) == data[256 * KiB : 768 * KiB]
        assert driver._cache.misses == misses  # served from what was read ahead
        # A read elsewhere is not sequential: nothing more is inflated ahead.
        wait_idle(driver)
        assert bytes(disk.read(2 * MiB, 10)) == data[2 * MiB : 2 * MiB + 10]
        wait_idle(driver)
        assert 33 not in driver._cache
        assert bytes(disk.read(0, len(data))) == data
    finally:
        disk.close()


@pytest.mark.parametrize("opts", [{}, {"read-ahead": "0"}, {"inline-decode": "1M"}])
def test_parallel_readers_with_read_ahead(tmp_path: Path, opts) -> None:
    data = mixed_data(2 * MiB, seed=22)
    image = make_cloop(tmp_path, "disk.cloop", data, "-B", "16384")
    disk = open_disk(
        str(image), "cloop", read_only=True, driver_options={"block-cache-size": "256K", **opts}
    )
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        pos = rng.randrange(len(data))
        for _ in range(60):
            if rng.random() < 0.3:
                pos = rng.randrange(len(data))
            n = rng.randrange(1, 300 * KiB)
            # As the FUSE layer reads: inline first, on "WouldBlock" again where it may wait.
            try:
                got = bytes(call_nowait(disk.read, pos, n)) if seed % 2 else b""
            except WouldBlock:
                got = b""
            if not got:
                got = bytes(disk.read(pos, n))
            if got != data[pos : pos + n]:
                errors.append(f"read {pos}+{n}")
            pos = (pos + n) % len(data)

    try:
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        driver = disk.top
        assert isinstance(driver, CloopDriver)
        wait_idle(driver)
        assert driver._cache.cached_bytes <= 256 * KiB
    finally:
        disk.close()


def test_close_waits_for_inflates_in_flight(tmp_path: Path) -> None:
    data = mixed_data(4 * MiB, seed=23)
    image = make_cloop(tmp_path, "disk.cloop", data, "-B", "4096")
    for _ in range(3):
        disk = open_disk(str(image), "cloop", read_only=True, driver_options={"read-ahead": "2M"})
        driver = disk.top
        assert isinstance(driver, CloopDriver)
        disk.read(0, 4096)
        disk.read(4096, 4096)  # sequential: queues 512 blocks of read-ahead
        in_flight = list(driver._work)
        assert in_flight
        disk.close()
        assert all(f.done() for f in in_flight)
        assert not driver._work
        # Work queued after close is refused, not run against the closed file.
        driver._read_ahead(100)
        assert not driver._work


def test_read_ahead_of_a_corrupt_block_leaves_the_error_to_its_reader(tmp_path: Path) -> None:
    image = tmp_path / "bad.cloop"
    hand_cloop(image, 4096, [bytes([i]) * 4096 for i in range(6)])
    offset_of_block_4 = struct.unpack_from(">Q", image.read_bytes(), 136 + 8 * 4)[0]
    patch(image, offset_of_block_4 + 2, b"\xff" * 6)
    disk = open_disk(str(image), "cloop", read_only=True)
    try:
        driver = disk.top
        assert isinstance(driver, CloopDriver)
        assert bytes(disk.read(0, 4096)) == bytes(4096)
        assert bytes(disk.read(4096, 4096)) == b"\1" * 4096  # read-ahead meets block 4
        wait_idle(driver)
        assert 4 not in driver._cache
        assert bytes(disk.read(5 * 4096, 4096)) == b"\5" * 4096
        with pytest.raises(CorruptImage, match="block 4"):
            disk.read(3 * 4096, 2 * 4096)
    finally:
        disk.close()


def test_nowait_reads_serve_cached_blocks_and_refuse_to_inflate_much(tmp_path: Path) -> None:
    data = mixed_data(1 * MiB, seed=24)
    image = make_cloop(tmp_path, "disk.cloop", data, "-B", "65536")
    disk = open_disk(str(image), "cloop", read_only=True, driver_options={"read-ahead": "0"})
    try:
        assert not disk.reads_may_block  # the FUSE layer tries reads inline first
        driver = disk.top
        assert isinstance(driver, CloopDriver)
        # Two missing blocks: refused, and nothing was inflated or cached.
        with pytest.raises(WouldBlock):
            call_nowait(disk.read, 60 * KiB, 10 * KiB)
        assert driver._cache.misses == 0
        # One missing block of 64 KiB (the inline-decode limit) is inflated inline.
        assert bytes(call_nowait(disk.read, 10, 1000)) == data[10:1010]
        assert bytes(disk.read(0, 256 * KiB)) == data[: 256 * KiB]  # blocks 0-3, blocking
        misses = driver._cache.misses
        assert bytes(call_nowait(disk.read, 5, 200 * KiB)) == data[5 : 5 + 200 * KiB]
        assert driver._cache.misses == misses  # all cached: no inflate
    finally:
        disk.close()
    disk = open_disk(str(image), "cloop", read_only=True, driver_options={"inline-decode": "0"})
    try:
        with pytest.raises(WouldBlock):
            call_nowait(disk.read, 0, 10)
        assert bytes(disk.read(0, 10)) == data[:10]
        assert bytes(call_nowait(disk.read, 0, 10)) == data[:10]
    finally:
        disk.close()
    disk = open_disk(str(image), "cloop", read_only=True, driver_options={"inline-reads": "off"})
    try:
        assert disk.reads_may_block  # every read goes to a worker thread
    finally:
        disk.close()


@pytest.mark.parametrize(
    "key, value",
    [("inline-reads", "maybe"), ("inline-reads", "2"), ("read-ahead", "-1"), ("read-ahead", "x")],
)
def test_bad_option_values_are_refused(tmp_path: Path, key: str, value: str) -> None:
    image = tmp_path / "h.cloop"
    hand_cloop(image, 4096, [bytes(4096)])
    with pytest.raises(InvalidRequest) as e:
        open_disk(str(image), "cloop", read_only=True, driver_options={key: value})
    assert value in str(e.value)


def test_corpus_simple_pattern(tmp_path: Path) -> None:
    image = CORPUS / "qemu-iotests" / "simple-pattern.cloop"
    exported = tmp_path / "exported.raw"
    exported.write_bytes(read_all(image, None))
    assert_export_matches_qemu(image, exported, tmp_path)
    manifest = (SHARED / "corpus" / "MANIFEST.tsv").read_text().splitlines()
    row = next(r.split("\t") for r in manifest if r.startswith("cloop/qemu-iotests/"))
    assert hashlib.sha256(exported.read_bytes()).hexdigest() == row[6]


def test_fuse_export_is_right_and_read_only(images: Path, mount, tmp_path: Path) -> None:
    data = mixed_data(1 * MiB, seed=11)
    image = make_cloop(images, "disk.cloop", data, "-B", "16384")
    shutil.copy(CORPUS / "qemu-iotests" / "simple-pattern.cloop", images / "pattern.cloop")
    m = mount(images)
    assert sorted(os.listdir(m.path)) == ["disk.cloop.raw", "pattern.cloop.raw"]
    assert_export_matches_qemu(image, m.file("disk.cloop"), tmp_path)
    assert_export_matches_qemu(images / "pattern.cloop", m.file("pattern.cloop"), tmp_path)
    st = os.stat(m.file("disk.cloop"))
    assert st.st_mode & 0o222 == 0
    with pytest.raises(OSError) as e:
        os.open(m.file("disk.cloop"), os.O_WRONLY)
    assert e.value.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
    with open(m.file("disk.cloop"), "rb") as f:
        f.seek(123457)
        assert f.read(70000) == data[123457 : 123457 + 70000]
    m.umount()


# -- malformed images -----------------------------------------------------------------------


def test_hand_assembled_image_reads_back(tmp_path: Path) -> None:
    # A hand-assembled image reads back what went in (the builder below is right).
    blocks = [bytes([i]) * 4096 for i in range(5)]
    hand_cloop(tmp_path / "h.cloop", 4096, blocks)
    assert read_all(tmp_path / "h.cloop") == b"".join(blocks)
    reference = qemu_raw(tmp_path / "h.cloop", tmp_path / "q")
    assert read_all(tmp_path / "h.cloop") == reference.read_bytes()


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "name, mutate, error",
    [
        ("truncated", lambda p: os.truncate(p, 100), CorruptImage),
        ("truncated-table", lambda p: os.truncate(p, 150), CorruptImage),
        ("version-3", lambda p: patch(p, 12, b"3.0"), Unsupported),
        ("block-size-0", lambda p: patch(p, 128, struct.pack(">I", 0)), CorruptImage),
        ("block-size-1000", lambda p: patch(p, 128, struct.pack(">I", 1000)), CorruptImage),
        ("block-size-huge", lambda p: patch(p, 128, struct.pack(">I", 1 << 31)), CorruptImage),
        ("count-huge", lambda p: patch(p, 132, struct.pack(">I", 0xFFFFFFFF)), Unsupported),
        ("count-past-eof", lambda p: patch(p, 132, struct.pack(">I", 100000)), CorruptImage),
        ("offset-in-header", lambda p: patch(p, 136, struct.pack(">Q", 10)), CorruptImage),
        ("not-monotonic", lambda p: patch(p, 144, struct.pack(">Q", 100)), CorruptImage),
        ("past-eof", lambda p: patch(p, 136 + 8 * 5, struct.pack(">Q", 1 << 40)), CorruptImage),
        ("block-too-big", lambda p: patch(p, 144, struct.pack(">Q", 1 << 30)), CorruptImage),
    ],
)
def test_malformed_headers(tmp_path: Path, name: str, mutate, error: type[ImgfsError]) -> None:
    image = tmp_path / "bad.cloop"
    hand_cloop(image, 4096, [os.urandom(4096) for _ in range(5)])
    mutate(image)
    with pytest.raises(error) as e:
        open_disk(str(image), "cloop", read_only=True)
    assert "\n" not in str(e.value)


def test_garbage_block_is_corrupt_on_read(tmp_path: Path) -> None:
    image = tmp_path / "bad.cloop"
    hand_cloop(image, 4096, [bytes(4096), b"y" * 4096, bytes(4096)])
    patch(image, 136 + 8 * 4 + len(zlib.compress(bytes(4096))) + 2, b"\xff" * 4)
    disk = open_disk(str(image), "cloop", read_only=True)
    try:
        assert bytes(disk.read(0, 4096)) == bytes(4096)
        with pytest.raises(CorruptImage):
            disk.read(4096, 4096)
    finally:
        disk.close()


def test_short_block_is_corrupt_on_read(tmp_path: Path) -> None:
    image = tmp_path / "short.cloop"
    hand_cloop(image, 4096, [bytes(4096), b"z" * 1000])
    disk = open_disk(str(image), "cloop", read_only=True)
    try:
        with pytest.raises(CorruptImage, match="block 1"):
            disk.read(4096, 10)
    finally:
        disk.close()


def test_block_inflating_past_its_size_is_corrupt_with_bounded_output(tmp_path: Path) -> None:
    image = tmp_path / "bomb.cloop"
    hand_cloop(image, 4096, [bytes(4096), bytes(4096)])
    bomb = zlib.compress(bytes(1 * MiB), 9)  # ~1 KiB that would inflate to 1 MiB
    head = image.read_bytes()[: 136 + 8 * 3]
    body = zlib.compress(bytes(4096)) + bomb
    first = 136 + 8 * 3
    table = struct.pack(">QQQ", first, first + len(zlib.compress(bytes(4096))), first + len(body))
    image.write_bytes(head[:136] + table + body)
    disk = open_disk(str(image), "cloop", read_only=True, driver_options={})
    try:
        assert bytes(disk.read(0, 4096)) == bytes(4096)
        with pytest.raises(CorruptImage, match="block 1 inflates to more than"):
            disk.read(4096, 4096)
    finally:
        disk.close()
