"""qcow2 check: the same counts as qemu-img check, on clean and deliberately damaged images."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.block.driver import RepairMode
from tests.conftest import SHARED
from tests.formats.qcow2_util import MiB, create, qemu_convert_raw, qemu_io, run

FIELDS = {
    "leaks": "leaks",
    "corruptions": "corruptions",
    "image-end-offset": "image_end_offset",
    "total-clusters": "total_clusters",
    "allocated-clusters": "allocated_clusters",
    "fragmented-clusters": "fragmented_clusters",
    "compressed-clusters": "compressed_clusters",
}


def qemu_check_json(img: Path, *args: str) -> dict:
    result = subprocess.run(
        ["qemu-img", "check", "--output=json", *args, img.name],
        capture_output=True, text=True, cwd=img.parent, timeout=120,
    )  # fmt: skip
    return json.loads(result.stdout) if result.stdout.strip() else {"qemu-error": result.stderr}


def our_check(img: Path, repair: RepairMode = RepairMode.NONE):
    disk = open_disk(str(img), read_only=repair is RepairMode.NONE)
    try:
        return disk.check(repair)
    finally:
        disk.close()


def assert_same_counts(img: Path) -> None:
    theirs = qemu_check_json(img)
    ours = our_check(img)
    for qkey, attr in FIELDS.items():
        assert (getattr(ours, attr) or 0) == theirs.get(qkey, 0), (qkey, ours, theirs)


def refcount_entry_offset(img: Path, cluster: int) -> int:
    """Host offset of the 16-bit refcount of ``cluster`` (first refcount block only)."""
    head = img.read_bytes()[:64]
    cluster_bits = struct.unpack(">I", head[20:24])[0]
    rt_off = struct.unpack(">Q", head[48:56])[0]
    with open(img, "rb") as f:
        f.seek(rt_off)
        block = struct.unpack(">Q", f.read(8))[0]
    assert cluster < (1 << cluster_bits) // 2
    return block + 2 * cluster


def poke16(img: Path, offset: int, value: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">H", value))


def data_cluster_of(img: Path, guest_offset: int) -> int:
    out = json.loads(run("qemu-img", "map", "--output=json", str(img)))
    for e in out:
        if e["start"] <= guest_offset < e["start"] + e["length"] and e.get("offset") is not None:
            return (e["offset"] + guest_offset - e["start"]) >> 16
    raise AssertionError("not allocated")


@pytest.mark.parametrize(
    "opts", ["compat=1.1", "compat=0.10,cluster_size=4096", "extended_l2=on",
             "cluster_size=512,refcount_bits=1", "data_file=d.bin",
             "refcount_bits=64,preallocation=metadata"]
)  # fmt: skip
def test_counts_match_qemu_on_clean_images(tmp_path: Path, opts: str) -> None:
    img = create(tmp_path / "a.qcow2", 6 * MiB, opts)
    qemu_io(img, "write -P 1 0 100k", "write -z 1M 1M", "write -P 2 3M 10k", "write 4M 300k",
            "discard 4M 64k")  # fmt: skip
    assert_same_counts(img)


def test_counts_match_qemu_on_corpus(tmp_path: Path) -> None:
    corpus = SHARED / "corpus" / "qcow2"
    for src in [corpus / "dfvfs" / "vsstest.qcow2", corpus / "dissect-hypervisor" / "basic.qcow2"]:
        shutil.copy(src, tmp_path / src.name)
        assert_same_counts(tmp_path / src.name)
    snap = tmp_path / "snapshot.qcow2"
    with gzip.open(corpus / "dissect-hypervisor" / "snapshot.qcow2.gz") as fin:
        snap.write_bytes(fin.read())
    assert_same_counts(snap)


def test_leak_found_and_repaired(tmp_path: Path) -> None:
    img = create(tmp_path / "l.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 0 128k")
    # A free cluster inside the file with refcount 1: leaked.
    with open(img, "r+b") as f:
        f.truncate(f.seek(0, 2) + 65536)
    poke16(img, refcount_entry_offset(img, img.stat().st_size // 65536 - 1), 1)
    # A data cluster with refcount 2: a leak and a COPIED-flag error.
    poke16(img, refcount_entry_offset(img, data_cluster_of(img, 0)), 2)
    assert_same_counts(img)
    ours = our_check(img)
    assert ours.leaks == 2 and ours.corruptions == 1 and ours.exit_status == 2
    fixed = our_check(img, RepairMode.LEAKS)
    assert fixed.leaks_fixed == 2 and fixed.leaks == 0
    theirs = qemu_check_json(img)
    assert theirs.get("leaks", 0) == 0 and theirs.get("corruptions", 0) == 0, theirs


def test_refcount_too_low_is_corruption_repaired_with_all(tmp_path: Path) -> None:
    img = create(tmp_path / "c.qcow2", 4 * MiB)
    qemu_io(img, "write -P 7 0 192k")
    expected = qemu_convert_raw(img, tmp_path / "before.raw").read_bytes()
    poke16(img, refcount_entry_offset(img, data_cluster_of(img, 65536)), 0)
    assert_same_counts(img)
    ours = our_check(img)
    assert ours.corruptions >= 1 and ours.exit_status == 2
    leaks_only = our_check(img, RepairMode.LEAKS)
    assert leaks_only.corruptions >= 1 and leaks_only.corruptions_fixed == 0
    fixed = our_check(img, RepairMode.ALL)
    assert fixed.corruptions == 0 and fixed.corruptions_fixed >= 1
    theirs = qemu_check_json(img)
    assert theirs.get("leaks", 0) == 0 and theirs.get("corruptions", 0) == 0, theirs
    assert qemu_convert_raw(img, tmp_path / "after.raw").read_bytes() == expected


def test_dirty_lazy_refcount_image_is_repaired_on_writable_open(tmp_path: Path) -> None:
    img = create(tmp_path / "d.qcow2", 4 * MiB, "lazy_refcounts=on")
    # A crash: the dirty bit is set and the refcounts are stale.
    subprocess.run(["qemu-io", "-c", "write -P 3 0 300k", "-c", "abort", str(img)],
                   capture_output=True, timeout=60)  # fmt: skip
    info = json.loads(run("qemu-img", "info", "--output=json", "-U", str(img)))
    assert info["dirty-flag"] is True
    disk = open_disk(str(img), read_only=True)
    try:
        assert bytes(disk.read(0, 300 * 1024)) == b"\x03" * 300 * 1024
    finally:
        disk.close()
    disk = open_disk(str(img))
    try:
        assert any("dirty" in n for n in disk.top.info().notes)
        disk.write(400 * 1024, b"\x04" * 1000)
        disk.flush()
    finally:
        disk.close()
    theirs = qemu_check_json(img)
    assert theirs.get("leaks", 0) == 0 and theirs.get("corruptions", 0) == 0, theirs
    info = json.loads(run("qemu-img", "info", "--output=json", str(img)))
    assert info["dirty-flag"] is False
    qemu_io(img, "read -P 3 0 300k", f"read -P 4 {400 * 1024} 1000")


def test_missing_refcount_block_rebuilt_with_repair_all(tmp_path: Path) -> None:
    # 512-byte clusters, 64-bit refcounts: a refcount block covers 64 clusters, so data
    # spreads over many blocks; drop the table entry of one that describes data clusters.
    img = create(tmp_path / "m.qcow2", 2 * MiB, "cluster_size=512,refcount_bits=64")
    qemu_io(img, "write -P 9 0 256k")
    expected = qemu_convert_raw(img, tmp_path / "before.raw").read_bytes()
    head = img.read_bytes()[:64]
    rt_off = struct.unpack(">Q", head[48:56])[0]
    with open(img, "r+b") as f:
        f.seek(rt_off + 8 * 3)
        assert struct.unpack(">Q", f.read(8))[0] != 0
        f.seek(rt_off + 8 * 3)
        f.write(bytes(8))
    theirs = qemu_check_json(img)
    ours = our_check(img)
    assert ours.corruptions == theirs["corruptions"] and ours.leaks == theirs.get("leaks", 0)
    fixed = our_check(img, RepairMode.ALL)
    assert fixed.corruptions == 0 and fixed.corruptions_fixed > 0
    after = qemu_check_json(img)
    assert after.get("leaks", 0) == 0 and after.get("corruptions", 0) == 0, after
    assert qemu_convert_raw(img, tmp_path / "after.raw").read_bytes() == expected
    # And the repaired image stays writable and consistent.
    disk = open_disk(str(img))
    try:
        disk.write(300 * 1024, b"\x01" * 70_000)
        disk.flush()
    finally:
        disk.close()
    after = qemu_check_json(img)
    assert after.get("leaks", 0) == 0 and after.get("corruptions", 0) == 0, after


def fuzz_check_against_qemu(tmp_path: Path, seed: int, rounds: int) -> None:
    """Damage metadata at random; opening, reading and checking must give ImgfsError or
    results, never a crash, and check's counts must equal qemu-img check's."""
    from imgfs.errors import ImgfsError

    src = create(tmp_path / "src.qcow2", 2 * MiB, "cluster_size=4096")
    qemu_io(src, "write -P 1 0 100k", "write -z 200k 8k", "write -P 2 1M 4k")
    original = src.read_bytes()
    rng = __import__("random").Random(seed)
    img = tmp_path / "z.qcow2"
    for _ in range(rounds):
        data = bytearray(original)
        for _ in range(rng.randrange(1, 6)):
            pos = rng.randrange(0, min(len(data), 6 * 4096)) & ~7
            data[pos : pos + 8] = rng.randbytes(8)
        img.write_bytes(data)
        try:
            disk = open_disk(str(img), "qcow2", read_only=True)
        except ImgfsError:
            continue
        try:
            for off in range(0, min(disk.size, 4 * MiB), 256 * 1024):
                try:
                    disk.read(off, min(256 * 1024, disk.size - off))
                except ImgfsError:
                    pass
            try:
                ours = disk.check()
            except ImgfsError:
                continue
        finally:
            disk.close()
        theirs = qemu_check_json(img)
        if "qemu-error" in theirs:
            continue  # qemu refuses to open it at all: nothing to compare
        assert (ours.corruptions, ours.leaks) == (
            theirs.get("corruptions", 0),
            theirs.get("leaks", 0),
        ), (ours.messages, theirs)


def test_fuzzed_metadata_counts_like_qemu(tmp_path: Path) -> None:
    fuzz_check_against_qemu(tmp_path, 0, 60)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_fuzzed_metadata_counts_like_qemu_long(tmp_path: Path, seed: int) -> None:
    fuzz_check_against_qemu(tmp_path, seed, 400)
