"""A real Linux guest (../shared/vmkit, QEMU/TCG) on a disk exported by imgfs.

Each case creates a blank 256 MiB raw image, exports it through imgfs and boots the vmkit guest
on MOUNTPOINT/guest.img.raw with the ``mkfs-files`` workload (mkfs.ext4, write 35 known files,
sync, drop caches, read them back and compare). After ``imgfs umount`` the host checks the image
file itself: ``e2fsck -fn`` must be clean and the files, extracted with debugfs, must have the
checksums vmkit expects; that proves the guest's writes really reached the image. A second
mount and a fresh boot with the ``verify`` workload (fsck in the guest, re-read every file) must
pass too.

The cases form a pairwise covering of imgfs ``--cache`` x QEMU's drive ``cache=`` x guest bus.
QEMU's ``cache=none`` opens the exported file with O_DIRECT, which exercises imgfs's direct_io
path; imgfs's ``--cache none`` makes imgfs itself use O_DIRECT on the image file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mountutil import Mount

pytestmark = pytest.mark.vm

VMKIT = Path(__file__).resolve().parents[2].parent / "shared" / "vmkit"
IMAGE_SIZE = 256 * 1024 * 1024
BUILD_TIMEOUT = 900  # the first build downloads ~90 MB of Debian packages
BOOT_TIMEOUT = 120  # boot.sh kills qemu after this; a boot takes 3-8 s under TCG
CONSOLE_TAIL = 60


@dataclass(frozen=True)
class Vmkit:
    cache: Path

    @property
    def expected_sha256(self) -> Path:
        return self.cache / "expected.sha256"


@pytest.fixture(scope="module")
def vmkit() -> Vmkit:
    """Build (or reuse) the guest kernel and initramfs in $VMKIT_CACHE or /tmp/vmkit-cache."""
    assert (VMKIT / "build.sh").is_file(), f"vmkit not found at {VMKIT}"
    cache = Path(os.environ.get("VMKIT_CACHE") or "/tmp/vmkit-cache")
    cache.mkdir(parents=True, exist_ok=True)
    # Two test runs sharing the cache must not build into it at the same time.
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(
            [str(VMKIT / "build.sh"), "--cache", str(cache)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    assert result.returncode == 0, (
        f"vmkit build.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    kit = Vmkit(cache)
    assert kit.expected_sha256.is_file(), f"build.sh left no {kit.expected_sha256}"
    return kit


def tail(path: Path, lines: int = CONSOLE_TAIL) -> str:
    if not path.exists():
        return f"(no {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def boot(
    kit: Vmkit, disk: Path, *, bus: str, qemu_cache: str, workload: str, console: Path, mount: Mount
) -> None:
    """Boot the guest on disk; assert that boot.sh exits 0 with a PASS result line."""
    cmd = [
        str(VMKIT / "boot.sh"),
        str(disk),
        "--bus",
        bus,
        "--workload",
        workload,
        "--cache",
        qemu_cache,
        "--cache-dir",
        str(kit.cache),
        "--console",
        str(console),
        "--timeout",
        str(BOOT_TIMEOUT),
        "--quiet",
    ]
    try:
        # bytes, not text=True: universal newlines would turn the CRs below into line breaks
        result = subprocess.run(cmd, capture_output=True, timeout=BOOT_TIMEOUT + 60)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"boot.sh {workload} did not finish in {BOOT_TIMEOUT + 60} s\n"
            f"--- guest console (tail) ---\n{tail(console)}\n"
            f"--- imgfs log (tail) ---\n{tail(mount.log, 20)}"
        ) from e
    # The last line is the result. boot.sh copies CRs from the (CRLF) console into its guest_*
    # fields, so split on newlines only (not splitlines()) and drop the CRs.
    stdout = result.stdout.decode(errors="replace")
    stderr = result.stderr.decode(errors="replace")
    result_line = stdout.rstrip("\n").rpartition("\n")[2].replace("\r", "")
    ok = (
        result.returncode == 0
        and result_line.startswith("vmkit: result=PASS ")
        and f" workload={workload} " in result_line
    )
    assert ok, (
        f"boot.sh {workload} on {bus} (qemu cache={qemu_cache}) exited {result.returncode}: "
        f"{result_line!r}\n--- boot.sh stderr ---\n{stderr.strip()}\n"
        f"--- guest console (tail) ---\n{tail(console)}\n"
        f"--- imgfs log (tail) ---\n{tail(mount.log, 20)}"
    )


def host_fsck(image: Path) -> None:
    result = subprocess.run(
        ["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (
        f"e2fsck -fn {image} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


def host_check_files(kit: Vmkit, image: Path, scratch: Path) -> None:
    """Extract the guest's files from the image with debugfs; compare with vmkit's checksums."""
    scratch.mkdir()
    result = subprocess.run(
        ["debugfs", "-R", f"rdump / {scratch}", str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"debugfs rdump failed:\n{result.stdout}\n{result.stderr}"
    expected = {}
    for line in kit.expected_sha256.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        expected[name] = digest
    assert len(expected) == 35, f"unexpected {kit.expected_sha256}: {len(expected)} entries"
    wrong = []
    for name, digest in sorted(expected.items()):
        path = scratch / name
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if got != digest:
            wrong.append(f"{name}: {got} (expected {digest})")
    assert not wrong, "files in the image differ from what the guest wrote:\n" + "\n".join(wrong)


# (imgfs --cache, boot.sh --cache, bus): every pair of values of any two of these occurs once.
CASES = [
    ("writeback", "writeback", "virtio"),
    ("writeback", "none", "scsi"),
    ("none", "none", "virtio"),
    ("none", "writeback", "scsi"),
]


@pytest.mark.parametrize(
    ("imgfs_cache", "qemu_cache", "bus"),
    CASES,
    ids=[f"imgfs-{i}-qemu-{q}-{b}" for i, q, b in CASES],
)
def test_guest_mkfs_then_verify(
    vmkit: Vmkit,
    images: Path,
    tmp_path: Path,
    mount: Callable[..., Mount],
    imgfs_cache: str,
    qemu_cache: str,
    bus: str,
) -> None:
    image = images / "guest.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)

    # 1. mkfs + write + read back, in the guest, through imgfs
    m = mount(images, "--cache", imgfs_cache, name="mnt-write")
    disk = m.file("guest.img")
    assert disk.stat().st_size == IMAGE_SIZE
    boot(
        vmkit,
        disk,
        bus=bus,
        qemu_cache=qemu_cache,
        workload="mkfs-files",
        console=tmp_path / "mkfs-files.console.log",
        mount=m,
    )
    m.umount()

    # 2. on the host, the image file itself holds a clean ext4 with the guest's files
    assert image.stat().st_size == IMAGE_SIZE
    host_fsck(image)
    host_check_files(vmkit, image, tmp_path / "extracted")

    # 3. a fresh mount and a fresh boot find everything again
    m = mount(images, "--cache", imgfs_cache, name="mnt-verify")
    boot(
        vmkit,
        m.file("guest.img"),
        bus=bus,
        qemu_cache=qemu_cache,
        workload="verify",
        console=tmp_path / "verify.console.log",
        mount=m,
    )
    m.umount()
    host_fsck(image)
