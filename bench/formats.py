#!/usr/bin/env python3
"""imgfs against qemu-storage-daemon's FUSE export, format by format, in one run.

The shared harness (bench/run.sh → ../shared/bench/peers.sh) knows raw, qcow2 and vmdk only. This
script covers every format both tools read: for each format it makes a fully allocated image
from the same source (random data, or compressible text for the compressed variants) and an
empty one, mounts it with each peer, and runs fio: sequential 1 MiB reads (buffered and
O_DIRECT), random 16 KiB reads (O_DIRECT) on the full image, then sequential 1 MiB writes
(allocating) and random 16 KiB writes on the empty one. Peers alternate order between
repetitions; medians are reported with imgfs/qsd ratios.

Usage: bench/formats.py [--size 1G] [--reps 3] [--runtime 3] [--formats qcow2,vpc,...]
Results: bench/results/formats-<date>.{tsv,md}. Needs root (FUSE).
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
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The imgfs measured is the checkout holding this script (a worktree has no .venv of its own:
# IMGFS_PYTHON names the interpreter, e.g. the main checkout's venv).
PYTHON = os.environ.get("IMGFS_PYTHON", str(HERE.parent / ".venv" / "bin" / "python"))
IMGFS = [PYTHON, "-m", "imgfs"]
IMGFS_ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}

# format -> (qemu-img create/convert format, -o options, writable in both peers)
FORMATS: dict[str, tuple[str, str, bool]] = {
    "raw": ("raw", "", True),
    "qcow2": ("qcow2", "cluster_size=65536", True),
    "qcow2-zlib": ("qcow2", "cluster_size=65536,compression_type=zlib", False),
    "qcow": ("qcow", "", True),
    "qed": ("qed", "", True),
    "vmdk": ("vmdk", "subformat=monolithicSparse", True),
    "vpc": ("vpc", "subformat=dynamic", True),
    "vhdx": ("vhdx", "subformat=dynamic", True),
    "vdi": ("vdi", "", True),
    "parallels": ("parallels", "", True),
    # LUKS (aes-256-xts-plain64, sha256) inside qcow2, and QEMU's standalone luks format.
    "qcow2-luks": ("qcow2", "cluster_size=65536,encrypt.format=luks,encrypt.iter-time=100", True),
    "luks": ("luks", "iter-time=100", True),
    "cloop": ("cloop", "", False),
    "dmg": ("dmg", "", False),
}
COMPRESSED = {"qcow2-zlib", "cloop", "dmg"}
# QEMU opens these read-only or not at all: the qsd blockdevs need read-only=on.
READ_ONLY_DRIVERS = {"cloop", "dmg"}
# Encrypted formats: one passphrase file (made in main) for qemu-img, qsd and imgfs.
ENCRYPTED = {"qcow2-luks", "luks"}
PASSPHRASE_FILE: Path | None = None
READS = ["seqR-1M", "seqR-1M-d1", "randR-16k-d1"]
WRITES = ["seqW-1M-d1", "randW-16k-d1"]


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def secret_opts(name: str) -> list[str]:
    """qemu-img's secret object and option for an encrypted format (empty otherwise)."""
    if name not in ENCRYPTED:
        return []
    return ["--object", f"secret,id=s0,file={PASSPHRASE_FILE}"]


def key_opt(name: str) -> str:
    if name not in ENCRYPTED:
        return ""
    return ",key-secret=s0" if FORMATS[name][0] == "luks" else ",encrypt.key-secret=s0"


def blockdev_key_opt(name: str) -> str:
    """--blockdev (QAPI) wants the encryption format named too."""
    if name in ENCRYPTED and FORMATS[name][0] == "qcow2":
        return ",encrypt.format=luks" + key_opt(name)
    return key_opt(name)


def run_retrying(cmd: list[str]) -> None:
    """qemu-img's LUKS creation fails now and then ("Unable to get accurate CPU usage")."""
    for attempt in range(8):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode == 0:
            return
        if "accurate CPU usage" not in result.stderr or attempt == 7:
            raise RuntimeError(f"{' '.join(cmd)}: {result.stderr}")


def make_sources(work: Path, size: int) -> tuple[Path, Path]:
    random_src = work / "random.raw"
    with open(random_src, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n
    text_src = work / "text.raw"
    # base64 of random bytes: zlib shrinks it to ~77%, so every cluster stays compressed.
    run(
        [
            "bash",
            "-c",
            f"head -c {size * 3 // 4} /dev/urandom | base64 -w0 | head -c {size} > {text_src}",
        ]
    )
    return random_src, text_src


def make_image(
    name: str, work: Path, sources: tuple[Path, Path], size: int
) -> tuple[Path, Path | None]:
    fmt, opts, writable = FORMATS[name]
    src = sources[1] if name in COMPRESSED else sources[0]
    ext = {"qcow2-zlib": "qcow2"}.get(name, fmt)
    full = work / f"{name}-full.{ext}"
    if name == "cloop":
        run(
            [
                "bash",
                "-c",
                f"create_compressed_fs -q -B 65536 {src} {full} 2>/dev/null"
                f" || create_compressed_fs -B 65536 {src} {full}",
            ]
        )
    elif name == "dmg":
        # zlib chunks of 1 MiB (hdiutil's UDZO layout); QEMU 7.2 reads zlib dmg.
        run([sys.executable, str(HERE / "make_dmg.py"), str(src), str(full)])
    else:
        opts += key_opt(name).replace(",", "", 1) if not opts else key_opt(name)
        cmd = ["qemu-img", "convert", *secret_opts(name), "-f", "raw", "-O", fmt]
        cmd += ["-o", opts] if opts else []
        if name in COMPRESSED:
            cmd.append("-c")
        run_retrying(cmd + [str(src), str(full)])
    empty = None
    if writable:
        empty = work / f"{name}-empty.{ext}"
        run_retrying(
            ["qemu-img", "create", *secret_opts(name), "-f", fmt]
            + (["-o", opts] if opts else [])
            + [str(empty), str(size)]
        )
    return full, empty


def describe_image(
    image: Path, fmt: str, size: int, want_full: bool, name: str | None = None
) -> str:
    """Check that IMAGE is what the target needs and say so: the format imgfs probes must be FMT
    (qsd gets driver=FMT), and [0, SIZE) must be all data (reads) or all unallocated (writes)."""
    key = ["--key", str(PASSPHRASE_FILE)] if name in ENCRYPTED else []
    info = run([*IMGFS, "info", *key, str(image)], env=IMGFS_ENV).stdout
    probed = next(
        line.split(":", 1)[1].strip()
        for line in info.splitlines()
        if line.startswith("file format:")
    )
    if probed != fmt:
        raise RuntimeError(f"{image.name}: imgfs probes {probed!r}, expected {fmt!r}")
    if name in ENCRYPTED:
        target = ["--image-opts", f"driver={fmt},file.filename={image}{key_opt(name)}"]
    else:
        target = ["-f", fmt, str(image)]
    map_cmd = ["qemu-img", "map", *secret_opts(name or ""), "--output=json", *target]
    extents = json.loads(run(map_cmd).stdout)
    if fmt == "luks" and not want_full:
        extents = []  # the payload of a LUKS volume is always "data"; a new one is unwritten
    data = sum(
        max(0, min(e["start"] + e["length"], size) - e["start"])
        for e in extents
        if e["data"] and e["start"] < size
    )
    # qemu-img create writes raw's first 4 KiB (its alignment probe); raw has nothing to allocate.
    allowed = (size,) if want_full else ((0, 4096) if fmt == "raw" else (0,))
    on_disk = image.stat().st_blocks * 512
    if all("offset" not in e for e in extents if e["data"]) and data:
        # QEMU has no block status for this format (vhdx): everything reads as "data". Judge
        # by the bytes the file holds instead.
        if (on_disk >= size) if want_full else (on_disk < size // 16):
            data = allowed[0]
    if data not in allowed:
        raise RuntimeError(f"{image.name}: {data} of {size} bytes hold data (qemu-img map)")
    specific = [
        line.strip()
        for line in info.split("Format specific information:", 1)[-1].splitlines()
        if "cache" in line
    ]
    return (
        f"{image.name}: imgfs probes {probed}, qsd driver={fmt}, "
        f"{data} of [0, {size}) allocated (qemu-img map), "
        f"{image.stat().st_blocks * 512 >> 20} MiB on disk"
        + (f", {', '.join(specific)}" if specific else "")
    )


class Peer:
    def __init__(
        self, peer: str, image: Path, fmt: str, mdir: Path, writable: bool, name: str = ""
    ) -> None:
        self.name = name
        # "imgfs:OPTS" is imgfs mounted with -o OPTS (e.g. imgfs:read-ahead=0), for A/B runs.
        self.kind, _, self.opts = peer.partition(":")
        # --peers is comma-separated, so a peer's own mount options are joined with "+".
        self.opts = self.opts.replace("+", ",")
        self.image, self.fmt, self.mdir, self.writable = image, fmt, mdir, writable
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Path:
        self.mdir.mkdir(parents=True)
        imgdir = self.mdir / "imgs"
        imgdir.mkdir()
        link = imgdir / self.image.name
        os.link(self.image, link)
        # Warm the host page cache: the run measures the exporters, not the disk.
        subprocess.run(["cat", str(link)], stdout=subprocess.DEVNULL, check=True)
        if self.kind == "imgfs":
            self.mnt = self.mdir / "mnt"
            self.mnt.mkdir()
            cmd = [
                *IMGFS,
                "mount",
                "--foreground",
                "--log",
                str(self.mdir / "imgfs.log"),
                *(["-o", self.opts] if self.opts else []),
                *(["--key", f"{link.name}={PASSPHRASE_FILE}"] if name_encrypted(self) else []),
                str(imgdir),
                str(self.mnt),
            ]
            exported = self.mnt / (self.image.name + ".raw")
        else:
            self.mnt = self.mdir / "export"
            self.mnt.touch()
            ro = ",read-only=on" if self.fmt in READ_ONLY_DRIVERS else ""
            cmd = [
                "qemu-storage-daemon",
                *secret_opts(self.name),
                "--blockdev",
                f"driver=file,node-name=f,filename={link}{ro}",
                "--blockdev",
                f"driver={self.fmt},node-name=q,file=f{ro}{blockdev_key_opt(self.name)}",
                "--export",
                f"type=fuse,id=e,node-name=q,mountpoint={self.mnt},"
                f"writable={'on' if self.writable else 'off'}",
            ]
            exported = self.mnt
        self.proc = subprocess.Popen(
            cmd,
            env=IMGFS_ENV if self.kind == "imgfs" else None,
            stdout=subprocess.DEVNULL,
            stderr=open(self.mdir / "peer.log", "w"),
            start_new_session=True,
        )
        try:
            return self._wait_ready(exported)
        except BaseException:
            self.__exit__()
            raise

    def _wait_ready(self, exported: Path) -> Path:
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if str(self.mnt) in Path("/proc/self/mountinfo").read_text() and exported.exists():
                return exported
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} failed: {(self.mdir / 'peer.log').read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind}: mount timed out")

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.kind == "imgfs":
            subprocess.run([*IMGFS, "umount", str(self.mnt)], capture_output=True, env=IMGFS_ENV)
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)


def name_encrypted(peer: Peer) -> bool:
    return peer.name in ENCRYPTED


def fio(path: Path, workload: str, runtime: int, size: int) -> tuple[float, float]:
    """(MB/s or IOPS, MB or I/Os done)."""
    kind, bs = workload.split("-")[0], workload.split("-")[1]
    rw = {"seqR": "read", "randR": "randread", "seqW": "write", "randW": "randwrite"}[kind]
    direct = "1" if workload.endswith("-d1") else "0"
    out = run(
        [
            "fio",
            "--name=j",
            f"--filename={path}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--direct={direct}",
            "--ioengine=psync",
            "--iodepth=1",
            "--numjobs=1",
            "--time_based",
            f"--runtime={runtime}",
            f"--size={size}",
            "--norandommap",
            "--randrepeat=1",
            "--allow_file_create=0",
            "--fallocate=none",
            "--thread",
            "--output-format=json",
        ]
    ).stdout
    job = json.loads(out)["jobs"][0]
    side = job["read"] if rw.endswith("read") else job["write"]
    if bs == "16k":
        return side["iops"], side["total_ios"]
    return side["bw_bytes"] / 1e6, side["io_bytes"] / 1e6


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def table(
    rows: list[tuple[int, str, str, str, float]],
    formats: list[str],
    peers: list[str],
    workloads: list[str],
    unit: Callable[[str], str],
    digits: int,
) -> list[str]:
    """A markdown table of the medians, with each peer's ratio to qsd."""
    lines = [
        "| format | peer | " + " | ".join(f"{w} {unit(w)}" for w in workloads) + " |",
        "|---|---|" + "---|" * len(workloads),
    ]
    for name in formats:
        med = {
            (p, w): statistics.median(v for _, pp, n, ww, v in rows if (pp, n, ww) == (p, name, w))
            for p in peers
            for w in workloads
            if any((pp, n, ww) == (p, name, w) for _, pp, n, ww, _ in rows)
        }
        for p in peers:
            cells = []
            for w in workloads:
                if (p, w) not in med:
                    cells.append("–")
                    continue
                v = med[(p, w)]
                ratio = (
                    f" ({v / med[('qsd', w)]:.2f}×)"
                    if p != "qsd" and ("qsd", w) in med and med[("qsd", w)]
                    else ""
                )
                cells.append(f"{v:.{digits}f}{ratio}")
            lines.append(f"| {name} | {p} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=3)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument(
        "--peers", default="qsd,imgfs", help="qsd, imgfs, imgfs:MOUNT-OPTS (comma-separated)"
    )
    args = ap.parse_args()
    size = (
        int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
        if args.size[-1] in "MG"
        else int(args.size)
    )
    formats = args.formats.split(",")
    peers = args.peers.split(",")
    global PASSPHRASE_FILE
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="imgfs-fmtbench-", dir="/tmp"))
    rows: list[tuple[int, str, str, str, float]] = []
    # The exporter's own CPU time per MB or per I/O: unlike throughput, it barely moves with
    # foreign load, so it shows the cost of each peer's read path on a busy machine.
    cpu_rows: list[tuple[int, str, str, str, float]] = []
    # Others may share the machine: the load is part of the record (the peers run side by side,
    # so their ratios stay comparable).
    load_before = os.getloadavg()
    notes: list[str] = []
    PASSPHRASE_FILE = work / "passphrase"
    PASSPHRASE_FILE.write_bytes(b"imgfs bench passphrase")
    try:
        print(f"making sources ({args.size}) in {work}", file=sys.stderr)
        sources = make_sources(work, size)
        for name in formats:
            fmt, _, writable = FORMATS[name]
            full, empty = make_image(name, work, sources, size)
            load = os.getloadavg()
            notes.append(
                f"{name} (load {load[0]:.1f} at start): "
                + describe_image(full, fmt, size, True, name)
            )
            if empty is not None:
                notes.append(f"{name}: " + describe_image(empty, fmt, size, False, name))
            print(notes[-1], file=sys.stderr)
            for rep in range(args.reps):
                order = peers if rep % 2 == 0 else peers[::-1]
                for peer in order:
                    mdir = work / f"m{rep}-{len(rows)}-{name}-r"
                    p = Peer(peer, full, fmt, mdir, writable=False, name=name)
                    with p as f:
                        for w in READS:
                            cpu0 = cpu_seconds(p.proc.pid)  # type: ignore[union-attr]
                            v, units = fio(f, w, args.runtime, size)
                            cpu = cpu_seconds(p.proc.pid) - cpu0  # type: ignore[union-attr]
                            rows.append((rep, peer, name, w, v))
                            cpu_rows.append((rep, peer, name, w, cpu * 1e3 / max(units, 1e-9)))
                            print(f"{rep} {peer:6} {name:11} {w:13} {v:10.1f}", file=sys.stderr)
                    if empty is None:
                        continue
                    # Each write workload starts from its own copy of the empty image, so both
                    # peers allocate from the same state (a faster sequential writer would
                    # otherwise leave more allocated for its random writes).
                    for w in WRITES:
                        copy = work / f"w{rep}-{peer}-{empty.name}"
                        shutil.copyfile(empty, copy)
                        mdir = work / f"m{rep}-{len(rows)}-{name}-w"
                        p = Peer(peer, copy, fmt, mdir, writable=True, name=name)
                        with p as f:
                            cpu0 = cpu_seconds(p.proc.pid)  # type: ignore[union-attr]
                            v, units = fio(f, w, args.runtime, size)
                            cpu = cpu_seconds(p.proc.pid) - cpu0  # type: ignore[union-attr]
                            rows.append((rep, peer, name, w, v))
                            cpu_rows.append((rep, peer, name, w, cpu * 1e3 / max(units, 1e-9)))
                            print(f"{rep} {peer:6} {name:11} {w:13} {v:10.1f}", file=sys.stderr)
                        copy.unlink()
            full.unlink()
            if empty is not None:
                empty.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tsv = results_dir / f"formats-{stamp}.tsv"
    tsv.write_text(
        "rep\tpeer\tformat\tworkload\tvalue\tcpu_ms_per_unit\n"
        + "".join(
            f"{r}\t{p}\t{n}\t{w}\t{v:.1f}\t{c[4]:.3f}\n"
            for (r, p, n, w, v), c in zip(rows, cpu_rows, strict=True)
        )
    )
    workloads = READS + WRITES
    load_after = os.getloadavg()
    lines = [
        f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/"
        f"{load_before[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; "
        f"size {args.size}, {args.reps} reps x {args.runtime} s, medians",
        "",
        *table(rows, formats, peers, workloads, lambda w: "IOPS" if "16k" in w else "MB/s", 0),
        "",
        "Exporter CPU time (user + system, all threads) per unit of I/O, lower is better:",
        "",
        *table(
            cpu_rows, formats, peers, workloads, lambda w: "ms/IO" if "16k" in w else "ms/MB", 2
        ),
        "",
        "Images:",
        "",
        *(f"- {n}" for n in notes),
    ]
    md = results_dir / f"formats-{stamp}.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {tsv} {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
