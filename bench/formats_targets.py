#!/usr/bin/env python3
"""Judge a bench/formats.py run (its .tsv) against the targets of issues 3 (qcow2) and 5.

For each format and workload: the imgfs and qsd medians, the ratio of the medians, the range of
the per-repetition ratios (imgfs rep r / qsd rep r: the two ran back to back), each peer's median
CPU per unit, and met/missed against the target on the ratio of the medians.

Usage: bench/formats_targets.py RESULTS.tsv [...]   (markdown on stdout)
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict

ISSUE5 = {"vmdk", "vpc", "vhdx", "vdi", "parallels", "qed", "qcow"}
SEQ_READS = ("seqR-1M", "seqR-1M-d1")


def targets(fmt: str, workload: str) -> list[tuple[str, str, float]]:
    """[(description, baseline peer, minimum ratio)] for one format and workload."""
    if fmt in ISSUE5:
        if workload in SEQ_READS:
            return [("issue 5: ≥2× qsd", "qsd", 2.0)]
        if workload in ("seqW-1M-d1", "randR-16k-d1"):
            return [("issue 5: ≥1× qsd", "qsd", 1.0)]
        return []
    if fmt == "qcow2":
        if workload in SEQ_READS:
            return [("issue 3: ≥0.9× imgfs raw", "raw", 0.9), ("issue 3: ≥2× qsd", "qsd", 2.0)]
        return [("issue 3: ≥1× qsd", "qsd", 1.0)]
    if fmt == "qcow2-zlib":
        return [("issue 3: ≥1× qsd", "qsd", 1.0)]
    return []


def main() -> int:
    val: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    cpu: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    order: list[str] = []
    workloads: list[str] = []
    for path in sys.argv[1:]:
        with open(path) as f:
            for row in csv.DictReader(f, delimiter="\t"):
                key = (row["format"], row["peer"], row["workload"])
                val[key][int(row["rep"])] = float(row["value"])
                cpu[key].append(float(row["cpu_ms_per_unit"]))
                if row["format"] not in order:
                    order.append(row["format"])
                if row["workload"] not in workloads:
                    workloads.append(row["workload"])
    med = {k: statistics.median(v.values()) for k, v in val.items()}
    print(
        "| format | workload | imgfs | qsd | imgfs/qsd (per-rep range) | CPU imgfs / qsd "
        "| target: verdict |"
    )
    print("|---|---|---|---|---|---|---|")
    for fmt in order:
        for w in workloads:
            i, q = (fmt, "imgfs", w), (fmt, "qsd", w)
            if i not in med or q not in med:
                continue
            unit = ("IOPS", "ms/IO") if "16k" in w else ("MB/s", "ms/MB")
            reps = sorted(set(val[i]) & set(val[q]))
            per = [val[i][r] / val[q][r] for r in reps if val[q][r]]
            rng = f"{min(per):.2f}–{max(per):.2f}" if per else "–"
            c = f"{statistics.median(cpu[i]):.3f} / {statistics.median(cpu[q]):.3f} {unit[1]}"
            verdicts = []
            for desc, base, need in targets(fmt, w):
                if base == "raw":
                    b = med.get(("raw", "imgfs", w))
                    if b is None:
                        verdicts.append(f"{desc}: no raw")
                        continue
                    r = med[i] / b
                    verdicts.append(f"{desc}: {r:.2f}× → **{'met' if r >= need else 'missed'}**")
                else:
                    r = med[i] / med[q]
                    reps_met = sum(p >= need for p in per)
                    verdicts.append(
                        f"{desc}: **{'met' if r >= need else 'missed'}** "
                        f"({reps_met}/{len(per)} reps)"
                    )
            print(
                f"| {fmt} | {w} | {med[i]:.0f} {unit[0]} | {med[q]:.0f} | "
                f"{med[i] / med[q]:.2f}× ({rng}) | {c} | {'; '.join(verdicts) or '–'} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
