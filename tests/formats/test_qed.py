"""qed: exports equal qemu-img's, writes pass qemu-img check and compare, create() opens in qemu."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.block.driver import RepairMode
from imgfs.errors import CorruptImage, Unsupported
from imgfs.formats.qed import QedDriver
from tests.oracle import (
    assert_export_matches_qemu,
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    assert_same_bytes,
    pattern_image,
    qemu_check,
    qemu_img,
    qemu_info,
    qemu_raw,
)

KiB = 1024
MiB = 1024 * 1024


def qemu_io(image: Path, *commands: str, fmt: str | None = None) -> None:
    args = ["qemu-io"] + (["-f", fmt] if fmt else [])
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True, timeout=120)


def random_qemu_io_commands(rng: random.Random, size: int, count: int, align: int) -> list[str]:
    """qemu-io writes, zero writes and discards at random (sector-aligned) places."""
    commands = []
    for _ in range(count):
        kind = rng.choice(["write", "write", "write", "zero", "discard"])
        off = rng.randrange(0, size // align) * align
        length = min(size - off, rng.randrange(1, 4) * align * rng.choice([1, 1, 8]))
        if kind == "write":
            commands.append(f"write -P {rng.randrange(1, 255)} {off} {length}")
        elif kind == "zero":
            commands.append(f"write -z {off} {length}")
        else:
            commands.append(f"discard {off} {length}")
    return commands


def export(image: Path, out: Path, fmt: str | None = None) -> Path:
    disk = open_disk(str(image), fmt, read_only=True)
    try:
        with open(out, "wb") as f:
            pos = 0
            while pos < disk.size:
                n = min(3 * MiB + 512, disk.size - pos)  # odd-sized requests
                f.write(disk.read(pos, n))
                pos += n
    finally:
        disk.close()
    return out


def random_writes(
    image: Path, expected: bytearray, rng: random.Random, count: int, fmt: str | None = None
) -> None:
    """Writes (and a few zero writes) at odd offsets and sizes through open_disk, mirrored in
    ``expected``."""
    disk = open_disk(str(image), fmt)
    try:
        size = disk.size
        for i in range(count):
            off = rng.randrange(0, size)
            length = min(size - off, rng.choice([1, 511, 4097, 70001, 300000]))
            if i % 7 == 6:
                disk.write_zeroes(off, length, may_unmap=True)
                expected[off : off + length] = bytes(length)
            else:
                data = os.urandom(length)
                disk.write(off, data)
                expected[off : off + length] = data
        # whole-cluster zeroing at the end, too
        disk.write_zeroes(size - 192 * KiB, 192 * KiB, may_unmap=True)
        expected[size - 192 * KiB :] = bytes(192 * KiB)
        disk.flush()
    finally:
        disk.close()


GEOMETRIES = [(4096, 2), (4096, 16), (64 * KiB, 4), (1 * MiB, 2)]


@pytest.mark.parametrize(("cluster_size", "table_size"), GEOMETRIES)
def test_qemu_written_image_exports_like_qemu(
    tmp_path: Path, cluster_size: int, table_size: int
) -> None:
    image = tmp_path / "disk.qed"
    size = 24 * MiB + 512 * 3
    qemu_img(
        "create", "-q", "-f", "qed", "-o",
        f"cluster_size={cluster_size},table_size={table_size}", str(image), str(size),
    )  # fmt: skip
    rng = random.Random(cluster_size * 31 + table_size)
    qemu_io(image, *random_qemu_io_commands(rng, size, 40, 512), fmt="qed")
    assert_export_matches_qemu(image, export(image, tmp_path / "ours.raw"), tmp_path)


def make_chain(tmp_path: Path, backing_fmt: str, short: bool) -> tuple[Path, Path]:
    """A qed overlay over a raw or qed backing image (shorter than the overlay if ``short``),
    both with data written by qemu-io."""
    size = 8 * MiB
    base_size = 3 * MiB + 512 if short else size
    if backing_fmt == "raw":
        base = tmp_path / "base.raw"
        pattern_image(base, base_size, seed=3)
    else:
        base = tmp_path / "base.qed"
        qemu_img("create", "-q", "-f", "qed", str(base), str(base_size))
        qemu_io(base, f"write -P 17 0 {base_size}", "write -z 64k 128k", fmt="qed")
    top = tmp_path / "top.qed"
    qemu_img(
        "create", "-q", "-f", "qed", "-o", "cluster_size=16k,table_size=2",
        "-b", base.name, "-F", backing_fmt, str(top), str(size),
    )  # fmt: skip
    qemu_io(
        top, "write -P 99 4096 1024", "write -z 1M 48k", "write -P 5 2M 100k",
        f"write -P 6 {min(base_size - 1024, size - 8192)} 8k", fmt="qed",
    )  # fmt: skip
    return base, top


@pytest.mark.parametrize("backing_fmt", ["raw", "qed"])
@pytest.mark.parametrize("short", [False, True])
def test_backing_chain_exports_like_qemu(tmp_path: Path, backing_fmt: str, short: bool) -> None:
    base, top = make_chain(tmp_path, backing_fmt, short)
    disk = open_disk(str(top), "qed", read_only=True)
    try:
        spec = disk.top.backing_spec
        assert spec is not None and spec.filename == base.name
        assert spec.format == ("raw" if backing_fmt == "raw" else None)
    finally:
        disk.close()
    assert_export_matches_qemu(top, export(top, tmp_path / "ours.raw"), tmp_path)


@pytest.mark.parametrize("backing_fmt", ["raw", "qed"])
def test_random_writes_over_backing_pass_qemu_check_and_compare(
    tmp_path: Path, backing_fmt: str
) -> None:
    _, top = make_chain(tmp_path, backing_fmt, short=True)
    expected = bytearray(qemu_raw(top, tmp_path / "before.raw").read_bytes())
    random_writes(top, expected, random.Random(7), 60)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(top)
    assert_qemu_compare_identical(top, tmp_path / "expected.raw")
    assert_same_bytes(export(top, tmp_path / "ours.raw"), tmp_path / "expected.raw")


@pytest.mark.parametrize(("cluster_size", "table_size"), [(4096, 2), (64 * KiB, 4)])
def test_random_writes_without_backing(tmp_path: Path, cluster_size: int, table_size: int) -> None:
    image = tmp_path / "disk.qed"
    size = 6 * MiB
    qemu_img(
        "create", "-q", "-f", "qed", "-o",
        f"cluster_size={cluster_size},table_size={table_size}", str(image), str(size),
    )  # fmt: skip
    qemu_io(image, "write -P 1 0 1M", "write -z 2M 256k", fmt="qed")
    expected = bytearray(qemu_raw(image, tmp_path / "before.raw").read_bytes())
    random_writes(image, expected, random.Random(cluster_size), 50)
    (tmp_path / "expected.raw").write_bytes(expected)
    status, data = qemu_check(image)
    assert status == 0, data
    assert_qemu_compare_identical(image, tmp_path / "expected.raw")
    assert not need_check(image)


def test_discard_and_zero_leave_no_leaks(tmp_path: Path) -> None:
    base, top = make_chain(tmp_path, "raw", short=False)
    expected = bytearray(qemu_raw(top, tmp_path / "before.raw").read_bytes())
    disk = open_disk(str(top), "qed")
    try:
        disk.write_zeroes(2 * MiB, 128 * KiB, may_unmap=True)  # allocated clusters
        disk.write_zeroes(5 * MiB + 100, 80 * KiB, may_unmap=True)  # over the backing file
        disk.discard(7 * MiB, 64 * KiB)
        disk.flush()
    finally:
        disk.close()
    expected[2 * MiB : 2 * MiB + 128 * KiB] = bytes(128 * KiB)
    expected[5 * MiB + 100 : 5 * MiB + 100 + 80 * KiB] = bytes(80 * KiB)
    (tmp_path / "expected.raw").write_bytes(expected)
    status, data = qemu_check(top)
    assert status == 0, data
    assert_qemu_compare_identical(top, tmp_path / "expected.raw")
    zero_map = [
        e for e in json_map(top) if e["start"] <= 5 * MiB + 16 * KiB < e["start"] + e["length"]
    ]
    assert zero_map[0]["zero"] and zero_map[0]["depth"] == 0


def json_map(image: Path) -> list[dict]:
    import json

    return json.loads(qemu_img("map", "--output=json", str(image)).stdout)


def test_writes_through_fuse_mount(images: Path, mount, tmp_path: Path) -> None:
    base = images / "base.raw"
    pattern_image(base, 4 * MiB, seed=9)
    top = images / "disk.qed"
    qemu_img("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", str(top), str(6 * MiB))
    expected = bytearray(qemu_raw(top, tmp_path / "before.raw").read_bytes())
    m = mount(images)
    exported = m.file("disk.qed")
    assert os.path.getsize(exported) == 6 * MiB
    rng = random.Random(11)
    with open(exported, "r+b") as f:
        for _ in range(30):
            off = rng.randrange(0, 6 * MiB - 1)
            data = os.urandom(min(6 * MiB - off, rng.choice([1, 777, 5000, 131073])))
            f.seek(off)
            f.write(data)
            expected[off : off + len(data)] = data
        f.flush()
        os.fsync(f.fileno())
    assert_same_bytes(exported, write_file(tmp_path / "expected.raw", expected))
    m.umount()
    assert_qemu_check_clean(top)
    assert_qemu_compare_identical(top, tmp_path / "expected.raw")


def write_file(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(data)
    return path


CREATE_OPTIONS = [
    {},
    {"cluster_size": "4096", "table_size": "2"},
    {"cluster_size": "1M", "table_size": "16"},
    {"cluster_size": "16k", "table_size": "8"},
]


@pytest.mark.parametrize("options", CREATE_OPTIONS)
def test_create_opens_in_qemu(tmp_path: Path, options: dict[str, str]) -> None:
    image = tmp_path / "new.qed"
    QedDriver.create(str(image), 10 * MiB, options)
    info = qemu_info(image, "qed")
    assert info["virtual-size"] == 10 * MiB
    sizes = {None: 65536, "4096": 4096, "1M": MiB, "16k": 16 * KiB}
    assert info["cluster-size"] == sizes[options.get("cluster_size")]
    assert_qemu_check_clean(image, "qed")
    expected = bytearray(10 * MiB)
    random_writes(image, expected, random.Random(3), 20, fmt="qed")
    qemu_io(image, "write -P 66 1M 4k", fmt="qed")
    expected[MiB : MiB + 4096] = b"\x42" * 4096
    (tmp_path / "expected.raw").write_bytes(expected)
    status, data = qemu_check(image, "qed")
    assert status == 0, data
    assert_qemu_compare_identical(image, tmp_path / "expected.raw", "qed")


@pytest.mark.parametrize("backing_fmt", ["raw", None])
def test_create_with_backing_file(tmp_path: Path, backing_fmt: str | None) -> None:
    base = tmp_path / "base.img"
    data = pattern_image(base, 2 * MiB + 512, seed=1)
    image = tmp_path / "new.qed"
    options = {"backing_file": "base.img"} | ({"backing_fmt": backing_fmt} if backing_fmt else {})
    QedDriver.create(str(image), 4 * MiB, options)
    info = qemu_info(image)
    assert info["backing-filename"] == "base.img"
    expected = bytearray(data + bytes(4 * MiB - len(data)))
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw")
    random_writes(image, expected, random.Random(5), 20)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw")


def test_table_size_one_round_trips_through_the_driver(tmp_path: Path) -> None:
    # qemu 7.2 refuses to open table_size=1 images (its L1 bounds check is off by one), so
    # this geometry is checked against the driver's own reads.
    image = tmp_path / "t1.qed"
    QedDriver.create(str(image), 3 * MiB, {"cluster_size": "4096", "table_size": "1"})
    expected = bytearray(3 * MiB)
    random_writes(image, expected, random.Random(13), 30, fmt="qed")
    assert export(image, tmp_path / "ours.raw", "qed").read_bytes() == expected
    disk = open_disk(str(image), "qed", read_only=True)
    try:
        result = disk.top.check(RepairMode.NONE)
    finally:
        disk.close()
    assert (result.corruptions, result.leaks) == (0, 0)


def need_check(image: Path) -> bool:
    """The QED_F_NEED_CHECK feature bit (qemu-img info does not show it)."""
    with open(image, "rb") as f:
        return bool(struct.unpack_from("<Q", f.read(64), 16)[0] & 2)


def test_need_check_set_while_dirty_and_cleared_on_flush(tmp_path: Path) -> None:
    image = tmp_path / "disk.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "table_size=2", str(image), str(4 * MiB))
    disk = open_disk(str(image), "qed")
    try:
        disk.write(1000, b"a" * 5000)
        assert need_check(image)
        crashed = tmp_path / "crashed.qed"
        shutil.copyfile(image, crashed)
        disk.flush()
        assert not need_check(image)
    finally:
        disk.close()
    assert_qemu_check_clean(image)
    # A writable open of the "crashed" copy checks it and clears the flag.
    disk = open_disk(str(crashed), "qed")
    try:
        assert disk.read(1000, 5000) == b"a" * 5000
    finally:
        disk.close()
    assert not need_check(crashed)
    assert_qemu_check_clean(crashed)


def test_open_repairs_an_image_qemu_left_dirty(tmp_path: Path) -> None:
    image = tmp_path / "disk.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "table_size=2", str(image), str(4 * MiB))
    # qemu-io's abort leaves the image as a crash would, with the need-check bit set.
    subprocess.run(
        ["qemu-io", "-f", "qed", "-c", "write -P 3 0 200k", "-c", "abort", str(image)],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert need_check(image)
    # Corrupt one L2 entry (past EOF) so the repair has something to do.
    raw = bytearray(image.read_bytes())
    l1 = struct.unpack_from("<Q", raw, 40)[0]
    l2 = struct.unpack_from("<Q", raw, l1)[0]
    struct.pack_into("<Q", raw, l2 + 8, 1 << 40)
    image.write_bytes(raw)
    disk = open_disk(str(image), "qed")
    try:
        info = disk.info()[0]
        assert any("1 corruptions fixed" in n for n in info.notes), info.notes
    finally:
        disk.close()
    status, data = qemu_check(image, "qed")
    # The cluster the bad entry pointed at is a leak now, as after qemu's own repair.
    assert status == 3 and data["leaks"] == 1, data
    assert not need_check(image)


def corrupt_copy(tmp_path: Path, src: Path, name: str, patches: list[tuple[int, bytes]]) -> Path:
    out = tmp_path / name
    raw = bytearray(src.read_bytes())
    for off, data in patches:
        raw[off : off + len(data)] = data
    out.write_bytes(raw)
    return out


def test_check_counts_match_qemu(tmp_path: Path) -> None:
    image = tmp_path / "disk.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", str(image), "4M")
    qemu_io(image, "write -P 5 0 16k", "write -P 6 1M 8k", "write -z 2M 4k", fmt="qed")
    raw = image.read_bytes()
    l1 = struct.unpack_from("<Q", raw, 40)[0]
    l2 = struct.unpack_from("<Q", raw, l1)[0]
    first_data = struct.unpack_from("<Q", raw, l2)[0]
    cases = {
        "leaky.qed": [(len(raw), bytes(3 * 4096))],
        "past_eof.qed": [(l2 + 8, struct.pack("<Q", 1 << 30))],
        "unaligned.qed": [(l2 + 8, struct.pack("<Q", first_data + 512))],
        "duplicate.qed": [(l2 + 8, struct.pack("<Q", first_data))],
        "bad_l2.qed": [(l1 + 8, struct.pack("<Q", 1 << 32))],
    }
    for name, patches in cases.items():
        bad = corrupt_copy(tmp_path, image, name, patches)
        status, data = qemu_check(bad, "qed")
        disk = open_disk(str(bad), "qed", read_only=True)
        try:
            ours = disk.top.check(RepairMode.NONE)
        finally:
            disk.close()
        assert ours.exit_status == status, (name, ours, data)
        theirs = (data.get("corruptions", 0), data.get("leaks", 0))
        assert (ours.corruptions, ours.leaks) == theirs, (name, ours, data)
        assert ours.allocated_clusters == data["allocated-clusters"], (name, ours, data)


def test_resize_grows(tmp_path: Path) -> None:
    image = tmp_path / "disk.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", str(image), "3M")
    qemu_io(image, "write -P 5 1M 8k", fmt="qed")
    disk = open_disk(str(image), "qed")
    try:
        disk.resize(40 * MiB)
        disk.write(39 * MiB, b"z" * 4096)
        disk.flush()
    finally:
        disk.close()
    expected = bytearray(40 * MiB)
    expected[MiB : MiB + 8192] = b"\x05" * 8192
    expected[39 * MiB : 39 * MiB + 4096] = b"z" * 4096
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_check_clean(image)
    assert_qemu_compare_identical(image, tmp_path / "expected.raw")


def header(**fields: int) -> bytes:
    values = {
        "cluster_size": 65536, "table_size": 4, "header_size": 1, "features": 0,
        "compat": 0, "autoclear": 0, "l1": 65536, "image_size": 10 * MiB,
        "bf_off": 0, "bf_size": 0,
    }  # fmt: skip
    values.update(fields)
    return struct.pack("<4sIIIQQQQQII", b"QED\0", *values.values())


MALFORMED = {
    "cluster_size_odd": (header(cluster_size=65535), CorruptImage, "65535"),
    "cluster_size_huge": (header(cluster_size=1 << 31), CorruptImage, "2147483648"),
    "table_size_huge": (header(table_size=1 << 30), CorruptImage, "1073741824"),
    "image_size_huge": (header(image_size=(1 << 64) - 512), CorruptImage, "image_size"),
    "l1_past_eof": (header(l1=1 << 40), CorruptImage, "l1_table_offset"),
    "l1_unaligned": (header(l1=65536 + 8), CorruptImage, "l1_table_offset"),
    "header_size_huge": (header(header_size=0xFFFFFFFF), CorruptImage, "header_size"),
    "backing_name_out": (header(features=1, bf_off=64, bf_size=1 << 20), CorruptImage, "backing"),
    "unknown_feature": (header(features=1 << 9), Unsupported, "0x200"),
    "l1_too_long": (header(image_size=1 << 50, table_size=16), CorruptImage, "L1"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_headers_are_rejected(tmp_path: Path, case: str) -> None:
    head, error, quoted = MALFORMED[case]
    image = tmp_path / "bad.qed"
    with open(image, "wb") as f:
        f.write(head)
        f.truncate(5 * 65536)
    start = time.monotonic()
    with pytest.raises(error, match=quoted):
        open_disk(str(image), "qed", read_only=True)
    assert time.monotonic() - start < 2


def test_bad_table_entries_fail_reads_not_the_process(tmp_path: Path) -> None:
    image = tmp_path / "disk.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", str(image), "4M")
    qemu_io(image, "write -P 5 0 8k", fmt="qed")
    raw = image.read_bytes()
    l1 = struct.unpack_from("<Q", raw, 40)[0]
    l2 = struct.unpack_from("<Q", raw, l1)[0]
    bad_data = corrupt_copy(tmp_path, image, "a.qed", [(l2, struct.pack("<Q", 1 << 45))])
    bad_l2 = corrupt_copy(tmp_path, image, "b.qed", [(l1, struct.pack("<Q", (1 << 45) + 4096))])
    for bad in (bad_data, bad_l2):
        disk = open_disk(str(bad), "qed", read_only=True)
        try:
            with pytest.raises(CorruptImage, match="0x"):
                disk.read(0, 4096)
        finally:
            disk.close()
    disk = open_disk(str(bad_data), "qed", read_only=True)
    try:
        assert disk.read(4096, 4096) == b"\x05" * 4096
    finally:
        disk.close()


def test_probe(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    qemu_img("create", "-q", "-f", "qed", str(image), "1M")
    disk = open_disk(str(image), read_only=True)
    try:
        assert disk.top.format_name == "qed"
        assert disk.size == MiB
    finally:
        disk.close()


def test_huge_tables_load_a_page_at_a_time(tmp_path: Path) -> None:
    # 64 MiB clusters and 16-cluster tables: each table is 1 GiB, and must never load whole.
    cs = 64 * MiB
    image = tmp_path / "big.qed"
    l2 = 17 * cs  # after the 16-cluster L1 table
    with open(image, "wb") as f:
        f.write(header(cluster_size=cs, table_size=16, l1=cs, image_size=100 * MiB))
        f.seek(cs)
        f.write(struct.pack("<Q", l2))
        f.seek(l2 + 8)
        f.write(struct.pack("<Q", l2 + 16 * cs))  # guest cluster 1
        f.seek(l2 + 16 * cs)
        f.write(b"data in cluster one")
        f.truncate(l2 + 17 * cs)
    disk = open_disk(str(image), "qed")
    try:
        start = time.monotonic()
        assert disk.read(cs, 19) == b"data in cluster one"
        assert disk.read(0, 4096) == bytes(4096)
        result = disk.top.check(RepairMode.NONE)
        assert (result.corruptions, result.allocated_clusters) == (0, 1)
        assert time.monotonic() - start < 10
        cache = disk.top._l2_cache
        assert all(len(page) * 8 <= 64 * KiB for page in cache._pages.values())
    finally:
        disk.close()


def test_l2_cache_is_bounded(tmp_path: Path) -> None:
    image = tmp_path / "disk.qed"
    QedDriver.create(str(image), 2 * 1024 * MiB, {"cluster_size": "4096", "table_size": "2"})
    disk = open_disk(str(image), "qed")
    try:
        span = 1024 * 4096  # guest bytes per L2 table
        for i in range(200):
            disk.write(i * span + 100, b"x")
        for i in range(200):
            assert disk.read(i * span + 100, 1) == b"x"
        assert len(disk.top._l2_cache._pages) <= 128
        disk.flush()
    finally:
        disk.close()
    status, data = qemu_check(image, "qed")
    assert status == 0 and data["allocated-clusters"] == 200, data


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("cluster_size", "table_size"),
    [(4096, 4), (8192, 2), (32 * KiB, 16), (64 * KiB, 8), (256 * KiB, 2), (4 * MiB, 2)],
)
def test_matrix_qemu_io_then_driver_writes(
    tmp_path: Path, cluster_size: int, table_size: int, seed: int
) -> None:
    base = tmp_path / "base.raw"
    pattern_image(base, 5 * MiB + 512, seed=seed)
    image = tmp_path / "disk.qed"
    backing = ["-b", "base.raw", "-F", "raw"] if seed % 2 else []
    qemu_img(
        "create", "-q", "-f", "qed", "-o", f"cluster_size={cluster_size},table_size={table_size}",
        *backing, str(image), str(16 * MiB),
    )  # fmt: skip
    rng = random.Random(seed)
    qemu_io(image, *random_qemu_io_commands(rng, 16 * MiB, 60, 512), fmt="qed")
    assert_export_matches_qemu(image, export(image, tmp_path / "ours.raw"), tmp_path)
    expected = bytearray(qemu_raw(image, tmp_path / "before.raw").read_bytes())
    random_writes(image, expected, rng, 80)
    write_file(tmp_path / "expected.raw", expected)
    status, data = qemu_check(image)
    assert status == 0, data
    assert_qemu_compare_identical(image, tmp_path / "expected.raw")


@pytest.mark.parametrize("backing", [False, True])
def test_whole_cluster_writes_across_tables_pass_check_and_compare(
    tmp_path: Path, backing: bool
) -> None:
    # Cluster-aligned writes of whole clusters take the no-staging-copy path. With 4 KiB
    # clusters an L2 table (4 clusters) maps 8 MiB: the runs below cross table boundaries.
    image = tmp_path / "whole.qed"
    size = 20 * MiB
    opts = "cluster_size=4096"
    expected = bytearray(size)
    if backing:
        base = tmp_path / "base.raw"
        pattern_image(base, size, seed=11)
        expected[:] = base.read_bytes()
        qemu_img("create", "-q", "-f", "qed", "-o", opts, "-b", base.name, "-F", "raw",
                 str(image), str(size))  # fmt: skip
    else:
        qemu_img("create", "-q", "-f", "qed", "-o", opts, str(image), str(size))
    disk = open_disk(str(image), "qed")
    try:
        for offset, length in [(0, MiB), (8 * MiB - 512 * KiB, MiB), (15 * MiB, 3 * MiB),
                               (9 * MiB + 4096, 8192), (10 * MiB + 100, 4096)]:  # fmt: skip
            data = os.urandom(length)
            disk.write(offset, data)
            expected[offset : offset + length] = data
        disk.flush()
    finally:
        disk.close()
    assert_qemu_check_clean(image, "qed")
    assert_qemu_compare_identical(image, write_file(tmp_path / "expected.raw", expected), "qed")
