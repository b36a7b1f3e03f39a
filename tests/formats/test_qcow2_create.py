"""Images imgfs creates: qemu-img check clean, qemu-img info agrees, qemu-io reads them back."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.errors import InvalidRequest
from imgfs.formats.qcow2 import Qcow2Driver
from tests.formats.qcow2_util import MiB, create, qemu_convert_raw, qemu_io, run
from tests.formats.test_qcow2_write import assert_check_clean, assert_compare


def qemu_info(img: Path) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", img.name, cwd=img.parent))


CREATE_SETTINGS = [
    {},
    {"compat": "0.10"},
    {"compat": "0.10", "cluster_size": "512"},
    {"cluster_size": "512", "refcount_bits": "64"},
    {"cluster_size": "4096", "refcount_bits": "1"},
    {"cluster_size": "2M", "refcount_bits": "8"},
    {"extended_l2": "on", "cluster_size": "32768"},
    {"lazy_refcounts": "on", "compression_type": "zstd"},
    {"data_file": "data.bin"},
    {"data_file": "data.bin", "data_file_raw": "on"},
    {"preallocation": "metadata"},
    {"preallocation": "falloc", "cluster_size": "4096"},
    {"preallocation": "full", "extended_l2": "on"},
]


@pytest.mark.parametrize(
    "opts", CREATE_SETTINGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_create_then_write(tmp_path: Path, opts: dict[str, str]) -> None:
    img = tmp_path / "new.qcow2"
    size = 5 * MiB + 512
    Qcow2Driver.create(str(img), size, opts)
    assert_check_clean(img)
    info = qemu_info(img)
    assert info["virtual-size"] == size
    assert info["cluster-size"] == int(opts.get("cluster_size", "65536").replace("M", "")) * (
        1 << 20 if opts.get("cluster_size", "").endswith("M") else 1
    )
    spec = info["format-specific"]["data"]
    assert spec["compat"] == opts.get("compat", "1.1")
    assert spec["refcount-bits"] == int(opts.get("refcount_bits", "16"))
    if "extended_l2" in opts:
        assert spec["extended-l2"] is True
    if "lazy_refcounts" in opts:
        assert spec["lazy-refcounts"] is True
    if "compression_type" in opts:
        assert spec["compression-type"] == "zstd"
    if "data_file" in opts:
        assert spec["data-file"] == "data.bin"
        assert spec["data-file-raw"] == (opts.get("data_file_raw") == "on")
    if opts.get("preallocation") in ("falloc", "full"):
        assert img.stat().st_blocks * 512 >= size
    # Written by imgfs, read back by qemu-io.
    disk = open_disk(str(img))
    try:
        disk.write(12345, b"\x5a" * 100_000)
        disk.write(size - 512, b"\x5b" * 512)
        disk.flush()
    finally:
        disk.close()
    assert_check_clean(img)
    qemu_io(img, "read -P 0x5a 12345 100000", f"read -P 0x5b {size - 512} 512", "read -P 0 0 12345")


def test_create_with_backing(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 3 0 4M")
    img = tmp_path / "over.qcow2"
    Qcow2Driver.create(str(img), 4 * MiB, {"backing_file": "base.qcow2", "backing_fmt": "qcow2"})
    info = qemu_info(img)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    disk = open_disk(str(img))
    try:
        assert bytes(disk.read(100, 10)) == b"\x03" * 10
        disk.write(1000, b"\x09" * 10)
        disk.flush()
    finally:
        disk.close()
    assert_check_clean(img)
    model = bytearray(b"\x03" * 4 * MiB)
    model[1000:1010] = b"\x09" * 10
    assert_compare(img, bytes(model), tmp_path)


@pytest.mark.parametrize(
    "opts",
    [
        {"bogus": "1"},
        {"compat": "2.0"},
        {"cluster_size": "1000"},
        {"cluster_size": "4M"},
        {"refcount_bits": "3"},
        {"compat": "0.10", "refcount_bits": "8"},
        {"extended_l2": "on", "cluster_size": "4096"},
        {"data_file_raw": "on"},
        {"backing_fmt": "raw"},
        {"preallocation": "sometimes"},
        {"lazy_refcounts": "maybe"},
    ],
)
def test_create_rejects_bad_options(tmp_path: Path, opts: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest):
        Qcow2Driver.create(str(tmp_path / "x.qcow2"), MiB, opts)


def test_create_options_have_help() -> None:
    assert {"size", "cluster_size", "compat", "preallocation", "data_file"} <= set(
        Qcow2Driver.create_options
    )
    assert all(isinstance(v, str) and v for v in Qcow2Driver.create_options.values())


@pytest.mark.parametrize(
    "opts", [{}, {"compression_type": "zstd"}, {"cluster_size": "512"},
             {"cluster_size": "4096", "refcount_bits": "1"}, {"extended_l2": "on"}]
)  # fmt: skip
def test_write_compressed(tmp_path: Path, opts: dict[str, str]) -> None:
    img = tmp_path / "c.qcow2"
    size = 3 * MiB + 512
    Qcow2Driver.create(str(img), size, opts)
    rng = random.Random(1)
    model = bytearray()
    while len(model) < size:
        model += b"compressible text %d " % rng.randrange(10**6) * 40
    model = model[:size]
    model[MiB : MiB + 65536] = rng.randbytes(65536)  # does not compress: stored plain
    disk = open_disk(str(img))
    try:
        unit = disk.top.compressed_write_unit()
        for off in range(0, size, unit * 4):
            disk.top.write_compressed(off, model[off : off + unit * 4])
        # Rewrite part of a compressed cluster: COW out of it.
        disk.write(70000, b"\x01" * 3000)
        model[70000:73000] = b"\x01" * 3000
        disk.flush()
    finally:
        disk.close()
    data = assert_check_clean(img)
    frag = data.get("compressed-clusters", 0)
    assert frag > data["allocated-clusters"] // 2, data
    assert_compare(img, bytes(model), tmp_path)
    assert qemu_convert_raw(img, tmp_path / "c.raw").read_bytes() == model


def test_create_empty_then_grow(tmp_path: Path) -> None:
    img = tmp_path / "zero.qcow2"
    Qcow2Driver.create(str(img), 0, {})
    assert_check_clean(img)
    disk = open_disk(str(img))
    try:
        assert disk.size == 0
        disk.resize(MiB)
        disk.write(5, b"abc")
        disk.flush()
    finally:
        disk.close()
    assert_check_clean(img)
    qemu_io(img, "read -P 0x61 5 1", "read -P 0 8 1000")
