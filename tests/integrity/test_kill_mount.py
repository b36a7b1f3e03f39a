"""Real crashes: ``kill -9`` of the ``imgfs mount`` daemon in the middle of concurrent writes and
fsyncs from several threads, many times over, then the same checks as for crash states: every
write acknowledged by a returned fsync reads back intact, the rest old or new per sector, and
qemu-img check finds no corruption (leaks, and a format's own dirty state, are repaired). Each
round remounts the image and first checks that the export reads what the last check found.

The daemon's death loses only what it held in memory (the host page cache survives), so this
tests the ordering of the daemon's own writes and that fsync is not acknowledged early; the
crash-state tests cover the loss of unsynced host writes.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from tests.integrity.crashstates import MiB, check_state
from tests.integrity.stress import Writer, fresh_allowed
from tests.integrity.subjects import PLAIN_MOUNT_SUBJECTS, SUBJECTS
from tests.mountutil import start_mount, stop_mount

SIZE = 4 * MiB
SECTORS = SIZE // 512
NOTES = ("LEAKS-REPAIRED", "LEAKS-LEFT", "RECOVERED")
# Totals for docs/INTEGRITY.md, when set.
TALLY = os.environ.get("IMGFS_KILL_TALLY")


def _read(subject_name: str, image: Path) -> bytes:
    subject = SUBJECTS[subject_name]
    disk = open_disk(str(image), subject.fmt, read_only=True)
    try:
        return bytes(disk.read(0, SIZE))
    finally:
        disk.close()


def kill_rounds(name: str, tmp_path: Path, rounds: int, threads: int = 4, seed: int = 1) -> int:
    """``rounds`` mount / write / kill -9 / check cycles on one image; returns the number of
    fsyncs that were acknowledged before the kills (all of them checked)."""
    subject = SUBJECTS[name]
    images = tmp_path / "images"
    images.mkdir()
    subject.make(images, SIZE)
    image = images / subject.filename
    base_raw = _read(name, image)
    rng = random.Random(seed)
    per = SECTORS // threads
    acked_fsyncs = 0
    for r in range(rounds):
        m = start_mount(images, tmp_path / "mnt", tmp_path / f"mount{r}.log")
        writers: list[Writer] = []
        try:
            exported = m.file(subject.filename)
            with open(exported, "rb") as f:
                assert f.read() == base_raw, f"{name}: round {r}: the remounted export differs"
            stop = threading.Event()
            writers = [
                Writer(
                    str(exported),
                    t * per,
                    per,
                    seed * 1000 + r * 10 + t,
                    version_base=(r * threads + t + 1) * 1_000_000,
                )  # fmt: skip
                for t in range(threads)
            ]
            workers = [threading.Thread(target=w.run, args=(stop,)) for w in writers]
            for w in workers:
                w.start()
            time.sleep(rng.uniform(0.4, 1.5))
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout=30)
            stop.set()
            for w in workers:
                w.join(timeout=60)
            assert not any(w.is_alive() for w in workers), "a writer hung after the kill"
        finally:
            stop_mount(m)  # fusermount3 -u, then -u -z for the dead mount
        errors = [w.error for w in writers if w.error is not None]
        assert not errors, f"{name}: round {r}: writer errors {errors}"
        assert sum(len(w.issued) for w in writers), f"{name}: round {r}: nothing was written"
        allowed = fresh_allowed(SECTORS)
        for w in writers:
            w.allowed_into(allowed)
            acked_fsyncs += w.fsyncs
        problems = [p for p in check_state(subject, image, base_raw, allowed) if p not in NOTES]
        assert not problems, f"{name}: round {r}: " + "; ".join(problems)
        base_raw = _read(name, image)
    if TALLY:
        with open(TALLY, "a") as f:
            f.write(f"{name}\t{rounds}\t{acked_fsyncs}\n")
    return acked_fsyncs


@pytest.mark.parametrize(("name", "rounds"), [("qcow2", 3), ("vmdk", 1), ("vhdx", 1)])
def test_kill_mount_during_writes(name: str, rounds: int, tmp_path: Path) -> None:
    assert kill_rounds(name, tmp_path, rounds) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", PLAIN_MOUNT_SUBJECTS)
def test_kill_mount_many_times(name: str, tmp_path: Path) -> None:
    assert kill_rounds(name, tmp_path, rounds=8, seed=len(name)) > 0
