"""Holes through a real mount: fallocate (punch hole, zero range, preallocate) and lseek
(SEEK_DATA/SEEK_HOLE) on the exported files, zero detection, the discard mode. These need the
pyfuse3 that ``make venv`` builds with third_party/pyfuse3's patch.

The oracle: ``qemu-img map -f raw`` of the exported file must find the same data runs as
``qemu-img map`` of the image (the raw view only knows data and holes, so zero clusters and
unallocated ranges both count as holes); after punching/zeroing, ``qemu-img check`` is clean,
``qemu-img compare`` matches the expected bytes and the image's allocation went down.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
from pathlib import Path

import pyfuse3
import pytest

from tests.mountutil import run_imgfs
from tests.oracle import (
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    assert_same_bytes,
    qemu_check,
    qemu_img,
    qemu_raw,
)

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB

# Outside CI, a venv made before the patch existed skips these; CI (make venv) must have it.
pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3.Operations, "lseek") and not os.environ.get("CI"),
    reason="this pyfuse3 lacks the fallocate/lseek patch: rebuild the venv with make venv",
)

# (image name, qemu-img create -f, create options); "-b" gets a backing image. The formats
# beyond raw and qcow2 are in the slow tier (-m slow).
SLOW = pytest.mark.slow
FORMATS = [
    pytest.param("disk.img", "raw", [], id="raw"),
    pytest.param("disk.qcow2", "qcow2", [], id="qcow2"),
    pytest.param("top.qcow2", "qcow2", ["-b", "base.qcow2", "-F", "qcow2"], id="qcow2-backing"),
    pytest.param("disk.vmdk", "vmdk", [], id="vmdk", marks=SLOW),
    pytest.param("zg.vmdk", "vmdk", ["-o", "zeroed_grain=on"], id="vmdk-zeroed-grain", marks=SLOW),
    pytest.param("disk.vhdx", "vhdx", [], id="vhdx", marks=SLOW),
    pytest.param("disk.vhd", "vpc", ["-o", "subformat=dynamic"], id="vpc", marks=SLOW),
    pytest.param("disk.qed", "qed", [], id="qed", marks=SLOW),
]
# qemu 7.2's vhdx driver has no block status: qemu-img map calls the whole disk data.
QEMU_ALL_DATA = {"vhdx"}
# monolithicSparse without zeroed grains can neither free a grain nor mark it zero: the
# punched range is written with zeros in place
CANNOT_FREE = {"disk.vmdk"}


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True, timeout=120)


def make_image(images: Path, name: str, fmt: str, options: list[str]) -> Path:
    if "-b" in options:
        base = images / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
        qemu_io(base, "qcow2", "write -P 0x33 30M 4M", "write -P 0x44 2M 2M")
    image = images / name
    qemu_img("create", "-q", "-f", fmt, *options, str(image), str(SIZE))
    return image


def data_runs(path: Path, fmt: str) -> list[tuple[int, int]]:
    """Merged (start, end) runs that qemu-img map calls data (and not known zeros)."""
    entries = json.loads(qemu_img("map", "--output=json", "-f", fmt, str(path)).stdout)
    runs: list[tuple[int, int]] = []
    for e in entries:
        if e["data"] and not e["zero"]:
            start, end = e["start"], e["start"] + e["length"]
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((start, end))
    return runs


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(path: Path, mode: int, offset: int, length: int) -> int:
    """fallocate(2) on ``path``; 0 or the errno."""
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, mode, offset, length) == 0:
            return 0
        return ctypes.get_errno()
    finally:
        os.close(fd)


@pytest.mark.parametrize(("name", "fmt", "options"), FORMATS)
def test_map_of_exported_file_matches_image(images: Path, mount, tmp_path, name, fmt, options):
    image = make_image(images, name, fmt, options)
    qemu_io(image, fmt, "write -P 0x11 8M 64k", "write -P 0x22 20M 2M", "write -P 0x55 60M 4M")
    written = [(8 * MiB, 8 * MiB + 64 * KiB), (20 * MiB, 22 * MiB), (60 * MiB, 64 * MiB)]
    expected = data_runs(image, fmt)
    m = mount(images)
    exported = m.file(name)
    found = data_runs(exported, "raw")
    if fmt in QEMU_ALL_DATA:
        # qemu cannot tell; imgfs must still find every written range and some holes
        assert all(any(s <= ws and we <= e for s, e in found) for ws, we in written), found
        assert sum(e - s for s, e in found) < SIZE
        expected = found
    assert found == expected
    # SEEK_DATA / SEEK_HOLE directly, as cp and tar use them
    with open(exported, "rb") as f:
        fd = f.fileno()
        assert os.lseek(fd, 0, os.SEEK_DATA) == expected[0][0]
        assert os.lseek(fd, expected[0][0], os.SEEK_HOLE) == expected[0][1]
        with pytest.raises(OSError) as e:
            os.lseek(fd, SIZE, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    m.umount()


def test_cp_sparse_copy_is_sparse_and_equal(images: Path, mount, tmp_path: Path) -> None:
    image = make_image(images, "disk.qcow2", "qcow2", [])
    qemu_io(image, "qcow2", "write -P 0x11 1M 64k", "write -P 0x22 40M 1M")
    m = mount(images)
    copy = tmp_path / "copy.raw"
    subprocess.run(["cp", "--sparse=always", str(m.file("disk.qcow2")), str(copy)], check=True)
    m.umount()
    assert_same_bytes(copy, qemu_raw(image, tmp_path / "ref.raw"))
    assert os.stat(copy).st_blocks * 512 <= 2 * MiB  # the holes stayed holes


def allocation(image: Path, fmt: str) -> tuple[int, int]:
    """(bytes qemu-img map calls data, bytes the host file system has allocated)."""
    return sum(e - s for s, e in data_runs(image, fmt)), os.stat(image).st_blocks * 512


# (offset, length, fallocate flags): whole blocks of every format (vhdx's are 8 MiB here),
# partial clusters, unaligned zero ranges, a punch over data, a hole and the backing image
PUNCHES = [
    (8 * MiB, 16 * MiB, ["-p"]),
    (MiB + 100, 1000, ["-p"]),
    (25 * MiB + 3, 70000, ["-z"]),
    (26 * MiB, MiB, ["-z", "-n"]),
    (30 * MiB, 8 * MiB, ["-p"]),
]


@pytest.mark.parametrize(("name", "fmt", "options"), FORMATS)
def test_punch_hole_and_zero_range(images: Path, mount, tmp_path, name, fmt, options):
    image = make_image(images, name, fmt, options)
    qemu_io(image, fmt, "write -P 0x5a 0 32M")
    before = allocation(image, fmt)
    m = mount(images)
    exported = m.file(name)
    size = os.stat(exported).st_size  # vpc rounds the size to its geometry
    for offset, length, flags in PUNCHES:
        cmd = ["fallocate", *flags, "-o", str(offset), "-l", str(length), str(exported)]
        subprocess.run(cmd, check=True, timeout=60)
    assert os.stat(exported).st_size == size
    m.umount()
    expected = bytearray(size)
    if "-b" in options:
        expected[30 * MiB : 34 * MiB] = b"\x33" * 4 * MiB
        expected[2 * MiB : 4 * MiB] = b"\x44" * 2 * MiB
    expected[0 : 32 * MiB] = b"\x5a" * 32 * MiB
    for offset, length, _ in PUNCHES:
        expected[offset : offset + length] = bytes(length)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, fmt)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", fmt)
    after = allocation(image, fmt)
    assert after[0] <= before[0] and after[1] <= before[1], f"{fmt}: grew {before} -> {after}"
    if name not in CANNOT_FREE:
        assert after != before, f"{fmt}: {before} -> {after}: the punched range was not freed"


def test_fallocate_modes_and_refusals(images: Path, mount) -> None:
    image = make_image(images, "disk.qcow2", "qcow2", [])
    qemu_io(image, "qcow2", "write -P 0x5a 0 1M")
    m = mount(images)
    exported = m.file("disk.qcow2")
    assert fallocate(exported, 0, 0, SIZE) == 0  # preallocate inside: a no-op
    assert fallocate(exported, 0x01, 0, 2 * SIZE) == 0  # KEEP_SIZE past the end: a no-op
    assert fallocate(exported, 0, SIZE - 10, 20) == errno.EOPNOTSUPP  # would grow the disk
    assert fallocate(exported, 0x08, 0, MiB) == errno.EOPNOTSUPP  # collapse range
    assert fallocate(exported, 0x03, SIZE - 4096, 8192) == 0  # punch past the end: cut
    assert os.stat(exported).st_size == SIZE
    with open(exported, "rb") as f:
        assert f.read(MiB) == b"\x5a" * MiB
    m.umount()
    ro = mount(images, "--read-only")
    with pytest.raises(OSError) as e:
        fallocate(ro.file("disk.qcow2"), 0x03, 0, 4096)
    assert e.value.errno == errno.EROFS
    ro.umount()


def allocated_clusters(image: Path) -> int:
    status, report = qemu_check(image, "qcow2")
    assert status == 0, report
    return report["allocated-clusters"]


@pytest.mark.parametrize("mode", ["off", "on", "unmap"])
def test_detect_zeroes(images: Path, mount, tmp_path: Path, mode: str) -> None:
    image = make_image(images, "disk.qcow2", "qcow2", [])
    qemu_io(image, "qcow2", "write -P 0x77 8M 1M")
    m = mount(images, "-o", f"detect-zeroes={mode}")
    fd = os.open(m.file("disk.qcow2"), os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(MiB), 0)  # unallocated
        os.pwrite(fd, bytes(512 * KiB), 8 * MiB)  # over data
        os.pwrite(fd, b"\x01" * 4096, 12 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.umount()
    expected = bytearray(SIZE)
    expected[8 * MiB + 512 * KiB : 9 * MiB] = b"\x77" * (512 * KiB)
    expected[12 * MiB : 12 * MiB + 4096] = b"\x01" * 4096
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "qcow2")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "qcow2")
    want = {"off": 16 + 16 + 1, "on": 16 + 1, "unmap": 8 + 1}[mode]  # 64 KiB clusters
    assert allocated_clusters(image) == want


def test_detect_zeroes_unmap_needs_discard(images: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = run_imgfs(
        "mount",
        "--detect-zeroes",
        "unmap",
        "--discard",
        "ignore",
        str(images),
        str(tmp_path / "mnt"),
    )
    assert result.returncode != 0 and "needs discard=unmap" in result.stderr


def test_discard_ignore_zeroes_without_freeing(images: Path, mount) -> None:
    image = images / "disk.img"
    image.write_bytes(b"\x66" * 8 * MiB)
    m = mount(images, "--discard", "ignore")
    subprocess.run(["fallocate", "-p", "-o", "1M", "-l", "2M", str(m.file("disk.img"))], check=True)
    m.umount()
    assert image.read_bytes() == b"\x66" * MiB + bytes(2 * MiB) + b"\x66" * 5 * MiB
    assert os.stat(image).st_blocks * 512 >= 8 * MiB


def test_no_seek_holes_reports_all_data(images: Path, mount) -> None:
    image = make_image(images, "disk.qcow2", "qcow2", [])
    qemu_io(image, "qcow2", "write -P 0x11 8M 64k")
    m = mount(images, "--no-seek-holes")
    assert data_runs(m.file("disk.qcow2"), "raw") == [(0, SIZE)]
    m.umount()
