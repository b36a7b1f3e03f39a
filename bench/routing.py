#!/usr/bin/env python3
"""routing.py - measure imgfs's request routing: inline on the trio thread vs a worker thread.

imgfs/fuse/ops.py serves reads of buffered images inline on the trio thread (RWF_NOWAIT, with a
retry on the pool if the data is not cached), writes of write-back images inline, and O_DIRECT
I/O (--cache none) on the worker pool. `--cache writeback` vs `--cache none` mixes two effects
(the thread hop, and O_DIRECT host I/O that goes to the virtual disk instead of the page cache),
so this script also runs two shims that only flip the routing decision, without touching the
imgfs sources (they replace Disk.reads_may_block / writes_may_block in the launched process):

  wb-inline    --cache writeback, default routing: reads and writes inline      (imgfs default)
  wb-thread    --cache writeback, everything through trio.to_thread (shim)      (hop cost only)
  none-thread  --cache none, default routing: O_DIRECT host I/O on the pool     (imgfs default)
  none-inline  --cache none, O_DIRECT host I/O inline on the trio thread (shim)
  qsd          qemu-storage-daemon FUSE export of the same file (reference, single-threaded)

Each variant is mounted on the same 1 GiB raw image (fully written, warm in the page cache) and
fio runs random reads/writes with --ioengine=libaio --direct=1 at iodepth 1 and 16 on the
exported file. Reps are interleaved (rep 1 of every variant, then rep 2, ...) so that load
changes on the host hit every variant alike. The daemon's CPU time per request is read from
/proc/PID/stat (all threads) around each job.

Usage (root, or FUSE permission):  bench/routing.py [--reps 3] [--runtime 3] [--size 1G]
Output: bench/results/routing-<date>.tsv and -summary.md (bench/results is gitignored).
Everything mounted is unmounted and every started process is ended (by pid), also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
TICK = os.sysconf("SC_CLK_TCK")

# Runs the imgfs CLI with the routing properties forced. ROUTE_READS / ROUTE_WRITES:
# "thread" (always the pool), "inline" (always the trio thread), "" (imgfs's own choice).
# Works whether Disk computes the flags as properties or as attributes set in __init__.
SHIM = r"""
import os, sys
from imgfs.block import disk
force = {}
for name, env in (("reads_may_block", "ROUTE_READS"), ("writes_may_block", "ROUTE_WRITES")):
    if os.environ.get(env):
        force[name] = os.environ[env] == "thread"
for name, value in force.items():
    if isinstance(getattr(disk.Disk, name, None), property):
        setattr(disk.Disk, name, property(lambda self, v=value: v))
if force and not all(isinstance(getattr(disk.Disk, n, None), property) for n in force):
    _init = disk.Disk.__init__
    def __init__(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        for name, value in force.items():
            if not isinstance(getattr(type(self), name, None), property):
                setattr(self, name, value)
    disk.Disk.__init__ = __init__
from imgfs.cli import main
sys.exit(main(sys.argv[1:]))
"""

VARIANTS = {
    # name: (cache mode, ROUTE_READS, ROUTE_WRITES, description)
    "wb-inline": ("writeback", "", "", "--cache writeback, default routing (inline + RWF_NOWAIT)"),
    "wb-thread": (
        "writeback",
        "thread",
        "thread",
        "--cache writeback, all I/O via to_thread (shim)",
    ),
    "none-thread": ("none", "", "", "--cache none, default routing (O_DIRECT on the pool)"),
    "none-inline": ("none", "inline", "inline", "--cache none, O_DIRECT inline (shim)"),
    "qsd": (None, None, None, "qemu-storage-daemon 7.2 FUSE export (file driver, writeback)"),
}

STARTED: list[subprocess.Popen] = []
MOUNTED: list[tuple[str, str, subprocess.Popen]] = []  # (kind, mountpoint, process)


class Abort(Exception):
    pass


def _on_signal(signum: int, _frame: object) -> None:
    raise Abort(f"signal {signum}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # utime + stime (all threads)
    except (OSError, IndexError, ValueError):
        return 0


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def prewarm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def mount(variant: str, image: str, work: str, aio_threads: int) -> tuple[subprocess.Popen, str]:
    cache, reads, writes, _ = VARIANTS[variant]
    mdir = tempfile.mkdtemp(prefix=f"{variant}-", dir=work)
    logf = open(os.path.join(mdir, "daemon.log"), "w")
    if cache is None:  # qsd: the mountpoint is a regular file
        mnt = os.path.join(mdir, "export")
        open(mnt, "w").close()
        cmd = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f,filename={image}",
            "--blockdev",
            "driver=raw,node-name=q,file=f",
            "--export",
            f"type=fuse,id=e,node-name=q,mountpoint={mnt},writable=on",
        ]
        env = None
        exported = mnt
    else:
        imgdir = os.path.join(mdir, "imgs")
        os.mkdir(imgdir)
        os.link(image, os.path.join(imgdir, os.path.basename(image)))
        mnt = os.path.join(mdir, "mnt")
        os.mkdir(mnt)
        cmd = [
            PYTHON,
            "-c",
            SHIM,
            "mount",
            "--foreground",
            "--cache",
            cache,
            "--aio-threads",
            str(aio_threads),
            "--log",
            os.path.join(mdir, "imgfs.log"),
            imgdir,
            mnt,
        ]
        env = dict(os.environ, ROUTE_READS=reads, ROUTE_WRITES=writes)
        exported = os.path.join(mnt, os.path.basename(image) + ".raw")
    # cwd=REPO: `python -c` puts the working directory first on sys.path, so this always runs
    # the imgfs of the repository this script belongs to.
    p = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=REPO,
    )
    STARTED.append(p)
    MOUNTED.append(("qsd" if cache is None else "imgfs", mnt, p))
    end = time.monotonic() + 30
    while not (is_mounted(mnt) and os.path.exists(exported)):
        if p.poll() is not None:
            raise RuntimeError(f"{variant}: exited rc={p.returncode}: see {logf.name}")
        if time.monotonic() > end:
            raise RuntimeError(f"{variant}: not mounted after 30 s: see {logf.name}")
        time.sleep(0.05)
    return p, exported


def umount(entry: tuple[str, str, subprocess.Popen]) -> None:
    kind, mnt, p = entry
    if kind == "qsd":
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # qsd unmounts itself; fusermount -u leaves it spinning
    elif is_mounted(mnt):
        subprocess.run(
            [os.path.join(REPO, ".venv", "bin", "imgfs"), "umount", mnt],
            capture_output=True,
            timeout=60,
        )
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
    MOUNTED.remove(entry)


def fio(path: str, rw: str, bs: str, qd: int, runtime: int, size: int) -> dict:
    cmd = [
        "fio",
        "--name=routing",
        f"--filename={path}",
        f"--rw={rw}",
        f"--bs={bs}",
        "--ioengine=libaio",
        f"--iodepth={qd}",
        "--direct=1",
        "--numjobs=1",
        "--time_based=1",
        f"--runtime={runtime}",
        f"--size={size}",
        "--allow_file_create=0",
        "--fallocate=none",
        "--norandommap=1",
        "--randrepeat=1",
        "--disk_util=0",
        "--thread",
        "--output-format=json",
    ]
    r = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=runtime + 60
    )
    try:
        job = json.loads(r.stdout[r.stdout.index("{") :])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        return {"status": "fail", "note": (r.stderr or r.stdout).strip()[-200:]}
    d = job["write" if "write" in rw else "read"]
    if job.get("error") or d["io_bytes"] == 0:
        return {"status": "fail", "note": f"error {job.get('error')}"}
    clat = d.get("clat_ns", {}).get("percentile", {})
    return {
        "status": "ok",
        "iops": d["iops"],
        "MBps": d["bw_bytes"] / 1e6,
        "lat_mean_us": d["lat_ns"]["mean"] / 1e3,
        "lat_p99_us": clat.get("99.000000", 0) / 1e3,
        "ios": d["total_ios"],
        "note": "",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bs", default="16k")
    ap.add_argument("--qd", default="1,16")
    ap.add_argument("--rw", default="randread,randwrite")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--aio-threads", type=int, default=4, help="imgfs --aio-threads (default 4)")
    ap.add_argument("--scratch", default="/tmp")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    size = parse_size(args.size)
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v}; known: {','.join(VARIANTS)}")
    qds = [int(q) for q in args.qd.split(",")]
    rws = args.rw.split(",")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    run_id = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, f"routing-{run_id}")
    work = tempfile.mkdtemp(prefix="imgfs-routing.", dir=args.scratch)
    rows = []
    try:
        image = os.path.join(work, "raw.raw")
        log(f"creating {size >> 20} MiB random raw image {image}")
        subprocess.run(
            [
                "dd",
                "if=/dev/urandom",
                f"of={image}",
                "bs=1M",
                f"count={size >> 20}",
                "status=none",
                "conv=fsync",
            ],
            check=True,
        )
        for rep in range(1, args.reps + 1):
            for v in variants:
                prewarm(image)
                p, exported = mount(v, image, work, args.aio_threads)
                try:
                    for rw in rws:
                        for qd in qds:
                            t0 = cpu_ticks(p.pid)
                            res = fio(exported, rw, args.bs, qd, args.runtime, size)
                            cpu = (cpu_ticks(p.pid) - t0) / TICK
                            if res["status"] == "ok" and res["ios"]:
                                res["cpu_us_per_io"] = cpu / res["ios"] * 1e6
                            row = {
                                "rep": rep,
                                "variant": v,
                                "rw": rw,
                                "bs": args.bs,
                                "qd": qd,
                                **res,
                            }
                            rows.append(row)
                            log(
                                f"rep {rep} {v:12s} {rw:9s} QD{qd:<2d} "
                                + (
                                    f"{res['iops']:8.0f} IOPS  mean {res['lat_mean_us']:6.0f} us"
                                    f"  daemon CPU {res.get('cpu_us_per_io', 0):5.0f} us/IO"
                                    if res["status"] == "ok"
                                    else f"FAIL {res['note']}"
                                )
                            )
                finally:
                    umount(MOUNTED[-1])
    except Abort as e:
        log(f"aborted: {e}")
        return 130
    finally:
        for entry in reversed(list(MOUNTED)):
            try:
                umount(entry)
            except Exception as e:  # keep cleaning up
                log(f"cleanup: {entry[1]}: {e}")
        for p in STARTED:
            if p.poll() is None:
                p.kill()
                p.wait()
        if not any(is_mounted(m) for _, m, _ in MOUNTED):
            shutil.rmtree(work, ignore_errors=True)
        if rows:
            write_results(base, rows, args, variants, rws, qds)
    return 0


def write_results(
    base: str,
    rows: list[dict],
    args: argparse.Namespace,
    variants: list[str],
    rws: list[str],
    qds: list[int],
) -> None:
    cols = [
        "rep",
        "variant",
        "rw",
        "bs",
        "qd",
        "status",
        "iops",
        "MBps",
        "lat_mean_us",
        "lat_p99_us",
        "cpu_us_per_io",
        "note",
    ]
    with open(base + ".tsv", "w") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            f.write(
                "\t".join(
                    f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                    for c in cols
                )
                + "\n"
            )
    try:
        commit = subprocess.run(
            ["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "?"
    out = [
        f"routing run {os.path.basename(base)} (imgfs {commit}): {args.bs} {','.join(rws)}, "
        f"libaio --direct=1, {args.reps} reps x {args.runtime} s, "
        f"--aio-threads {args.aio_threads}",
        "",
        "IOPS median [min-max], mean latency (µs, median), daemon CPU µs per I/O (median)",
        "",
    ]
    out.append("| variant | " + " | ".join(f"{rw} QD{qd}" for rw in rws for qd in qds) + " |")
    out.append("|---|" + "---|" * (len(rws) * len(qds)))
    for v in variants:
        cells = []
        for rw in rws:
            for qd in qds:
                ok = [
                    r
                    for r in rows
                    if r["variant"] == v and r["rw"] == rw and r["qd"] == qd and r["status"] == "ok"
                ]
                if not ok:
                    cells.append("fail")
                    continue
                iops = [r["iops"] for r in ok]
                lat = statistics.median(r["lat_mean_us"] for r in ok)
                cpu = statistics.median(r.get("cpu_us_per_io", 0) for r in ok)
                cells.append(
                    f"{statistics.median(iops):.0f} [{min(iops):.0f}-{max(iops):.0f}], "
                    f"{lat:.0f} µs, cpu {cpu:.0f}"
                )
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    out += ["", "Variants:"] + [f"- {v}: {VARIANTS[v][3]}" for v in variants]
    with open(base + "-summary.md", "w") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(out))
    log(f"results: {base}.tsv, {base}-summary.md")


if __name__ == "__main__":
    sys.exit(main())
