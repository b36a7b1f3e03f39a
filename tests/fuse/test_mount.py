"""imgfs mounted for real under fusermount3, used the way people use it."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.mountutil import is_mounted, run_imgfs
from tests.oracle import (
    assert_export_matches_qemu,
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    assert_same_bytes,
    pattern_image,
    qemu_info,
)
from tests.toyformat import BUG_SECTOR, make_toy

MiB = 1024 * 1024
CACHE_MODES = ["writeback", "none", "writethrough", "directsync", "unsafe"]


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_lists_disks_and_hides_what_is_not_a_disk(images: Path, mount, tmp_path: Path) -> None:
    pattern_image(images / "disk.img", 2 * MiB)
    sparse_file(images / "blank.raw", 1 << 30)
    (images / "README.txt").write_text("not a disk\n")
    (images / "odd").write_bytes(b"x" * 1000)  # not a whole number of sectors
    (images / ".hidden.img").write_bytes(bytes(4096))
    (images / "subdir").mkdir()
    os.chmod(images / "disk.img", 0o640)
    m = mount(images)
    assert sorted(os.listdir(m.path)) == ["blank.raw.raw", "disk.img.raw"]
    st = os.stat(m.file("disk.img"))
    assert st.st_size == 2 * MiB
    assert oct(st.st_mode & 0o777) == oct(0o640)
    assert (st.st_uid, st.st_gid) == (os.stat(images / "disk.img").st_uid, os.stat(images).st_gid)
    assert os.stat(m.file("blank.raw")).st_size == 1 << 30
    assert not os.path.exists(m.path / "README.txt.raw")
    m.umount()


def test_dd_write_and_read_back_match_qemu(images: Path, mount, tmp_path: Path) -> None:
    expected = bytearray(pattern_image(images / "disk.img", 8 * MiB))
    payload = os.urandom(3 * MiB)
    (tmp_path / "payload").write_bytes(payload)
    m = mount(images)
    exported = m.file("disk.img")
    subprocess.run(
        ["dd", f"if={tmp_path / 'payload'}", f"of={exported}", "bs=1M", "seek=2",
         "oflag=direct", "conv=notrunc,fsync", "status=none"],
        check=True, timeout=60,
    )  # fmt: skip
    expected[2 * MiB : 5 * MiB] = payload
    (tmp_path / "expected").write_bytes(expected)
    copy = tmp_path / "copy"
    subprocess.run(
        ["dd", f"if={exported}", f"of={copy}", "bs=1M", "status=none"], check=True, timeout=60
    )
    assert_same_bytes(copy, tmp_path / "expected")
    assert_export_matches_qemu(images / "disk.img", exported, tmp_path)
    m.umount()
    assert_qemu_compare_identical(images / "disk.img", tmp_path / "expected")
    assert_qemu_check_clean(images / "disk.img")


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_random_io_under_every_cache_mode(images: Path, mount, tmp_path: Path, cache: str) -> None:
    size = 4 * MiB + 512 * 3  # not a multiple of 4 KiB: the end is unaligned too
    model = bytearray(os.urandom(size))
    (images / "disk.img").write_bytes(model)
    m = mount(images, "--cache", cache)
    rng = random.Random(f"{cache}-io")
    fd = os.open(m.file("disk.img"), os.O_RDWR)
    try:
        for step in range(300):
            offset = rng.randrange(0, size)
            length = rng.choice([1, 7, 511, 512, 4096, 4097, 65536, 300_000])
            if rng.random() < 0.5:
                data = rng.randbytes(length)
                written = os.pwrite(fd, data, offset)
                assert written == min(length, size - offset)
                model[offset : offset + written] = data[:written]
            else:
                got = os.pread(fd, length, offset)
                assert got == model[offset : offset + length], f"step {step}"
            if step % 50 == 49:
                os.fsync(fd)
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", size)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    m.umount()
    assert (images / "disk.img").read_bytes() == bytes(model)


def test_concurrent_readers_and_writers(images: Path, mount, tmp_path: Path) -> None:
    region = 2 * MiB
    writers = 6
    initial = pattern_image(images / "disk.img", region * (writers + 1))
    m = mount(images, "--aio-threads", "4")
    exported = m.file("disk.img")
    final = bytearray(initial)
    errors: list[str] = []

    def writer(n: int) -> None:
        rng = random.Random(n)
        fd = os.open(exported, os.O_RDWR | (os.O_DIRECT if n % 2 else 0))
        try:
            base = n * region
            for _ in range(40):
                off = rng.randrange(0, region // 4096) * 4096
                data = rng.randbytes(4096 * rng.randint(1, 16))
                data = data[: region - off]
                buf = bytearray(data) if not n % 2 else _aligned(data)
                os.pwrite(fd, buf, base + off)
                final[base + off : base + off + len(data)] = data
                if rng.random() < 0.2:
                    os.fsync(fd)
        except Exception as e:  # reported below; a thread cannot fail the test itself
            errors.append(f"writer {n}: {e!r}")
        finally:
            os.close(fd)

    def reader(n: int) -> None:
        # The last region is never written: every read of it must see the original bytes.
        rng = random.Random(100 + n)
        fd = os.open(exported, os.O_RDONLY)
        try:
            base = writers * region
            for _ in range(200):
                off = rng.randrange(0, region - 65536)
                if os.pread(fd, 65536, base + off) != initial[base + off : base + off + 65536]:
                    errors.append(f"reader {n}: wrong data at {base + off}")
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert exported.read_bytes() == bytes(final)
    m.umount()
    assert (images / "disk.img").read_bytes() == bytes(final)


def _aligned(data: bytes):
    import mmap

    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def _daemon_syncs(m, action, tmp_path: Path) -> int:
    """Run ``action`` with strace attached to the mount daemon; count its fdatasync calls."""
    trace = tmp_path / f"strace-{time.monotonic_ns()}.txt"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=fdatasync", "-o", str(trace), "-p", str(m.proc.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_for(lambda: _traced(m.proc.pid), 10), "strace did not attach"
        action()
    finally:
        time.sleep(0.2)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=10)
    return sum("fdatasync(" in line for line in trace.read_text().splitlines())


def _traced(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1]) != 0
    return False


@pytest.mark.parametrize(
    "cache,writes,fsyncs,expected",
    [
        ("writeback", 3, 0, 0),  # nothing durable yet: it is the guest's job to flush
        ("writeback", 3, 1, 1),  # the guest's flush reaches the disk
        ("none", 2, 1, 1),
        ("writethrough", 3, 0, 3),  # every write is durable when it completes
        ("unsafe", 3, 2, 0),  # flushes never reach the disk
    ],
)
def test_fsync_is_the_guests_flush(
    images: Path, mount, tmp_path: Path, cache: str, writes: int, fsyncs: int, expected: int
) -> None:
    (images / "disk.img").write_bytes(bytes(MiB))
    m = mount(images, "--cache", cache)
    fd = os.open(m.file("disk.img"), os.O_RDWR)

    def workload() -> None:
        for i in range(writes):
            os.pwrite(fd, b"w" * 4096, i * 4096)
        for _ in range(fsyncs):
            os.fsync(fd)

    try:
        assert _daemon_syncs(m, workload, tmp_path) == expected
    finally:
        os.close(fd)
    m.umount()


def test_unmount_flushes_what_was_not_synced(images: Path, mount, tmp_path: Path) -> None:
    (images / "disk.img").write_bytes(bytes(MiB))
    m = mount(images)
    fd = os.open(m.file("disk.img"), os.O_RDWR)
    os.pwrite(fd, b"unsynced" * 512, 8192)

    def close_and_unmount() -> None:
        os.close(fd)
        m.umount()

    assert _daemon_syncs(m, close_and_unmount, tmp_path) >= 1
    assert (images / "disk.img").read_bytes()[8192 : 8192 + 4096] == b"unsynced" * 512


def test_sigterm_flushes_and_unmounts(images: Path, mount) -> None:
    (images / "disk.img").write_bytes(bytes(MiB))
    m = mount(images)
    fd = os.open(m.file("disk.img"), os.O_RDWR)
    os.pwrite(fd, b"before-term" * 10, 0)
    os.close(fd)
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=30) == 0
    assert not is_mounted(m.path)
    assert (images / "disk.img").read_bytes()[:110] == b"before-term" * 10


def test_read_only_mount_and_read_only_images(images: Path, mount) -> None:
    (images / "ro.img").write_bytes(bytes(MiB))
    (images / "rw.img").write_bytes(bytes(MiB))
    os.chmod(images / "ro.img", 0o444)
    m = mount(images)
    assert os.stat(m.file("ro.img")).st_mode & 0o222 == 0
    with pytest.raises(PermissionError) as info:
        os.open(m.file("ro.img"), os.O_WRONLY)
    assert info.value.errno == errno.EACCES
    with open(m.file("ro.img"), "rb") as f:
        assert f.read(4) == bytes(4)
    m.umount()

    m = mount(images, "--read-only", name="mnt-ro")
    assert os.stat(m.file("rw.img")).st_mode & 0o222 == 0
    with pytest.raises(OSError) as info:
        os.open(m.file("rw.img"), os.O_RDWR)
    assert info.value.errno == errno.EROFS
    m.umount()


def test_truncate_resizes_the_disk(images: Path, mount) -> None:
    (images / "disk.img").write_bytes(b"\x01" * MiB)
    m = mount(images)
    os.truncate(m.file("disk.img"), 3 * MiB)
    assert os.stat(m.file("disk.img")).st_size == 3 * MiB
    with open(m.file("disk.img"), "rb") as f:
        assert f.read() == b"\x01" * MiB + bytes(2 * MiB)
    m.umount()
    assert (images / "disk.img").stat().st_size == 3 * MiB


def test_images_appear_and_disappear_while_mounted(images: Path, mount) -> None:
    (images / "first.img").write_bytes(bytes(MiB))
    m = mount(images)
    assert os.listdir(m.path) == ["first.img.raw"]
    (images / "second.img").write_bytes(b"\x02" * MiB)
    assert wait_for(lambda: "second.img.raw" in os.listdir(m.path))
    assert m.file("second.img").read_bytes() == b"\x02" * MiB
    (images / "first.img").unlink()
    assert wait_for(lambda: "first.img.raw" not in os.listdir(m.path))
    m.umount()


def test_bad_images_next_to_good_ones(images: Path, mount, tmp_path: Path) -> None:
    pattern_image(images / "good.img", MiB)
    # a corrupt image of a real (test) format: a virtual size that is not whole sectors
    make_toy(images / "corrupt.toy", 4096)
    data = bytearray((images / "corrupt.toy").read_bytes())
    data[8:16] = (4097).to_bytes(8, "little")
    (images / "corrupt.toy").write_bytes(data)
    # an overlay whose backing file escapes the images directory
    (tmp_path / "outside.img").write_bytes(bytes(4096))
    make_toy(images / "escape.toy", 4096, "../outside.img")
    # a symlink out of the images directory, and a dangling one
    os.symlink(tmp_path / "outside.img", images / "link.img")
    os.symlink(tmp_path / "nowhere.img", images / "dangling.img")
    make_toy(images / "fine.toy", 4096)
    m = mount(images, preload=("tests.toyformat",))
    m.expected_log_errors = ["corrupt.toy: not exported", "escape.toy: not exported",
                             "link.img: not exported"]  # fmt: skip
    assert sorted(os.listdir(m.path)) == ["fine.toy.raw", "good.img.raw"]
    assert m.file("good.img").read_bytes() == (images / "good.img").read_bytes()
    assert m.file("fine.toy").read_bytes() == bytes(4096)
    log = m.log_text()
    assert "corrupt.toy: not exported" in log and "bad virtual size 4097" in log
    assert "escape.toy: not exported" in log and "outside the images directory" in log
    m.umount()


def test_write_errors_map_to_errno_and_the_mount_stays_up(images: Path, mount) -> None:
    (images / "disk.img").write_bytes(bytes(MiB))
    m = mount(images, preload=("tests.toyformat",))
    fd = os.open(m.file("disk.img"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:  # would turn the probed raw disk into a toy image
            os.pwrite(fd, b"TOYFMT01", 0)
        assert info.value.errno == errno.EPERM
        os.pwrite(fd, b"still fine", 4096)
        assert os.pread(fd, 10, 4096) == b"still fine"
    finally:
        os.close(fd)
    m.umount()


def test_statfs_reports_host_usage(images: Path, mount) -> None:
    (images / "disk.img").write_bytes(bytes(MiB))
    m = mount(images)
    host, exported = os.statvfs(images), os.statvfs(m.path)
    assert exported.f_blocks == host.f_blocks and exported.f_frsize == host.f_frsize
    assert abs(exported.f_bavail - host.f_bavail) * host.f_frsize < 64 * MiB
    m.umount()


def test_partition_and_make_a_filesystem(images: Path, mount, tmp_path: Path) -> None:
    sparse_file(images / "disk.img", 64 * MiB)
    m = mount(images)
    exported = str(m.file("disk.img"))
    subprocess.run(["sfdisk", "-q", exported], input=b"label: dos\n,,L\n", check=True, timeout=60)
    listing = subprocess.run(["fdisk", "-l", exported], capture_output=True, text=True, check=True)
    assert "Linux" in listing.stdout and f"{exported}1" in listing.stdout
    # Partition 1 through a loop device at its offset (containers have no partition nodes).
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-o", str(MiB), exported],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, timeout=120)
        subprocess.run(["e2fsck", "-fn", loop], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    m.umount()
    # the partition table and file system really are in the image file
    listing = subprocess.run(
        ["fdisk", "-l", str(images / "disk.img")], capture_output=True, text=True, check=True
    )
    assert "Linux" in listing.stdout
    part = tmp_path / "part1"
    with open(images / "disk.img", "rb") as src, open(part, "wb") as dst:
        src.seek(MiB)
        dst.write(src.read())
    subprocess.run(["e2fsck", "-fn", str(part)], check=True, capture_output=True)


def test_info_matches_qemu_img(images: Path) -> None:
    pattern_image(images / "disk.img", 3 * MiB)
    result = run_imgfs("info", "--output", "json", str(images / "disk.img"), check=True)
    import json

    ours, theirs = json.loads(result.stdout), qemu_info(images / "disk.img")
    for key in ("virtual-size", "format", "actual-size", "dirty-flag"):
        assert ours[key] == theirs[key], key
    human = run_imgfs("info", str(images / "disk.img"), check=True).stdout
    assert "file format: raw" in human and "(3145728 bytes)" in human


# -- command-line errors ----------------------------------------------------------------------


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imgfs: error: ")
    return lines[0]


def test_bad_mountpoints_and_directories(images: Path, mount, tmp_path: Path) -> None:
    (images / "disk.img").write_bytes(bytes(MiB))
    missing = tmp_path / "missing"
    assert "does not exist" in one_line_error(run_imgfs("mount", str(images), str(missing)))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "not a directory" in one_line_error(run_imgfs("mount", str(images), str(a_file)))
    no_images = tmp_path / "no-images"
    target = tmp_path / "target"
    target.mkdir()
    line = one_line_error(run_imgfs("mount", str(no_images), str(target)))
    assert "images directory" in line
    m = mount(images)
    assert "busy" in one_line_error(run_imgfs("mount", str(images), str(m.path)))
    assert "is not mounted" in one_line_error(run_imgfs("umount", str(target)))
    m.umount()


def test_background_mount_returns_when_ready_and_umount_waits(images: Path, tmp_path: Path):
    (images / "disk.img").write_bytes(bytes(MiB))
    mnt = tmp_path / "bg"
    mnt.mkdir()
    log = tmp_path / "bg.log"
    result = run_imgfs("mount", "--log", str(log), str(images), str(mnt))
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)  # ready when the command returns
        pid = int(os.getxattr(mnt, "user.imgfs.pid"))
        busy = open(mnt / "disk.img.raw", "rb")
        try:
            line = one_line_error(run_imgfs("umount", str(mnt)))
            assert "busy" in line
        finally:
            busy.close()
        assert run_imgfs("umount", str(mnt)).returncode == 0
        assert not is_mounted(mnt)
        state = Path(f"/proc/{pid}/stat")
        assert not state.exists() or state.read_text().rpartition(")")[2].split()[0] in "ZX"
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)


def test_cache_none_on_a_file_system_without_o_direct(tmp_path: Path) -> None:
    ramfs = tmp_path / "ramfs"  # ramfs has no O_DIRECT (tmpfs has it since Linux 6.6)
    ramfs.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ramfs)], check=True)
    try:
        (ramfs / "disk.img").write_bytes(bytes(MiB))
        target = tmp_path / "target"
        target.mkdir()
        line = one_line_error(run_imgfs("mount", "--cache", "none", str(ramfs), str(target)))
        assert "O_DIRECT" in line and "--cache writeback" in line
        assert not is_mounted(target)
    finally:
        subprocess.run(["umount", str(ramfs)], check=True)


def test_kernel_cache_mode_reads_and_writes(images: Path, mount) -> None:
    expected = bytearray(pattern_image(images / "disk.img", 4 * MiB))
    m = mount(images, "--kernel-cache")
    with open(m.file("disk.img"), "r+b") as f:
        assert f.read() == expected
        f.seek(12345)
        f.write(b"cached write")
        f.flush()
        os.fsync(f.fileno())
    expected[12345 : 12345 + 12] = b"cached write"
    assert m.file("disk.img").read_bytes() == expected
    m.umount()
    assert (images / "disk.img").read_bytes() == expected


def test_dd_and_cp_onto_a_disk_keep_its_size(images: Path, mount, tmp_path: Path) -> None:
    # Like a block device: O_TRUNC from dd (without conv=notrunc) or cp does not shrink the disk.
    expected = bytearray(pattern_image(images / "disk.img", 4 * MiB))
    iso = os.urandom(MiB + 4096)
    (tmp_path / "small.iso").write_bytes(iso)
    m = mount(images)
    subprocess.run(
        ["dd", f"if={tmp_path / 'small.iso'}", f"of={m.file('disk.img')}", "bs=1M", "status=none"],
        check=True,
        timeout=60,
    )
    assert os.stat(m.file("disk.img")).st_size == 4 * MiB
    expected[: len(iso)] = iso
    assert m.file("disk.img").read_bytes() == expected
    subprocess.run(["cp", str(tmp_path / "small.iso"), str(m.file("disk.img"))], check=True)
    assert m.file("disk.img").read_bytes() == expected
    m.umount()
    assert (images / "disk.img").read_bytes() == expected


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_allow_other_follows_the_image_files_permissions(images: Path, mount) -> None:
    import tempfile

    (images / "public.img").write_bytes(b"p" * MiB)
    (images / "private.img").write_bytes(b"s" * MiB)
    os.chmod(images / "public.img", 0o644)
    os.chmod(images / "private.img", 0o600)
    base = Path(tempfile.mkdtemp(prefix="imgfs-allow-other-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        m = mount(images, "--allow-other", at=base / "mnt")
        assert _as_nobody("head", "-c", "4", str(m.file("public.img"))).stdout == "pppp"
        denied = _as_nobody("head", "-c", "4", str(m.file("private.img")))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        denied = _as_nobody("dd", "if=/dev/zero", f"of={m.file('public.img')}", "count=1",
                            "conv=notrunc")  # fmt: skip
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        m.umount()
        m = mount(
            images, name="mnt2", at=base / "mnt2"
        )  # without --allow-other: nobody sees nothing
        denied = _as_nobody("head", "-c", "4", str(m.file("public.img")))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        m.umount()
    finally:
        for sub in ("mnt", "mnt2"):
            if is_mounted(base / sub):
                subprocess.run(["fusermount3", "-uz", str(base / sub)], check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_check_of_a_format_without_metadata_says_so(images: Path) -> None:
    (images / "disk.img").write_bytes(bytes(MiB))
    result = run_imgfs("check", str(images / "disk.img"))
    assert result.returncode == 63, result  # qemu-img check's status for "no check"
    assert "has no check" in result.stderr
    qemu = subprocess.run(["qemu-img", "check", str(images / "disk.img")], capture_output=True)
    assert qemu.returncode == 63


@pytest.mark.slow
@pytest.mark.parametrize("cache", CACHE_MODES)
def test_random_io_soak(images: Path, mount, cache: str) -> None:
    """The slow tier: many more random requests, from several threads, per cache mode."""
    size = 64 * MiB + 1536
    model = bytearray(os.urandom(size))
    (images / "disk.img").write_bytes(model)
    m = mount(images, "--cache", cache)
    errors: list[str] = []
    slots = 8
    slot = size // slots

    def worker(n: int) -> None:
        rng = random.Random(f"{cache}-{n}")
        fd = os.open(m.file("disk.img"), os.O_RDWR)
        lo, hi = n * slot, (n + 1) * slot if n < slots - 1 else size
        try:
            for step in range(3000):
                off = rng.randrange(lo, hi)
                length = min(rng.choice([1, 511, 4096, 65537, 1 << 20]), hi - off)
                if rng.random() < 0.5:
                    data = rng.randbytes(length)
                    os.pwrite(fd, data, off)
                    model[off : off + length] = data
                elif os.pread(fd, length, off) != model[off : off + length]:
                    errors.append(f"worker {n} step {step}: wrong data at {off}+{length}")
                if step % 500 == 499:
                    os.fsync(fd)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(slots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:5]
    m.umount()
    assert (images / "disk.img").read_bytes() == bytes(model)


def test_a_driver_bug_is_eio_for_that_request_only(images: Path, mount) -> None:
    make_toy(images / "buggy.toy", 8 * 512, data=b"A" * 512 + BUG_SECTOR + b"C" * 512)
    (images / "other.img").write_bytes(b"o" * MiB)
    m = mount(images, preload=("tests.toyformat",))
    m.expected_log_errors = ["buggy.toy.raw: unexpected error in read", "Traceback"]
    fd = os.open(m.file("buggy.toy"), os.O_RDONLY)
    try:
        assert os.pread(fd, 512, 0) == b"A" * 512
        with pytest.raises(OSError) as info:
            os.pread(fd, 512, 512)
        assert info.value.errno == errno.EIO
        assert os.pread(fd, 512, 1024) == b"C" * 512  # the image still works
    finally:
        os.close(fd)
    assert m.file("other.img").read_bytes() == b"o" * MiB  # and so do the others
    assert "buggy.toy.raw: unexpected error in read" in m.log_text()
    assert "RuntimeError: toy driver bug triggered" in m.log_text()
    m.umount()


def test_extra_fuse_options_override_ours(images: Path, mount) -> None:
    (images / "disk.img").write_bytes(bytes(MiB))
    m = mount(images, "-o", "fsname=vmdisks")
    with open("/proc/self/mounts") as f:
        line = next(x for x in f if f" {m.path} " in x)
    assert line.split()[0] == "vmdisks" and line.split()[2] == "fuse.imgfs"
    m.umount()


def test_truncate_where_the_format_cannot_resize_is_a_clear_errno(images: Path, mount) -> None:
    make_toy(images / "fixed.toy", 4096)
    m = mount(images, preload=("tests.toyformat",))
    with pytest.raises(OSError) as info:
        os.truncate(m.file("fixed.toy"), 8192)
    assert info.value.errno == errno.EOPNOTSUPP
    assert os.stat(m.file("fixed.toy")).st_size == 4096
    m.umount()


def test_umount_cleans_up_after_a_killed_daemon(images: Path, mount) -> None:
    (images / "disk.img").write_bytes(b"k" * MiB)
    m = mount(images)
    m.proc.kill()
    m.proc.wait(timeout=10)
    assert is_mounted(m.path)  # a dead mount: "Transport endpoint is not connected"
    result = run_imgfs("umount", str(m.path))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(m.path)
    m2 = mount(images, name="mnt")  # the same mountpoint is usable again
    assert m2.file("disk.img").read_bytes() == b"k" * MiB
    m2.umount()


def test_a_base_image_other_disks_build_on_is_read_only(images: Path, mount) -> None:
    base = pattern_image(images / "base.img", 64 * 1024)
    make_toy(images / "top.toy", 64 * 1024, "base.img")
    pattern_image(images / "alone.img", 64 * 1024)
    m = mount(images, preload=("tests.toyformat",))
    assert m.file("top.toy").read_bytes() == base  # the overlay reads through to its base
    assert os.stat(m.file("base.img")).st_mode & 0o222 == 0
    with pytest.raises(PermissionError):
        open(m.file("base.img"), "r+b")
    with open(m.file("alone.img"), "r+b") as f:  # a disk nobody builds on stays writable
        f.write(b"x")
    assert "base.img: exported read-only: it is the backing image of top.toy.raw" in m.log_text()
    m.umount()
    m = mount(images, "--writable-backing", preload=("tests.toyformat",), name="mnt2")
    with open(m.file("base.img"), "r+b") as f:
        f.write(b"y")
    m.umount()
    assert (images / "base.img").read_bytes()[:1] == b"y"
