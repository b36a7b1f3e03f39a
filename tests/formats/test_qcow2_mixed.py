"""Mixed random operations (write, write_zeroes, discard, write_compressed, resize, reopen)
against a byte model, then qemu-img check and compare."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from tests.formats.qcow2_util import MiB, create, qemu_convert_raw, qemu_io
from tests.formats.test_qcow2_write import assert_check_clean, assert_compare

SETTINGS = [
    ("compat=1.1,cluster_size=4096", False),
    ("compat=1.1,cluster_size=65536,extended_l2=on", True),
    ("compat=0.10,cluster_size=1024", True),
    ("compat=1.1,cluster_size=512,refcount_bits=2", False),
    ("compat=1.1,cluster_size=32768,compression_type=zstd", True),
]
SLOW_SETTINGS = [
    ("compat=1.1,cluster_size=2097152", True),
    ("compat=1.1,cluster_size=16384,extended_l2=on,refcount_bits=64", False),
    ("compat=0.10,cluster_size=512", False),
    ("compat=1.1,cluster_size=1024,refcount_bits=1", True),
    ("compat=1.1,data_file=m.bin", False),
]


def run_mixed(tmp_path: Path, opts: str, with_backing: bool, steps: int, seed: str) -> None:
    size = 4 * MiB + 3 * 512
    backing = None
    if with_backing:
        backing = create(tmp_path / "base.qcow2", 3 * MiB, "cluster_size=65536")
        qemu_io(backing, "write -P 0x42 0 3M")
    img = create(tmp_path / "m.qcow2", size, opts, backing=backing)
    model = bytearray(qemu_convert_raw(img, tmp_path / "start.raw").read_bytes())
    rng = random.Random(seed)
    disk = open_disk(str(img))
    try:
        unit = disk.top.cs
        for step in range(steps):
            size = len(model)
            roll = rng.random()
            off = rng.randrange(0, size)
            length = min(size - off, rng.choice([1, 100, 512, unit, 3 * unit + 7, 200_000]))
            if roll < 0.45:
                data = rng.randbytes(length)
                disk.write(off, data)
                model[off : off + length] = data
            elif roll < 0.6:
                disk.write_zeroes(off, length, may_unmap=rng.random() < 0.5)
                model[off : off + length] = bytes(length)
            elif roll < 0.72:
                # Discard: the range reads zeros or (v2 with backing) keeps its data; either
                # way the model takes what the image now says.
                disk.discard(off, length)
                model[off : off + length] = disk.read(off, length)
                a = -(-off // unit) * unit
                b = size if off + length == size else (off + length) // unit * unit
                if a < b and not with_backing:
                    assert bytes(model[a:b]) == bytes(b - a)  # whole clusters were freed
            elif roll < 0.82 and "data_file" not in opts:
                cunit = disk.top.compressed_write_unit()
                coff = rng.randrange(0, size // cunit) * cunit
                n = min(rng.randrange(1, 4) * cunit, size - coff)
                if coff + n < size:
                    n = n // cunit * cunit
                data = (b"%d squeeze " % step) * (n // 10 + 1)
                data = data[:n]
                disk.top.write_compressed(coff, data)
                # Disk has no write_compressed yet: count it as a write so flush() runs.
                disk._written()
                model[coff : coff + n] = data
            elif roll < 0.86:
                new = size + rng.randrange(1, 64) * 512
                disk.resize(new)
                model += bytes(new - size)
            elif roll < 0.93:
                disk.flush()
            else:
                disk.flush()
                disk.close()
                disk = open_disk(str(img))
            if step % 25 == 0:
                assert bytes(disk.read(0, len(model))) == model, f"step {step}"
        assert bytes(disk.read(0, len(model))) == model
        disk.flush()
    finally:
        disk.close()
    assert_check_clean(img)
    assert_compare(img, bytes(model), tmp_path)


@pytest.mark.parametrize(("opts", "with_backing"), SETTINGS)
def test_mixed_operations(tmp_path: Path, opts: str, with_backing: bool) -> None:
    run_mixed(tmp_path, opts, with_backing, 120, opts)


@pytest.mark.slow
@pytest.mark.parametrize(("opts", "with_backing"), SETTINGS + SLOW_SETTINGS)
@pytest.mark.parametrize("seed", range(3))
def test_mixed_operations_long(tmp_path: Path, opts: str, with_backing: bool, seed: int) -> None:
    run_mixed(tmp_path, opts, with_backing, 600, f"{opts}-{seed}")
