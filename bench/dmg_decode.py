#!/usr/bin/env python3
"""The dmg read path without FUSE: sequential 1 MiB and random 16 KiB reads through the driver
(``open_disk``), with read-ahead on and off, interleaved A/B so that foreign load hits both.

Usage: bench/dmg_decode.py IMAGE.dmg [--seconds 3] [--rounds 3]
Run from the checkout to measure (PYTHONPATH=. or cwd), with the venv's python.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from imgfs.block.disk import open_disk


def seq(path: str, opts: dict[str, str], seconds: float) -> float:
    disk = open_disk(path, "dmg", read_only=True, driver_options=opts)
    try:
        size, off, done = disk.size, 0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            n = len(disk.read(off, 1 << 20))
            done += n
            off = (off + n) % size
        return done / (time.perf_counter() - start) / 1e6
    finally:
        disk.close()


def rand(path: str, opts: dict[str, str], seconds: float) -> float:
    disk = open_disk(path, "dmg", read_only=True, driver_options=opts)
    rng = random.Random(1)
    try:
        blocks = disk.size // 16384
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            disk.read(rng.randrange(blocks) * 16384, 16384)
            count += 1
        return count / (time.perf_counter() - start)
    finally:
        disk.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    variants = {"read-ahead 0": {"read-ahead": "0"}, "read-ahead 2M": {"read-ahead": "2M"}}
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in names:
            for kind, fn in (("seq 1M MB/s", seq), ("rand 16k IOPS", rand)):
                v = fn(args.image, variants[name], args.seconds)
                results.setdefault((name, kind), []).append(v)
                print(f"{r} {name:14} {kind:14} {v:8.1f}", file=sys.stderr)
    for (name, kind), vs in results.items():
        print(f"{name:14} {kind:14} median {statistics.median(vs):8.1f}  {[round(v) for v in vs]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
