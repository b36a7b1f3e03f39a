"""imgfs dedup figures: scan (hash) throughput on a first and a second run, rebase time and the
space saved, on a directory of qcow2 clones; and FIDEDUPERANGE on raw clones on a loop-mounted
XFS with reflink (needs root).

    python bench/dedup.py [--workdir DIR] [--count 10] [--size 1G] [--xfs-count 4]

Each clone is ``qemu-img convert`` of one random base, then 10-20% of it rewritten with its own
random data by qemu-io. Prints a Markdown table; the numbers depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
GiB = 1024 * MiB


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True)


def imgfs_dedup(directory: Path, *args: str) -> tuple[float, dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "imgfs", "dedup", str(directory), "--output", "json", *args],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return time.monotonic() - started, json.loads(out.stdout)


def random_file(path: Path, size: int, rng: random.Random) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(rng.randbytes(n))
            left -= n


def make_clones(directory: Path, count: int, size: int, fmt: str, seed: int) -> list[Path]:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    base = directory.parent / f"base-{seed}.raw"
    random_file(base, size, rng)
    scratch = directory.parent / f"diverge-{seed}.bin"
    images = []
    for k in range(count):
        ext = "qcow2" if fmt == "qcow2" else "img"
        image = directory / f"vm{k:02d}.{ext}"
        sh("qemu-img", "convert", "-f", "raw", "-O", fmt, str(base), str(image))
        share = 0.10 + 0.10 * k / max(1, count - 1)
        piece = int(size * share / 4) // 65536 * 65536
        commands: list[str] = []
        for _ in range(4):
            random_file(scratch, piece, rng)
            offset = rng.randrange(0, (size - piece) // 4096) * 4096
            commands += ["-c", f"write -s {scratch} {offset} {piece}"]
            sh("qemu-io", "-f", fmt, *commands, str(image))
            commands = []
        images.append(image)
    base.unlink()
    scratch.unlink()
    return images


def allocated(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if not p.name.startswith("."))


def rebase_figures(work: Path, count: int, size: int) -> list[str]:
    directory = work / "qcow2"
    started = time.monotonic()
    make_clones(directory, count, size, "qcow2", seed=1)
    made = time.monotonic() - started
    before = allocated(directory)
    wall1, first = imgfs_dedup(directory, "--method", "rebase")
    after = allocated(directory)
    wall2, second = imgfs_dedup(directory, "--method", "rebase")
    s1, s2 = first["scan"], second["scan"]
    total = s1["hashed-bytes"] + s1["index-bytes"]
    dup = s1["duplicate-bytes-same-offset"]
    rows = [
        f"| qcow2 clones | {count} x {size / GiB:g} GiB, 10-20% rewritten each "
        f"(made in {made:.0f} s) | |",
        f"| first run: hashing | {s1['hashed-bytes'] / GiB:.1f} GiB in {s1['seconds']:.1f} s | "
        f"**{s1['hashed-bytes'] / GiB / s1['seconds']:.2f} GiB/s** |",
        f"| first run: base + overlays written, verified, renamed | "
        f"{first['rebase']['seconds']:.1f} s "
        f"| {total / GiB / first['rebase']['seconds']:.2f} GiB/s of guest data |",
        f"| first run: wall | {wall1:.1f} s | {total / GiB / wall1:.2f} GiB/s |",
        f"| second run (index hits: {len(s2['from-index'])} images, "
        f"{s2['hashed-bytes']} bytes hashed) | wall {wall2:.2f} s | "
        f"{s2['index-bytes'] / GiB / wall2:.1f} GiB/s of guest data |",
        f"| space (st_blocks) | {before / GiB:.2f} GiB -> {after / GiB:.2f} GiB | "
        f"saved {(before - after) / GiB:.2f} GiB = {100 * (before - after) / dup:.0f}% of the "
        f"{dup / GiB:.2f} GiB duplicated at the same offsets |",
    ]
    shutil.rmtree(directory)
    return rows


def xfs_figures(work: Path, count: int, size: int) -> list[str]:
    backing = work / "xfs.img"
    with open(backing, "wb") as f:
        f.truncate(int(count * size * 1.6) + 512 * MiB)
    sh("mkfs.xfs", "-q", "-m", "reflink=1", str(backing))
    mnt = work / "xfs"
    mnt.mkdir(exist_ok=True)
    sh("mount", "-o", "loop", str(backing), str(mnt))
    try:
        directory = mnt / "raw"
        make_clones(directory, count, size, "raw", seed=2)
        os.sync()
        st = os.statvfs(mnt)
        free_before = st.f_bfree * st.f_frsize
        wall1, first = imgfs_dedup(directory, "--method", "fideduperange")
        os.sync()
        st = os.statvfs(mnt)
        freed = st.f_bfree * st.f_frsize - free_before
        wall2, second = imgfs_dedup(directory, "--method", "fideduperange")
        f1 = first["fideduperange"]
        s1 = first["scan"]
        rows = [
            f"| raw clones on XFS (reflink) | {count} x {size / GiB:g} GiB | |",
            f"| first run: hashing | {s1['hashed-bytes'] / GiB:.1f} GiB in {s1['seconds']:.1f} s"
            f" | **{s1['hashed-bytes'] / GiB / s1['seconds']:.2f} GiB/s** |",
            f"| first run: FIDEDUPERANGE | {f1['ranges-shared']} ranges, "
            f"{f1['bytes-shared'] / GiB:.2f} GiB in {f1['seconds']:.1f} s (wall {wall1:.1f} s) | "
            f"{f1['bytes-shared'] / GiB / f1['seconds']:.2f} GiB/s shared |",
            f"| file system free space | +{freed / GiB:.2f} GiB | |",
            f"| second run | wall {wall2:.2f} s, "
            f"{second['fideduperange']['ranges-shared']} ranges shared again | |",
        ]
    finally:
        sh("umount", str(mnt))
        backing.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/imgfs-bench-dedup")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--size", type=float, default=1.0, help="GiB per image")
    parser.add_argument("--xfs-count", type=int, default=4)
    parser.add_argument("--xfs-size", type=float, default=1.0, help="GiB per raw image")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print("| what | measured | rate |")
    print("|---|---|---|")
    for row in rebase_figures(work, args.count, int(args.size * GiB)):
        print(row, flush=True)
    if args.xfs_count and os.geteuid() == 0:
        for row in xfs_figures(work, args.xfs_count, int(args.xfs_size * GiB)):
            print(row, flush=True)


if __name__ == "__main__":
    main()
