"""A host file system that fills up under a FUSE mount: images on an 8 MiB tmpfs, written through
the export until the space runs out.

The writer must see ENOSPC (or EIO) from write or fsync, never success for data that was not
stored; after the space is freed, writes and fsync work again on the same mount; after the
unmount the image checks clean (or leaks only) and holds every chunk whose write and fsync
succeeded, the failed chunk old or new per sector.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integrity.crashstates import SECTOR, MiB, check_state, pattern
from tests.integrity.stress import fresh_allowed
from tests.integrity.subjects import SUBJECTS
from tests.mountutil import start_mount, stop_mount

VIRTUAL = 32 * MiB
CHUNK = 256 * 1024
FS_SIZE = 8 * MiB
FILLER = 3 * MiB


@pytest.fixture
def small_fs(tmp_path: Path):
    point = tmp_path / "small"
    point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(point)], check=True
    )
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize(
    "name", ["qcow2", "vmdk", pytest.param("vpc", marks=pytest.mark.slow),
             pytest.param("qed", marks=pytest.mark.slow)]
)  # fmt: skip
def test_full_file_system_under_the_mount(name: str, small_fs: Path, tmp_path: Path) -> None:
    subject = SUBJECTS[name]
    images = small_fs / "images"
    images.mkdir()
    subject.make(images, VIRTUAL)
    filler = small_fs / "filler"
    filler.write_bytes(b"\xff" * FILLER)
    m = start_mount(images, tmp_path / "mnt", tmp_path / "mount.log")
    stored: list[int] = []  # chunks whose write and fsync both succeeded
    failed: list[int] = []
    try:
        fd = os.open(m.file(subject.filename), os.O_RDWR)
        try:
            chunk = 0
            while chunk * CHUNK < VIRTUAL:
                first = chunk * CHUNK // SECTOR
                try:
                    os.pwrite(fd, pattern(1000 + chunk, first, CHUNK // SECTOR), chunk * CHUNK)
                    os.fsync(fd)
                except OSError as e:
                    assert e.errno in (errno.ENOSPC, errno.EIO), e
                    failed.append(chunk)
                    break
                stored.append(chunk)
                chunk += 1
            assert failed, f"{name}: {VIRTUAL} bytes fit in an {FS_SIZE}-byte file system?"
            assert stored, f"{name}: not even one chunk fitted"
            # Free the space: the same chunk (and the next) now write and sync.
            filler.unlink()
            for again in (failed[0], failed[0] + 1):
                first = again * CHUNK // SECTOR
                data = pattern(5000 + again, first, CHUNK // SECTOR)
                assert os.pwrite(fd, data, again * CHUNK) == CHUNK
                os.fsync(fd)
        finally:
            os.close(fd)
        m.umount()
    finally:
        stop_mount(m)
    assert "Traceback" not in m.log_text()
    allowed = fresh_allowed(VIRTUAL // SECTOR)
    for chunk in stored:
        first = chunk * CHUNK // SECTOR
        for s in range(first, first + CHUNK // SECTOR):
            allowed[s] = {1000 + chunk}
    for again in (failed[0], failed[0] + 1):
        first = again * CHUNK // SECTOR
        for s in range(first, first + CHUNK // SECTOR):
            allowed[s] = {5000 + again}
    base = bytes(VIRTUAL)  # a fresh image reads as zeros: BASE is zeros here
    after = tmp_path / "after"  # checked off the small file system (qemu-img writes beside it)
    shutil.copytree(images, after)
    problems = [
        p
        for p in check_state(subject, after / subject.filename, base, allowed)
        if p not in ("LEAKS-REPAIRED", "LEAKS-LEFT", "RECOVERED")
    ]
    assert not problems, f"{name}: " + "; ".join(problems)
