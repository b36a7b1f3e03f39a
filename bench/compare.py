#!/usr/bin/env python3
"""compare.py - imgfs vs qemu-storage-daemon, side by side, from a peers.sh result TSV.

Usage: bench/compare.py [RESULTS.tsv] [--peer imgfs] [--ref qsd]
(default: the newest bench/results/peers-*.tsv). Prints a markdown table: per workload the
median over the repetitions with [min-max], the ratio peer/ref of the medians, the worst-case
ratio (peer min / ref max) and the best-case ratio (peer max / ref min), and the verdict
against the targets: sequential 1 MiB reads >= 2x the reference, every other workload >= 1x.
16k workloads are compared in IOPS, the others in MB/s (10^6 B/s). Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["seqR-1M", "randR-256k", "randR-16k", "seqW-1M", "randW-16k"]
EXTRA = ["dd-1M", "convert"]  # not fio jobs; shown for information
TARGET = {"seqR-1M": 2.0, "seqR-1M-d1": 2.0, "dd-1M": 2.0}


def load(path: str) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["status"] != "ok":
                continue
            wl = row["workload"]
            key = "iops" if wl.startswith(("randR-16k", "randW-16k")) else "MBps"
            out.setdefault((row["peer"], wl), []).append(float(row[key]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tsv", nargs="?")
    ap.add_argument("--peer", default="imgfs")
    ap.add_argument("--ref", default="qsd")
    args = ap.parse_args()
    path = args.tsv
    if path is None:
        runs = sorted(
            p
            for p in glob.glob(os.path.join(HERE, "results", "peers-*.tsv"))
            if not p.endswith(("-summary.tsv", "-fuse.tsv"))
        )
        if not runs:
            print("compare.py: no bench/results/peers-*.tsv", file=sys.stderr)
            return 1
        path = runs[-1]
    data = load(path)
    print(
        f"{os.path.basename(path)}: {args.peer} vs {args.ref}, median [min-max] over reps; "
        "16k in IOPS, others in MB/s"
    )
    print()
    print(
        f"| workload | {args.peer} | {args.ref} | ratio (medians) | worst / best case | "
        "target | verdict |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = [w for base in ORDER for w in (base, base + "-d1")] + EXTRA
    for wl in rows:
        a, b = data.get((args.peer, wl)), data.get((args.ref, wl))
        if not a or not b:
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        ratio = ma / mb
        target = TARGET.get(wl, 1.0)
        verdict = "met" if ratio >= target else "MISSED"
        if wl in EXTRA:
            verdict += " (info)"
        print(
            f"| {wl} | {ma:.0f} [{min(a):.0f}-{max(a):.0f}] | "
            f"{mb:.0f} [{min(b):.0f}-{max(b):.0f}]"
            f" | {ratio:.2f} | {min(a) / max(b):.2f} / {max(a) / min(b):.2f} | "
            f">= {target:g}x | {verdict} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
