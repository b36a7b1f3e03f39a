"""imgfs snapshot, run as a user runs it, checked with qemu-img snapshot -l and check."""

from __future__ import annotations

from pathlib import Path

from tests.mountutil import run_imgfs
from tests.oracle import qemu_check, qemu_img

MiB = 1024 * 1024


def make(path: Path) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", str(path), "1M")
    return path


def test_list_create_apply_delete(tmp_path: Path) -> None:
    img = make(tmp_path / "disk.qcow2")
    assert run_imgfs("snapshot", "-l", str(img), check=True).stdout == ""
    assert run_imgfs("snapshot", "-c", "first", str(img), check=True).stdout == ""
    qemu_img("snapshot", "-c", "second", str(img))
    ours = run_imgfs("snapshot", "-l", str(img), check=True).stdout
    assert ours == qemu_img("snapshot", "-l", str(img)).stdout
    assert ours.splitlines()[2].split()[:2] == ["1", "first"]
    run_imgfs("snapshot", "-a", "second", str(img), check=True)
    run_imgfs("snapshot", "-d", "1", str(img), check=True)
    assert [
        line.split()[1] for line in qemu_img("snapshot", "-l", str(img)).stdout.splitlines()[2:]
    ] == ["second"]
    assert qemu_check(img, "qcow2")[0] == 0


def test_errors_are_one_line(tmp_path: Path) -> None:
    img = make(tmp_path / "disk.qcow2")
    for args in (["-a", "nope"], ["-d", "nope"]):
        result = run_imgfs("snapshot", *args, str(img))
        assert result.returncode == 1
        assert (
            result.stderr.count("\n") == 1 and "no snapshot with id or name 'nope'" in result.stderr
        )
    raw = tmp_path / "disk.img"
    raw.write_bytes(bytes(MiB))
    result = run_imgfs("snapshot", "-c", "x", str(raw))
    assert result.returncode == 1 and "no internal snapshots" in result.stderr
    assert run_imgfs("snapshot", str(img)).returncode == 2  # no action: a usage error
    assert run_imgfs("snapshot", "-l", "-d", "x", str(img)).returncode == 2
