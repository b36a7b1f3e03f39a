"""Every writable format side by side in one mounted directory, the way users keep their disks:
each exports the same bytes as qemu-img, probing tells them apart, and writes through each land
in its own image and pass qemu-img check and compare."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from imgfs.block import registry
from tests.oracle import (
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    assert_same_bytes,
    pattern_image,
    qemu_img,
    qemu_raw,
)

MiB = 1024 * 1024
SIZE = 8 * MiB
# file name -> (qemu-img format, -o options)
IMAGES = {
    "d.qcow2": ("qcow2", ""),
    "d-v2.qcow2": ("qcow2", "compat=0.10"),
    "d.qcow": ("qcow", ""),
    "d.qed": ("qed", ""),
    "d.vmdk": ("vmdk", ""),
    "d.vhd": ("vpc", "force_size=on"),
    "d.vhdx": ("vhdx", ""),
    "d.vdi": ("vdi", ""),
    "d.hds": ("parallels", ""),
    "d.img": ("raw", ""),
}


def test_every_format_in_one_directory(images: Path, mount, tmp_path: Path) -> None:
    known = {d.format_name for d in registry.all_drivers()}
    missing = sorted({fmt for fmt, _ in IMAGES.values()} - known)
    assert not missing, f"drivers missing: {missing}"
    source = tmp_path / "source.raw"
    pattern_image(source, SIZE, seed=7)
    for name, (fmt, opts) in IMAGES.items():
        qemu_img("convert", "-f", "raw", "-O", fmt, *(["-o", opts] if opts else []),
                 str(source), str(images / name))  # fmt: skip
    m = mount(images)
    assert sorted(os.listdir(m.path)) == sorted(n + ".raw" for n in IMAGES)
    for name, (fmt, _) in IMAGES.items():
        assert os.stat(m.file(name)).st_size == SIZE, name
        assert_same_bytes(m.file(name), qemu_raw(images / name, tmp_path / f"{name}.q", fmt))
    rng = random.Random(11)
    expected = bytearray(source.read_bytes())
    writes = [(rng.randrange(SIZE - 70000), rng.randbytes(rng.randrange(1, 70000)))
              for _ in range(20)]  # fmt: skip
    for off, data in writes:
        expected[off : off + len(data)] = data
    for name in IMAGES:
        fd = os.open(m.file(name), os.O_RDWR)
        try:
            for off, data in writes:
                assert os.pwrite(fd, data, off) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
    m.umount()
    want = tmp_path / "expected.raw"
    want.write_bytes(expected)
    for name, (fmt, _) in IMAGES.items():
        assert_qemu_check_clean(images / name, fmt)
        assert_qemu_compare_identical(images / name, want, fmt)


@pytest.mark.parametrize("fmt", sorted({fmt for fmt, _ in IMAGES.values()} - {"raw"}))
def test_imgfs_create_makes_images_qemu_accepts(fmt: str, tmp_path: Path) -> None:
    from tests.mountutil import run_imgfs

    image = tmp_path / f"new.{fmt}"
    result = run_imgfs("create", "-f", fmt, str(image), "5M")
    assert result.returncode == 0, result.stderr
    assert_qemu_check_clean(image, fmt)
    assert qemu_img("info", "--output=json", "-f", fmt, str(image)).returncode == 0
    raw = tmp_path / "data.raw"
    pattern_image(raw, 5 * MiB, seed=3)
    out = tmp_path / f"conv.{fmt}"
    result = run_imgfs("convert", "-O", fmt, str(raw), str(out))
    assert result.returncode == 0, result.stderr
    assert_qemu_check_clean(out, fmt)
    assert_qemu_compare_identical(out, raw, fmt)
