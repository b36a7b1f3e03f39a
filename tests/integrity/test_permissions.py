"""--allow-other: the kernel checks permissions (FUSE default_permissions) against an exported
file's owner, group and mode, which follow its image file; read-only images lose their write
bits. Run as root against an unprivileged user (nobody, 65534) through setpriv."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.oracle import pattern_image

MiB = 1024 * 1024
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


def as_nobody(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
         "sh", "-c", script],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def can_read(path: Path) -> bool:
    r = as_nobody(f"head -c 512 '{path}' > /dev/null")
    assert r.returncode == 0 or "Permission denied" in r.stderr, r.stderr
    return r.returncode == 0


def can_write(path: Path, data: str = "nobody was here") -> bool:
    r = as_nobody(f"printf '{data}' | dd of='{path}' conv=notrunc status=none")
    assert r.returncode == 0 or "Permission denied" in r.stderr, r.stderr
    return r.returncode == 0


@pytest.fixture
def public_mountpoint() -> Iterator[Path]:
    """A mountpoint nobody can reach (pytest's tmp_path is private to root)."""
    parent = Path(tempfile.mkdtemp(prefix="imgfs-perm-", dir="/tmp"))
    os.chmod(parent, 0o755)
    yield parent / "mnt"
    shutil.rmtree(parent, ignore_errors=True)


def mount_options(point: Path) -> list[str]:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(point):
                return fields[3].split(",")
    raise AssertionError(f"{point} is not mounted")


def make(images: Path, name: str, mode: int, uid: int = 0, gid: int = 0) -> Path:
    path = images / name
    pattern_image(path, MiB)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def test_allow_other_follows_owner_group_and_mode(images: Path, mount, public_mountpoint) -> None:
    os.chmod(images, 0o755)
    make(images, "public.img", 0o644)
    make(images, "private.img", 0o600)
    shared = make(images, "shared.img", 0o666)
    make(images, "owned.img", 0o600, NOBODY, NOBODY)
    make(images, "group.img", 0o640, 0, NOBODY)
    make(images, "readonly.img", 0o444, NOBODY, NOBODY)
    m = mount(images, "--allow-other", at=public_mountpoint)
    options = mount_options(m.path)
    assert "default_permissions" in options and "allow_other" in options, options
    for name, mode, uid, gid in (("public.img", 0o644, 0, 0), ("private.img", 0o600, 0, 0),
                                 ("owned.img", 0o600, NOBODY, NOBODY),
                                 ("group.img", 0o640, 0, NOBODY),
                                 ("readonly.img", 0o444, NOBODY, NOBODY)):  # fmt: skip
        st = os.stat(m.file(name))
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (mode, uid, gid), name
    assert can_read(m.file("public.img")) and not can_write(m.file("public.img"))
    assert not can_read(m.file("private.img")) and not can_write(m.file("private.img"))
    assert can_read(m.file("group.img")) and not can_write(m.file("group.img"))
    assert can_read(m.file("owned.img")) and can_write(m.file("owned.img"))
    assert can_read(m.file("readonly.img")) and not can_write(m.file("readonly.img"))
    assert can_write(m.file("shared.img"), "shared by all")
    m.umount()
    assert shared.read_bytes()[:13] == b"shared by all"
    assert (images / "owned.img").read_bytes()[:15] == b"nobody was here"


def test_read_only_image_loses_write_bits_for_everyone(
    images: Path, mount, public_mountpoint
) -> None:
    os.chmod(images, 0o755)
    make(images, "base.img", 0o666)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw",
                    str(images / "top.qcow2")], check=True)  # fmt: skip
    os.chmod(images / "top.qcow2", 0o666)
    make(images, "frozen.img", 0o444)
    m = mount(images, "--allow-other", at=public_mountpoint)
    # A base image others build on is exported read-only: no write bits even at 0666.
    assert os.stat(m.file("base.img")).st_mode & 0o777 == 0o444
    assert os.stat(m.file("top.qcow2")).st_mode & 0o777 == 0o666
    assert not can_write(m.file("base.img")) and can_read(m.file("base.img"))
    assert can_write(m.file("top.qcow2"))
    # chmod a-w keeps even root out.
    with pytest.raises(PermissionError) as info:
        open(m.file("frozen.img"), "r+b")
    assert info.value.errno == errno.EACCES


def test_without_allow_other_nobody_cannot_enter(images: Path, mount, public_mountpoint) -> None:
    os.chmod(images, 0o755)
    make(images, "public.img", 0o666)
    m = mount(images, at=public_mountpoint)
    r = as_nobody(f"ls '{m.path}'")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    assert not can_read(m.file("public.img"))
