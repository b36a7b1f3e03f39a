"""Containment: an image cannot make imgfs open files outside IMAGES_DIR (for a mount) or outside
the image's own directory (for info/check/convert) unless --allow-external-files is given; and
backing chains and extent lists that loop are refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imgfs.block.chain import Containment, image_containment
from imgfs.block.disk import open_disk
from imgfs.errors import CorruptImage, NotPermitted
from tests.mountutil import run_imgfs
from tests.oracle import pattern_image

MiB = 1024 * 1024


def qcow2(path: Path, *args: str, size: str = "1M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(path), size], check=True)
    return path


def over(path: Path, backing: str, fmt: str = "raw") -> Path:
    """A qcow2 image naming ``backing`` (not opened: it may not exist or may loop)."""
    return qcow2(path, "-u", "-b", backing, "-F", fmt)


def flat_vmdk(path: Path, extent: str, sectors: int = 2048) -> Path:
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\n\nRW {sectors} FLAT "{extent}" 0\n\n'
        'ddb.adapterType = "ide"\n'
    )
    return path


@pytest.fixture
def hostile_dir(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """IMAGES_DIR with good images and images that reach out of it; returns (images, outside,
    {refused image: the value its log line must quote})."""
    images = tmp_path / "images"
    images.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    pattern_image(outside / "secret.raw", MiB)
    qcow2(outside / "elsewhere.qcow2")
    pattern_image(images / "base.raw", MiB)
    over(images / "good.qcow2", "base.raw")
    refused = {
        "shadow.qcow2": "/etc/shadow",
        "dotdot.qcow2": "../outside/secret.raw",
        "abs.qcow2": str(outside / "secret.raw"),
        "via-link.qcow2": "link-to-secret",
        "link-out.qcow2": str(outside / "elsewhere.qcow2"),
        "extent.vmdk": "../outside/secret.raw",
        "datafile.qcow2": str(outside / "data.raw"),
    }
    over(images / "shadow.qcow2", "/etc/shadow")
    over(images / "dotdot.qcow2", "../outside/secret.raw")
    over(images / "abs.qcow2", str(outside / "secret.raw"))
    # A backing chain through a symlink that leads out (the hidden name keeps the link itself
    # from being scanned as an image).
    os.symlink("../outside/secret.raw", images / ".link-to-secret")
    refused["via-link.qcow2"] = ".link-to-secret"
    over(images / "via-link.qcow2", ".link-to-secret")
    # An image file that is itself a symlink out of the directory.
    os.symlink(outside / "elsewhere.qcow2", images / "link-out.qcow2")
    flat_vmdk(images / "extent.vmdk", "../outside/secret.raw")
    qcow2(images / "datafile.qcow2", "-o", f"data_file={outside / 'data.raw'},data_file_raw=on")
    return images, outside, refused


def log_lines_about(log: str, name: str) -> list[str]:
    return [line for line in log.splitlines() if f" {name}: " in line]


def test_mount_refuses_files_outside_the_images_directory(hostile_dir, mount) -> None:
    images, _outside, refused = hostile_dir
    m = mount(images)
    m.expected_log_errors.append("not exported")
    assert sorted(os.listdir(m.path)) == ["base.raw.raw", "good.qcow2.raw"]
    with open(m.file("good.qcow2"), "rb") as f:
        assert f.read(MiB) == (images / "base.raw").read_bytes()
    log = m.log_text()
    for name, value in refused.items():
        lines = log_lines_about(log, name)
        assert len(lines) == 1, (name, log)
        assert "not exported" in lines[0] and value in lines[0], lines[0]
        assert "--allow-external-files" in lines[0] or "outside" in lines[0], lines[0]


def test_allow_external_files_lets_them_in(hostile_dir, mount) -> None:
    images, outside, refused = hostile_dir
    (images / "shadow.qcow2").unlink()  # /etc/shadow is not worth exporting even here
    del refused["shadow.qcow2"]
    m = mount(images, "--allow-external-files")
    exported = sorted(os.listdir(m.path))
    assert exported == sorted(["base.raw.raw", "good.qcow2.raw", *(n + ".raw" for n in refused)])
    with open(m.file("dotdot.qcow2"), "rb") as f:
        assert f.read(MiB) == (outside / "secret.raw").read_bytes()
    with open(m.file("extent.vmdk"), "rb") as f:
        assert f.read(MiB) == (outside / "secret.raw").read_bytes()


@pytest.mark.parametrize("command", ["info", "check", "convert"])
def test_single_image_commands_contain_to_the_image_directory(
    hostile_dir, tmp_path: Path, command: str
) -> None:
    images, outside, _refused = hostile_dir
    for name, value in (("dotdot.qcow2", "../outside/secret.raw"),
                        ("extent.vmdk", "../outside/secret.raw"),
                        ("shadow.qcow2", "/etc/shadow")):  # fmt: skip
        extra = [str(tmp_path / "out.raw")] if command == "convert" else []
        r = run_imgfs(command, str(images / name), *extra)
        assert r.returncode == 1, (name, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and value in r.stderr, r.stderr
        assert "--allow-external-files" in r.stderr
        assert not (tmp_path / "out.raw").exists()
    extra = [str(tmp_path / "out.raw")] if command == "convert" else []
    r = run_imgfs(command, "--allow-external-files", str(images / "dotdot.qcow2"), *extra)
    assert r.returncode == 0, r.stderr
    if command == "convert":
        assert (tmp_path / "out.raw").read_bytes() == (outside / "secret.raw").read_bytes()
    # Files in the image's own directory (and below) are fine.
    sub = images / "sub"
    sub.mkdir()
    pattern_image(sub / "base.raw", MiB)
    over(images / "below.qcow2", "sub/base.raw")
    r = run_imgfs(command, str(images / "below.qcow2"), *[e + "2" for e in extra])
    assert r.returncode == 0, r.stderr


def test_containment_root_of_single_image_commands(tmp_path: Path) -> None:
    assert image_containment(str(tmp_path / "x.qcow2"), False).root == str(tmp_path)
    assert image_containment(str(tmp_path / "x.qcow2"), True).root is None


def test_symlinked_directory_inside_is_followed_to_its_target(tmp_path: Path) -> None:
    """The root itself may be a symlink: what counts is where files really are."""
    real = tmp_path / "real"
    real.mkdir()
    pattern_image(real / "base.raw", MiB)
    over(real / "top.qcow2", "base.raw")
    os.symlink(real, tmp_path / "alias")
    disk = open_disk(
        str(tmp_path / "alias/top.qcow2"), containment=Containment(str(tmp_path / "alias"))
    )
    disk.close()
    with pytest.raises(NotPermitted, match="outside"):
        open_disk(str(real / "top.qcow2"), containment=Containment(str(tmp_path / "elsewhere")))


# -- loops --------------------------------------------------------------------------------------


def test_backing_chain_loops_are_refused(tmp_path: Path) -> None:
    over(tmp_path / "a.qcow2", "b.qcow2", "qcow2")
    over(tmp_path / "b.qcow2", "a.qcow2", "qcow2")
    over(tmp_path / "self.qcow2", "self.qcow2", "qcow2")
    over(tmp_path / "s.qcow2", "s-link.qcow2", "qcow2")
    os.symlink("s.qcow2", tmp_path / "s-link.qcow2")
    over(tmp_path / "as-raw.qcow2", "as-raw.qcow2")  # itself as its own raw backing file
    containment = Containment(str(tmp_path))
    for name in ("a.qcow2", "b.qcow2", "self.qcow2", "s.qcow2", "s-link.qcow2", "as-raw.qcow2"):
        for read_only in (True, False):
            with pytest.raises(CorruptImage, match="loops back") as info:
                open_disk(str(tmp_path / name), "qcow2", read_only=read_only,
                          containment=containment)  # fmt: skip
            assert "\n" not in str(info.value)


def test_backing_loop_in_a_mount_is_left_out(images: Path, mount) -> None:
    over(images / "a.qcow2", "b.qcow2", "qcow2")
    over(images / "b.qcow2", "a.qcow2", "qcow2")
    pattern_image(images / "fine.img", MiB)
    m = mount(images)
    m.expected_log_errors.append("loops back")
    assert os.listdir(m.path) == ["fine.img.raw"]
    log = m.log_text()
    assert len(log_lines_about(log, "a.qcow2")) == 1 and len(log_lines_about(log, "b.qcow2")) == 1


def test_vmdk_flat_extent_naming_its_own_descriptor_is_refused(tmp_path: Path) -> None:
    image = flat_vmdk(tmp_path / "d.vmdk", "d.vmdk")
    for read_only in (True, False):
        with pytest.raises(CorruptImage, match="descriptor itself"):
            open_disk(str(image), "vmdk", read_only=read_only)
    # The same through a symlink to the descriptor.
    os.symlink("e.vmdk", tmp_path / "e-link.vmdk")
    image = flat_vmdk(tmp_path / "e.vmdk", "e-link.vmdk")
    with pytest.raises(CorruptImage, match="descriptor itself"):
        open_disk(str(image), "vmdk")
