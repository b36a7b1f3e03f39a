"""imgfs create and imgfs convert, run as a user runs them, checked with qemu-img."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imgfs.create import parse_options, parse_size
from imgfs.errors import InvalidRequest
from tests.mountutil import run_imgfs
from tests.oracle import assert_same_bytes, pattern_image, qemu_info

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "size"),
    [("512", 512), ("4k", 4096), ("10M", 10 * MiB), ("1.5M", 3 * MiB // 2), ("2G", 2 << 30),
     ("1T", 1 << 40), ("7b", 7)],
)  # fmt: skip
def test_sizes_read_like_qemu_img(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "-1", "5Q", "9E"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_size(text)


def test_options_parse_like_qemu_img() -> None:
    assert parse_options(["a=1,b=x,,y", "lazy_refcounts"]) == {
        "a": "1",
        "b": "x,y",
        "lazy_refcounts": "on",
    }


def test_create_raw_matches_qemu_info(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    result = run_imgfs("create", "-f", "raw", str(image), "3M")
    assert result.returncode == 0, result.stderr
    assert "Formatting" in result.stdout
    info = qemu_info(image, "raw")
    assert info["virtual-size"] == 3 * MiB
    assert os.stat(image).st_blocks == 0  # sparse


def test_create_options_help_and_errors(tmp_path: Path) -> None:
    result = run_imgfs("create", "-f", "raw", "-o", "help")
    assert result.returncode == 0 and "preallocation" in result.stdout
    result = run_imgfs("create", "-f", "raw", "-o", "colour=red", str(tmp_path / "x"), "1M")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "imgfs: error: raw does not take the option colour (known: preallocation)"
    )
    assert not (tmp_path / "x").exists()
    result = run_imgfs("create", "-f", "nosuchformat", str(tmp_path / "y"), "1M")
    assert result.returncode == 1 and "unknown format 'nosuchformat'" in result.stderr
    result = run_imgfs("create", "-f", "raw", str(tmp_path / "z"))
    assert result.returncode == 1 and "a size is needed" in result.stderr


def test_create_preallocation_full_writes_the_space(tmp_path: Path) -> None:
    image = tmp_path / "full.raw"
    assert (
        run_imgfs("create", "-f", "raw", "-o", "preallocation=full", str(image), "2M").returncode
        == 0
    )
    assert os.stat(image).st_blocks * 512 >= 2 * MiB
    assert image.read_bytes() == bytes(2 * MiB)


def test_convert_raw_to_raw_is_exact_and_sparse(tmp_path: Path) -> None:
    source = tmp_path / "src.img"
    data = bytearray(16 * MiB)
    data[MiB : 4 * MiB] = b"A" * (3 * MiB)
    data[9 * MiB : 9 * MiB + 4096] = bytes(4095) + b"B"  # data with zeros around it
    data[-512:] = b"C" * 512
    source.write_bytes(data)
    out = tmp_path / "out.raw"
    result = run_imgfs("convert", "-p", "-O", "raw", str(source), str(out))
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stderr  # the progress bar ran to the end
    assert_same_bytes(out, source)
    # Only 3 MiB + two 4 KiB granules hold data: the zeros were skipped.
    assert os.stat(out).st_blocks * 512 <= 3 * MiB + 2 * 4096


def test_convert_failure_leaves_no_half_image(tmp_path: Path) -> None:
    source = tmp_path / "src.img"
    pattern_image(source, MiB)
    out = tmp_path / "out.raw"
    result = run_imgfs("convert", "-O", "raw", "-o", "preallocation=bogus", str(source), str(out))
    assert result.returncode == 1
    assert "preallocation must be off, falloc or full" in result.stderr
    assert not out.exists()
    result = run_imgfs("convert", "-O", "raw", str(source), str(source))
    assert result.returncode == 1 and "is the source image itself" in result.stderr
    assert source.stat().st_size == MiB


def test_mount_o_sends_format_options_to_drivers_and_the_rest_to_fuse() -> None:
    from imgfs.cli import split_mount_options

    fuse, driver = split_mount_options(["fsname=vms,chunk-cache-size=8M", "allow_other"])
    assert fuse == ["fsname=vms", "allow_other"]
    assert driver == {"chunk-cache-size": "8M"}
