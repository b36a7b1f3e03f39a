"""Which images of a directory ``imgfs dedup`` looks at, and the content hashes of their guest
blocks (from the index when the file is unchanged)."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

from imgfs.block import chain
from imgfs.block.disk import Disk, open_disk
from imgfs.block.extent import Allocation
from imgfs.dedup.control import Control
from imgfs.dedup.index import DedupIndex, FileKey
from imgfs.fuse.scan import DirectoryScanner

# Reads for hashing cover this many bytes at once (whole blocks).
READ_CHUNK = 8 * 1024 * 1024


def block_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The content hash of a block (SHA-256: the CPU's SHA extensions make it the fastest of
    hashlib's strong hashes here)."""
    return hashlib.sha256(data).digest()


@dataclass(slots=True)
class Image:
    """One disk of the directory as dedup sees it."""

    name: str  # the file name in the directory
    path: str
    format: str
    virtual_size: int
    key: FileKey
    backing: str | None = None  # the backing file's name as stored, if any
    # Why the image may not be rewritten (it is another image's backing file, ...), if so.
    read_only_reason: str | None = None
    hashes: dict[int, bytes] = field(default_factory=dict)  # block index -> hash, non-zero only
    hashed_now: bool = False


@dataclass(slots=True)
class ScanResult:
    images: list[Image]
    hashed_bytes: int = 0  # guest bytes read and hashed in this run
    reused_bytes: int = 0  # guest bytes whose hashes came from the index
    seconds: float = 0.0  # hashing (and index lookups), not listing
    errors: list[str] = field(default_factory=list)


def list_images(directory: str) -> tuple[list[Image], list[str]]:
    """The disks of the directory (as the mount would export them), without hashes."""
    scanner = DirectoryScanner(directory, chain.Containment(directory))
    images: list[Image] = []
    errors: list[str] = []
    for entry in sorted(scanner.scan().values(), key=lambda e: e.source_name):
        if entry.source_name != os.path.basename(entry.path):
            continue  # a bundle directory: not a file dedup can rewrite or reflink
        try:
            disk = open_disk(entry.path, entry.format, read_only=True,
                             containment=chain.Containment(directory))  # fmt: skip
        except Exception as e:  # a disk imgfs cannot open is left alone
            errors.append(f"{entry.source_name}: {e}")
            continue
        reason = entry.read_only_reason
        if os.path.islink(entry.path):
            reason = "it is a symbolic link"
        elif entry.st.st_nlink > 1:
            reason = "it has other hard links"
        try:
            spec = disk.top.backing_spec
            images.append(
                Image(
                    entry.source_name,
                    entry.path,
                    entry.format,
                    disk.size,
                    FileKey(entry.st.st_ino, entry.st.st_size, entry.st.st_mtime_ns),
                    spec.filename if spec else None,
                    reason,
                )  # fmt: skip
            )
        finally:
            disk.close()
    return images, errors


def scan(directory: str, index: DedupIndex, control: Control) -> ScanResult:
    """List the images and fill in their hashes, hashing only what changed since the index."""
    images, errors = list_images(directory)
    started = time.monotonic()
    result = ScanResult(images, errors=errors)
    index.forget_except(img.name for img in images)
    todo = [img for img in images if not index.is_current(img.name, img.key)]
    for img in images:
        if img not in todo:
            img.hashes = index.hashes(img.name)
            result.reused_bytes += img.virtual_size
    bar = control.bar(sum(img.virtual_size for img in todo), "hash")
    try:
        for img in todo:
            disk = open_disk(img.path, img.format, read_only=True,
                             containment=chain.Containment(directory))  # fmt: skip
            try:
                img.hashes = hash_disk(disk, index.block_size, control, bar)
            finally:
                disk.close()
            if FileKey.of(img.path) != img.key:
                errors.append(f"{img.name}: changed while it was hashed; not indexed")
                img.read_only_reason = "it changed while imgfs dedup read it"
                continue
            index.replace(img.name, img.key, img.format, img.virtual_size, img.hashes)
            img.hashed_now = True
            result.hashed_bytes += img.virtual_size
    finally:
        bar.close()
    result.seconds = time.monotonic() - started
    return result


def data_blocks(disk: Disk, block_size: int) -> list[tuple[int, int]]:
    """Runs (first block, count) of blocks that hold some data in the chain (the rest reads
    as zeros and needs no hash)."""
    runs: list[tuple[int, int]] = []
    size = disk.size
    offset = 0
    while offset < size:
        ext = disk.block_status(offset, min(size - offset, 1 << 30))
        end = ext.offset + ext.length
        if ext.allocation is Allocation.DATA:
            first, last = ext.offset // block_size, (end - 1) // block_size
            if runs and runs[-1][0] + runs[-1][1] > first:
                first = runs[-1][0] + runs[-1][1]
            if first <= last:
                if runs and runs[-1][0] + runs[-1][1] == first:
                    runs[-1] = (runs[-1][0], last + 1 - runs[-1][0])
                else:
                    runs.append((first, last + 1 - first))
        offset = end
    return runs


def hash_disk(disk: Disk, block_size: int, control: Control, bar: object) -> dict[int, bytes]:
    """Hashes of the non-zero blocks of the disk's guest content. (Serial: a thread pool for
    hashing measured slower here, on two busy cores, than hashing in line.)"""
    zero = bytes(block_size)
    hashes: dict[int, bytes] = {}
    per_read = max(1, READ_CHUNK // block_size)
    size = disk.size
    done = 0
    for first, count in data_blocks(disk, block_size):
        i = first
        while i < first + count:
            control.check("hash-chunk")
            n = min(per_read, first + count - i)
            start = i * block_size
            data = memoryview(disk.read(start, min(n * block_size, size - start)))
            for k in range(0, len(data), block_size):
                piece = data[k : k + block_size]
                if piece != zero[: len(piece)]:
                    hashes[i + k // block_size] = block_hash(piece)
            i += n
        end = min(size, (first + count) * block_size)
        bar.update(end - done)  # type: ignore[attr-defined]
        done = end
    bar.update(max(0, size - done))  # type: ignore[attr-defined]
    return hashes
