"""vhdx: exports match qemu-img and the corpus manifest, writes pass qemu-img check/compare,
differencing images match vhdimount (libvhdi), since qemu refuses differencing VHDX."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from imgfs.block import registry
from imgfs.block.disk import open_disk
from imgfs.errors import CorruptImage, InvalidRequest, ReadOnly
from imgfs.formats.vhdx import VhdxDriver
from tests.conftest import SHARED
from tests.formats.writers import striped_thread_writes
from tests.oracle import (
    assert_export_matches_qemu,
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    assert_same_bytes,
    qemu_img,
    qemu_info,
    sha256_file,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
CORPUS = SHARED / "corpus"


def export(image: Path, out: Path, fmt: str | None = "vhdx", read_only: bool = True) -> Path:
    disk = open_disk(str(image), fmt, read_only=read_only)
    try:
        with open(out, "wb") as f:
            f.truncate(disk.size)
            off = 0
            while off < disk.size:
                ext = disk.block_status(off, min(64 * MiB, disk.size - off))
                if ext.allocation.value != "zero" or ext.depth:
                    for o in range(off, off + ext.length, 4 * MiB):
                        data = disk.read(o, min(4 * MiB, off + ext.length - o))
                        if any(data):
                            f.seek(o)
                            f.write(data)
                off += ext.length
    finally:
        disk.close()
    return out


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "vhdx"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True, timeout=120)


def decompress(src: Path, dst: Path) -> Path:
    opener = {".gz": gzip.open, ".bz2": bz2.open}[src.suffix]
    with opener(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(MiB):
            if any(chunk):
                fout.write(chunk)
            else:
                fout.seek(len(chunk), 1)  # keep zeros sparse
        fout.truncate()
    return dst


def manifest_sha(rel: str) -> str:
    for line in (CORPUS / "MANIFEST.tsv").read_text().splitlines():
        cols = line.split("\t")
        if cols[0] == rel:
            return cols[6]
    raise KeyError(rel)


def random_writes(disk, expected: bytearray, seed: int, count: int = 50) -> None:
    rng = random.Random(seed)
    for i in range(count):
        length = rng.choice([1, 511, 512, 4097, 70_000, 3 * MiB // 2])
        offset = rng.randrange(0, len(expected) - length)
        data = bytes([(i * 7 + seed) % 251 + 1]) * length
        disk.write(offset, data)
        expected[offset : offset + length] = data


@pytest.mark.parametrize(
    "opts",
    [
        "subformat=dynamic",
        "subformat=fixed",
        "block_state_zero=off",
        "subformat=fixed,block_state_zero=off",
        "block_size=1M,log_size=2M",
        "block_size=256M",
    ],
)
def test_qemu_created_images_export_like_qemu(tmp_path: Path, opts: str) -> None:
    image = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", opts, str(image), "40M")
    qemu_io(image, "write -P 0x5a 0 70k", f"write -P 0xa5 {3 * MiB - 512} 1536",
            f"write -P 0x33 {40 * MiB - 4096} 4096")  # fmt: skip
    assert registry.probe_file(str(image)) is VhdxDriver
    out = export(image, tmp_path / "out.raw")
    assert_export_matches_qemu(image, out, tmp_path, "vhdx")


@pytest.mark.parametrize(
    "opts",
    [
        "",
        "subformat=fixed",
        pytest.param("block_state_zero=off", marks=pytest.mark.slow),
        "block_size=1M,log_size=2M",
    ],
)
@pytest.mark.parametrize("creator", ["qemu-img", "imgfs"])
def test_random_writes_pass_qemu_check_and_compare(tmp_path: Path, opts: str, creator: str) -> None:
    image = tmp_path / "disk.vhdx"
    options = dict(kv.split("=") for kv in opts.split(",") if kv)
    if creator == "qemu-img":
        qemu_img("create", "-q", "-f", "vhdx", *(["-o", opts] if opts else []), str(image), "24M")
    else:
        VhdxDriver.create(str(image), 24 * MiB, options)
    qemu_io(image, "write -P 0x77 1M 1M")
    expected = bytearray(export(image, tmp_path / "before.raw").read_bytes())
    disk = open_disk(str(image), "vhdx")
    random_writes(disk, expected, seed=len(opts) + len(creator))
    disk.flush()
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "vhdx")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vhdx")
    assert_same_bytes(export(image, tmp_path / "after.raw"), tmp_path / "expected.raw")


@pytest.mark.parametrize("sector", ["512", "4096"])
def test_imgfs_created_sector_sizes(tmp_path: Path, sector: str) -> None:
    """qemu reads only 512-byte logical sectors; libvhdi checks the 4096-byte ones."""
    image = tmp_path / "disk.vhdx"
    VhdxDriver.create(str(image), 10 * MiB + 4096, {"logical_sector_size": sector})
    disk = open_disk(str(image), "vhdx")
    assert disk.top.info().format_specific["logical-sector-size"] == int(sector)
    disk.write(5 * MiB - 3, b"\xab" * 9000)
    disk.close()
    expected = bytearray(10 * MiB + 4096)
    expected[5 * MiB - 3 : 5 * MiB + 8997] = b"\xab" * 9000
    (tmp_path / "expected.raw").write_bytes(expected)
    if sector == "512":
        assert qemu_info(image, "vhdx")["virtual-size"] == 10 * MiB + 4096
        assert_qemu_check_clean(image, "vhdx")
        assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vhdx")
    else:
        assert vhdimount_read(image, tmp_path / "mnt") == bytes(expected)


@pytest.mark.parametrize(
    "size", [MiB, GiB, GiB + 512, 100 * GiB, 100 * GiB + 512, 32 * 1024 * GiB + 512]
)
def test_create_block_size_default_matches_qemu_img(tmp_path: Path, size: int) -> None:
    ours, theirs = tmp_path / "ours.vhdx", tmp_path / "theirs.vhdx"
    VhdxDriver.create(str(ours), size, {})
    qemu_img("create", "-q", "-f", "vhdx", str(theirs), str(size))
    a, b = qemu_info(ours, "vhdx"), qemu_info(theirs, "vhdx")
    assert (a["virtual-size"], a["cluster-size"]) == (b["virtual-size"], b["cluster-size"])
    assert_qemu_check_clean(ours, "vhdx")


def test_create_rejects_bad_options(tmp_path: Path) -> None:
    for opts in ({"block_size": "3M"}, {"log_size": "1000k"}, {"subformat": "sparse"},
                 {"cluster_size": "64k"}, {"logical_sector_size": "1024"}):  # fmt: skip
        with pytest.raises(InvalidRequest):
            VhdxDriver.create(str(tmp_path / "x.vhdx"), MiB, opts)


def vhdimount_read(image: Path, mnt: Path) -> bytes:
    mnt.mkdir(exist_ok=True)
    subprocess.run(["vhdimount", str(image), str(mnt)], check=True, capture_output=True,
                   timeout=60)  # fmt: skip
    try:
        return sorted(mnt.iterdir())[-1].read_bytes()  # the last layer is the child
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=60)


@pytest.mark.parametrize("sector", ["512", "4096"])
def test_differencing_matches_vhdimount(tmp_path: Path, sector: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    parent, child = images / "parent.vhdx", images / "child.vhdx"
    if sector == "512":
        qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(parent), "12M")
        qemu_io(parent, "write -P 0x11 0 12M")
    else:  # qemu has no 4096-byte sectors
        VhdxDriver.create(str(parent), 12 * MiB, {"logical_sector_size": "4096"})
        writer = open_disk(str(parent), "vhdx")
        writer.write(0, b"\x11" * 12 * MiB)
        writer.close()
    VhdxDriver.create(str(child), 12 * MiB,
                      {"backing_file": "parent.vhdx", "block_size": "2M"})  # fmt: skip
    with pytest.raises(InvalidRequest, match="parent's size"):
        VhdxDriver.create(str(images / "bad.vhdx"), 8 * MiB, {"backing_file": "parent.vhdx"})
    disk = open_disk(str(child), "vhdx")
    assert disk.top.backing is not None
    expected = bytearray(disk.read(0, disk.size))
    assert expected == b"\x11" * 12 * MiB
    random_writes(disk, expected, seed=int(sector), count=40)
    disk.flush()
    disk.close()
    assert export(child, tmp_path / "ours.raw").read_bytes() == bytes(expected)
    assert vhdimount_read(child, tmp_path / "mnt") == bytes(expected)
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)
    assert export(moved / "child.vhdx", tmp_path / "m.raw").read_bytes() == bytes(expected)


def test_differencing_through_fuse_mount(tmp_path: Path, images: Path, mount) -> None:
    qemu_img("create", "-q", "-f", "vhdx", str(images / "base.vhdx"), "6M")
    qemu_io(images / "base.vhdx", "write -P 0x21 0 6M")
    VhdxDriver.create(str(images / "top.vhdx"), 6 * MiB, {"backing_file": "base.vhdx"})
    expected = bytearray(b"\x21" * 6 * MiB)
    m = mount(images)
    with open(m.file("top.vhdx"), "r+b") as f:
        rng = random.Random(9)
        for i in range(30):
            length = rng.choice([1, 700, 4096, 100_000])
            offset = rng.randrange(0, 6 * MiB - length)
            f.seek(offset)
            f.write(bytes([i + 1]) * length)
            expected[offset : offset + length] = bytes([i + 1]) * length
    m.umount()
    assert export(images / "top.vhdx", tmp_path / "ours.raw").read_bytes() == bytes(expected)
    assert vhdimount_read(images / "top.vhdx", tmp_path / "vmnt") == bytes(expected)
    assert_qemu_check_clean(images / "base.vhdx", "vhdx")


def test_dynamic_through_fuse_mount(tmp_path: Path, images: Path, mount) -> None:
    image = images / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(image), "12M")
    expected = bytearray(12 * MiB)
    m = mount(images)
    with open(m.file("disk.vhdx"), "r+b") as f:
        rng = random.Random(3)
        for i in range(40):
            length = rng.choice([3, 512, 65536, 300_001])
            offset = rng.randrange(0, 12 * MiB - length)
            f.seek(offset)
            f.write(bytes([i + 1]) * length)
            expected[offset : offset + length] = bytes([i + 1]) * length
    m.umount()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "vhdx")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vhdx")


@pytest.mark.parametrize(
    "rel",
    [
        "vhdx/dissect-hypervisor/fixed.vhdx.gz",
        "vhdx/dissect-hypervisor/dynamic.vhdx.gz",
        pytest.param("vhdx/qemu-iotests/iotest-dynamic-1G.vhdx.bz2", marks=pytest.mark.slow),
        pytest.param("vhdx/qemu-iotests/test-disk2vhd.vhdx.bz2", marks=pytest.mark.slow),
        pytest.param("vhdx/discutils/swap.vhdx.gz", marks=pytest.mark.slow),
    ],
)
def test_corpus_exports_match_manifest(tmp_path: Path, rel: str) -> None:
    image = decompress(CORPUS / rel, tmp_path / Path(rel).stem)
    assert disk_sha256(image) == manifest_sha(rel)


def test_corpus_small_one_matches_qemu(tmp_path: Path) -> None:
    image = decompress(CORPUS / "vhdx/dissect-hypervisor/dynamic.vhdx.gz", tmp_path / "d.vhdx")
    assert_export_matches_qemu(image, export(image, tmp_path / "out.raw"), tmp_path, "vhdx")


def disk_sha256(image: Path, read_only: bool = True) -> str:
    """sha256 of the disk as imgfs reads it, hashing zero runs without writing a file."""
    h = hashlib.sha256()
    zeros = bytes(4 * MiB)
    disk = open_disk(str(image), "vhdx", read_only=read_only)
    try:
        off = 0
        while off < disk.size:
            ext = disk.block_status(off, min(64 * MiB, disk.size - off))
            for o in range(off, off + ext.length, 4 * MiB):
                n = min(4 * MiB, off + ext.length - o)
                if ext.allocation.value == "zero" and not ext.depth:
                    h.update(zeros[:n])
                else:
                    h.update(disk.read(o, n))
            off += ext.length
    finally:
        disk.close()
    return h.hexdigest()


@pytest.mark.parametrize(
    "rel",
    [
        "vhdx/discutils/vhdx-log-replay.vhdx.gz",
        pytest.param("vhdx/qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2", marks=pytest.mark.slow),
    ],
)
def test_dirty_log_read_only_is_replayed_in_memory(tmp_path: Path, rel: str) -> None:
    image = decompress(CORPUS / rel, tmp_path / Path(rel).stem)
    before = sha256_file(image)
    disk = open_disk(str(image), "vhdx", read_only=True)
    assert any("replayed in memory" in n for n in disk.top.info().notes)
    with pytest.raises(ReadOnly):
        disk.write(0, b"x")
    disk.close()
    assert disk_sha256(image) == manifest_sha(rel)
    assert sha256_file(image) == before  # the file is untouched


def test_dirty_log_writable_open_replays_into_the_file(tmp_path: Path) -> None:
    rel = "vhdx/discutils/vhdx-log-replay.vhdx.gz"
    image = decompress(CORPUS / rel, tmp_path / "log.vhdx")
    reference = tmp_path / "ref.vhdx"
    shutil.copyfile(image, reference)
    disk = open_disk(str(image), "vhdx")
    assert any("replayed 2 log entries" in n for n in disk.top.info().notes)
    disk.write(5 * MiB + 1, b"\x42" * 3000)
    disk.close()
    # qemu replays its copy and writes the same bytes; the two must be identical.
    qemu_img("check", "-q", "-r", "all", "-f", "vhdx", str(reference))
    qemu_io(reference, f"write -P 0x42 {5 * MiB + 1} 3000")
    assert_qemu_check_clean(image, "vhdx")
    result = qemu_img("compare", "-f", "vhdx", "-F", "vhdx", str(image), str(reference),
                      check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_corpus_differencing_without_parent_is_a_clear_error(tmp_path: Path) -> None:
    image = decompress(CORPUS / "vhdx/dissect-hypervisor/differencing.avhdx.gz",
                       tmp_path / "diff.avhdx")  # fmt: skip
    with pytest.raises(CorruptImage, match="Generation 1_49C4BAF3"):
        open_disk(str(image), "vhdx", read_only=True)


def test_damaged_header_uses_the_other_one(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(image), "8M")
    qemu_io(image, "write -P 0x61 0 1M")
    raw = bytearray(image.read_bytes())
    raw[128 * 1024 + 100] ^= 0xFF  # header 2 (the newer one) fails its CRC
    image.write_bytes(raw)
    disk = open_disk(str(image), "vhdx", read_only=True)
    assert any("header 2 is invalid" in n for n in disk.top.info().notes)
    assert disk.read(0, MiB) == b"\x61" * MiB
    disk.close()


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [
        (0, b"XXXXXXXX", "vhdxfile"),
        (64 * 1024, b"\0" * 4096, None),  # one header gone: still opens
        (192 * 1024, b"\0" * 65536, None),  # one region table gone: still opens
    ],
)
def test_malformed(tmp_path: Path, where: int, value: bytes, match: str | None) -> None:
    image = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(image), "8M")
    raw = bytearray(image.read_bytes())
    raw[where : where + len(value)] = value
    image.write_bytes(raw)
    if match:
        with pytest.raises(CorruptImage, match=match):
            open_disk(str(image), "vhdx", read_only=True)
    else:
        open_disk(str(image), "vhdx", read_only=True).close()


def test_hostile_metadata_is_rejected_fast(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(image), "8M")
    raw = bytearray(image.read_bytes())
    # Virtual disk size item (second metadata entry's data): 2^62 bytes.
    md = 3 * MiB
    raw[md + 65536 + 8 : md + 65536 + 16] = (1 << 62).to_bytes(8, "little")
    image.write_bytes(raw)
    start = time.monotonic()
    with pytest.raises(CorruptImage, match=str(1 << 62)):
        open_disk(str(image), "vhdx", read_only=True)
    assert time.monotonic() - start < 1


def test_write_zeroes_keeps_zero_blocks_unallocated(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(image), "8M")
    qemu_io(image, "write -P 0x31 0 2M")
    size_before = image.stat().st_size
    disk = open_disk(str(image), "vhdx")
    disk.write_zeroes(MiB, 6 * MiB)
    disk.close()
    assert image.stat().st_size == size_before
    (tmp_path / "expected.raw").write_bytes(b"\x31" * MiB + bytes(7 * MiB))
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vhdx")
    assert_qemu_check_clean(image, "vhdx")


def test_payload_block_states_read_as_qemu_reads_them(tmp_path: Path) -> None:
    image = tmp_path / "states.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(image), "8M")
    qemu_io(image, "write -P 0x41 0 8M")
    raw = bytearray(image.read_bytes())
    bat = 2 * MiB  # where qemu-img puts the BAT with a 1 MiB log
    for block, state in enumerate(range(8)):
        (entry,) = struct.unpack_from("<Q", raw, bat + 8 * block)
        struct.pack_into("<Q", raw, bat + 8 * block, entry & ~7 | state)
    image.write_bytes(raw)
    disk = open_disk(str(image), "vhdx", read_only=True)
    try:
        for block in range(8):
            # -r: imgfs holds the image (read-only), as another QEMU would; reading is shared.
            args = ["qemu-io", "-r", "-f", "vhdx", "-c", f"read -v {block * MiB} 16", str(image)]
            theirs = subprocess.run(args, capture_output=True, text=True, timeout=60).stdout
            if "Input/output error" in theirs:
                with pytest.raises(CorruptImage, match="invalid state"):
                    disk.read(block * MiB, 16)
            else:
                fill = b"\x41" if block == 6 else b"\0"  # only FULLY_PRESENT holds data
                assert disk.read(block * MiB, 16) == fill * 16
                assert (" 41 41" in theirs) == (block == 6)
    finally:
        disk.close()


def test_changed_parent_is_refused(tmp_path: Path) -> None:
    parent, child = tmp_path / "p.vhdx", tmp_path / "c.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(parent), "4M")
    VhdxDriver.create(str(child), 4 * MiB, {"backing_file": "p.vhdx"})
    open_disk(str(child), "vhdx", read_only=True).close()
    qemu_io(parent, "write -P 1 0 4k")  # a new data write GUID in the parent
    with pytest.raises(CorruptImage, match="data write GUID"):
        open_disk(str(child), "vhdx", read_only=True)


def test_block_cut_off_by_a_crash_reads_zeros_and_new_blocks_go_after_it(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(image), "8M")
    qemu_io(image, "write -P 0x31 0 1M", "write -P 0x32 3M 1M")
    os.truncate(image, image.stat().st_size - MiB)  # the last block never made it
    disk = open_disk(str(image), "vhdx")
    assert any("past the end of the file" in n for n in disk.top.info().notes)
    assert disk.read(3 * MiB, MiB) == bytes(MiB)
    disk.write(5 * MiB, b"\x35" * 1000)
    disk.close()
    expected = bytearray(8 * MiB)
    expected[:MiB] = b"\x31" * MiB
    expected[5 * MiB : 5 * MiB + 1000] = b"\x35" * 1000
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vhdx")


def test_check_finds_bad_entries(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(image), "8M")
    qemu_io(image, "write -P 1 0 1M", "write -P 2 3M 1M")
    disk = open_disk(str(image), "vhdx", read_only=True)
    result = disk.check()
    assert (result.corruptions, result.allocated_clusters) == (0, 2)
    disk.close()
    raw = bytearray(image.read_bytes())
    bat = 2 * MiB
    raw[bat + 8 : bat + 16] = raw[bat : bat + 8]  # block 1 shares block 0's space
    raw[bat + 16 : bat + 24] = (4).to_bytes(8, "little")  # block 2: no such state
    image.write_bytes(raw)
    disk = open_disk(str(image), "vhdx", read_only=True)
    result = disk.check()
    disk.close()
    assert result.corruptions == 2
    assert any("share space" in m for m in result.messages)
    assert any("invalid state 4" in m for m in result.messages)


@pytest.mark.parametrize("parent", [False, True])
def test_concurrent_writes_from_threads(tmp_path: Path, parent: bool) -> None:
    image = tmp_path / "disk.vhdx"
    if parent:
        base = tmp_path / "base.vhdx"
        qemu_img(
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            str(base),
            "16M",
        )
        qemu_io(base, "write -P 0x66 0 16M")
        VhdxDriver.create(
            str(image),
            qemu_info(base, "vhdx")["virtual-size"],
            {"backing_file": base.name, "block_size": "1M"},
        )
    else:
        VhdxDriver.create(str(image), 16 * MiB, {"block_size": "1M"})
    disk = open_disk(str(image), "vhdx")
    expected = striped_thread_writes(disk, 16 * MiB)
    disk.flush()
    assert disk.read(0, 16 * MiB) == expected
    disk.close()
    assert export(image, tmp_path / "out.raw").read_bytes()[: 16 * MiB] == bytes(expected)
    again = open_disk(str(image), "vhdx", read_only=True)
    assert again.check().corruptions == 0
    again.close()


def test_discard_frees_space_and_reads_zeros(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    VhdxDriver.create(str(image), 8 * MiB, {"block_size": "1M"})
    disk = open_disk(str(image), "vhdx")
    disk.write(0, b"\x5a" * 8 * MiB)
    disk.flush()
    used = image.stat().st_blocks
    disk.discard(MiB, 3 * MiB + 5000)  # two whole blocks and parts of two others
    disk.close()
    expected = bytearray(b"\x5a" * 8 * MiB)
    expected[MiB : 4 * MiB + 4096] = bytes(3 * MiB + 4096)  # the 4 KiB-aligned part of the last
    (tmp_path / "expected.raw").write_bytes(expected)
    assert image.stat().st_blocks <= used - (3 * MiB - 64 * 1024) // 512
    assert_qemu_check_clean(image, "vhdx")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vhdx")
    disk = open_disk(str(image), "vhdx")
    disk.write(2 * MiB + 10, b"\x01" * 10)  # a discarded block comes back
    disk.close()
    expected[2 * MiB + 10 : 2 * MiB + 20] = b"\x01" * 10
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vhdx")


def test_write_zeroes_with_unmap_frees_whole_blocks(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    VhdxDriver.create(str(image), 4 * MiB, {"block_size": "1M"})
    disk = open_disk(str(image), "vhdx")
    size = disk.size
    disk.write(0, b"\x5a" * size)
    disk.flush()
    used = image.stat().st_blocks
    disk.write_zeroes(MiB - 100, 2 * MiB + 200, may_unmap=True)
    disk.close()
    assert image.stat().st_blocks <= used - (2 * MiB - 64 * 1024) // 512
    expected = bytearray(b"\x5a" * size)
    expected[MiB - 100 : 3 * MiB + 100] = bytes(2 * MiB + 200)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "vhdx")


def make_dirty(image: Path, descriptors: list[tuple], last_file_offset: int) -> None:
    """Give a qemu-made image a one-entry log: descriptors are ("data", file_offset, page) or
    ("zero", file_offset, length). Built from MS-VHDX's layout, so qemu's replay checks it."""
    from imgfs.formats.vhdx import HEADER, LOG_DESCRIPTOR, LOG_HEADER, with_crc

    raw = bytearray(image.read_bytes())
    log_guid = bytes(range(1, 17))
    seq = 7
    desc_area = -(-(64 + 32 * len(descriptors)) // 4096) * 4096
    pages = [d for d in descriptors if d[0] == "data"]
    entry = bytearray(desc_area + 4096 * len(pages))
    data_at = desc_area
    for i, d in enumerate(descriptors):
        if d[0] == "zero":
            desc = LOG_DESCRIPTOR.pack(b"zero", bytes(4), d[2].to_bytes(8, "little"), d[1], seq)
        else:
            page = d[2]
            desc = LOG_DESCRIPTOR.pack(b"desc", page[4092:], page[:8], d[1], seq)
            entry[data_at : data_at + 4096] = (
                b"data" + (seq >> 32).to_bytes(4, "little") + page[8:4092]
                + (seq & 0xFFFFFFFF).to_bytes(4, "little")
            )  # fmt: skip
            data_at += 4096
        entry[64 + 32 * i : 96 + 32 * i] = desc
    LOG_HEADER.pack_into(entry, 0, b"loge", 0, len(entry), 0, seq, len(descriptors), 0,
                         log_guid, last_file_offset, last_file_offset)  # fmt: skip
    entry = with_crc(entry)
    for h in (64 * 1024, 128 * 1024):
        fields = list(HEADER.unpack_from(raw, h))
        fields[5] = log_guid
        raw[h : h + 4096] = with_crc(HEADER.pack(*fields).ljust(4096, b"\0"))
        log_offset = fields[9]
    raw[log_offset : log_offset + len(entry)] = entry
    image.write_bytes(raw)


def test_crafted_log_replays_like_qemu(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(image), "8M")
    qemu_io(image, "write -P 0x31 0 2M")
    (entry,) = struct.unpack_from("<Q", image.read_bytes(), 2 * MiB)
    block0 = (entry >> 20) << 20
    size = image.stat().st_size
    make_dirty(image, [("data", block0 + 8192, bytes(range(256)) * 16),
                       ("zero", block0 + 65536, 8192),
                       ("data", block0 + 69632, b"\x77" * 4096)], size)  # fmt: skip
    reference = tmp_path / "ref.vhdx"
    shutil.copyfile(image, reference)
    qemu_img("check", "-q", "-r", "all", "-f", "vhdx", str(reference))
    expected = qemu_img("convert", "-f", "vhdx", "-O", "raw", str(reference),
                        str(tmp_path / "ref.raw")) and (tmp_path / "ref.raw")  # fmt: skip
    data = expected.read_bytes()
    assert data[8192:12288] == bytes(range(256)) * 16 and data[65536:69632] == bytes(4096)
    assert data[69632:73728] == b"\x77" * 4096
    # Read-only: replayed in memory, file untouched.
    before = sha256_file(image)
    assert export(image, tmp_path / "ro.raw").read_bytes() == data
    assert sha256_file(image) == before
    # Writable: replayed into the file; qemu then reads it without a replay of its own.
    disk = open_disk(str(image), "vhdx")
    disk.close()
    assert_qemu_compare_identical(image, expected, "vhdx")
    assert_qemu_check_clean(image, "vhdx")


def test_hostile_log_is_rejected_fast(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(image), "8M")
    make_dirty(image, [("zero", 1 << 20, 1 << 62)], image.stat().st_size)
    start = time.monotonic()
    with pytest.raises(CorruptImage, match="zero descriptor"):
        open_disk(str(image), "vhdx", read_only=True)
    assert time.monotonic() - start < 1
