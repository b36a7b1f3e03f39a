"""Writer threads over exported disks, with a model of what each sector may hold afterwards.

Each writer owns a disjoint sector range of one exported file, writes sector-stamped patterns
(tests.integrity.crashstates.pattern) at random sector-aligned places in it, and now and then
fsyncs. A write is *acknowledged* once an fsync that started after it returned. After a crash,
a sector must hold the version of the last acknowledged write that covered it (or what it held
before), or the version of any later write that covered it; after a clean end (final fsync),
exactly the last write's.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass, field

from tests.integrity.crashstates import BASE, SECTOR, pattern

# Errors a writer sees once the mount daemon is gone.
GONE = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV, errno.EBADF)


@dataclass
class Writer:
    path: str
    first: int  # first sector owned
    count: int  # sectors owned
    seed: int
    version_base: int
    fsync_chance: float = 0.15
    max_sectors: int = 256
    issued: list[tuple[int, int, int]] = field(default_factory=list)  # (version, sector, n)
    acked: int = 0  # issued[:acked] are promised by a returned fsync
    fsyncs: int = 0
    error: BaseException | None = None
    gone: bool = False

    def run(self, stop: threading.Event, direct: bool = False) -> None:
        rng = random.Random(self.seed)
        flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as e:
            self.gone = e.errno in GONE
            if not self.gone:
                self.error = e
            return
        try:
            while not stop.is_set():
                n = rng.randint(1, min(self.max_sectors, self.count))
                start = self.first + rng.randrange(0, self.count - n + 1)
                version = self.version_base + len(self.issued) + 1
                self.issued.append((version, start, n))  # before: it may land in part
                data = pattern(version, start, n)
                if direct:
                    data = _aligned(data)
                done = os.pwrite(fd, data, start * SECTOR)
                if done != n * SECTOR:
                    raise AssertionError(f"short write {done} of {n * SECTOR}")
                if rng.random() < self.fsync_chance:
                    covered = len(self.issued)
                    os.fsync(fd)
                    self.acked = covered
                    self.fsyncs += 1
        except OSError as e:
            if e.errno in GONE:
                self.gone = True
            else:
                self.error = e
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    def finish(self) -> None:
        """A final fsync after a clean run: everything issued is acknowledged."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.acked = len(self.issued)

    def allowed_into(self, allowed: list[set[int]]) -> None:
        """Narrow ``allowed`` (indexed by sector, starting at {BASE}) for this writer's range."""
        for i, (version, start, n) in enumerate(self.issued):
            for s in range(start, start + n):
                if i < self.acked:
                    allowed[s] = {version}
                else:
                    allowed[s] = allowed[s] | {version}


def _aligned(data: bytes) -> memoryview:
    import mmap

    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return memoryview(buf)


def fresh_allowed(sectors: int) -> list[set[int]]:
    return [{BASE} for _ in range(sectors)]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
