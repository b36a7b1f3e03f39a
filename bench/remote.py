#!/usr/bin/env python3
"""Sequential reads of an image served by nginx on loopback: imgfs's HTTP backend against
qemu's curl driver.

One ~1 GiB source of random data is served as raw and as qcow2 (fully allocated) by a real
nginx (the same launcher as tests/remote). For each image and repetition:

* ``imgfs mount`` of a ``NAME.url`` file, then ``dd bs=1M`` of the exported file to /dev/null
  (direct_io: 1 MiB FUSE requests);
* ``imgfs convert -O raw URL out`` (the CLI path: no FUSE);
* ``qemu-img convert -m 1 -O raw URL out`` (qemu's curl driver; ``-m 1`` because qemu 7.2's
  curl driver hangs with several coroutines in flight, see tests/remote/test_http.py);
* ``qemu-img convert -O raw LOCALFILE out`` as the ceiling of the convert path without HTTP.

Convert outputs go to a scratch file (on the same disk, deleted each time). Medians of MB/s.
Usage: bench/remote.py [--size 1G] [--reps 3]. Writes bench/results/remote-<date>.{tsv,md}.
Needs root (FUSE).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
PYTHON = os.environ.get("IMGFS_PYTHON", str(HERE.parent / ".venv" / "bin" / "python"))
IMGFS = [PYTHON, "-m", "imgfs"]
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}

from tests.remote.httpserver import Nginx  # noqa: E402


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def timed(fn: Callable[[], None]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL, timeout=1800)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="imgfs-bench-remote-", dir="/var/tmp") as scratch_dir:
        scratch = Path(scratch_dir)
        www = scratch / "www"
        www.mkdir()
        with open(www / "disk.img", "wb") as f:
            for _ in range(0, size, 64 << 20):
                f.write(os.urandom(64 << 20))
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(www / "disk.img"),
            str(www / "disk.qcow2"))  # fmt: skip
        images = scratch / "images"
        images.mkdir()
        mnt = scratch / "mnt"
        mnt.mkdir()
        server = Nginx(www, scratch)
        out = scratch / "out.raw"
        try:
            for name in ("disk.img", "disk.qcow2"):
                (images / f"{name}.url").write_text(f"{server.url}/{name}\n")
            run(*IMGFS, "mount", "--log", str(scratch / "imgfs.log"), str(images), str(mnt))
            try:
                for rep in range(args.reps):
                    for name, fmt in (("disk.img", "raw"), ("disk.qcow2", "qcow2")):
                        url = f"{server.url}/{name}"
                        cases: dict[str, Callable[[], None]] = {
                            "imgfs mount + dd": lambda n=name: run(
                                "dd",
                                f"if={mnt / n}.raw",
                                "of=/dev/null",
                                "bs=1M",
                                "status=none",
                            ),  # fmt: skip
                            "imgfs convert": lambda u=url: run(*IMGFS, "convert", u, str(out)),
                            "qemu-img convert (curl)": lambda u=url, f=fmt: run(
                                "qemu-img",
                                "convert",
                                "-m",
                                "1",
                                "-f",
                                f,
                                "-O",
                                "raw",
                                u,
                                str(out),
                            ),  # fmt: skip
                            "qemu-img convert (local file)": lambda n=name, f=fmt: run(
                                "qemu-img",
                                "convert",
                                "-f",
                                f,
                                "-O",
                                "raw",
                                str(www / n),
                                str(out),
                            ),  # fmt: skip
                        }
                        for case, fn in cases.items():
                            seconds = timed(fn)
                            out.unlink(missing_ok=True)
                            mbps = size / seconds / 1e6
                            results.setdefault((name, case), []).append(mbps)
                            print(f"rep {rep} {name:11} {case:30} {mbps:8.1f} MB/s", flush=True)
            finally:
                run(*IMGFS, "umount", str(mnt))
        finally:
            server.stop()
    stamp = time.strftime("%Y%m%d-%H%M")
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    load = os.getloadavg()
    lines = [
        f"# HTTP sequential read, {args.size} random data, {args.reps} reps (median MB/s)",
        "",
        f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (2 cores)",
        "",
        "| image | case | median MB/s | all |",
        "|---|---|---|---|",
    ]
    with open(results_dir / f"remote-{stamp}.tsv", "w") as tsv:
        for (name, case), values in results.items():
            med = statistics.median(values)
            every = " ".join(f"{v:.0f}" for v in values)
            lines.append(f"| {name} | {case} | {med:.0f} | {every} |")
            tsv.write(f"{name}\t{case}\t{med:.1f}\t{every}\n")
    (results_dir / f"remote-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
