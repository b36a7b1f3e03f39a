"""imgfs.block.holes through the Disk API (no FUSE): zero detection, SEEK_DATA/SEEK_HOLE from
the chain's block status, fallocate modes, the discard mode, and the device models reaching the
same calls. qemu-img is the oracle for allocation and for the bytes."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
from contextlib import closing
from pathlib import Path

import pytest

from imgfs.block import holes
from imgfs.block.disk import Disk, open_disk
from imgfs.emulation.ata import AtaDisk
from imgfs.emulation.scsi import ScsiDisk
from imgfs.emulation.target import DiskTarget
from imgfs.emulation.virtio import VirtioBlk
from imgfs.errors import InvalidRequest, ReadOnly, Unsupported
from tests.oracle import (
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    qemu_check,
    qemu_img,
)

KiB = 1024
MiB = 1024 * KiB


def qemu_io(image: Path, *commands: str, fmt: str | None = None) -> None:
    args = ["qemu-io"] + (["-f", fmt] if fmt else [])
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True, timeout=120)


def data_runs(image: Path, fmt: str | None = None) -> list[tuple[int, int]]:
    """qemu-img map's data ranges (merged), as (start, end): what SEEK_DATA/SEEK_HOLE must find."""
    # -U: the test holds the image open through imgfs, which takes QEMU's image locks
    args = ["map", "-U", "--output=json"] + (["-f", fmt] if fmt else []) + [str(image)]
    runs: list[tuple[int, int]] = []
    for e in json.loads(qemu_img(*args).stdout):
        if e["data"] and not e["zero"]:
            start, end = e["start"], e["start"] + e["length"]
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((start, end))
    return runs


def allocated_bytes(image: Path, fmt: str | None = None) -> int:
    return sum(end - start for start, end in data_runs(image, fmt))


def allocated_clusters(image: Path) -> int:
    """qemu-img check's allocated-clusters of a qcow2 image (zero clusters that keep their
    space count; freed ones do not)."""
    status, report = qemu_check(image)
    assert status == 0, report
    return report["allocated-clusters"]


def seek_runs(disk: Disk) -> list[tuple[int, int]]:
    """Data runs found by alternating seek_data / seek_hole, as cp --sparse does."""
    runs, offset = [], 0
    while True:
        try:
            start = holes.seek_data(disk, offset)
        except OSError as e:
            assert e.errno == errno.ENXIO
            return runs
        end = holes.seek_hole(disk, start)
        assert end > start
        runs.append((start, end))
        offset = end


def scattered_qcow2(path: Path, size: int = 64 * MiB, backing: Path | None = None) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    qemu_img(*args, str(path), str(size))
    qemu_io(path, "write -P 0x11 1M 64k", "write -P 0x22 10M 200k", "write -z 20M 1M")
    return path


# -- zero detection --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 511, 4096, MiB, 3 * MiB + 7])
def test_is_zero(size: int) -> None:
    zeros = bytes(size)
    assert holes.is_zero(zeros)
    assert holes.is_zero(bytearray(size))
    assert holes.is_zero(memoryview(bytearray(size + 10))[5 : 5 + size])
    for pos in {0, size // 3, size // 2, size - 1}:
        data = bytearray(size)
        data[pos] = 1
        assert not holes.is_zero(data) and not holes.is_zero(bytes(data))
        assert not holes.is_zero(memoryview(data))
    assert not holes.is_zero(b"")


# -- SEEK_DATA / SEEK_HOLE --------------------------------------------------------------------


def test_seek_matches_qemu_map(tmp_path: Path) -> None:
    image = scattered_qcow2(tmp_path / "a.qcow2")
    with closing(open_disk(str(image))) as disk:
        assert (
            seek_runs(disk)
            == data_runs(image)
            == [(MiB, MiB + 64 * KiB), (10 * MiB, 10 * MiB + 256 * KiB)]
        )
        # inside a run and inside a hole; the end of the disk is a hole
        assert holes.seek_data(disk, MiB + 5) == MiB + 5
        assert holes.seek_hole(disk, MiB + 5) == MiB + 64 * KiB
        assert holes.seek_data(disk, 2 * MiB) == 10 * MiB
        assert holes.seek_hole(disk, 30 * MiB) == 30 * MiB
        for find in (holes.seek_data, holes.seek_hole):
            with pytest.raises(OSError) as e:
                find(disk, disk.size)
            assert e.value.errno == errno.ENXIO


def test_seek_through_backing_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(64 * MiB))
    qemu_io(base, "write -P 0x33 30M 128k", "write -P 0x44 1M 64k")
    top = scattered_qcow2(tmp_path / "top.qcow2", backing=base)
    with closing(open_disk(str(top))) as disk:
        assert seek_runs(disk) == data_runs(top)
        assert (30 * MiB, 30 * MiB + 128 * KiB) in seek_runs(disk)


def test_seek_cached_answers_match_walks(tmp_path: Path) -> None:
    image = scattered_qcow2(tmp_path / "a.qcow2")
    with closing(open_disk(str(image))) as disk:
        assert holes.seek_cached(disk, 0, os.SEEK_DATA) is None  # nothing learnt yet
        runs = seek_runs(disk)
        for offset in (0, MiB - 1, MiB, MiB + 5, 2 * MiB, 10 * MiB + 3, 11 * MiB, 63 * MiB):
            for whence, find in ((os.SEEK_DATA, holes.seek_data), (os.SEEK_HOLE, holes.seek_hole)):
                try:
                    want: int | str = find(disk, offset)
                except OSError as e:
                    want = errno.errorcode[e.errno]
                try:
                    got = holes.seek_cached(disk, offset, whence)
                except OSError as e:
                    got = errno.errorcode[e.errno]
                assert got is None or got == want, (offset, whence, got, want)
        assert holes.seek_cached(disk, MiB + 5, os.SEEK_HOLE) == runs[0][1]
        disk.write(0, b"x")  # any write forgets what was learnt
        assert holes.seek_cached(disk, MiB + 5, os.SEEK_HOLE) is None


def test_seek_cache_follows_writes(tmp_path: Path) -> None:
    image = scattered_qcow2(tmp_path / "a.qcow2")
    with closing(open_disk(str(image))) as disk:
        assert holes.seek_data(disk, 2 * MiB) == 10 * MiB  # caches the hole 1.06M..10M
        disk.write(5 * MiB, b"\x55" * 4096)
        assert holes.seek_data(disk, 2 * MiB) == 5 * MiB
        disk.write_zeroes(5 * MiB, 64 * KiB, may_unmap=True)
        assert holes.seek_data(disk, 2 * MiB) == 10 * MiB


def test_seek_raw_image(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(4 * MiB)
        f.write(b"x" * MiB)
    with closing(open_disk(str(image), "raw")) as disk:
        assert seek_runs(disk) == data_runs(image, "raw") == [(4 * MiB, 5 * MiB)]


# -- fallocate ---------------------------------------------------------------------------------

PUNCH = holes.FALLOC_FL_PUNCH_HOLE | holes.FALLOC_FL_KEEP_SIZE
ZERO = holes.FALLOC_FL_ZERO_RANGE


def test_fallocate_punch_and_zero_qcow2(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), str(16 * MiB))
    qemu_io(image, "write -P 0x5a 0 8M")
    expected = bytearray(b"\x5a" * 8 * MiB + bytes(8 * MiB))
    with closing(open_disk(str(image))) as disk:
        holes.fallocate(disk, PUNCH, MiB, 2 * MiB)  # whole clusters: freed
        holes.fallocate(disk, PUNCH, 5 * MiB + 100, 1000)  # inside one cluster: zeroed
        holes.fallocate(disk, ZERO, 6 * MiB + 3, 70000)  # unaligned zero range
        holes.fallocate(disk, PUNCH, 15 * MiB, 4 * MiB)  # past the end: cut at it
        holes.fallocate(disk, 0, 0, 16 * MiB)  # preallocate inside: nothing to do
        holes.fallocate(disk, holes.FALLOC_FL_KEEP_SIZE, 0, 64 * MiB)
        assert disk.size == 16 * MiB
    expected[MiB : 3 * MiB] = bytes(2 * MiB)
    expected[5 * MiB + 100 : 5 * MiB + 1100] = bytes(1000)
    expected[6 * MiB + 3 : 6 * MiB + 70003] = bytes(70000)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw")
    assert allocated_bytes(image) <= 6 * MiB  # the 2 MiB punched were freed


def test_fallocate_refusals(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), str(MiB))
    with closing(open_disk(str(image))) as disk:
        with pytest.raises(Unsupported, match="grow"):
            holes.fallocate(disk, 0, 0, 2 * MiB)
        with pytest.raises(Unsupported, match="grow"):
            holes.fallocate(disk, ZERO, MiB - 10, 20)
        for mode in (0x08, 0x20, 0x40):  # collapse, insert, unshare
            with pytest.raises(Unsupported, match="mode"):
                holes.fallocate(disk, mode, 0, 4096)
        with pytest.raises(OSError) as e:
            holes.fallocate(disk, holes.FALLOC_FL_PUNCH_HOLE, 0, 4096)
        assert e.value.errno == errno.EOPNOTSUPP
    with closing(open_disk(str(image), read_only=True)) as disk, pytest.raises(ReadOnly):
        holes.fallocate(disk, PUNCH, 0, 4096)


# -- detect-zeroes and discard modes ------------------------------------------------------------


@pytest.mark.parametrize("mode", list(holes.DetectZeroes))
def test_detect_zeroes(tmp_path: Path, mode: holes.DetectZeroes) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), str(16 * MiB))
    qemu_io(image, "write -P 0x77 8M 1M")
    with closing(open_disk(str(image))) as disk:
        disk.detect_zeroes = mode
        disk.write(0, bytes(2 * MiB))  # unallocated: must stay unallocated unless off
        disk.write(8 * MiB, bytes(512 * KiB))  # over data
        disk.write(12 * MiB + 5, b"\0" * 100 + b"\x01")  # not all zero: data
    expected = bytearray(16 * MiB)
    expected[8 * MiB + 512 * KiB : 9 * MiB] = b"\x77" * (512 * KiB)
    expected[12 * MiB + 105] = 1
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw")
    clusters = allocated_clusters(image)  # 64 KiB each; 16 before, +1 for the non-zero write
    if mode is holes.DetectZeroes.OFF:
        assert clusters == 16 + 32 + 1  # the zeros were written as data
    elif mode is holes.DetectZeroes.ON:
        assert clusters == 16 + 1  # nothing new allocated; the zeroed half stays allocated
    else:
        assert clusters == 8 + 1  # the zeroed half was freed


def test_discard_ignore_still_zeroes(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"\x66" * 4 * MiB)
    with closing(open_disk(str(image), "raw")) as disk:
        disk.discard_mode = holes.DiscardMode.IGNORE
        holes.fallocate(disk, PUNCH, MiB, MiB)
        disk.discard(0, MiB)  # ignored: the data stays
    assert image.read_bytes() == b"\x66" * MiB + bytes(MiB) + b"\x66" * 2 * MiB
    assert os.stat(image).st_blocks * 512 >= 4 * MiB  # nothing was deallocated


def test_mount_policy() -> None:
    opts = {"detect-zeroes": "unmap", "discard": "unmap", "l2-cache-size": "1M"}
    policy = holes.mount_policy(None, None, None, opts)
    assert policy == (holes.DetectZeroes.UNMAP, holes.DiscardMode.UNMAP, True)
    assert opts == {"l2-cache-size": "1M"}
    assert holes.mount_policy("on", "off", False, {"seek-holes": "on"}) == (
        holes.DetectZeroes.ON,
        holes.DiscardMode.IGNORE,
        False,
    )
    assert holes.mount_policy(None, None, None, {"seek-holes": "off"})[2] is False
    with pytest.raises(InvalidRequest, match="needs discard=unmap"):
        holes.mount_policy("unmap", "ignore", None, {})
    for bad in ({"detect-zeroes": "yes"}, {"discard": "maybe"}, {"seek-holes": "1"}):
        with pytest.raises(InvalidRequest):
            holes.mount_policy(None, None, None, bad)


# -- the device models reach the same calls on a Disk -------------------------------------------


def _qcow2_with_data(tmp_path: Path) -> tuple[Path, Disk]:
    image = tmp_path / "dev.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), str(16 * MiB))
    qemu_io(image, "write -P 0x42 0 4M")
    return image, open_disk(str(image))


def _after_device(tmp_path: Path, image: Path, freed: tuple[int, int]) -> None:
    expected = bytearray(b"\x42" * 4 * MiB + bytes(12 * MiB))
    expected[freed[0] : freed[0] + freed[1]] = bytes(freed[1])
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw")
    assert allocated_bytes(image) == 4 * MiB - freed[1]


def test_scsi_unmap_frees_qcow2_clusters(tmp_path: Path) -> None:
    image, disk = _qcow2_with_data(tmp_path)
    with closing(disk):
        dev = ScsiDisk(DiskTarget(disk))
        descs = struct.pack(">QI4x", MiB // 512, MiB // 512)
        params = struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs
        done = dev.submit(struct.pack(">BB4xBHB", 0x42, 0, 0, len(params), 0), params)
        assert done.ok and done.kind == "discard"
    _after_device(tmp_path, image, (MiB, MiB))


def test_ata_trim_frees_qcow2_clusters(tmp_path: Path) -> None:
    from tests.emulation.test_ata import fis, trim_payload

    image, disk = _qcow2_with_data(tmp_path)
    with closing(disk):
        dev = AtaDisk(DiskTarget(disk))
        done = dev.submit(fis(0x06, 0, 1, features=1), trim_payload([(2 * MiB // 512, 2048)]))
        assert done.ok and done.kind == "discard"
    _after_device(tmp_path, image, (2 * MiB, MiB))


def test_virtio_discard_and_write_zeroes_free_qcow2_clusters(tmp_path: Path) -> None:
    image, disk = _qcow2_with_data(tmp_path)
    with closing(disk):
        dev = VirtioBlk(DiskTarget(disk))
        seg = struct.pack("<QII", 0, MiB // 512, 0)
        done = dev.submit(struct.pack("<IIQ", 11, 0, 0), seg)  # DISCARD
        assert done.ok and done.kind == "discard"
        seg = struct.pack("<QII", MiB // 512, MiB // 512, 1)  # WRITE_ZEROES with UNMAP
        done = dev.submit(struct.pack("<IIQ", 13, 0, 0), seg)
        assert done.ok and done.kind == "write_zeroes"
    _after_device(tmp_path, image, (0, 2 * MiB))
