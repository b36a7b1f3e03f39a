"""qcow2 discard, write_zeroes and resize, against qemu-io doing the same on a copy."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from tests.formats.qcow2_util import KiB, MiB, create, qemu_convert_raw, qemu_io, run
from tests.formats.test_qcow2_write import assert_check_clean, assert_compare


def qemu_map(img: Path) -> list[tuple[int, int, bool, bool, int]]:
    """qemu-img map --output=json as (start, length, data, zero, depth) runs, merged."""
    out = json.loads(run("qemu-img", "map", "--output=json", img.name, cwd=img.parent))
    runs: list[tuple[int, int, bool, bool, int]] = []
    for e in out:
        key = (e["data"], e["zero"], e.get("depth", 0))
        if runs and runs[-1][2:] == key and runs[-1][0] + runs[-1][1] == e["start"]:
            last = runs.pop()
            runs.append((last[0], last[1] + e["length"], *key))
        else:
            runs.append((e["start"], e["length"], *key))
    return runs


def ops(rng: random.Random, size: int, unit: int, count: int) -> list[tuple[str, int, int]]:
    out = []
    for _ in range(count):
        kind = rng.choice(["write", "zero", "zero-unmap", "discard"])
        if rng.random() < 0.6:
            off = rng.randrange(0, size // unit) * unit
            length = min(size - off, rng.randrange(1, 6) * unit)
        else:
            off = rng.randrange(0, size - 1)
            length = min(size - off, rng.randrange(1, 3 * unit))
        out.append((kind, off, length))
    return out


SETTINGS = [
    "compat=1.1,cluster_size=4096",
    "compat=1.1,cluster_size=65536,extended_l2=on",
    "compat=0.10,cluster_size=4096",
]


@pytest.mark.parametrize("opts", SETTINGS)
@pytest.mark.parametrize("with_backing", [False, True])
def test_discard_and_zeroes_like_qemu(tmp_path: Path, opts: str, with_backing: bool) -> None:
    size = 2 * MiB
    backing = None
    if with_backing:
        backing = create(tmp_path / "base.qcow2", size, opts)
        qemu_io(backing, f"write -P 5 0 {size}")
    img = create(tmp_path / "a.qcow2", size, opts, backing=backing)
    qemu_io(img, "write -P 1 0 1M", "write -P 2 1536k 100k")
    copy = tmp_path / "q.qcow2"
    shutil.copy(img, copy)
    unit = 4096 if "4096" in opts else 65536
    rng = random.Random(f"{opts}{with_backing}")
    todo = ops(rng, size, unit, 25)
    disk = open_disk(str(img))
    commands = []
    try:
        for i, (kind, off, length) in enumerate(todo):
            if kind == "write":
                disk.write(off, bytes([i + 10]) * length)
                commands.append(f"write -P {i + 10} {off} {length}")
            elif kind == "zero":
                disk.write_zeroes(off, length, may_unmap=False)
                commands.append(f"write -z {off} {length}")
            elif kind == "zero-unmap":
                disk.write_zeroes(off, length, may_unmap=True)
                commands.append(f"write -z -u {off} {length}")
            else:
                disk.discard(off, length)
                commands.append(f"discard {off} {length}")
        disk.flush()
    finally:
        disk.close()
    qemu_io(copy, *commands)
    assert_check_clean(img)
    expected = qemu_convert_raw(copy, tmp_path / "expected.raw").read_bytes()
    assert_compare(img, expected, tmp_path)
    ours, theirs = qemu_map(img), qemu_map(copy)
    # Same data/zero classification everywhere (host placement may differ).
    assert [(s, n, d, z) for s, n, d, z, _ in ours] == [(s, n, d, z) for s, n, d, z, _ in theirs]


def test_discard_frees_and_punches(tmp_path: Path) -> None:
    img = create(tmp_path / "d.qcow2", 8 * MiB, "cluster_size=65536")
    qemu_io(img, "write -P 1 0 8M")
    before = img.stat().st_blocks
    disk = open_disk(str(img))
    try:
        disk.discard(0, 8 * MiB)
        disk.flush()
        # The freed clusters are reused by the next allocation.
        disk.write(0, b"a" * 65536)
        disk.flush()
    finally:
        disk.close()
    check = assert_check_clean(img)
    assert check["allocated-clusters"] == 1
    assert img.stat().st_blocks < before // 4
    out = json.loads(run("qemu-img", "check", "--output=json", str(img)))
    assert out["image-end-offset"] <= 9 * MiB


def test_resize_grows_l1(tmp_path: Path) -> None:
    img = create(tmp_path / "r.qcow2", 1 * MiB, "cluster_size=512,refcount_bits=64")
    disk = open_disk(str(img))
    try:
        disk.write(1000, b"x" * 3000)
        disk.resize(300 * MiB)
        assert disk.size == 300 * MiB
        disk.write(299 * MiB, b"y" * 5000)
        disk.flush()
    finally:
        disk.close()
    assert_check_clean(img)
    info = json.loads(run("qemu-img", "info", "--output=json", str(img)))
    assert info["virtual-size"] == 300 * MiB
    qemu_io(img, "read -P 0x78 1000 3000", f"read -P 0x79 {299 * MiB} 5000")
    data = qemu_convert_raw(img, tmp_path / "r.raw").read_bytes()
    assert data[1000:4000] == b"x" * 3000 and data[299 * MiB : 299 * MiB + 5000] == b"y" * 5000
    assert data.count(0) == len(data) - 8000
    assert KiB  # keep the import meaningful for readers


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "extended_l2=on"])
def test_shrink_then_grow_reads_zeros_not_backing(tmp_path: Path, opts: str) -> None:
    base = create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x55 0 4M")
    img = create(tmp_path / "o.qcow2", 2 * MiB + 1024, opts, backing=base)
    qemu_io(img, "write -P 0x66 1M 1M")
    disk = open_disk(str(img))
    try:
        disk.resize(1 * MiB + 512)
        disk.resize(3 * MiB)
        assert disk.size == 3 * MiB
        disk.flush()
    finally:
        disk.close()
    model = bytearray(b"\x55" * MiB + b"\x66" * 512 + bytes(2 * MiB - 512))
    assert_check_clean(img)
    assert_compare(img, bytes(model), tmp_path)
