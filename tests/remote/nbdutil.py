"""NBD test helpers: qemu-nbd, nbdkit and ``imgfs serve`` as subprocesses (always stopped:
SIGTERM, then SIGKILL), a Disk on an NBD URL, self-signed TLS certificates, and qemu-img map
in a comparable form."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgfs.block import registry
from imgfs.block.disk import Disk
from imgfs.block.driver import PROBE_HEAD_SIZE, PROBE_TAIL_SIZE, OpenOptions, ProbeInput
from imgfs.block.hostfile import CacheMode
from imgfs.remote import open_url
from tests.remote.tls import make_ca_and_cert

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def wait_connectable(
    proc: subprocess.Popen, *, port: int | None = None, sock: Path | None = None
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            if sock is not None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start listening")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # without the export name: nbd://127.0.0.1:PORT or nbd+unix://...
    port: int | None = None
    sock: Path | None = None
    log: Path | None = None

    def export(self, name: str = "") -> str:
        if self.sock is not None:
            return f"nbd+unix:///{name}?socket={self.sock}"
        return f"{self.url}/{name}"


@contextlib.contextmanager
def qemu_nbd(
    image: Path, fmt: str, *, unix: Path | None = None, read_only: bool = False, name: str = "disk"
) -> Iterator[Server]:
    args = ["qemu-nbd", "-t", "-f", fmt, "-x", name, "--cache=writeback"]
    if read_only:
        args.append("-r")
    port = None
    if unix is not None:
        args += ["-k", str(unix)]
    else:
        port = free_port()
        args += ["-b", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen([*args, str(image)], stdout=subprocess.DEVNULL)
    try:
        wait_connectable(proc, port=port, sock=unix)
        yield Server(proc, f"nbd://127.0.0.1:{port}", port, unix)
    finally:
        stop(proc)


@contextlib.contextmanager
def nbdkit(*plugin_args: str, unix: Path, extra: tuple[str, ...] = ()) -> Iterator[Server]:
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(unix), *extra, *plugin_args], stdout=subprocess.DEVNULL
    )
    try:
        wait_connectable(proc, sock=unix)
        yield Server(proc, "", None, unix)
    finally:
        stop(proc)


@contextlib.contextmanager
def imgfs_serve(
    images: Path, *args: str, log: Path, listen: str = "127.0.0.1:0"
) -> Iterator[Server]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgfs", "serve", str(images), "--listen", listen, *args],
            stdout=subprocess.DEVNULL,
            stderr=out,
            env=env,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        bound = None
        while bound is None:
            text = log.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("imgfs: listening on "):
                    bound = line.removeprefix("imgfs: listening on ")
            if bound is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"imgfs serve did not start:\n{text}")
                time.sleep(0.05)
        if bound.startswith("unix:"):
            sock = Path(bound[5:])
            yield Server(proc, "", None, sock, log)
        else:
            port = int(bound.rpartition(":")[2])
            yield Server(proc, f"nbd://127.0.0.1:{port}", port, None, log)
    finally:
        stop(proc)


def open_url_disk(url: str, fmt: str | None = None, *, writable: bool = False) -> Disk:
    """A Disk on an NBD URL through the remote registry and a format driver (what the chain
    layer does for a URL once it knows them)."""
    cache = CacheMode.WRITEBACK
    file = open_url(url, writable=writable, cache=cache)
    try:
        if fmt is None:
            size = file.size()
            head = bytes(file.pread(0, min(PROBE_HEAD_SIZE, size)))
            tail = bytes(file.pread(max(0, size - PROBE_TAIL_SIZE), min(PROBE_TAIL_SIZE, size)))
            driver_cls = registry.probe(ProbeInput("export", size, head, tail))
        else:
            driver_cls = registry.get_driver(fmt)
        top = driver_cls.open(file, OpenOptions(read_only=not writable, cache=cache))
    except BaseException:
        file.close()
        raise
    return Disk(top, cache, url)


def read_all(disk: Disk, step: int = 1 << 20) -> bytes:
    return b"".join(bytes(disk.read(pos, step)) for pos in range(0, disk.size, step))


def map_runs(target: str, fmt: str | None = None, *args: str) -> list[tuple[int, int, bool, bool]]:
    """qemu-img map as (start, length, data, zero) with adjacent equal runs merged."""
    cmd = ["qemu-img", "map", "--output=json", *args] + (["-f", fmt] if fmt else []) + [target]
    entries = json.loads(subprocess.run(cmd, capture_output=True, check=True, text=True).stdout)
    return merge_runs((e["start"], e["length"], e["data"], e["zero"]) for e in entries)


def merge_runs(runs: object) -> list[tuple[int, int, bool, bool]]:
    out: list[list] = []
    for start, length, data, zero in runs:  # type: ignore[attr-defined]
        if out and out[-1][2:] == [data, zero] and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length
        else:
            out.append([start, length, data, zero])
    return [tuple(r) for r in out]  # type: ignore[misc]


def extents_of(file: object, size: int) -> list[tuple[int, int, bool, bool]]:
    """data_extents walked over the whole export, in map_runs' form."""
    runs = []
    pos = 0
    while pos < size:
        is_data, n = file.data_extents(pos, size - pos)  # type: ignore[attr-defined]
        assert n > 0
        runs.append((pos, n, is_data, not is_data))
        pos += n
    return merge_runs(runs)


def make_tls_dir(path: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it, in the layout qemu
    (ca-cert.pem, server-cert.pem, server-key.pem) and libnbd (ca-cert.pem) read."""
    ca, cert, key = make_ca_and_cert(path)
    ca.rename(path / "ca-cert.pem")
    cert.rename(path / "server-cert.pem")
    key.rename(path / "server-key.pem")
    return path
