"""Shared helpers for the emulation tests: real targets over real files."""

from __future__ import annotations

from pathlib import Path

from imgfs.block.hostfile import CacheMode
from imgfs.emulation.target import FileTarget

MiB = 1024 * 1024


def raw_file(path: Path, size: int = 64 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def file_target(
    tmp_path: Path,
    size: int = 64 * MiB,
    name: str = "disk.raw",
    cache: CacheMode = CacheMode.WRITEBACK,
    read_only: bool = False,
) -> FileTarget:
    return FileTarget(str(raw_file(tmp_path / name, size)), cache, read_only=read_only)
