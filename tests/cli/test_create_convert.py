"""imgfs create and imgfs convert, run as a user runs them, checked with qemu-img."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imgfs.create import parse_options, parse_size
from imgfs.errors import InvalidRequest
from tests.mountutil import run_imgfs
from tests.oracle import (
    assert_qemu_compare_identical,
    assert_same_bytes,
    pattern_image,
    qemu_check,
    qemu_info,
    qemu_raw,
)

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
    assert "option preallocation: expected one of off, falloc, full, not 'bogus'" in result.stderr
    assert not out.exists()
    result = run_imgfs("convert", "-O", "raw", str(source), str(source))
    assert result.returncode == 1 and "is the source image itself" in result.stderr
    assert source.stat().st_size == MiB


def test_mount_o_sends_format_options_to_drivers_and_the_rest_to_fuse() -> None:
    from imgfs.cli import split_mount_options

    fuse, driver = split_mount_options(["fsname=vms,chunk-cache-size=8M", "allow_other"])
    assert fuse == ["fsname=vms", "allow_other"]
    assert driver == {"chunk-cache-size": "8M"}


def test_convert_qcow2_chain_to_raw_equals_qemu(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    pattern_image(base, 16 * MiB, seed=5)
    top = tmp_path / "top.qcow2"
    created = run_imgfs("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top))
    assert created.returncode == 0, created.stderr
    io = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 1M 3M", "-c", "write -z 8M 1M", str(top)]
    assert subprocess.run(io, capture_output=True).returncode == 0
    expected = qemu_raw(top, tmp_path / "expected.raw", "qcow2")
    out = tmp_path / "out.raw"
    result = run_imgfs("convert", "-f", "qcow2", "-O", "raw", str(top), str(out))
    assert result.returncode == 0, result.stderr
    assert_same_bytes(out, expected)


def test_convert_c_writes_compressed_qcow2_that_qemu_reads(tmp_path: Path) -> None:
    source = tmp_path / "text.raw"
    # Compressible, with a zero hole in the middle and a short tail cluster.
    text = b"".join(b"line %08d of some compressible text\n" % i for i in range(120_000))
    data = bytearray(text[: 4 * MiB]) + bytes(MiB) + bytearray(text[: MiB + 4096])
    source.write_bytes(data)
    out = tmp_path / "out.qcow2"
    result = run_imgfs("convert", "-c", "-O", "qcow2", str(source), str(out))
    assert result.returncode == 0, result.stderr
    status, report = qemu_check(out, "qcow2")
    assert status == 0, report
    assert report["compressed-clusters"] > 0
    assert report["compressed-clusters"] == report["allocated-clusters"]
    assert_qemu_compare_identical(out, source, "qcow2")
    assert out.stat().st_size < len(data) // 3  # the clusters really are compressed


def test_convert_into_every_writable_format_and_back(tmp_path: Path) -> None:
    source = tmp_path / "src.raw"
    pattern_image(source, 6 * MiB, seed=9)
    for fmt in ("qcow2", "qcow", "qed", "vmdk", "vpc", "vhdx", "vdi", "parallels"):
        image = tmp_path / f"img.{fmt}"
        result = run_imgfs("convert", "-O", fmt, str(source), str(image))
        assert result.returncode == 0, f"{fmt}: {result.stderr}"
        assert_qemu_compare_identical(image, source, fmt)
        back = tmp_path / f"back-{fmt}.raw"
        result = run_imgfs("convert", "-f", fmt, str(image), str(back))
        assert result.returncode == 0, f"{fmt}: {result.stderr}"
        # vpc rounds a size up to a whole CHS geometry, as qemu-img does: zeros after the data.
        exported = back.read_bytes()
        assert exported[: 6 * MiB] == source.read_bytes(), fmt
        assert exported[6 * MiB :] == bytes(len(exported) - 6 * MiB), fmt


def test_check_prints_what_qemu_img_check_prints(tmp_path: Path) -> None:
    source = tmp_path / "text.raw"
    source.write_bytes(b"".join(b"row %09d\n" % i for i in range(300_000))[: 3 * MiB])
    image = tmp_path / "c.qcow2"
    assert run_imgfs("convert", "-c", "-O", "qcow2", str(source), str(image)).returncode == 0
    ours = run_imgfs("check", str(image))
    theirs = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert ours.returncode == theirs.returncode == 0
    assert ours.stdout == theirs.stdout
