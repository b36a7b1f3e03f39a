"""Load: 16 threads reading and writing 8 images of mixed formats through one mount for a while,
every byte verified at the end against a model, and the daemon's memory watched.

Each thread owns half of one image's sectors and mixes sector-stamped writes of 1 sector to
512 KiB, reads of its own range compared at once with what it last wrote (read-your-writes), and
fsyncs. At the end: a final fsync, a clean unmount, and per image qemu-img check plus a full
read through imgfs and qemu compared with the model.

The daemon's RSS is sampled every 0.2 s. Bound: the RSS after mounting plus 160 MiB. The steady
state holds bounded metadata caches per open image (qcow2's L2/refcount caches, vmdk's grain
table LRU, the vpc/vdi/parallels tables of an 8 MiB disk: well under 8 MiB in all) and up to 16
requests in flight of at most 1 MiB each, copied at most twice on their way (about 32 MiB); the
rest is headroom for the allocator and trio. A leak of even a few hundred bytes per request
would pass the bound in the long run, so the slow run also requires that the second half's peak
exceed the first half's by less than 32 MiB.

The duration is IMGFS_LOAD_SECONDS (default 10 s; the slow tier runs 240 s unless told).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from tests.integrity.crashstates import SECTOR, MiB, check_state, pattern
from tests.integrity.stress import rss_kib
from tests.integrity.subjects import SUBJECTS
from tests.mountutil import start_mount, stop_mount

SIZE = 8 * MiB
FORMATS = ["qcow2", "qcow", "qed", "vmdk", "vpc", "vhdx", "vdi", "parallels"]
RSS_HEADROOM_KIB = 160 * 1024
NOTES = ("LEAKS-REPAIRED", "LEAKS-LEFT", "RECOVERED")


class Worker:
    def __init__(self, path: Path, first: int, count: int, seed: int, version_base: int) -> None:
        self.path, self.first, self.count = path, first, count
        self.rng = random.Random(seed)
        self.version = version_base
        self.latest = [0] * count  # version per owned sector (0: never written: zeros)
        self.ops = {"write": 0, "read": 0, "fsync": 0}
        self.error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                while not stop.is_set():
                    self._step(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:  # reported by the test
            self.error = e

    def _step(self, fd: int) -> None:
        rng = self.rng
        n = rng.choice([1, 7, 8, 64, 255, 1024])
        n = min(n, self.count)
        at = rng.randrange(0, self.count - n + 1)
        roll = rng.random()
        if roll < 0.65:
            self.version += 1
            data = pattern(self.version, self.first + at, n)
            assert os.pwrite(fd, data, (self.first + at) * SECTOR) == len(data)
            self.latest[at : at + n] = [self.version] * n
            self.ops["write"] += 1
        elif roll < 0.95:
            got = os.pread(fd, n * SECTOR, (self.first + at) * SECTOR)
            want = b"".join(
                pattern(v, self.first + at + i, 1) if v else bytes(SECTOR)
                for i, v in enumerate(self.latest[at : at + n])
            )
            assert got == want, f"{self.path}: read-your-writes failed at sector {self.first + at}"
            self.ops["read"] += 1
        else:
            os.fsync(fd)
            self.ops["fsync"] += 1


def run_load(tmp_path: Path, seconds: float) -> dict[str, object]:
    images = tmp_path / "images"
    images.mkdir()
    for name in FORMATS:
        SUBJECTS[name].make(images, SIZE)
    m = start_mount(images, tmp_path / "mnt", tmp_path / "mount.log")
    workers: list[Worker] = []
    samples: list[int] = []
    try:
        half = SIZE // SECTOR // 2
        for i, name in enumerate(FORMATS):
            exported = m.file(SUBJECTS[name].filename)
            for h in range(2):
                workers.append(Worker(exported, h * half, half, 100 * i + h, (2 * i + h + 1) << 32))
        stop = threading.Event()
        threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
        baseline = rss_kib(m.proc.pid)
        for t in threads:
            t.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end and not any(w.error for w in workers):
            samples.append(rss_kib(m.proc.pid))
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        errors = [w.error for w in workers if w.error is not None]
        assert not errors, f"worker errors: {errors[:3]}"
        m.umount()
    finally:
        stop_mount(m)
    m.check_log()
    for i, name in enumerate(FORMATS):
        subject = SUBJECTS[name]
        allowed = [{v} for w in workers[2 * i : 2 * i + 2] for v in w.latest]
        problems = [
            p
            for p in check_state(subject, images / subject.filename, bytes(SIZE), allowed)
            if p not in NOTES
        ]
        assert not problems, f"{name}: " + "; ".join(problems)
    totals = {k: sum(w.ops[k] for w in workers) for k in ("write", "read", "fsync")}
    peak = max(samples)
    assert peak < baseline + RSS_HEADROOM_KIB, f"daemon RSS {peak} KiB, baseline {baseline} KiB"
    return {"baseline": baseline, "peak": peak, "samples": samples, **totals}


def test_load_short(tmp_path: Path) -> None:
    seconds = float(os.environ.get("IMGFS_LOAD_SECONDS", "10"))
    result = run_load(tmp_path, seconds)
    assert result["write"] and result["read"]


@pytest.mark.slow
def test_load_long(tmp_path: Path) -> None:
    seconds = float(os.environ.get("IMGFS_LOAD_SECONDS", "240"))
    result = run_load(tmp_path, seconds)
    samples: list[int] = result["samples"]  # type: ignore[assignment]
    first, second = samples[: len(samples) // 2], samples[len(samples) // 2 :]
    assert max(second) < max(first) + 32 * 1024, f"RSS still growing: {max(first)} -> {max(second)}"
    tally = os.environ.get("IMGFS_LOAD_TALLY")
    if tally:
        with open(tally, "a") as f:
            f.write(
                f"{seconds}\t{result['write']}\t{result['read']}\t{result['fsync']}\t"
                f"{result['baseline']}\t{result['peak']}\n"
            )
