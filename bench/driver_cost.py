#!/usr/bin/env python3
"""Each driver's own cost, without FUSE: CPU time (this process, all threads) per 1 MiB
sequential read, per random 16 KiB read (a fully allocated image), per 1 MiB allocating
sequential write and per random 16 KiB allocating write (an empty image), through ``open_disk``.

Usage: bench/driver_cost.py [--size 256M] [--seconds 2] [--formats qcow2,vpc] [--profile F:KIND]
Run from the checkout to measure (PYTHONPATH=.), with the venv's python. KIND is seqR, randR,
seqW or randW; --profile prints the cProfile top 25 (by own time) for that one case.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgfs.block.disk import open_disk

OPTS = {
    "raw": "",
    "qcow2": "cluster_size=65536",
    "qcow2-zlib": "cluster_size=65536,compression_type=zlib",
    "qcow": "",
    "qed": "",
    "vmdk": "subformat=monolithicSparse",
    "vpc": "subformat=dynamic",
    "vhdx": "subformat=dynamic",
    "vdi": "",
    "parallels": "",
}


def qfmt(name: str) -> str:
    return name.split("-")[0]


def make(work: Path, name: str, src: Path, size: int) -> tuple[Path, Path]:
    fmt, opts = qfmt(name), OPTS[name]
    o = ["-o", opts] if opts else []
    full, empty = work / f"{name}-full.{fmt}", work / f"{name}-empty.{fmt}"
    c = ["-c"] if name.endswith("zlib") else []
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, *o, *c, str(src), str(full)], check=True
    )
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *o, str(empty), str(size)], check=True)
    return full, empty


def case(path: Path, name: str, kind: str, seconds: float, size: int) -> tuple[float, float]:
    """(ms CPU per unit, units per wall second)."""
    write = kind.endswith("W")
    disk = open_disk(str(path), qfmt(name), read_only=not write)
    rng = random.Random(1)
    buf = os.urandom(1 << 20)
    try:
        bs = 1 << 20 if kind.startswith("seq") else 16384
        blocks = size // bs
        n, off = 0, 0
        c0, w0 = time.process_time(), time.perf_counter()
        while time.perf_counter() - w0 < seconds:
            at = off if kind.startswith("seq") else rng.randrange(blocks) * bs
            if write:
                disk.write(at, memoryview(buf)[:bs])
            else:
                disk.read(at, bs)
            off = (off + bs) % size
            n += 1
        if write:
            disk.flush()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        return cpu * 1e3 / n, n / wall
    finally:
        disk.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--seconds", type=float, default=2)
    ap.add_argument("--formats", default=",".join(OPTS))
    ap.add_argument("--profile", default="")
    args = ap.parse_args()
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    work = Path(tempfile.mkdtemp(prefix="imgfs-drvcost-", dir="/tmp"))
    try:
        src = work / "src.raw"
        with open(src, "wb") as f:
            f.write(os.urandom(size))
        text = work / "text.raw"
        subprocess.run(
            [
                "bash",
                "-c",
                f"head -c {size * 3 // 4} /dev/urandom | base64 -w0 | head -c {size} > {text}",
            ],
            check=True,
        )
        print("format | seqR ms/MB | randR ms/IO | seqW ms/MB | randW ms/IO")
        for name in args.formats.split(","):
            full, empty = make(work, name, text if name.endswith("zlib") else src, size)
            cells = []
            for kind in ("seqR", "randR", "seqW", "randW"):
                if kind.endswith("W") and name.endswith("zlib"):
                    cells.append("–")
                    continue
                path = full
                if kind.endswith("W"):
                    path = work / f"copy-{empty.name}"
                    subprocess.run(["cp", "--sparse=always", str(empty), str(path)], check=True)
                if args.profile == f"{name}:{kind}":
                    prof = cProfile.Profile()
                    prof.enable()
                    ms, rate = case(path, name, kind, args.seconds, size)
                    prof.disable()
                    pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
                else:
                    ms, rate = case(path, name, kind, args.seconds, size)
                cells.append(f"{ms:.3f} ({rate:.0f}/s)")
                if kind.endswith("W"):
                    path.unlink()
            print(f"{name} | " + " | ".join(cells), flush=True)
            full.unlink()
            empty.unlink()
    finally:
        subprocess.run(["rm", "-rf", str(work)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
