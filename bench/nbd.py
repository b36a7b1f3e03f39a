#!/usr/bin/env python3
"""NBD figures: imgfs's NBD client against QEMU's, and ``imgfs serve`` against qemu-nbd.

Client: an image (random data, so nothing is skipped as zeros) served by qemu-nbd over a unix
socket, read sequentially in 1 MiB requests through imgfs's client (imgfs.nbd.client, one
thread and four threads sharing one connection, the way FUSE workers share it) side by side
with ``qemu-img convert`` (QEMU's NBD client) and ``nbdcopy`` (libnbd) from the same export.

The qcow2 file's own bytes are also served (qemu-nbd -f raw) and read through a qcow2 driver
on the client: imgfs's (on its NBD client) against qemu-img convert -f qcow2 (QEMU's).

Server: the same images exported by ``imgfs serve`` and by ``qemu-nbd`` (TCP on loopback),
copied with ``nbdcopy`` to ``null:`` (reads) and from a file into a fresh image (writes:
into a sparse raw file, and into an empty qcow2, i.e. allocating writes).

Each figure is the median of --reps runs, in MB/s (10^6 bytes per second). Servers are
restarted for every run and stopped (SIGTERM, then SIGKILL) when it ends.

Usage: bench/nbd.py [--size 512M] [--reps 3] [--out bench/results/nbd-DATE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
PYTHON = os.environ.get("IMGFS_PYTHON", sys.executable)
IMGFS_ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}
MiB = 1024 * 1024


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_listening(proc: subprocess.Popen, port: int | None, sock: Path | None) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode})")
        try:
            if sock is not None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def qemu_nbd(image: Path, fmt: str, *, sock: Path | None = None) -> Iterator[str]:
    """qemu-nbd serving one image; yields the export URL (its pid in SERVER_PID)."""
    args = ["qemu-nbd", "-t", "-f", fmt, "-x", "disk", "--cache=writeback", "-e", "16"]
    port = None
    if sock is not None:
        args += ["-k", str(sock)]
        url = f"nbd+unix:///disk?socket={sock}"
    else:
        port = free_port()
        args += ["-b", "127.0.0.1", "-p", str(port)]
        url = f"nbd://127.0.0.1:{port}/disk"
    proc = subprocess.Popen(
        [*args, str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(proc, port, sock)
        SERVER_PID[0] = proc.pid
        yield url
    finally:
        stop(proc)


@contextlib.contextmanager
def imgfs_serve(images: Path) -> Iterator[str]:
    """imgfs serve on the directory; yields nbd://127.0.0.1:PORT (append /NAME)."""
    port = free_port()
    proc = subprocess.Popen(
        [PYTHON, "-m", "imgfs", "serve", str(images), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=IMGFS_ENV,
    )
    try:
        wait_listening(proc, port, None)
        SERVER_PID[0] = proc.pid
        yield f"nbd://127.0.0.1:{port}"
    finally:
        stop(proc)


SERVER_PID = [0]  # the server started last
CPU_SECONDS: dict[str, list[float]] = {}  # figure -> server CPU seconds per GiB, per run


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_cpu() -> float:
    """CPU seconds of this process and its finished children (the client tools)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], None], nbytes: int, key: str, *, server: bool = False) -> float:
    """MB/s of fn(); also the CPU seconds per GiB moved of the server (server=True) or of the
    client (this process, or the client tool it ran)."""
    pid = SERVER_PID[0]
    cpu0 = cpu_seconds(pid) if server else client_cpu()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    used = (cpu_seconds(pid) if server else client_cpu()) - cpu0
    CPU_SECONDS.setdefault(key, []).append(used * (1 << 30) / nbytes)
    return nbytes / elapsed / 1e6


def imgfs_client_read(url: str, threads: int, request: int = MiB) -> Callable[[], None]:
    def go() -> None:
        from imgfs.block.hostfile import CacheMode
        from imgfs.remote import open_url

        f = open_url(url, writable=False, cache=CacheMode.WRITEBACK)
        size = f.size()

        def worker(k: int) -> None:
            for pos in range(k * request, size, threads * request):
                f.pread(pos, request)

        try:
            pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        finally:
            f.close()

    return go


def imgfs_disk_read(url: str, fmt: str, threads: int, request: int = MiB) -> Callable[[], None]:
    """A format driver on top of the NBD client (an image file's bytes served as the export)."""

    def go() -> None:
        from imgfs.block import registry
        from imgfs.block.disk import Disk
        from imgfs.block.driver import OpenOptions
        from imgfs.block.hostfile import CacheMode
        from imgfs.remote import open_url

        file = open_url(url, writable=False, cache=CacheMode.WRITEBACK)
        opts = OpenOptions(read_only=True, cache=CacheMode.WRITEBACK)
        disk = Disk(registry.get_driver(fmt).open(file, opts), CacheMode.WRITEBACK, url)

        def worker(k: int) -> None:
            for pos in range(k * request, disk.size, threads * request):
                disk.read(pos, request)

        try:
            pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        finally:
            disk.close()

    return go


def qemu_img_convert(url: str, size: int, fmt: str = "raw") -> Callable[[], None]:
    return lambda: run(
        "qemu-img", "convert", "-n", "-f", fmt, "--target-image-opts", url,
        f"driver=null-co,size={size}",
    )  # fmt: skip


def nbdcopy(src: str, dst: str) -> Callable[[], None]:
    return lambda: run("nbdcopy", src, dst)


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512M")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    size = parse_size(args.size)
    results: dict[str, list[float]] = {}

    def measure(key: str, fn: Callable[[], None], *, server: bool = False) -> None:
        record(key, timed(fn, size, key, server=server))

    def record(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)
        print(f"{key}: {value:.0f} MB/s", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="imgfs-nbd-bench-") as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        source = work / "source.raw"
        with open(source, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        raw = images / "disk.raw"
        qcow2 = images / "disk.qcow2"
        run("cp", str(source), str(raw))
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source), str(qcow2))
        # read everything once so every run starts from a warm page cache
        for path in (source, raw, qcow2):
            path.read_bytes()
        sock = work / "q.sock"
        for rep in range(args.reps):
            print(f"-- rep {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
            for fmt, image in (("raw", raw), ("qcow2", qcow2)):
                # client side: the same qemu-nbd export read by three clients
                with qemu_nbd(image, fmt, sock=sock) as url:
                    measure(f"client {fmt} imgfs 1 thread", imgfs_client_read(url, 1))
                    measure(f"client {fmt} imgfs 4 threads", imgfs_client_read(url, 4))
                    measure(f"client {fmt} qemu-img convert", qemu_img_convert(url, size))
                    measure(f"client {fmt} nbdcopy", nbdcopy(url, "null:"))
                if fmt == "qcow2":  # the qcow2 file's bytes as the export, a driver on top
                    with qemu_nbd(image, "raw", sock=sock) as url:
                        measure(
                            "client qcow2-bytes imgfs qcow2 driver 4 threads",
                            imgfs_disk_read(url, "qcow2", 4),
                        )
                        measure(
                            "client qcow2-bytes qemu-img convert -f qcow2",
                            qemu_img_convert(url, size, "qcow2"),
                        )
                # server side: nbdcopy reading from, and writing to, each server
                with imgfs_serve(images) as base:
                    key = f"server {fmt} read imgfs serve"
                    measure(key, nbdcopy(f"{base}/{image.name}", "null:"), server=True)
                with qemu_nbd(image, fmt) as url:
                    measure(f"server {fmt} read qemu-nbd", nbdcopy(url, "null:"), server=True)
            for fmt in ("raw", "qcow2"):
                target_dir = work / "targets"
                target_dir.mkdir(exist_ok=True)
                target = target_dir / f"target.{fmt}"
                for server in ("imgfs serve", "qemu-nbd"):
                    target.unlink(missing_ok=True)
                    run("qemu-img", "create", "-q", "-f", fmt, str(target), str(size))
                    key = f"server {fmt} write {server}"
                    if server == "imgfs serve":
                        with imgfs_serve(target_dir) as base:
                            measure(key, nbdcopy(str(source), f"{base}/{target.name}"), server=True)
                    else:
                        with qemu_nbd(target, fmt) as url:
                            measure(key, nbdcopy(str(source), url), server=True)
                    run(
                        "qemu-img",
                        "compare",
                        "-q",
                        "-f",
                        fmt,
                        "-F",
                        "raw",
                        str(target),
                        str(source),
                    )

    load = os.getloadavg()
    lines = [
        f"size {args.size}, {args.reps} reps, median MB/s; load average at the end "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs",
        "",
        "| figure | MB/s (median) | runs | CPU s/GiB (median; server's or client's) |",
        "|---|---:|---|---:|",
    ]
    for key, values in results.items():
        cpu = CPU_SECONDS.get(key)
        cpu_text = f"{statistics.median(cpu):.2f}" if cpu else ""
        runs = " ".join(f"{v:.0f}" for v in values)
        lines.append(f"| {key} | {median(values)} | {runs} | {cpu_text} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
