#!/usr/bin/env python3
"""Device-emulation benchmarks (issue 7).

    bench/replay.py decode [--n N]
        decode rate of each bus alone (requests/s): SCSI WRITE(10), ATA WRITE FPDMA QUEUED,
        virtio-blk OUT headers.
    bench/replay.py randwrite FILE [--n N] [--qd 32] [--size BYTES]
        replays a 4 KiB random-write virtio trace against FILE (an exported raw file) at queue
        depth QD, then runs fio on the same file with the same pattern (psync, QD threads) and
        prints both IOPS.

Heavy: run it on a quiet machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgfs.block.hostfile import CacheMode
from imgfs.emulation import ata, scsi, virtio
from imgfs.emulation.replay import Replayer
from imgfs.emulation.target import FileTarget
from imgfs.emulation.trace import request_line


def bench_decode(n: int) -> None:
    rng = random.Random(1)
    cdbs = [
        bytes.fromhex("2a00") + rng.randrange(1 << 30).to_bytes(4, "big") + b"\x00\x00\x08\x00"
        for _ in range(1024)
    ]
    fises = [ata.build_fis(0x61, rng.randrange(1 << 40), 8) for _ in range(1024)]
    headers = [virtio.build_header(1, rng.randrange(1 << 40)) for _ in range(1024)]
    for name, fn, items in (
        ("scsi", scsi.decode, cdbs),
        ("ata", ata.decode, fises),
        ("virtio", virtio.decode, headers),
    ):
        start = time.perf_counter()
        for i in range(n):
            fn(items[i & 1023])
        rate = n / (time.perf_counter() - start)
        print(f"decode {name}: {rate:,.0f} requests/s")


def bench_randwrite(path: str, n: int, qd: int, size: int) -> None:
    rng = random.Random(7)
    blocks = size // 4096
    lines = [
        request_line(
            "virtio",
            virtio.build_header(1, rng.randrange(blocks) * 8),
            data={"pattern": "fill", "seed": i},
            sg=[4096],
        )
        for i in range(n)
    ]
    target = FileTarget(path, CacheMode.WRITEBACK)
    summary = Replayer(target, queue_depth=qd).run(lines)
    target.close()
    replay_iops = summary.requests / summary.seconds
    print(f"replay: {summary.requests} x 4 KiB random writes, QD {qd}: {replay_iops:,.0f} IOPS")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fio.json"
        subprocess.run(
            [
                "fio",
                "--name=rw",
                f"--filename={path}",
                f"--size={size}",
                "--rw=randwrite",
                "--bs=4k",
                f"--number_ios={n // qd}",
                f"--numjobs={qd}",
                "--ioengine=psync",
                "--thread",
                "--group_reporting",
                "--output-format=json",
                f"--output={out}",
            ],
            check=True,
        )
        fio_iops = json.loads(out.read_text())["jobs"][0]["write"]["iops"]
    print(f"fio:    psync, {qd} threads: {fio_iops:,.0f} IOPS")
    print(f"replay / fio: {replay_iops / fio_iops:.0%}")


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--n", type=int, default=300_000)
    r = sub.add_parser("randwrite")
    r.add_argument("file")
    r.add_argument("--n", type=int, default=20_000)
    r.add_argument("--qd", type=int, default=32)
    r.add_argument("--size", type=int, default=256 << 20)
    args = p.parse_args()
    if args.what == "decode":
        bench_decode(args.n)
    else:
        if not os.path.exists(args.file):
            with open(args.file, "wb") as f:
                f.truncate(args.size)
        bench_randwrite(args.file, args.n, args.qd, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
