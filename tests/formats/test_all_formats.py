"""Every writable format side by side in one mounted directory, the way users keep their disks:
each exports the same bytes as qemu-img, probing tells them apart, and writes through each land
in its own image and pass qemu-img check and compare."""

from __future__ import annotations

import os
import random
import subprocess
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
    sha256_file,
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


def test_backing_chain_of_mixed_formats(images: Path, mount, tmp_path: Path) -> None:
    """qcow2 over qcow over qed over vmdk (a vmdk's parent must be a vmdk, so it is the base),
    each layer written by qemu-io: the export is what qemu reads, and writes through the top land
    in the top image only."""
    pattern_image(tmp_path / "base.raw", SIZE, seed=1)
    qemu_img("convert", "-f", "raw", "-O", "vmdk", str(tmp_path / "base.raw"),
             str(images / "base.vmdk"))  # fmt: skip
    layers = [("l1.qed", "qed", "base.vmdk", "vmdk"), ("l2.qcow", "qcow", "l1.qed", "qed"),
              ("top.qcow2", "qcow2", "l2.qcow", "qcow")]  # fmt: skip
    for n, (name, fmt, backing, backing_fmt) in enumerate(layers):
        qemu_img("create", "-q", "-f", fmt, "-b", backing, "-F", backing_fmt,
                 str(images / name), str(SIZE))  # fmt: skip
        off = (n + 1) * MiB + n * 4096 + 512  # overlapping, unaligned ranges per layer
        io = subprocess.run(
            ["qemu-io", "-f", fmt, "-c", f"write -P {0x41 + n} {off} 1536K", str(images / name)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert io.returncode == 0, io.stderr
    lower = ["base.vmdk"] + [name for name, *_ in layers[:-1]]
    before = {name: sha256_file(images / name) for name in lower}
    m = mount(images)
    expected = qemu_raw(images / "top.qcow2", tmp_path / "top.q", "qcow2")
    assert_same_bytes(m.file("top.qcow2"), expected)
    for name in lower:  # bases of another disk: read-only
        assert os.stat(m.file(name)).st_mode & 0o222 == 0, name
    fd = os.open(m.file("top.qcow2"), os.O_RDWR)
    try:
        os.pwrite(fd, b"Z" * 70000, 3 * MiB - 1000)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.umount()
    want = bytearray(expected.read_bytes())
    want[3 * MiB - 1000 : 3 * MiB - 1000 + 70000] = b"Z" * 70000
    (tmp_path / "want.raw").write_bytes(want)
    assert_qemu_check_clean(images / "top.qcow2", "qcow2")
    assert_qemu_compare_identical(images / "top.qcow2", tmp_path / "want.raw", "qcow2")
    assert {name: sha256_file(images / name) for name in lower} == before
