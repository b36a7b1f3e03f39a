"""QEMU-compatible image locking: imgfs and qemu-io/qemu-img/qemu-system keep out of each other's
way exactly as two QEMU processes do (imgfs/block/locking.py has the lock layout)."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgfs.block import locking
from imgfs.block.disk import open_disk
from imgfs.cli import main as imgfs_main
from tests.mountutil import run_imgfs
from tests.oracle import pattern_image

MiB = 1024 * 1024
WRITE_LOCKED = 'Failed to get "write" lock'
SHARED_WRITE_LOCKED = 'Failed to get shared "write" lock'


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)


def qemu_io(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True, timeout=60)


class QemuIo:
    """An interactive qemu-io holding an image open, waiting for commands on stdin."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["qemu-io", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.image = args[-1]
        deadline = time.monotonic() + 10
        # It holds its locks once the image is open: wait until they show in /proc/locks.
        while not self.holds_locks():
            assert self.proc.poll() is None, self.proc.stdout.read() if self.proc.stdout else ""
            assert time.monotonic() < deadline, "qemu-io did not open the image"
            time.sleep(0.05)

    def holds_locks(self) -> bool:
        ino = os.stat(self.image).st_ino
        with open("/proc/locks") as f:
            return any(f":{ino} " in line and "OFDLCK" in line for line in f)

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> str:
        if self.proc.poll() is None:
            self.command("quit")
        out, _ = self.proc.communicate(timeout=30)
        return out


@pytest.fixture
def qemu_io_holding() -> Iterator:
    started: list[QemuIo] = []

    def start(*args: str) -> QemuIo:
        q = QemuIo(*args)
        started.append(q)
        return q

    yield start
    for q in started:
        q.close()


def lock_bytes(path: Path) -> list[tuple[int, int]]:
    """The OFD lock ranges anyone holds on ``path``, from /proc/locks."""
    ino = os.stat(path).st_ino
    out = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "OFDLCK" in fields and any(x.endswith(f":{ino}") for x in fields):
                out.append((int(fields[-2]), int(fields[-1])))
    return sorted(out)


def qcow2(path: Path, size: str = "8M", *args: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(path), size], check=True)
    return path


# -- the lock bytes themselves ------------------------------------------------------------------


def test_imgfs_takes_the_bytes_qemu_takes(tmp_path: Path, qemu_io_holding) -> None:
    """The same bytes in /proc/locks as qemu-io for a writable image, a read-only one and a
    backing file (QEMU 7.2: 100-101 and 103 held, 201 and 203 not shared)."""
    base = qcow2(tmp_path / "base.qcow2")
    top = qcow2(tmp_path / "top.qcow2", "8M", "-b", "base.qcow2", "-F", "qcow2")
    q = qemu_io_holding("-f", "qcow2", str(top))
    qemu_top, qemu_base = lock_bytes(top), lock_bytes(base)
    q.close()
    disk = open_disk(str(top), "qcow2")
    try:
        # qemu-io merges 100-101 into one range; we lock byte by byte: compare byte sets.
        def byte_set(ranges: list[tuple[int, int]]) -> set[int]:
            return {b for a, z in ranges for b in range(a, z + 1)}

        assert byte_set(lock_bytes(top)) == byte_set(qemu_top) == {100, 101, 103, 201, 203}
        assert byte_set(lock_bytes(base)) == byte_set(qemu_base) == {100, 201, 203}
    finally:
        disk.close()
    assert lock_bytes(top) == [] and lock_bytes(base) == []
    disk = open_disk(str(top), "qcow2", read_only=True, force_share=True)
    try:
        assert lock_bytes(top) == [(100, 100)]  # qemu-io -U -r holds consistent read only
    finally:
        disk.close()


# -- imgfs holds, QEMU asks ---------------------------------------------------------------------


def test_qemu_is_refused_an_image_imgfs_writes(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "disk.qcow2")
    disk = open_disk(str(image), "qcow2")
    try:
        r = qemu_io("-f", "qcow2", "-c", "write 0 512", str(image))
        assert r.returncode != 0 and WRITE_LOCKED in r.stderr, r.stderr
        r = qemu_io("-r", "-f", "qcow2", "-c", "read 0 512", str(image))
        assert r.returncode != 0 and SHARED_WRITE_LOCKED in r.stderr, r.stderr
        r = qemu_img("info", str(image))
        assert r.returncode != 0 and SHARED_WRITE_LOCKED in r.stderr, r.stderr
        r = qemu_img("check", str(image))
        assert r.returncode != 0 and SHARED_WRITE_LOCKED in r.stderr, r.stderr
        r = qemu_img("resize", str(image), "16M")
        assert r.returncode != 0 and WRITE_LOCKED in r.stderr, r.stderr
        # -U reads it anyway, as against a running VM.
        assert qemu_img("info", "-U", str(image)).returncode == 0
        assert qemu_io("-U", "-r", "-f", "qcow2", "-c", "read 0 512", str(image)).returncode == 0
    finally:
        disk.close()
    assert qemu_io("-f", "qcow2", "-c", "write 0 512", str(image)).returncode == 0


def test_qemu_can_read_but_not_write_a_raw_image_imgfs_writes(tmp_path: Path) -> None:
    """QEMU's raw driver has no metadata to keep consistent, so its read-only opens share
    writing, against imgfs as against a VM; its writable opens are refused."""
    raw = tmp_path / "disk.img"
    pattern_image(raw, MiB)
    disk = open_disk(str(raw), "raw")
    try:
        r = qemu_io("-f", "raw", "-c", "write 0 512", str(raw))
        assert r.returncode != 0 and WRITE_LOCKED in r.stderr, r.stderr
        assert qemu_io("-r", "-f", "raw", "-c", "read 0 512", str(raw)).returncode == 0
        assert qemu_img("info", "-f", "raw", str(raw)).returncode == 0
    finally:
        disk.close()
    assert qemu_io("-f", "raw", "-c", "write 0 512", str(raw)).returncode == 0


def test_qemu_reads_but_cannot_write_an_image_imgfs_reads(tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2")
    top = qcow2(tmp_path / "top.qcow2", "8M", "-b", "base.qcow2", "-F", "qcow2")
    for path, read_only in ((top, True), (base, False)):  # the base is read as a backing file
        disk = open_disk(str(path if read_only else top), "qcow2", read_only=read_only)
        try:
            r = qemu_io("-f", "qcow2", "-c", "write 0 512", str(path))
            assert r.returncode != 0 and WRITE_LOCKED in r.stderr, r.stderr
            assert qemu_img("info", str(path)).returncode == 0
            assert qemu_io("-r", "-f", "qcow2", "-c", "read 0 512", str(path)).returncode == 0
        finally:
            disk.close()


def test_qemu_system_is_refused_an_image_imgfs_writes(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "disk.qcow2")
    disk = open_disk(str(image), "qcow2")
    try:
        r = subprocess.run(
            ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "none",
             "-drive", f"file={image},format=qcow2,if=none,id=d0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode != 0 and WRITE_LOCKED in r.stderr, r.stderr
    finally:
        disk.close()


def test_mounted_image_is_locked_while_its_export_is_open(images: Path, mount) -> None:
    image = qcow2(images / "disk.qcow2")
    m = mount(images)
    # Not open: imgfs holds nothing, so qemu-img works on the directory as usual.
    assert qemu_img("check", str(image)).returncode == 0
    with open(m.file("disk.qcow2"), "r+b") as f:
        f.write(b"x" * 512)
        r = qemu_io("-f", "qcow2", "-c", "write 0 512", str(image))
        assert r.returncode != 0 and WRITE_LOCKED in r.stderr, r.stderr
        r = qemu_img("info", str(image))
        assert r.returncode != 0 and SHARED_WRITE_LOCKED in r.stderr, r.stderr
        assert qemu_img("info", "-U", str(image)).returncode == 0
    # Closed: the locks go with the last handle (FUSE's release follows close(2) a moment
    # later, asynchronously).
    deadline = time.monotonic() + 5
    while lock_bytes(image):
        assert time.monotonic() < deadline, lock_bytes(image)
        time.sleep(0.05)
    assert qemu_img("check", str(image)).returncode == 0


# -- QEMU holds, imgfs asks ---------------------------------------------------------------------


def test_imgfs_refuses_an_image_qemu_writes(tmp_path: Path, qemu_io_holding, capsys) -> None:
    image = qcow2(tmp_path / "disk.qcow2")
    q = qemu_io_holding("-f", "qcow2", str(image))
    for read_only in (False, True):
        with pytest.raises(locking.ImageLocked) as info:
            open_disk(str(image), "qcow2", read_only=read_only)
        assert "\n" not in str(info.value)
        expected = SHARED_WRITE_LOCKED if read_only else WRITE_LOCKED
        assert expected in str(info.value) and str(image) in str(info.value)
        assert info.value.errno == errno.EBUSY
    assert imgfs_main(["info", str(image)]) == 1
    assert SHARED_WRITE_LOCKED in capsys.readouterr().err
    assert imgfs_main(["check", str(image)]) == 1
    assert imgfs_main(["info", "-U", str(image)]) == 0
    assert "file format: qcow2" in capsys.readouterr().out
    assert imgfs_main(["check", "-U", "-r", "all", str(image)]) == 1  # -U never writes
    q.close()
    open_disk(str(image), "qcow2").close()


def test_mount_leaves_out_an_image_qemu_writes(images: Path, mount, qemu_io_holding) -> None:
    busy = qcow2(images / "busy.qcow2")
    read = qcow2(images / "read.qcow2")
    pattern_image(images / "free.img", MiB)
    q = qemu_io_holding("-f", "qcow2", str(busy))
    r = qemu_io_holding("-r", "-f", "qcow2", str(read))
    m = mount(images)
    m.expected_log_errors.append(SHARED_WRITE_LOCKED)
    assert sorted(os.listdir(m.path)) == ["free.img.raw", "read.qcow2.raw"]
    log = m.log_text()
    lines = [line for line in log.splitlines() if "busy.qcow2" in line]
    assert len(lines) == 1 and "not exported" in lines[0] and SHARED_WRITE_LOCKED in lines[0], log
    # Another process reads read.qcow2 without sharing writes: exported read-only, readable.
    assert os.stat(m.file("read.qcow2")).st_mode & 0o222 == 0
    with open(m.file("read.qcow2"), "rb") as f:
        assert f.read(512) == bytes(512)
    with pytest.raises(PermissionError):
        open(m.file("read.qcow2"), "r+b")
    with open(m.file("free.img"), "r+b") as f:
        f.write(b"still fine")
    # When qemu-io lets go, the next scan exports both, writable.
    q.close()
    r.close()
    deadline = time.monotonic() + 5
    while "busy.qcow2.raw" not in os.listdir(m.path):
        assert time.monotonic() < deadline, os.listdir(m.path)
        time.sleep(0.2)
    time.sleep(1.1)  # the kernel's attribute cache
    with open(m.file("busy.qcow2"), "r+b") as f:
        f.write(b"mine now")
    with open(m.file("read.qcow2"), "r+b") as f:
        f.write(b"mine too")
    deadline = time.monotonic() + 5
    while lock_bytes(busy):  # the release follows close(2)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r2 = qemu_io("-f", "qcow2", "-c", "write 0 512", str(busy))
    assert r2.returncode == 0, r2.stderr
    # Taken again: left out again, and said again in the log.
    qemu_io_holding("-f", "qcow2", str(busy))
    deadline = time.monotonic() + 5
    while "busy.qcow2.raw" in os.listdir(m.path):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    lines = [line for line in m.log_text().splitlines() if "busy.qcow2: not exported" in line]
    assert len(lines) == 2, lines


def test_export_open_while_qemu_took_the_image_fails_busy(images: Path, mount, qemu_io_holding):
    """An image exported while free, then taken by QEMU before anyone opens its export: the open
    fails with EBUSY and one line in the log, and the next scan leaves the image out."""
    image = qcow2(images / "disk.qcow2")
    m = mount(images)
    exported = m.file("disk.qcow2")
    os.stat(exported)
    qemu_io_holding("-f", "qcow2", str(image))
    with pytest.raises(OSError) as info:
        open(exported, "rb")
    assert info.value.errno in (errno.EBUSY, errno.ENOENT)
    deadline = time.monotonic() + 5
    while "disk.qcow2.raw" in os.listdir(m.path):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    m.expected_log_errors.append(SHARED_WRITE_LOCKED)


# -- imgfs against imgfs ------------------------------------------------------------------------


def test_second_mount_of_a_directory_refuses_what_the_first_writes(
    images: Path, mount, tmp_path: Path
) -> None:
    """As a second QEMU would be: while the first mount has an image open for writing, the
    second leaves it out (and cannot open it if it listed it earlier)."""
    qcow2(images / "a.qcow2")
    qcow2(images / "b.qcow2")
    first = mount(images, name="one")
    second = mount(images, name="two")
    second.expected_log_errors.append(SHARED_WRITE_LOCKED)
    assert sorted(os.listdir(second.path)) == ["a.qcow2.raw", "b.qcow2.raw"]
    with open(first.file("a.qcow2"), "r+b") as f:
        f.write(b"first")
        with pytest.raises(OSError) as info:
            open(second.file("a.qcow2"), "rb")
        assert info.value.errno in (errno.EBUSY, errno.ENOENT)
        time.sleep(0.6)
        assert sorted(os.listdir(second.path)) == ["b.qcow2.raw"]
        with open(second.file("b.qcow2"), "r+b") as g:
            g.write(b"second")
    deadline = time.monotonic() + 5
    while "a.qcow2.raw" not in os.listdir(second.path):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with open(second.file("a.qcow2"), "rb") as f:
        assert f.read(5) == b"first"


def test_cli_info_of_an_image_a_mount_writes(images: Path, mount) -> None:
    image = qcow2(images / "disk.qcow2")
    m = mount(images)
    with open(m.file("disk.qcow2"), "r+b"):
        r = run_imgfs("info", str(image))
        assert r.returncode == 1 and SHARED_WRITE_LOCKED in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert run_imgfs("info", "-U", str(image)).returncode == 0


# -- imgfs snapshot ------------------------------------------------------------------------------


def test_snapshot_command_refused_while_qemu_writes_the_image(tmp_path: Path, qemu_io_holding):
    image = qcow2(tmp_path / "vm.qcow2")
    q = qemu_io_holding("-f", "qcow2", str(image))
    r = run_imgfs("snapshot", "-c", "x", str(image))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "lock" in r.stderr, r.stderr
    q.close()
    run_imgfs("snapshot", "-c", "x", str(image), check=True)
    assert "x" in qemu_img("snapshot", "-l", str(image)).stdout


def test_snapshot_refused_while_a_mount_writes_and_views_do_not_block_writes(
    images: Path, mount
) -> None:
    """While NAME.raw is open for writing, neither imgfs snapshot nor qemu-img snapshot may
    change the table; a snapshot view (NAME@SNAP.raw) open beside it does not stop writes."""
    image = qcow2(images / "vm.qcow2")
    run_imgfs("snapshot", "-c", "before", str(image), check=True)
    m = mount(images)
    with open(m.path / "vm.qcow2@before.raw", "rb") as view, open(m.file("vm.qcow2"), "r+b") as f:
        f.write(b"y" * 4096)
        os.fsync(f.fileno())
        r = run_imgfs("snapshot", "-c", "during", str(image))
        assert r.returncode == 1 and "lock" in r.stderr, r.stderr
        r = qemu_img("snapshot", "-c", "during", str(image))
        assert r.returncode != 0 and "lock" in r.stderr, r.stderr
        assert view.read(4096) == bytes(4096)  # the snapshot still reads as it was
