"""Mounting imgfs for tests: a real FUSE mount in a child process, always cleaned up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MOUNT_TIMEOUT = 20.0


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == target:
                return True
    return False


REPO = Path(__file__).resolve().parents[1]


def imgfs_cmd(*args: str, preload: tuple[str, ...] = ()) -> list[str]:
    """The imgfs command line; ``preload`` imports modules first (test-only formats)."""
    if not preload:
        return [sys.executable, "-m", "imgfs", *args]
    code = (
        "import importlib, sys\n"
        f"for m in {list(preload)!r}: importlib.import_module(m)\n"
        "from imgfs.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return [sys.executable, "-c", code, *args]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_imgfs(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        imgfs_cmd(*args),
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        env=subprocess_env(),
    )


@dataclass
class Mount:
    images: Path
    path: Path
    log: Path
    proc: subprocess.Popen
    args: tuple[str, ...] = ()
    expected_log_errors: list[str] = field(default_factory=list)

    def file(self, name: str) -> Path:
        return self.path / f"{name}.raw"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def umount(self) -> None:
        """imgfs umount; asserts it worked and the daemon exited cleanly."""
        result = run_imgfs("umount", str(self.path))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(self.path)
        rc = self.proc.wait(timeout=30)
        assert rc == 0, f"imgfs exited with {rc}; log:\n{self.log_text()}"

    def check_log(self) -> None:
        """No unexpected errors or tracebacks in the daemon's log (s3ql's checklogs idea)."""
        bad = []
        for line in self.log_text().splitlines():
            if BENIGN_UNMOUNT_RACE in line:
                continue
            if " ERROR " in line or "Traceback" in line or " CRITICAL " in line:
                if not any(expected in line for expected in self.expected_log_errors):
                    bad.append(line)
        assert not bad, "unexpected errors in the imgfs log:\n" + "\n".join(bad)


# The kernel sends RELEASE for a file closed just before the unmount asynchronously; when it
# arrives after the connection is gone, libfuse cannot deliver the reply and pyfuse3 logs this at
# ERROR level. Nothing is lost: imgfs closes (and flushes) every image when the loop ends.
BENIGN_UNMOUNT_RACE = "fuse_release(): fuse_reply_* failed with No such file or directory"


def start_mount(
    images: Path, mountpoint: Path, log: Path, *args: str, preload: tuple[str, ...] = ()
) -> Mount:
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        imgfs_cmd(
            "mount",
            "--foreground",
            "--log",
            str(log),
            *args,
            str(images),
            str(mountpoint),
            preload=preload,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=subprocess_env(),
    )
    mount = Mount(images, mountpoint, log, proc, args)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(mountpoint):
        if proc.poll() is not None:
            raise RuntimeError(f"imgfs mount exited with {proc.returncode}:\n{mount.log_text()}")
        if time.monotonic() > deadline:
            stop_mount(mount)
            raise RuntimeError(f"imgfs did not mount within {MOUNT_TIMEOUT} s")
        time.sleep(0.02)
    return mount


def stop_mount(mount: Mount) -> None:
    """Tear down whatever is left, even after a failed test: unmount, then end the process."""
    if is_mounted(mount.path):
        subprocess.run(["fusermount3", "-u", str(mount.path)], capture_output=True)
    if is_mounted(mount.path):
        subprocess.run(["fusermount3", "-uz", str(mount.path)], capture_output=True)
    if mount.proc.poll() is None:
        try:
            mount.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(mount.proc.pid, signal.SIGKILL)
            mount.proc.wait(timeout=10)
