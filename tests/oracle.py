"""The qemu-img oracle, reusable by every driver's tests.

A driver is right when the bytes it exports equal ``qemu-img convert -O raw`` of the same
image, and when an image it wrote passes ``qemu-img check`` and ``qemu-img compare`` against the
data written.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

CHUNK = 4 * 1024 * 1024


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, check=check, timeout=600
    )


def qemu_info(image: Path, fmt: str | None = None) -> dict:
    args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + [str(image)]
    return json.loads(qemu_img(*args).stdout)


def qemu_raw(image: Path, out: Path, fmt: str | None = None) -> Path:
    """``qemu-img convert -O raw`` of the image into ``out``."""
    args = ["convert"] + (["-f", fmt] if fmt else []) + ["-O", "raw", str(image), str(out)]
    qemu_img(*args)
    return out


def first_difference(a: Path, b: Path) -> int | None:
    """The first byte offset where two files differ (a shorter file differs at its end)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                for i in range(min(len(ca), len(cb))):
                    if ca[i] != cb[i]:
                        return offset + i
                return offset + min(len(ca), len(cb))
            if not ca:
                return None
            offset += len(ca)


def assert_same_bytes(exported: Path, expected: Path) -> None:
    diff = first_difference(exported, expected)
    assert diff is None, f"{exported} differs from {expected} at byte {diff}"


def assert_export_matches_qemu(
    image: Path, exported: Path, scratch: Path, fmt: str | None = None
) -> None:
    """The exported file's bytes equal qemu-img convert -O raw of the image."""
    reference = qemu_raw(image, scratch / (image.name + ".qemu.raw"), fmt)
    assert_same_bytes(exported, reference)


def qemu_check(image: Path, fmt: str | None = None) -> tuple[int, dict]:
    """(exit status, json) of ``qemu-img check``; 0 clean, 3 leaks only, 2 corrupt, 63 no
    check for this format."""
    args = ["check", "--output=json"] + (["-f", fmt] if fmt else []) + [str(image)]
    result = qemu_img(*args, check=False)
    try:
        data = json.loads(result.stdout) if result.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {"raw-output": result.stdout, "stderr": result.stderr}
    return result.returncode, data


def assert_qemu_check_clean(image: Path, fmt: str | None = None, allow_leaks: bool = False) -> None:
    status, data = qemu_check(image, fmt)
    ok = {0, 63} | ({3} if allow_leaks else set())
    assert status in ok, f"qemu-img check {image}: status {status}: {data}"


def assert_qemu_compare_identical(image: Path, expected_raw: Path, fmt: str | None = None) -> None:
    """``qemu-img compare`` of the image against the raw bytes that should be in it."""
    args = ["compare"] + (["-f", fmt] if fmt else []) + ["-F", "raw", str(image), str(expected_raw)]
    result = qemu_img(*args, check=False)
    assert result.returncode == 0, (
        f"qemu-img compare: {result.stdout.strip()} {result.stderr.strip()}"
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pattern_image(path: Path, size: int, seed: int = 0) -> bytes:
    """A raw image in which every 64 KiB block holds its own index and the seed, so a misplaced
    block shows at once. Returns the bytes written."""
    block = 64 * 1024
    out = bytearray(size)
    for i in range(0, size, block):
        tag = f"imgfs block {i // block:08d} seed {seed:04d} ".encode()
        piece = (tag * (block // len(tag) + 1))[: min(block, size - i)]
        out[i : i + len(piece)] = piece
    path.write_bytes(out)
    return bytes(out)
