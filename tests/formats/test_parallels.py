"""Parallels expandable images and Parallels Desktop .hdd bundles, with qemu-img as the oracle."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from imgfs.block import registry
from imgfs.block.chain import Containment
from imgfs.block.disk import open_disk
from imgfs.block.driver import RepairMode
from imgfs.block.extent import Allocation
from imgfs.block.hostfile import CacheMode
from imgfs.errors import CorruptImage, InvalidRequest, NotPermitted, ReadOnly, Unsupported
from imgfs.formats.parallels import INUSE_MAGIC, ParallelsDriver
from imgfs.formats.parallels_hdd import ParallelsHddDriver
from tests.conftest import SHARED
from tests.oracle import (
    assert_export_matches_qemu,
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    qemu_check,
    qemu_img,
    qemu_info,
    qemu_raw,
    sha256_file,
)

MiB = 1024 * 1024
CORPUS = SHARED / "corpus" / "parallels"
TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "parallels"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True, timeout=120)


def export(image: Path, out: Path, fmt: str | None = "parallels") -> Path:
    disk = open_disk(str(image), fmt, read_only=True)
    try:
        with open(out, "wb") as f:
            for off in range(0, disk.size, 4 * MiB):
                f.write(disk.read(off, 4 * MiB))
    finally:
        disk.close()
    return out


def qemu_parallels(path: Path, size: int, cluster: str | None = None) -> Path:
    opts = ["-o", f"cluster_size={cluster}"] if cluster else []
    qemu_img("create", "-q", "-f", "parallels", *opts, str(path), str(size))
    return path


def random_writes(disk, expected: bytearray, seed: int, count: int, max_len: int) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        off = rng.randrange(disk.size)
        n = min(rng.randrange(1, max_len), disk.size - off)
        data = rng.randbytes(n)
        assert disk.write(off, data) == n
        expected[off : off + n] = data


@pytest.mark.parametrize("cluster", [None, "64k", "4k", "3k", "2M"])
def test_qemu_images_export_like_qemu(tmp_path: Path, cluster: str | None) -> None:
    size = 6 * MiB + 512
    image = qemu_parallels(tmp_path / "disk.prl", size, cluster)
    rng = random.Random(str(cluster))
    cmds = []
    for i in range(12):
        n = rng.choice([512, 4096, 70000 // 512 * 512])
        cmds.append(f"write -P {i + 1} {rng.randrange(0, size - n) // 512 * 512} {n}")
    qemu_io(image, *cmds)
    exported = export(image, tmp_path / "out.raw", None)  # probed
    assert_export_matches_qemu(image, exported, tmp_path, "parallels")


@pytest.mark.parametrize(
    "name, raw_sha",
    [
        ("parallels-v1", "15faf41ebc93b5f734341cb7a2d909001e3f7306960f9d8bc63894f2a8e5bc45"),
        ("parallels-v2", "15faf41ebc93b5f734341cb7a2d909001e3f7306960f9d8bc63894f2a8e5bc45"),
        ("fake.parallels", "15faf41ebc93b5f734341cb7a2d909001e3f7306960f9d8bc63894f2a8e5bc45"),
    ],
)
def test_qemu_iotests_corpus(tmp_path: Path, name: str, raw_sha: str) -> None:
    image = CORPUS / "qemu-iotests" / name
    exported = export(image, tmp_path / "out.raw", None)
    assert sha256_file(exported) == raw_sha
    assert_export_matches_qemu(image, exported, tmp_path, "parallels")


def test_v1_image_writes(tmp_path: Path) -> None:
    """A "WithoutFreeSpace" image (BAT in sectors) takes new clusters and stays valid."""
    image = tmp_path / "v1.prl"
    shutil.copyfile(CORPUS / "qemu-iotests" / "parallels-v1", image)
    os.chmod(image, 0o644)
    disk = open_disk(str(image), "parallels")
    expected = bytearray(disk.read(0, disk.size))
    random_writes(disk, expected, 5, 40, 100_000)
    disk.close()
    assert image.read_bytes()[:16] == b"WithoutFreeSpace"
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "parallels")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "parallels")


def test_bat_shorter_than_disk_is_read_only(tmp_path: Path) -> None:
    image = tmp_path / "fake.prl"
    shutil.copyfile(CORPUS / "qemu-iotests" / "fake.parallels", image)
    os.chmod(image, 0o644)
    disk = open_disk(str(image), "parallels")
    try:
        assert disk.read_only
        assert "BAT" in " ".join(disk.info()[0].notes)
    finally:
        disk.close()


@pytest.mark.parametrize("producer", ["qemu", "imgfs"])
@pytest.mark.parametrize("cluster", ["1M", "64k", "3k"])
def test_random_writes_then_qemu_check_and_compare(
    tmp_path: Path, producer: str, cluster: str
) -> None:
    image = tmp_path / "disk.prl"
    size = 7 * MiB + 1536
    if producer == "qemu":
        qemu_parallels(image, size, cluster)
    else:
        ParallelsDriver.create(str(image), size, {"cluster_size": cluster})
        # qemu 7.2 reports leaks on its own empty images when the BAT spans several clusters
        assert_qemu_check_clean(image, "parallels", allow_leaks=cluster == "3k")
        assert qemu_info(image)["format"] == "parallels"
    disk = open_disk(str(image), "parallels")
    # open for writing: the in-use flag is on disk while we hold the image
    assert struct.unpack_from("<I", image.read_bytes(), 44)[0] == INUSE_MAGIC
    expected = bytearray(disk.size)
    random_writes(disk, expected, 3, 60, 300_000)
    assert disk.read(0, disk.size) == expected
    disk.close()
    assert struct.unpack_from("<I", image.read_bytes(), 44)[0] == 0  # clean close
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "parallels")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "parallels")


def test_create_options(tmp_path: Path) -> None:
    ParallelsDriver.create(str(tmp_path / "a.prl"), 5 * MiB, {})
    ParallelsDriver.create(
        str(tmp_path / "b.prl"), 5 * MiB, {"cluster_size": "64k", "preallocation": "falloc"}
    )
    a, b = qemu_info(tmp_path / "a.prl"), qemu_info(tmp_path / "b.prl")
    assert a["virtual-size"] == b["virtual-size"] == 5 * MiB
    # the header says what we asked for (qemu-img info has no cluster-size for parallels)
    assert struct.unpack_from("<I", (tmp_path / "b.prl").read_bytes(), 28)[0] == 128
    for name in ("a.prl", "b.prl"):
        assert_qemu_check_clean(tmp_path / name, "parallels")
        assert qemu_raw(tmp_path / name, tmp_path / "x.raw").read_bytes() == bytes(5 * MiB)
    assert os.stat(tmp_path / "b.prl").st_blocks * 512 >= 5 * MiB
    with pytest.raises(InvalidRequest, match="static"):
        ParallelsDriver.create(str(tmp_path / "x.prl"), MiB, {"static": "on"})
    with pytest.raises(InvalidRequest, match="cluster_size"):
        ParallelsDriver.create(str(tmp_path / "x.prl"), MiB, {"cluster_size": "lots"})


def test_unflushed_writes_leave_the_on_disk_image_consistent(tmp_path: Path) -> None:
    image = qemu_parallels(tmp_path / "disk.prl", 4 * MiB, "64k")
    qemu_io(image, "write -P 0x11 0 64k")
    before = qemu_raw(image, tmp_path / "before.raw", "parallels")
    disk = open_disk(str(image), "parallels")
    disk.write(2 * MiB + 5, b"new cluster" * 1000)
    crash = tmp_path / "crash.prl"
    shutil.copyfile(image, crash)
    disk.close()
    # The copy has the in-use flag (as after a crash): qemu reports that, and nothing else.
    status, data = (
        subprocess.run(
            ["qemu-img", "check", "-f", "parallels", str(crash)], capture_output=True, text=True
        ).returncode,
        None,
    )
    assert status in (0, 2, 3), data
    with open(crash, "r+b") as f:  # what a repair of the flag does
        f.seek(44)
        f.write(bytes(4))
    assert_qemu_check_clean(crash, "parallels", allow_leaks=True)
    assert_qemu_compare_identical(crash, before, "parallels")


def test_unclean_image_opens_read_only(tmp_path: Path) -> None:
    image = qemu_parallels(tmp_path / "disk.prl", MiB)
    with open(image, "r+b") as f:
        f.seek(44)
        f.write(struct.pack("<I", INUSE_MAGIC))
    disk = open_disk(str(image), "parallels")
    try:
        assert disk.read_only
        with pytest.raises(ReadOnly):
            disk.write(0, b"x")
        assert disk.info()[0].dirty_flag
    finally:
        disk.close()
    assert struct.unpack_from("<I", image.read_bytes(), 44)[0] == INUSE_MAGIC  # left alone
    status, _ = qemu_check(image, "parallels")
    assert status == 2  # qemu agrees the image is unclean
    disk = open_disk(str(image), "parallels")
    try:
        assert disk.check(RepairMode.NONE).corruptions == 1
        result = disk.check(RepairMode.ALL)
        assert (result.corruptions, result.corruptions_fixed) == (0, 1)
    finally:
        disk.close()
    assert_qemu_check_clean(image, "parallels")
    disk = open_disk(str(image), "parallels")
    try:
        assert not disk.read_only
        disk.write(0, b"x")
    finally:
        disk.close()
    assert_qemu_check_clean(image, "parallels")


def test_discard_and_block_status(tmp_path: Path) -> None:
    image = qemu_parallels(tmp_path / "disk.prl", 4 * MiB)
    qemu_io(image, "write -P 0x22 1M 3M")
    disk = open_disk(str(image), "parallels")
    first = disk.block_status(0, 4 * MiB)
    assert (first.allocation, first.length) == (Allocation.UNALLOCATED, MiB)
    used = os.stat(image).st_blocks
    disk.discard(2 * MiB, MiB)
    disk.write_zeroes(3 * MiB + 100, 1000)
    disk.flush()
    assert os.stat(image).st_blocks <= used - MiB // 512
    assert disk.block_status(2 * MiB, MiB).allocation is Allocation.ZERO
    expected = bytearray(4 * MiB)
    expected[MiB : 2 * MiB] = b"\x22" * MiB
    expected[3 * MiB : 4 * MiB] = b"\x22" * MiB
    expected[3 * MiB + 100 : 3 * MiB + 1100] = bytes(1000)
    assert disk.read(0, 4 * MiB) == expected
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "parallels")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "parallels")


def test_through_fuse_mount(tmp_path: Path, images: Path, mount) -> None:
    image = images / "disk.hds"
    ParallelsDriver.create(str(image), 8 * MiB, {"cluster_size": "256k"})
    qemu_io(image, "write -P 0x5a 3M 100k")
    expected = bytearray(qemu_raw(image, tmp_path / "start.raw", "parallels").read_bytes())
    m = mount(images)
    exported = m.file("disk.hds")
    assert exported.stat().st_size == 8 * MiB
    rng = random.Random(11)
    fd = os.open(exported, os.O_RDWR)
    try:
        for _ in range(40):
            off = rng.randrange(8 * MiB - 1)
            data = rng.randbytes(min(rng.randrange(1, 200_000), 8 * MiB - off))
            assert os.pwrite(fd, data, off) == len(data)
            expected[off : off + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    assert exported.read_bytes() == expected
    m.umount()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "parallels")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "parallels")


# -- hostile headers ----------------------------------------------------------------------------


def _patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _open_fails(path: Path, error: type[Exception], match: str) -> None:
    start = time.monotonic()
    with pytest.raises(error, match=match):
        open_disk(str(path), "parallels").close()
    assert time.monotonic() - start < 2


def test_truncated_header(tmp_path: Path) -> None:
    image = qemu_parallels(tmp_path / "disk.prl", MiB)
    os.truncate(image, 40)
    _open_fails(image, CorruptImage, "shorter than a Parallels header")


@pytest.mark.parametrize(
    "offset, fmt, value, error, match",
    [
        (16, "<I", 3, Unsupported, "version 3"),
        (28, "<I", 0, CorruptImage, "cluster size"),
        (28, "<I", 0xFFFFFFFF, CorruptImage, "cluster size"),
        (32, "<I", 0xFFFFFFFF, CorruptImage, "overlaps the BAT|limit|past the end"),
        (32, "<I", 0x1000000, CorruptImage, "overlaps the BAT|past the end"),
        (48, "<I", 0, CorruptImage, "past the end"),  # data_off 0 with a huge BAT
    ],
)
def test_hostile_fields(
    tmp_path: Path, offset: int, fmt: str, value: int, error: type[Exception], match: str
) -> None:
    image = qemu_parallels(tmp_path / "disk.prl", 4 * MiB)
    if offset == 48:
        _patch(image, 32, "<I", 0x1000000)
    _patch(image, offset, fmt, value)
    _open_fails(image, error, match)


def test_bat_entry_before_data_area_is_corrupt(tmp_path: Path) -> None:
    image = qemu_parallels(tmp_path / "disk.prl", 2 * MiB)
    _patch(image, 64, "<I", 0)
    _patch(image, 68, "<I", 0)
    with open(image, "r+b") as f:  # v1 layout: entry 1 sector points into the header
        f.write(b"WithoutFreeSpace")
    _patch(image, 64, "<I", 1)
    disk = open_disk(str(image), "parallels", read_only=True)
    try:
        with pytest.raises(CorruptImage, match="before the data area"):
            disk.read(0, 512)
        assert disk.read(MiB, 512) == bytes(512)
    finally:
        disk.close()


# -- Parallels Desktop bundles --------------------------------------------------------------------


def unpack_bundle(name: str, dest: Path) -> Path:
    """A writable copy of a corpus bundle with its .gz parts decompressed; returns the .hdd."""
    src = CORPUS / "dissect-hypervisor" / name
    bundle = dest / name
    bundle.mkdir(parents=True)
    for item in src.iterdir():
        if item.suffix == ".gz":
            with gzip.open(item) as fin, open(bundle / item.name[:-3], "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(item, bundle / item.name)
    return bundle


def part(bundle: Path, index: int = 0) -> Path:
    return bundle / f"{bundle.stem}.hdd.{index}.{TOP_GUID}.hds"


RAW_100M_SHA = "7906281f7a25f13df78c907d7bc4e9313d9a26fa86386c6e2a737a784fe80b8f"


@pytest.mark.parametrize("name", ["plain.hdd", "expanding.hdd"])
def test_bundle_corpus(tmp_path: Path, name: str) -> None:
    bundle = unpack_bundle(name, tmp_path)
    descriptor = bundle / "DiskDescriptor.xml"
    assert registry.probe_file(str(descriptor)) is ParallelsHddDriver
    assert ParallelsHddDriver.companion_files(str(descriptor)) == [part(bundle).name]
    exported = export(descriptor, tmp_path / "out.raw", None)
    assert sha256_file(exported) == RAW_100M_SHA
    fmt = "raw" if name == "plain.hdd" else "parallels"
    assert_export_matches_qemu(part(bundle), exported, tmp_path, fmt)


def test_split_bundle_matches_its_parts(tmp_path: Path) -> None:
    bundle = unpack_bundle("split.hdd", tmp_path)
    disk = open_disk(str(bundle / "DiskDescriptor.xml"), read_only=True)
    try:
        assert disk.size == 10 * 1024 * MiB
        assert len(disk.top.desc.storages) == 6
        part_size = 3989504 * 512
        for i in range(6):
            image = part(bundle, i)
            # qemu's view of the part, compared where the part holds data (and around it)
            ref = qemu_raw(image, tmp_path / f"p{i}.raw", "parallels")
            fd = os.open(ref, os.O_RDONLY)
            try:
                offset, extents = 0, 0
                while extents < 64:  # each data extent of the part, read through the bundle
                    try:
                        offset = os.lseek(fd, offset, os.SEEK_DATA)
                    except OSError:
                        break
                    end = os.lseek(fd, offset, os.SEEK_HOLE)
                    want = os.pread(fd, end - offset, offset)
                    assert disk.read(i * part_size + offset, end - offset) == want, (i, offset)
                    offset, extents = end, extents + 1
                assert extents >= 1
            finally:
                os.close(fd)
            ref.unlink()
        # a read across a part boundary joins the two parts (qemu-io reads 01s at the end of
        # part 0 and 02s at the start of part 1)
        assert disk.read(part_size - 512, 1024) == b"\x01" * 512 + b"\x02" * 512
    finally:
        disk.close()


@pytest.mark.slow
def test_split_bundle_sha256(tmp_path: Path) -> None:
    bundle = unpack_bundle("split.hdd", tmp_path)
    disk = open_disk(str(bundle / "DiskDescriptor.xml"), read_only=True)
    h = hashlib.sha256()
    try:
        for off in range(0, disk.size, 64 * MiB):
            h.update(disk.read(off, 64 * MiB))
    finally:
        disk.close()
    assert h.hexdigest() == "035f643ace2bbca90762a1318e865ec456c44cfd578e65ed32a9363d6348efa1"


@pytest.mark.parametrize("name", ["plain.hdd", "expanding.hdd"])
def test_bundle_writes(tmp_path: Path, name: str) -> None:
    bundle = unpack_bundle(name, tmp_path)
    descriptor = bundle / "DiskDescriptor.xml"
    disk = open_disk(str(descriptor))
    expected = bytearray(disk.read(0, disk.size))
    random_writes(disk, expected, 9, 30, 300_000)
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    fmt = "raw" if name == "plain.hdd" else "parallels"
    assert_qemu_check_clean(part(bundle), fmt)
    assert_qemu_compare_identical(part(bundle), tmp_path / "expected.raw", fmt)


def test_split_bundle_write_across_parts(tmp_path: Path) -> None:
    bundle = unpack_bundle("split.hdd", tmp_path)
    disk = open_disk(str(bundle / "DiskDescriptor.xml"))
    part_size = 3989504 * 512
    data = random.Random(1).randbytes(3 * MiB + 7)
    disk.write(part_size - MiB - 3, data)
    assert disk.read(part_size - MiB - 3, len(data)) == data
    disk.close()
    for i in (0, 1):
        assert_qemu_check_clean(part(bundle, i), "parallels")
    with open(qemu_raw(part(bundle, 0), tmp_path / "p0.raw"), "rb") as f:
        f.seek(part_size - MiB - 3)
        assert f.read() == data[: MiB + 3]
    with open(qemu_raw(part(bundle, 1), tmp_path / "p1.raw"), "rb") as f:
        assert f.read(len(data) - MiB - 3) == data[MiB + 3 :]


def _descriptor(storages: str, snapshots: str, disk_size: int = 2048) -> bytes:
    return (
        "<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image Version=\"1.0\">"
        f"<Disk_Parameters><Disk_size>{disk_size}</Disk_size><Padding>0</Padding>"
        f"</Disk_Parameters><StorageData>{storages}</StorageData>"
        f"<Snapshots>{snapshots}</Snapshots></Parallels_disk_image>"
    ).encode()


def _image(guid: str, kind: str, file: str) -> str:
    return f"<Image><GUID>{guid}</GUID><Type>{kind}</Type><File>{file}</File></Image>"


def test_bundle_with_snapshot_overlay(tmp_path: Path) -> None:
    """The top snapshot's image is written; clusters it lacks come from the parent's."""
    bundle = tmp_path / "snap.hdd"
    bundle.mkdir()
    base, top = "{11111111-0000-0000-0000-000000000001}", "{22222222-0000-0000-0000-000000000002}"
    (bundle / "base.hds").write_bytes(b"B" * MiB)  # a Plain root
    ParallelsDriver.create(str(bundle / "top.hds"), MiB, {"cluster_size": "64k"})
    qemu_io(bundle / "top.hds", "write -P 0x54 64k 64k")
    storages = (
        f"<Storage><Start>0</Start><End>2048</End><Blocksize>128</Blocksize>"
        f"{_image(base, 'Plain', 'base.hds')}{_image(top, 'Compressed', 'top.hds')}</Storage>"
    )
    snaps = (
        f"<TopGUID>{top}</TopGUID>"
        f"<Shot><GUID>{base}</GUID><ParentGUID>{{00000000-0000-0000-0000-000000000000}}"
        f"</ParentGUID></Shot><Shot><GUID>{top}</GUID><ParentGUID>{base}</ParentGUID></Shot>"
    )
    (bundle / "DiskDescriptor.xml").write_bytes(_descriptor(storages, snaps))
    disk = open_disk(str(bundle / "DiskDescriptor.xml"))
    expected = bytearray(b"B" * MiB)
    expected[64 * 1024 : 128 * 1024] = b"T" * 64 * 1024
    assert disk.read(0, MiB) == expected
    disk.write(300_000, b"new")
    expected[300_000:300_003] = b"new"
    assert disk.read(0, MiB) == expected
    disk.close()
    assert (bundle / "base.hds").read_bytes() == b"B" * MiB  # the parent is never written
    assert_qemu_check_clean(bundle / "top.hds", "parallels")


@pytest.mark.parametrize(
    "storages, snaps, match",
    [
        ("", "", "no <Storage>"),
        (
            "<Storage><Start>0</Start><End>1024</End>"
            + _image(TOP_GUID, "Plain", "a")
            + "</Storage>",
            "",
            "storages end at sector 1024",
        ),
        (
            "<Storage><Start>8</Start><End>2048</End>"
            + _image(TOP_GUID, "Plain", "a")
            + "</Storage>",
            "",
            "does not follow",
        ),
        (
            "<Storage><Start>0</Start><End>2048</End>"
            + _image(TOP_GUID, "Fancy", "a")
            + "</Storage>",
            "",
            "image type",
        ),
        (
            "<Storage><Start>0</Start><End>2048</End>"
            + _image("{1-1}", "Plain", "a")
            + "</Storage>",
            "",
            "no image for snapshot",
        ),
        (
            "<Storage><Start>0</Start><End>x</End></Storage>",
            "",
            "bad <End>",
        ),
    ],
)
def test_bad_descriptors(tmp_path: Path, storages: str, snaps: str, match: str) -> None:
    bundle = tmp_path / "bad.hdd"
    bundle.mkdir()
    (bundle / "a").write_bytes(bytes(MiB))
    (bundle / "DiskDescriptor.xml").write_bytes(_descriptor(storages, snaps))
    with pytest.raises((CorruptImage, Unsupported), match=match):
        open_disk(str(bundle / "DiskDescriptor.xml"), "parallels-hdd").close()


def test_descriptor_with_entities_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "bomb.hdd"
    bundle.mkdir()
    (bundle / "DiskDescriptor.xml").write_bytes(
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaa">]>'
        b"<Parallels_disk_image>&a;</Parallels_disk_image>"
    )
    with pytest.raises(CorruptImage, match="DTD"):
        open_disk(str(bundle / "DiskDescriptor.xml"), "parallels-hdd").close()
    assert ParallelsHddDriver.companion_files(str(bundle / "DiskDescriptor.xml")) == []


def test_bundle_part_outside_the_bundle_is_refused(tmp_path: Path, images: Path) -> None:
    bundle = images / "escape.hdd"
    bundle.mkdir()
    (tmp_path / "secret.hds").write_bytes(bytes(MiB))
    storages = (
        "<Storage><Start>0</Start><End>2048</End>"
        + _image(TOP_GUID, "Plain", str(tmp_path / "secret.hds"))
        + "</Storage>"
    )
    (bundle / "DiskDescriptor.xml").write_bytes(_descriptor(storages, ""))
    with pytest.raises(NotPermitted, match="outside the images directory"):
        open_disk(str(bundle / "DiskDescriptor.xml"), containment=Containment(str(images))).close()


def test_bundle_through_fuse_mount(tmp_path: Path, images: Path, mount) -> None:
    bundle = unpack_bundle("expanding.hdd", images)
    m = mount(images)
    assert sorted(os.listdir(m.path)) == ["expanding.hdd.raw"]
    exported = m.path / "expanding.hdd.raw"
    assert exported.stat().st_size == 100 * MiB
    expected = bytearray(qemu_raw(part(bundle), tmp_path / "start.raw", "parallels").read_bytes())
    rng = random.Random(4)
    fd = os.open(exported, os.O_RDWR)
    try:
        for _ in range(20):
            off = rng.randrange(100 * MiB - 1)
            data = rng.randbytes(min(rng.randrange(1, 300_000), 100 * MiB - off))
            assert os.pwrite(fd, data, off) == len(data)
            expected[off : off + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    m.umount()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(part(bundle), "parallels")
    assert_qemu_compare_identical(part(bundle), tmp_path / "expected.raw", "parallels")


@pytest.mark.parametrize("cache", [CacheMode.NONE, CacheMode.DIRECTSYNC])
def test_writes_with_o_direct(tmp_path: Path, cache: CacheMode) -> None:
    image = tmp_path / "disk.prl"
    ParallelsDriver.create(str(image), 5 * MiB + 512, {"cluster_size": "64k"})
    disk = open_disk(str(image), "parallels", cache=cache)
    expected = bytearray(disk.size)
    random_writes(disk, expected, 21, 25, 150_000)
    assert disk.read(0, disk.size) == expected
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "parallels")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "parallels")


def test_multi_terabyte_disk(tmp_path: Path) -> None:
    """Offsets past 2**32 sectors and a table of millions of entries."""
    image = tmp_path / "big.prl"
    size = 3 << 40
    ParallelsDriver.create(str(image), size, {})
    disk = open_disk(str(image), "parallels")
    disk.write(size - 5, b"hello")
    disk.write((2 << 40) + 12345, b"world" * 1000)
    disk.close()
    assert_qemu_check_clean(image, "parallels")
    assert os.stat(image).st_blocks * 512 < 32 * MiB
    out = subprocess.run(
        ["qemu-io", "-f", "parallels", "-r", "-c", f"read -P 0 {size - MiB} {MiB - 5}",
         "-c", f"read -v {size - 5} 5", str(image)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "hello" in out and "failed" not in out


def test_concurrent_writers(tmp_path: Path) -> None:
    """Threads writing interleaved 4 KiB pieces of the same blocks: every allocation happens
    once and no write is lost."""
    image = tmp_path / "disk.prl"
    size = 4 * MiB
    ParallelsDriver.create(str(image), size, {"cluster_size": "64k"})
    disk = open_disk(str(image), "parallels")
    expected = bytearray(size)
    pieces = [(off, bytes([1 + off // 4096 % 250]) * 4096) for off in range(0, size, 4096)]
    random.Random(2).shuffle(pieces)
    for off, data in pieces:
        expected[off : off + 4096] = data

    def worker(k: int) -> None:
        for off, data in pieces[k::4]:
            disk.write(off, data)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert disk.read(0, size) == expected
    disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image, "parallels")
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "parallels")
