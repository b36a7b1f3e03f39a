#!/usr/bin/env python3
"""Device-emulation benchmarks (issue 7).

    bench/replay.py decode [--n N]
        decode rate of each bus alone (requests/s): SCSI WRITE(10), ATA WRITE FPDMA QUEUED,
        virtio-blk OUT headers; then trace parsing + decoding (JSON line -> request -> command)
        per bus, still without any I/O.
    bench/replay.py compare [--n N] [--reps R] [--size BYTES] [--qd QD] [--dir DIR]
        mounts a directory holding one preallocated raw image with imgfs, writes a 4 KiB
        random-write trace per bus (virtio, SCSI) over the exported file, and in each repetition
        runs, in an order that rotates between repetitions, fio (several engines, all at 32
        requests in flight) and `imgfs replay --file MNT/disk.raw --queue-depth QD` of each
        trace, all against the same exported file and the same mount. Prints every run and the
        medians, and writes them as JSON (--json). --baseline COMMIT adds the virtio replay run
        with the imgfs of COMMIT (git archive), to compare a change to the replay path.
    bench/replay.py split [--n N] [--qd 1 8 32]
        in-process replay of the virtio trace against a fresh imgfs export at each queue depth:
        IOPS, time per request inside pwrite vs. Python time between a thread's pwrites, and
        the replay's CPU per request (user, sys).

Heavy: it saturates the machine for a few minutes. The numbers are only meaningful side by side
(same run, same load); `uptime` is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imgfs.emulation import ata, scsi, virtio  # noqa: E402
from imgfs.emulation.replay import read_trace  # noqa: E402
from imgfs.emulation.trace import header_line, request_line  # noqa: E402
from tests.mountutil import imgfs_cmd, start_mount, stop_mount, subprocess_env  # noqa: E402

BLOCK = 4096


# -- decode -------------------------------------------------------------------------------------


def bench_decode(n: int) -> dict[str, float]:
    rng = random.Random(1)
    cdbs = [
        bytes.fromhex("2a00") + rng.randrange(1 << 30).to_bytes(4, "big") + b"\x00\x00\x08\x00"
        for _ in range(1024)
    ]
    fises = [ata.build_fis(0x61, rng.randrange(1 << 40), 8) for _ in range(1024)]
    headers = [virtio.build_header(1, rng.randrange(1 << 40)) for _ in range(1024)]
    rates: dict[str, float] = {}
    decoders: tuple[tuple[str, Callable[[bytes], object], list[bytes]], ...] = (
        ("scsi", scsi.decode, cdbs),
        ("ata", ata.decode, fises),
        ("virtio", virtio.decode, headers),
    )
    for name, fn, items in decoders:
        best = 0.0
        for _ in range(3):  # best of 3: the machine is shared
            start = time.perf_counter()
            for i in range(n):
                fn(items[i & 1023])
            best = max(best, n / (time.perf_counter() - start))
        rates[f"decode {name}"] = best
        print(f"decode {name}: {best:,.0f} requests/s (best of 3 x {n})")
    # Trace line -> TraceRequest (JSON, data pattern) -> decoded command: what the replay does
    # per request before any I/O.
    for bus in ("scsi", "ata", "virtio"):
        lines = random_write_trace(bus, min(n, 100_000), 1 << 30)
        fn = {"scsi": scsi.decode, "ata": ata.decode, "virtio": virtio.decode}[bus]
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            count = 0
            for item in read_trace(lines):
                if not isinstance(item, int):
                    fn(item.cmd)  # type: ignore[union-attr]
                    count += 1
            best = max(best, count / (time.perf_counter() - start))
        rates[f"parse+decode {bus}"] = best
        print(f"parse+decode {bus}: {best:,.0f} requests/s (best of 3 x {count})")
    return rates


# -- traces -------------------------------------------------------------------------------------


def random_write_trace(bus: str, n: int, size: int, seed: int = 7) -> list[str]:
    """n 4 KiB writes at random 4 KiB-aligned offsets of a disk of ``size`` bytes (512-byte
    blocks), each filled with one byte value (the "fill" pattern: cheap to expand)."""
    rng = random.Random(seed)
    blocks = size // BLOCK
    lines = [header_line(512, source=f"bench/replay.py randwrite {bus}")]
    for i in range(n):
        lba = rng.randrange(blocks) * (BLOCK // 512)
        if bus == "virtio":
            cmd = virtio.build_header(virtio.T_OUT, lba)
        elif bus == "scsi":  # WRITE(10): opcode, flags, LBA (4), group, length (2), control
            cmd = bytes((0x2A, 0)) + lba.to_bytes(4, "big") + bytes((0, 0, BLOCK // 512, 0))
        else:  # WRITE FPDMA QUEUED
            cmd = ata.build_fis(0x61, lba, BLOCK // 512)
        lines.append(request_line(bus, cmd, data={"pattern": "fill", "seed": i}, sg=[BLOCK]))
    return lines


# -- compare ------------------------------------------------------------------------------------


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def fio_jobs(path: Path, n: int, qd: int) -> dict[str, list[str]]:
    """fio command lines, each keeping ``qd`` writes in flight, ``n`` writes in all."""
    common = [
        "fio",
        "--name=randwrite",
        f"--filename={path}",
        "--rw=randwrite",
        f"--bs={BLOCK}",
        "--randrepeat=0",
        "--thread",
        "--group_reporting",
        "--output-format=json",
    ]
    return {
        # The like-for-like engine: the replay is qd threads each issuing one blocking pwrite.
        "fio psync x32 threads": [
            *common,
            "--ioengine=psync",
            f"--numjobs={qd}",
            f"--number_ios={n // qd}",
        ],
        # The textbook QD32: one thread, 32 asynchronous O_DIRECT writes in flight.
        "fio libaio qd32 direct": [
            *common,
            "--ioengine=libaio",
            f"--iodepth={qd}",
            "--direct=1",
            f"--number_ios={n}",
        ],
        "fio io_uring qd32 direct": [
            *common,
            "--ioengine=io_uring",
            f"--iodepth={qd}",
            "--direct=1",
            f"--number_ios={n}",
        ],
    }


def run_fio(cmd: list[str]) -> float:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    return float(job["iops"])


def run_replay(trace: Path, exported: Path, qd: int, code: str | None = None) -> tuple[float, str]:
    """`imgfs replay` of ``trace``; ``code``: run the imgfs package from this tree instead."""
    cmd = imgfs_cmd(
        "replay", "--file", str(exported), "--queue-depth", str(qd), "--no-progress", str(trace)
    )
    env = subprocess_env()
    if code is not None:
        env["PYTHONPATH"] = code
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"replay failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    match = re.search(r"time: ([\d.]+) s, (\d+) IOPS", result.stdout)
    errors = re.search(r"errors: device (\d+), trace (\d+)", result.stdout)
    if match is None or errors is None or errors.groups() != ("0", "0"):
        raise RuntimeError(f"unexpected replay output:\n{result.stdout}")
    return float(match.group(2)), result.stdout


def bench_compare(
    n: int, reps: int, size: int, qd: int, workdir: str | None, baseline: str | None
) -> dict:
    report: dict = {"n": n, "qd": qd, "size": size, "reps": reps, "uptime_before": uptime()}
    print(report["uptime_before"])
    with tempfile.TemporaryDirectory(prefix="imgfs-emubench-", dir=workdir) as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        image = images / "disk.raw"
        with open(image, "wb") as f:
            # Allocated up front, so no run pays for block allocation the others do not.
            os.posix_fallocate(f.fileno(), 0, size)
        traces = {}
        for bus in ("virtio", "scsi"):
            traces[bus] = root / f"randwrite-{bus}.jsonl"
            traces[bus].write_text("\n".join(random_write_trace(bus, n, size)) + "\n")
        mount = start_mount(images, root / "mnt", root / "imgfs.log")
        exported = mount.file("disk.raw")
        runs: dict[str, list[float]] = {}
        commands: dict[str, str] = {}
        jobs: dict[str, Callable[[], float]] = {}
        for name, cmd in fio_jobs(exported, n, qd).items():
            commands[name] = " ".join(cmd)
            jobs[name] = lambda cmd=cmd: run_fio(cmd)
        for bus, trace in traces.items():
            name = f"imgfs replay {bus} qd{qd}"
            commands[name] = (
                f"imgfs replay --file {exported} --queue-depth {qd} --no-progress {trace.name}"
            )
            jobs[name] = lambda trace=trace: run_replay(trace, exported, qd)[0]
        if baseline:
            # The same replay with an older imgfs (a git tree-ish of this repository), to show
            # what a change to the replay path bought, in the same run.
            base = root / "baseline"
            base.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", baseline, "imgfs"],
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            name = f"imgfs replay virtio qd{qd} ({baseline})"
            commands[name] = (
                f"PYTHONPATH=<git archive {baseline}> " + commands[f"imgfs replay virtio qd{qd}"]
            )
            jobs[name] = lambda: run_replay(traces["virtio"], exported, qd, str(base))[0]
        try:
            names = list(jobs)
            for rep in range(reps):
                # Rotate (and reverse every other repetition) so no job always runs first or
                # always follows the same neighbour.
                k = rep % len(names)
                order = names[k:] + names[:k]
                if rep % 2:
                    order.reverse()
                for name in order:
                    iops = jobs[name]()
                    runs.setdefault(name, []).append(iops)
                    print(f"rep {rep + 1}: {name}: {iops:,.0f} IOPS", flush=True)
        finally:
            mount.umount()
            stop_mount(mount)
        log = mount.log_text()
    report["uptime_after"] = uptime()
    print(report["uptime_after"])
    medians = {name: statistics.median(v) for name, v in runs.items()}
    report["runs"] = runs
    report["medians"] = medians
    report["commands"] = commands
    report["log_errors"] = [line for line in log.splitlines() if " ERROR " in line]
    print(f"\nmedians of {reps} ({n} x 4 KiB random writes each, {qd} in flight):")
    fio_best = max(v for k, v in medians.items() if k.startswith("fio"))
    for name, value in medians.items():
        ratio = f"  ({value / fio_best:.0%} of the best fio)" if name.startswith("imgfs") else ""
        print(f"  {name:32} {value:>10,.0f} IOPS{ratio}")
    return report


class _TimedWrites:
    """Wraps HostFile.pwrite: seconds spent inside it, and seconds each thread spent between
    the return of one call and the start of its next."""

    def __init__(self, pwrite: Callable[[int, bytes], None]) -> None:
        self.pwrite = pwrite
        self.inside = 0.0
        self.between = 0.0
        self.local = threading.local()
        self.lock = threading.Lock()

    def __call__(self, offset: int, data: bytes) -> None:
        start = time.perf_counter()
        last = getattr(self.local, "last", None)
        self.pwrite(offset, data)
        end = self.local.last = time.perf_counter()
        with self.lock:
            self.inside += end - start
            if last is not None:
                self.between += start - last


def bench_split(n: int, qds: list[int], size: int, workdir: str | None) -> dict:
    """Where a replayed request's time goes, in-process against an imgfs export: time inside
    pwrite (waiting for the FUSE daemon, queueing included) vs. the Python time between one
    pwrite's return and the same thread's next pwrite, and the replay's CPU (user/sys)."""
    from imgfs.emulation.replay import Replayer
    from imgfs.emulation.target import FileTarget

    report: dict = {"uptime_before": uptime(), "split": {}}
    print(report["uptime_before"])
    lines = random_write_trace("virtio", n, size)
    with tempfile.TemporaryDirectory(prefix="imgfs-emubench-", dir=workdir) as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        with open(root / "images" / "disk.raw", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, size)
        mount = start_mount(root / "images", root / "mnt", root / "imgfs.log")
        try:
            for qd in qds:
                target = FileTarget(str(mount.file("disk.raw")))
                timed = _TimedWrites(target.file.pwrite)
                target.file.pwrite = timed  # type: ignore[method-assign]
                t0 = os.times()
                summary = Replayer(target, queue_depth=qd).run(lines)
                t1 = os.times()
                target.close()
                row = {
                    "iops": summary.requests / summary.seconds,
                    "in_pwrite_us": 1e6 * timed.inside / n,
                    "between_pwrites_us": 1e6 * timed.between / n,
                    "user_us": 1e6 * (t1.user - t0.user) / n,
                    "sys_us": 1e6 * (t1.system - t0.system) / n,
                }
                report["split"][qd] = row
                print(
                    f"qd {qd}: {row['iops']:,.0f} IOPS; per request: in pwrite "
                    f"{row['in_pwrite_us']:,.0f} us, Python between pwrites "
                    f"{row['between_pwrites_us']:.0f} us, CPU user {row['user_us']:.0f} us "
                    f"+ sys {row['sys_us']:.0f} us",
                    flush=True,
                )
        finally:
            mount.umount()
            stop_mount(mount)
    report["uptime_after"] = uptime()
    print(report["uptime_after"])
    return report


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--n", type=int, default=300_000)
    c = sub.add_parser("compare")
    c.add_argument("--n", type=int, default=100_000)
    c.add_argument("--reps", type=int, default=3)
    c.add_argument("--qd", type=int, default=32)
    c.add_argument("--size", type=int, default=1 << 30)
    c.add_argument("--dir", help="where to put the image and mount point (default: $TMPDIR)")
    c.add_argument("--baseline", metavar="COMMIT", help="also replay virtio with this imgfs")
    sp = sub.add_parser("split")
    sp.add_argument("--n", type=int, default=20_000)
    sp.add_argument("--qd", type=int, nargs="+", default=[1, 8, 32])
    sp.add_argument("--size", type=int, default=1 << 30)
    sp.add_argument("--dir")
    for q in (d, c, sp):
        q.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = p.parse_args()
    if args.what == "decode":
        report: dict = bench_decode(args.n)
    elif args.what == "split":
        report = bench_split(args.n, args.qd, args.size, args.dir)
    else:
        report = bench_compare(args.n, args.reps, args.size, args.qd, args.dir, args.baseline)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
