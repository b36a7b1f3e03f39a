"""Helpers shared by the qcow2 tests: images made with qemu-img/qemu-io, and comparisons."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from imgfs.block.disk import open_disk

KiB = 1024
MiB = 1024 * KiB


def run(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stdout} {result.stderr}"
    return result.stdout


def create(path: Path, size: int, opts: str = "", backing: Path | None = None, bfmt: str = "qcow2"):
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing is not None:
        args += ["-b", backing.name, "-F", bfmt]
    run(*args, path.name, str(size), cwd=path.parent)  # relative data_file names
    return path


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    run(*args, path.name, cwd=path.parent)  # qemu opens data files relative to its cwd


def random_io_commands(rng: random.Random, size: int, count: int, zero: bool = True) -> list[str]:
    """qemu-io commands: pattern writes at odd offsets, zero writes and discards."""
    out = []
    for _ in range(count):
        length = rng.choice([512, 1024, 4096, 65536, 70000 // 512 * 512, 300 * 1024])
        off = rng.randrange(0, max(1, size - length)) // 512 * 512
        roll = rng.random()
        if roll < 0.7 or not zero:
            out.append(f"write -P {rng.randrange(1, 255)} {off} {length}")
        elif roll < 0.85:
            out.append(f"write -z {off} {length}")
        else:
            out.append(f"discard {off} {length}")
    return out


def qemu_convert_raw(path: Path, out: Path) -> Path:
    """qemu-img convert -O raw, run in the image's directory (relative data file names)."""
    run("qemu-img", "convert", "-O", "raw", path.name, str(out.resolve()), cwd=path.parent)
    return out


def read_all(path: Path, chunk: int = 3 * MiB + 4096 + 17, **kw) -> bytes:
    disk = open_disk(str(path), read_only=True, **kw)
    try:
        out = bytearray()
        pos = 0
        while pos < disk.size:
            n = min(chunk, disk.size - pos)
            piece = disk.read(pos, n)
            assert len(piece) == n
            out += piece
            pos += n
        return bytes(out)
    finally:
        disk.close()


def assert_reads_like_qemu(path: Path, scratch: Path, **kw) -> None:
    ours = read_all(path, **kw)
    ref = qemu_convert_raw(path, scratch / (path.name + ".ref.raw")).read_bytes()
    assert len(ours) == len(ref)
    if ours != ref:
        first = next(i for i in range(len(ref)) if ours[i] != ref[i])
        raise AssertionError(f"{path.name}: differs from qemu-img convert at byte {first}")
