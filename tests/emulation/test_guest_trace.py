"""A trace recorded live from a real Linux guest (../shared/vmkit under QEMU/TCG), imported and
replayed with --verify against a raw image through its driver and through an imgfs FUSE mount.

The guest runs ``mkfs-files`` on a blank disk: mkfs.ext4, 35 files written, caches dropped and
every file read back. The replay writes patterns where the guest wrote files, and the guest's
read-back requests are then checked block by block against them.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

from imgfs.emulation.cli import main
from tests.conftest import SHARED
from tests.emulation.helpers import MiB, raw_file

pytestmark = pytest.mark.vm

VMKIT = SHARED / "vmkit"
DISK = 256 * MiB


def record(tmp_path: Path, bus: str) -> Path:
    cache = Path(os.environ.get("VMKIT_CACHE") or "/tmp/vmkit-cache")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(
            [str(VMKIT / "build.sh"), "--cache", str(cache)],
            check=True,
            capture_output=True,
            timeout=900,
        )
    disk = raw_file(tmp_path / "guest.raw", DISK)
    log = tmp_path / f"{bus}.log"
    result = subprocess.run(
        [
            str(VMKIT / "boot.sh"),
            str(disk),
            "--bus",
            bus,
            "--workload",
            "mkfs-files",
            "--trace",
            str(log),
            "--cache-dir",
            str(cache),
            "--quiet",
            "--timeout",
            "180",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    # The result line may carry CRs copied from the guest console: search the whole output.
    assert result.returncode == 0 and "vmkit: result=PASS" in result.stdout, (
        result.stdout[-1000:],
        result.stderr[-2000:],
    )
    return log


def test_live_guest_trace_replays_and_verifies(tmp_path: Path, images: Path, mount, capsys) -> None:
    log = record(tmp_path, "scsi")
    trace = tmp_path / "scsi.jsonl"
    assert main(["trace", "import", "--from", "qemu", str(log), str(trace)]) == 0
    capsys.readouterr()

    image = raw_file(tmp_path / "replay.img", DISK)
    assert (
        main(
            [
                "replay",
                str(trace),
                "--image",
                str(image),
                "--verify",
                "--verify-initial",
                "zero",
                "--queue-depth",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    errors = next(x for x in out.splitlines() if x.startswith("errors:"))
    assert ", trace 0, verify 0" in errors and "expect 0" in errors, out
    checked = int(errors.split("(")[1].split()[0])
    assert checked > 8000  # the guest re-read its 4 MiB blob and the other files

    raw_file(images / "guest.img", DISK)
    m = mount(images)
    assert (
        main(
            [
                "replay",
                str(trace),
                "--file",
                str(m.file("guest.img")),
                "--cache",
                "none",
                "--verify",
                "--verify-initial",
                "zero",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert ", trace 0, verify 0" in out
    m.umount()
    assert (images / "guest.img").read_bytes() == image.read_bytes()
