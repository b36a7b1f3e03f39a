"""NBD URLs end to end: a NAME.url in a mount (read and write), an overlay whose backing file is
an nbd:// URL, and imgfs convert from an export. Servers are real qemu-nbd processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.mountutil import REPO
from tests.oracle import (
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    pattern_image,
    qemu_img,
    qemu_raw,
)
from tests.remote.nbdutil import qemu_nbd

MiB = 1024 * 1024


def imgfs(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "imgfs", *args], capture_output=True, text=True, env=env, cwd=REPO
    )


def test_url_file_of_an_nbd_export_mounts_and_writes(images: Path, tmp_path: Path, mount) -> None:
    served = tmp_path / "served.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(served), "8M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 1M 2M", str(served)],
        check=True,
        capture_output=True,
    )
    expected = bytearray(qemu_raw(served, tmp_path / "expected.raw").read_bytes())
    sock = tmp_path / "nbd.sock"
    with qemu_nbd(served, "qcow2", unix=sock, name="disk") as server:
        (images / "remote.url").write_text(f"# served by qemu-nbd\n{server.export('disk')}\n")
        m = mount(images)
        exported = m.path / "remote.raw"
        assert exported.read_bytes() == bytes(expected)
        assert os.stat(exported).st_mode & 0o200, "a writable NBD export is exported writable"
        with open(exported, "r+b") as f:
            f.seek(3 * MiB + 17)
            f.write(b"\xa5" * 70000)
            os.fsync(f.fileno())
        expected[3 * MiB + 17 : 3 * MiB + 17 + 70000] = b"\xa5" * 70000
        m.umount()
    want = tmp_path / "want.raw"
    want.write_bytes(bytes(expected))
    assert_qemu_check_clean(served)
    assert_qemu_compare_identical(served, want)


def test_read_only_export_is_exported_read_only(images: Path, tmp_path: Path, mount) -> None:
    served = tmp_path / "ro.img"
    data = pattern_image(served, 2 * MiB)
    with qemu_nbd(served, "raw", unix=tmp_path / "s", read_only=True) as server:
        (images / "ro.url").write_text(server.export("disk") + "\n")
        m = mount(images)
        exported = m.path / "ro.raw"
        assert exported.read_bytes() == data
        assert not os.stat(exported).st_mode & 0o222


def test_overlay_backed_by_nbd_url_and_convert_from_url(
    images: Path, tmp_path: Path, mount
) -> None:
    base = tmp_path / "base.img"
    data = pattern_image(base, 4 * MiB)
    with qemu_nbd(base, "raw", unix=tmp_path / "b.sock", read_only=True) as server:
        url = server.export("disk")
        overlay = images / "top.qcow2"
        r = imgfs("create", "-q", "-f", "qcow2", "-b", url, "-F", "raw", str(overlay), "4M")
        assert r.returncode == 0, r.stderr
        m = mount(images, "--allow-external-files")
        exported = m.path / "top.qcow2.raw"
        assert exported.read_bytes() == data
        with open(exported, "r+b") as f:
            f.seek(MiB + 3)
            f.write(b"Z" * 5000)
        m.umount()
        expected = bytearray(data)
        expected[MiB + 3 : MiB + 5003] = b"Z" * 5000
        out = tmp_path / "from-url.qcow2"
        r = imgfs("convert", "-O", "qcow2", url, str(out))
        assert r.returncode == 0, r.stderr
        assert_qemu_compare_identical(out, base)
        copy = tmp_path / "top-flat.raw"
        r = imgfs("convert", "-O", "raw", str(overlay), str(copy))
        assert r.returncode == 1 and "--allow-external-files" in r.stderr, r.stderr
        r = imgfs("convert", "--allow-external-files", "-O", "raw", str(overlay), str(copy))
        assert r.returncode == 0, r.stderr
        assert copy.read_bytes() == bytes(expected)
    assert base.read_bytes() == data  # the base was only read
