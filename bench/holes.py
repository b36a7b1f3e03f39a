#!/usr/bin/env python3
"""What hole reporting and guest trim are worth on an exported file.

1. Copy time: a 10 GiB qcow2 with ~200 MiB of data scattered over it (100 runs of 2 MiB) is
   mounted, and ``qemu-img convert -f raw -O raw`` (and ``-O qcow2``) copies the exported file,
   once with SEEK_DATA/SEEK_HOLE answered (the default with the patched pyfuse3) and once with
   ``--no-seek-holes`` (what an unpatched pyfuse3 gives: the kernel calls every byte data, so
   qemu-img reads all 10 GiB through FUSE and finds the zeros itself). Also ``cp --sparse=always``.
2. Space reclaimed by a guest's trim: a vmkit guest (../shared/vmkit) writes 64 MiB of files
   on a fresh ext4 in an exported qcow2, deletes half, and in a second boot runs fstrim; the
   image's allocated clusters and host blocks are read after each boot.

Usage: bench/holes.py [--size 10G] [--reps 3] [--dir DIR] [--no-vm] [--out bench/RESULTS-holes.md]
Needs root (FUSE). IMGFS_PYTHON names the interpreter (default: this checkout's .venv), which
must have the patched pyfuse3 (make venv).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = os.environ.get("IMGFS_PYTHON", str(HERE.parent / ".venv" / "bin" / "python"))
IMGFS = [PYTHON, "-m", "imgfs"]
IMGFS_ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}
VMKIT = HERE.parent.parent / "shared" / "vmkit"
MiB = 1 << 20
GiB = 1 << 30
RUN = 2 * MiB
RUNS = 100


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def make_scattered(image: Path, size: int) -> int:
    """The qcow2: RUNS runs of RUN bytes at seeded random 2 MiB-aligned places."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)])
    rnd = random.Random(20261126)
    slots = rnd.sample(range(size // RUN), RUNS)
    commands: list[str] = []
    for i, slot in enumerate(sorted(slots)):
        commands += ["-c", f"write -P {1 + i % 250} {slot * RUN} {RUN}"]
    run(["qemu-io", "-f", "qcow2", *commands, str(image)], timeout=600)
    return RUNS * RUN


class Mounted:
    def __init__(self, images: Path, point: Path, *args: str) -> None:
        point.mkdir(exist_ok=True)
        log = point.parent / f"{point.name}.log"
        run([*IMGFS, "mount", "--log", str(log), *args, str(images), str(point)], env=IMGFS_ENV)
        self.point = point

    def __enter__(self) -> Path:
        return self.point

    def __exit__(self, *exc: object) -> None:
        run([*IMGFS, "umount", str(self.point)], env=IMGFS_ENV, timeout=120)


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    run(cmd, timeout=3600)
    return time.perf_counter() - t


def bench_copy(work: Path, size: int, reps: int) -> list[dict[str, object]]:
    images = work / "images"
    images.mkdir()
    image = images / "sparse.qcow2"
    data = make_scattered(image, size)
    rows = []
    for label, args in (("holes reported", ()), ("--no-seek-holes", ("--no-seek-holes",))):
        times: dict[str, list[float]] = {"convert -O raw": [], "convert -O qcow2": [], "cp": []}
        for _ in range(reps):
            with Mounted(images, work / "mnt", *args) as mnt:
                src = str(mnt / "sparse.qcow2.raw")
                convert = ["qemu-img", "convert", "-f", "raw", "-O"]
                for name, out, cmd in (
                    ("convert -O raw", "out.raw", [*convert, "raw"]),
                    ("convert -O qcow2", "out.qcow2", [*convert, "qcow2"]),
                    ("cp", "cp.raw", ["cp", "--sparse=always"]),
                ):
                    target = work / out
                    times[name].append(timed([*cmd, src, str(target)]))
                    if name == "convert -O raw":  # the copy is right, and how sparse
                        compare = ["qemu-img", "compare", "-f", "qcow2", "-F", "raw"]
                        run([*compare, str(image), str(target)])
                        allocated = os.stat(target).st_blocks * 512
                    target.unlink()
        rows.append(
            {
                "mode": label,
                **{k: statistics.median(v) for k, v in times.items()},
                "copy allocated": allocated,
                "reps": reps,
            }
        )
    rows.append({"mode": "image", "size": size, "data": data})
    return rows


def bench_trim(work: Path) -> dict[str, int]:
    cache = Path(os.environ.get("VMKIT_CACHE") or "/tmp/vmkit-cache")
    run([str(VMKIT / "build.sh"), "--cache", str(cache)], timeout=900)
    images = work / "vm-images"
    images.mkdir()
    image = images / "guest.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"])
    fill = work / "fill.sh"
    fill.write_text(
        ". /vmkit/workloads/common.inc\n"
        "do_mkfs -E nodiscard\n"
        'mkdir -p /mnt && mount -t ext4 "$DISK" /mnt || die mount\n'
        "for i in $(seq 1 16); do dd if=/vmkit/data/blob-4m.bin of=/mnt/f$i bs=1M 2>/dev/null"
        " || die write; done\n"
        "sync; rm /mnt/f1 /mnt/f3 /mnt/f5 /mnt/f7 /mnt/f9 /mnt/f11 /mnt/f13 /mnt/f15; sync\n"
        "umount /mnt || die umount\n"
    )
    trim = work / "trim.sh"
    trim.write_text(
        ". /vmkit/workloads/common.inc\n"
        'mkdir -p /mnt && mount -t ext4 "$DISK" /mnt || die mount\n'
        'out=$(fstrim -v /mnt 2>&1) || die "fstrim: $out"\n'
        'echo "VMKIT-FSTRIM $out"\n'
        "umount /mnt || die umount\n"
    )

    def boot(script: Path) -> None:
        with Mounted(images, work / "vm-mnt") as mnt:
            cmd = [str(VMKIT / "boot.sh"), str(mnt / "guest.qcow2.raw"), "--bus", "virtio"]
            cmd += ["--script", str(script), "--discard", "on", "--cache-dir", str(cache)]
            cmd += ["--console", str(work / f"{script.stem}.console"), "--quiet"]
            run(cmd, timeout=600)

    def allocation() -> tuple[int, int]:
        report = json.loads(run(["qemu-img", "check", "--output=json", str(image)]).stdout)
        return report["allocated-clusters"] * 65536, os.stat(image).st_blocks * 512

    boot(fill)
    before = allocation()
    boot(trim)
    after = allocation()
    trimmed = [
        line
        for line in (work / "trim.console").read_text(errors="replace").splitlines()
        if "VMKIT-FSTRIM" in line
    ]
    return {
        "clusters_before": before[0],
        "clusters_after": after[0],
        "host_before": before[1],
        "host_after": after[1],
        "fstrim": trimmed[0].split("VMKIT-FSTRIM", 1)[1].strip() if trimmed else "?",
    }  # type: ignore[return-value]


def mib(n: object) -> str:
    return f"{int(n) / MiB:.1f} MiB"  # type: ignore[call-overload]


def report(copy: list[dict[str, object]], trim: dict[str, int] | None, size: int) -> str:
    load = os.getloadavg()
    lines = [
        "# Holes: copy time with and without SEEK_DATA/SEEK_HOLE, and guest trim",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bench/holes.py` on the "
        f"2-core machine (load average {load[0]:.1f} at the end; above ~1.5 other work shared "
        "the machine and absolute times are noisy: the ratio is the point). Kernel "
        f"{os.uname().release}, pyfuse3 with third_party/pyfuse3's patch.",
        "",
        f"## Copying a {size // GiB} GiB exported qcow2 holding {RUNS} × 2 MiB of data",
        "",
        "Median seconds of each copy of `MNT/sparse.qcow2.raw` (imgfs default options otherwise).",
        "",
        "| imgfs mount | qemu-img convert -O raw | qemu-img convert -O qcow2 "
        "| cp --sparse=always | raw copy allocated |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in copy:
        if row["mode"] == "image":
            continue
        lines.append(
            f"| {row['mode']} | {row['convert -O raw']:.2f} | {row['convert -O qcow2']:.2f} "
            f"| {row['cp']:.2f} | {mib(row['copy allocated'])} |"
        )
    if trim is not None:
        lines += [
            "",
            "## Space reclaimed by a guest's fstrim",
            "",
            "A vmkit guest (virtio-blk, drive `discard=unmap`) on an exported 1 GiB qcow2: "
            "ext4 made without mkfs-time discard, 16 × 4 MiB files written, 8 deleted; then, "
            "in a second boot, `fstrim -v /mnt`.",
            "",
            "| | after writing and deleting | after fstrim |",
            "|---|---:|---:|",
            f"| qcow2 allocated clusters (qemu-img check) | {mib(trim['clusters_before'])} "
            f"| {mib(trim['clusters_after'])} |",
            f"| host file allocation (st_blocks) | {mib(trim['host_before'])} "
            f"| {mib(trim['host_after'])} |",
            "",
            f"Guest: `{trim['fstrim']}`",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="10G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    ap.add_argument("--no-vm", action="store_true", help="skip the guest trim part")
    ap.add_argument("--out", default=str(HERE / "RESULTS-holes.md"))
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.dir or tempfile.mkdtemp(prefix="imgfs-bench-holes-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        copy = bench_copy(work, size, args.reps)
        trim = None if args.no_vm else bench_trim(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(copy, trim, size)
    Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
