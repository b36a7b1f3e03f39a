"""qcow2 internal snapshots: qemu's snapshots read and kept intact by imgfs writes, imgfs's
snapshots (create/apply/delete) read and checked by qemu-img, and hostile snapshot tables.

The oracle: ``qemu-img convert -O raw -l snapshot.name=S`` for each snapshot's bytes,
``qemu-img check`` (clean: no corruption, no leak) and ``qemu-img compare`` for the active layer.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.errors import CorruptImage, InvalidRequest, NoSpace, Unsupported
from imgfs.formats.qcow2 import snapshot as qsnap
from imgfs.formats.qcow2.driver import Qcow2Driver
from tests.formats.qcow2_util import KiB, MiB, create, qemu_io, run
from tests.oracle import assert_qemu_check_clean, assert_qemu_compare_identical, qemu_check

SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")


# -- helpers ---------------------------------------------------------------------------------------


def qemu_snapshot_bytes(img: Path, key: str, tmp: Path) -> bytes:
    """The snapshot's disk as qemu reads it (by name, or by id when ``key`` is digits)."""
    out = tmp / f"qemu-snap-{random.randrange(1 << 30)}.raw"
    opt = f"snapshot.id={key}" if key.isdigit() else f"snapshot.name={key}"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-l", opt, img.name, str(out),
        cwd=img.parent)  # fmt: skip
    data = out.read_bytes()
    out.unlink()
    return data


def imgfs_read(img: Path, snapshot: str | None = None) -> bytes:
    disk = open_disk(str(img), read_only=True, snapshot=snapshot)
    try:
        return bytes(disk.read(0, disk.size))
    finally:
        disk.close()


def assert_clean(img: Path) -> None:
    """qemu-img check finds nothing at all: no corruption, and no leaked cluster either; nor
    does imgfs's own check."""
    assert_qemu_check_clean(img, "qcow2", allow_leaks=False)
    disk = open_disk(str(img), read_only=True)
    try:
        result = disk.check()
        assert result.exit_status == 0, result.messages
    finally:
        disk.close()


def assert_active(img: Path, expected: bytes, tmp: Path) -> None:
    raw = tmp / "expected-active.raw"
    raw.write_bytes(expected)
    assert_qemu_compare_identical(img, raw, "qcow2")
    assert imgfs_read(img) == expected


def assert_snapshots(img: Path, model: dict[str, bytes], tmp: Path) -> None:
    """Every snapshot reads (in qemu and in imgfs) as the model says."""
    for name, data in model.items():
        assert qemu_snapshot_bytes(img, name, tmp) == data, f"qemu reads snapshot {name} wrong"
        assert imgfs_read(img, name) == data, f"imgfs reads snapshot {name} wrong"


def snap_cmd(*args: str) -> None:
    from imgfs.cli import main

    assert main(["snapshot", *args]) == 0


def qemu_list(img: Path) -> str:
    return run("qemu-img", "snapshot", "-l", str(img))


def entries_raw(img: Path) -> list[bytes]:
    """The raw bytes of every snapshot table entry, padding included (the last entry's padding,
    which qemu may leave unwritten, reads as zeros)."""
    data = img.read_bytes()
    nb, off = struct.unpack_from(">IQ", data, 60)
    out = []
    for _ in range(nb):
        (_, _, id_len, name_len, _, _, _, _, extra) = SNAPSHOT_ENTRY.unpack_from(data, off)
        n = SNAPSHOT_ENTRY.size + extra + id_len + name_len
        n += -n % 8
        out.append(data[off : off + n].ljust(n, b"\0"))
        off += n
    return out


def random_writes(disk, model: bytearray, rng: random.Random, count: int) -> None:
    """Writes, zero writes and discards at odd offsets through the driver, mirrored in model."""
    size = len(model)
    for _ in range(count):
        length = rng.choice([1, 511, 4096, 65536 + 7, 200 * KiB + 3])
        off = rng.randrange(0, size - length)
        roll = rng.random()
        if roll < 0.7:
            data = bytes([rng.randrange(1, 256)]) * length
            disk.write(off, data)
            model[off : off + length] = data
        elif roll < 0.85:
            disk.write_zeroes(off, length, may_unmap=rng.random() < 0.5)
            model[off : off + length] = bytes(length)
        else:
            # Only whole clusters are discarded; they then read as zeros (no backing file).
            before = bytes(model[off : off + length])
            disk.discard(off, length)
            after = bytes(disk.read(off, length))
            assert all(x == y or x == 0 for x, y in zip(after, before, strict=True))
            model[off : off + length] = after


# -- snapshots made by qemu, read by imgfs ---------------------------------------------------------


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qemu_snapshots_read_by_imgfs(tmp_path: Path, compat: str) -> None:
    img = create(tmp_path / "q.qcow2", 4 * MiB, f"compat={compat},cluster_size=4096")
    qemu_io(img, "write -P 1 0 1M", "write -P 2 2M 300k")
    run("qemu-img", "snapshot", "-c", "one", str(img))
    qemu_io(img, "write -P 3 512k 1M", "write -z 2M 64k")
    run("qemu-img", "snapshot", "-c", "two", str(img))
    qemu_io(img, "write -P 4 0 4M")
    disk = open_disk(str(img), read_only=True)
    try:
        snaps = disk.top.snapshots()
        assert [(s.id, s.name, s.virtual_size) for s in snaps] == [
            ("1", "one", 4 * MiB),
            ("2", "two", 4 * MiB),
        ]
    finally:
        disk.close()
    for key in ("one", "two", "1", "2"):
        assert imgfs_read(img, key) == qemu_snapshot_bytes(img, key, tmp_path)
    with pytest.raises(InvalidRequest, match="no snapshot"):
        open_disk(str(img), snapshot="three")


def test_snapshot_view_is_read_only(tmp_path: Path) -> None:
    img = create(tmp_path / "v.qcow2", 1 * MiB)
    qemu_io(img, "write -P 1 0 64k")
    run("qemu-img", "snapshot", "-c", "s", str(img))
    disk = open_disk(str(img), snapshot="s")  # a writable request still opens read-only
    try:
        assert disk.read_only
        from imgfs.errors import ReadOnly

        with pytest.raises(ReadOnly):
            disk.write(0, b"x")
    finally:
        disk.close()
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"")
    raw.write_bytes(bytes(MiB))
    with pytest.raises(InvalidRequest, match="no snapshot"):
        open_disk(str(raw), "raw", snapshot="s")


def test_snapshot_of_a_resized_image_keeps_its_size(tmp_path: Path) -> None:
    img = create(tmp_path / "r.qcow2", 1 * MiB)
    qemu_io(img, "write -P 7 0 1M")
    run("qemu-img", "snapshot", "-c", "small", str(img))
    run("qemu-img", "resize", str(img), "3M")
    qemu_io(img, "write -P 8 2M 1M")
    assert imgfs_read(img, "small") == b"\7" * MiB
    assert len(imgfs_read(img)) == 3 * MiB
    # imgfs grows it too; it refuses to shrink an image with snapshots (as qemu does).
    disk = open_disk(str(img))
    try:
        disk.resize(5 * MiB)
        with pytest.raises(Unsupported, match="shrink"):
            disk.resize(MiB)
    finally:
        disk.close()
    assert_clean(img)
    # qemu-img convert -l shows a snapshot at the image's current size (zeros past the
    # snapshot's own 1 MiB); imgfs exports it at its own size.
    theirs = qemu_snapshot_bytes(img, "small", tmp_path)
    assert theirs[:MiB] == imgfs_read(img, "small") == b"\7" * MiB
    assert theirs[MiB:] == bytes(4 * MiB)


# -- imgfs writes to images with snapshots ------------------------------------------------------


WRITE_CASES = [
    pytest.param("compat=1.1,cluster_size=65536", id="v3-64k"),
    pytest.param("compat=0.10,cluster_size=4096", id="v2-4k"),
    pytest.param("compat=1.1,cluster_size=512,refcount_bits=2", id="v3-512-rc2"),
    pytest.param("compat=1.1,cluster_size=16384,extended_l2=on", id="v3-extl2"),
]


@pytest.mark.parametrize("opts", WRITE_CASES)
def test_imgfs_writes_leave_qemu_snapshots_intact(tmp_path: Path, opts: str) -> None:
    size = 3 * MiB + 4096
    img = create(tmp_path / "w.qcow2", size, opts)
    rng = random.Random(opts)
    model = bytearray(size)
    snapshots: dict[str, bytes] = {}
    for round_ in range(2):
        disk = open_disk(str(img))
        try:
            assert not disk.read_only
            random_writes(disk, model, rng, 25)
        finally:
            disk.close()
        assert_clean(img)
        run("qemu-img", "snapshot", "-c", f"s{round_}", str(img))
        snapshots[f"s{round_}"] = bytes(model)
    disk = open_disk(str(img))
    try:
        random_writes(disk, model, rng, 40)
        disk.write(0, b"\xee" * size)  # every cluster and L2 table copied once more
        model[:] = b"\xee" * size
        random_writes(disk, model, rng, 10)
    finally:
        disk.close()
    assert_clean(img)
    assert_active(img, bytes(model), tmp_path)
    assert_snapshots(img, snapshots, tmp_path)


def test_discard_of_shared_clusters_drops_only_the_active_reference(tmp_path: Path) -> None:
    img = create(tmp_path / "d.qcow2", 2 * MiB, "cluster_size=65536")
    qemu_io(img, "write -P 5 0 2M")
    run("qemu-img", "snapshot", "-c", "keep", str(img))
    disk = open_disk(str(img))
    try:
        disk.discard(0, MiB)
        disk.write_zeroes(MiB, MiB // 2, may_unmap=True)
        disk.write_zeroes(MiB + MiB // 2, MiB // 2, may_unmap=False)
    finally:
        disk.close()
    assert_clean(img)
    assert_active(img, bytes(2 * MiB), tmp_path)
    assert_snapshots(img, {"keep": b"\5" * 2 * MiB}, tmp_path)
    # Deleting the snapshot frees its clusters: nothing is left allocated.
    snap_cmd("-d", "keep", str(img))
    assert_clean(img)
    _, data = qemu_check(img, "qcow2")
    assert data.get("allocated-clusters", 0) == 0
    assert img.stat().st_blocks * 512 < 600 * KiB  # the freed data clusters were punched


def test_compressed_clusters_shared_with_a_snapshot(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes((b"compressible " * 200_000)[: 2 * MiB])
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(img))
    run("qemu-img", "snapshot", "-c", "z", str(img))
    model = bytearray(src.read_bytes())
    disk = open_disk(str(img))
    try:
        random_writes(disk, model, random.Random(3), 30)
    finally:
        disk.close()
    assert_clean(img)
    assert_active(img, bytes(model), tmp_path)
    assert_snapshots(img, {"z": src.read_bytes()}, tmp_path)


def test_image_with_a_backing_file(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 2 * MiB)
    qemu_io(base, "write -P 9 0 2M")
    top = create(tmp_path / "top.qcow2", 2 * MiB, backing=base)
    qemu_io(top, "write -P 1 64k 64k")
    snap_cmd("-c", "s", str(top))
    expected = bytearray(b"\x09" * 2 * MiB)
    expected[64 * KiB : 128 * KiB] = b"\1" * 64 * KiB
    disk = open_disk(str(top))
    try:
        disk.write(100 * KiB, b"\2" * 100 * KiB)
        disk.write_zeroes(MiB, 64 * KiB)
    finally:
        disk.close()
    active = bytearray(expected)
    active[100 * KiB : 200 * KiB] = b"\2" * 100 * KiB
    active[MiB : MiB + 64 * KiB] = bytes(64 * KiB)
    assert_clean(top)
    assert_active(top, bytes(active), tmp_path)
    assert_snapshots(top, {"s": bytes(expected)}, tmp_path)  # unallocated parts from the base


# -- snapshots made by imgfs, checked by qemu ------------------------------------------------------


LIFECYCLE_CASES = [
    pytest.param("compat=1.1", id="v3"),
    pytest.param("compat=0.10,cluster_size=4096", id="v2-4k"),
    pytest.param("compat=1.1,cluster_size=512,refcount_bits=8", id="v3-512-rc8"),
    pytest.param("compat=1.1,cluster_size=16384,extended_l2=on,refcount_bits=64", id="extl2-rc64"),
]


@pytest.mark.parametrize("opts", LIFECYCLE_CASES)
def test_create_apply_delete_checked_by_qemu(tmp_path: Path, opts: str) -> None:
    size = 2 * MiB + 512
    img = create(tmp_path / "l.qcow2", size, opts)
    rng = random.Random(opts)
    model = bytearray(size)
    snapshots: dict[str, bytes] = {}

    def write_some(n: int) -> None:
        disk = open_disk(str(img))
        try:
            random_writes(disk, model, rng, n)
        finally:
            disk.close()

    write_some(15)
    snap_cmd("-c", "alpha", str(img))
    snapshots["alpha"] = bytes(model)
    assert_clean(img)
    write_some(15)
    snap_cmd("-c", "beta", str(img))
    snapshots["beta"] = bytes(model)
    write_some(15)
    assert_clean(img)
    assert_snapshots(img, snapshots, tmp_path)
    assert_active(img, bytes(model), tmp_path)
    listing = qemu_list(img)
    assert [line.split()[:2] for line in listing.splitlines()[2:]] == [
        ["1", "alpha"],
        ["2", "beta"],
    ]
    # Apply: the active layer becomes alpha's; the old active clusters are freed.
    snap_cmd("-a", "alpha", str(img))
    model[:] = snapshots["alpha"]
    assert_clean(img)
    assert_active(img, bytes(model), tmp_path)
    write_some(10)
    assert_clean(img)
    assert_snapshots(img, snapshots, tmp_path)
    # Delete by id and by name; the survivors stay intact.
    snap_cmd("-d", "1", str(img))
    del snapshots["alpha"]
    assert_clean(img)
    assert_snapshots(img, snapshots, tmp_path)
    assert_active(img, bytes(model), tmp_path)
    snap_cmd("-c", "gamma", str(img))
    snapshots["gamma"] = bytes(model)
    assert [line.split()[:2] for line in qemu_list(img).splitlines()[2:]] == [
        ["2", "beta"],
        ["3", "gamma"],
    ]
    snap_cmd("-d", "beta", str(img))
    snap_cmd("-d", "gamma", str(img))
    assert qemu_list(img) == ""
    assert_clean(img)
    assert_active(img, bytes(model), tmp_path)


def test_qemu_and_imgfs_take_turns(tmp_path: Path) -> None:
    img = create(tmp_path / "t.qcow2", 2 * MiB, "cluster_size=4096")
    qemu_io(img, "write -P 1 0 1M")
    snap_cmd("-c", "ours", str(img))
    qemu_io(img, "write -P 2 512k 1M")
    run("qemu-img", "snapshot", "-c", "theirs", str(img))
    disk = open_disk(str(img))
    try:
        disk.write(0, b"\3" * 4096)
    finally:
        disk.close()
    ours = b"\1" * MiB + bytes(MiB)
    theirs = b"\1" * (512 * KiB) + b"\2" * MiB + bytes(512 * KiB)
    assert_clean(img)
    assert_snapshots(img, {"ours": ours, "theirs": theirs}, tmp_path)
    run("qemu-img", "snapshot", "-a", "ours", str(img))  # qemu applies imgfs's snapshot
    assert_clean(img)
    snap_cmd("-a", "theirs", str(img))  # and imgfs applies qemu's
    assert_clean(img)
    assert_active(img, theirs, tmp_path)
    run("qemu-img", "snapshot", "-d", "ours", str(img))
    snap_cmd("-d", "theirs", str(img))
    assert_clean(img)
    assert_active(img, theirs, tmp_path)


def test_list_output_is_qemu_img_s(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = create(tmp_path / "ls.qcow2", MiB)
    from imgfs.cli import main

    assert main(["snapshot", "-l", str(img)]) == 0
    assert capsys.readouterr().out == qemu_list(img) == ""
    snap_cmd("-c", "a-rather-long-snapshot-name-over-17", str(img))
    run("qemu-img", "snapshot", "-c", "b", str(img))
    snap_cmd("-c", "b", str(img))  # names may repeat, as in qemu-img
    run("qemu-img", "snapshot", "-c", "c", str(img))
    # VM state sizes, clocks and icounts of every shape qemu prints, poked into the table.
    data = bytearray(img.read_bytes())
    nb, off = struct.unpack_from(">IQ", data, 60)
    values = [(999, 3600 * 1000 * 10**9 + 1_234_567_890, 5), (1000, 59_999_999_999, (1 << 64) - 1),
              (1023999, 0, 12345678901234), (5 * 2**30, 7 * 10**9, 0)]  # fmt: skip
    for vm, clock, icount in values[:nb]:
        struct.pack_into(">QI", data, off + 24, clock, vm & 0xFFFFFFFF)
        struct.pack_into(">Q", data, off + 40, vm)
        struct.pack_into(">Q", data, off + 56, icount)
        (_, _, id_len, name_len, _, _, _, _, extra) = SNAPSHOT_ENTRY.unpack_from(data, off)
        n = SNAPSHOT_ENTRY.size + extra + id_len + name_len
        off += n + -n % 8
    img.write_bytes(data)
    capsys.readouterr()
    assert main(["snapshot", "-l", str(img)]) == 0
    assert capsys.readouterr().out == qemu_list(img)


def test_refused_without_snapshot_support_or_on_overflow(tmp_path: Path) -> None:
    from imgfs.cli import main

    raw = tmp_path / "d.img"
    raw.write_bytes(bytes(MiB))
    assert main(["snapshot", "-c", "x", str(raw)]) == 1
    assert main(["snapshot", "-l", str(raw)]) == 0
    # 1-bit refcounts cannot share a cluster: refused before anything changes.
    img = create(tmp_path / "one.qcow2", MiB, "refcount_bits=1")
    qemu_io(img, "write -P 1 0 64k")
    before = img.read_bytes()
    disk = open_disk(str(img))
    try:
        assert isinstance(disk.top, Qcow2Driver)
        with pytest.raises(NoSpace, match="overflow"):
            qsnap.create(disk.top, "nope")
    finally:
        disk.close()
    assert img.read_bytes() == before
    # 2-bit refcounts: three references at most, so a third snapshot is one too many.
    img2 = create(tmp_path / "two.qcow2", MiB, "refcount_bits=2,cluster_size=4096")
    qemu_io(img2, "write -P 1 0 64k")
    snap_cmd("-c", "a", str(img2))
    snap_cmd("-c", "b", str(img2))
    assert main(["snapshot", "-c", "c", str(img2)]) == 1
    assert_clean(img2)
    assert main(["snapshot", "-a", "missing", str(img2)]) == 1
    assert main(["snapshot", "-d", "missing", str(img2)]) == 1


def test_existing_entries_kept_byte_for_byte(tmp_path: Path) -> None:
    """VM state sizes, clocks, icount and unknown extra data of existing snapshots survive
    imgfs's create and delete of others unchanged."""
    img = create(tmp_path / "x.qcow2", MiB, "cluster_size=4096")
    qemu_io(img, "write -P 1 0 64k")
    run("qemu-img", "snapshot", "-c", "vm", str(img))
    run("qemu-img", "snapshot", "-c", "other", str(img))
    # Rewrite the table in place: entry 1 gets 16 more bytes of (unknown) extra data, a VM
    # state size, a clock and an icount. The table's cluster has room for it.
    data = bytearray(img.read_bytes())
    nb, off = struct.unpack_from(">IQ", data, 60)
    old = entries_raw(img)
    fields = list(SNAPSHOT_ENTRY.unpack_from(old[0]))
    extra = fields[8]
    id_name = old[0][40 + extra : 40 + extra + fields[2] + fields[3]]
    fields[6], fields[7], fields[8] = 123_456_789_012, 0x1234, extra + 16
    body = bytearray(old[0][40 : 40 + extra])
    struct.pack_into(">Q", body, 0, 0x1234)  # vm_state_size_large
    struct.pack_into(">Q", body, 16, 42)  # icount
    body += b"\xde\xad\xbe\xef" * 4  # a future field
    first = SNAPSHOT_ENTRY.pack(*fields) + bytes(body) + id_name
    first += bytes(-len(first) % 8)
    table = first + old[1]
    data[off : off + len(table)] = table
    img.write_bytes(data)
    assert_clean(img)
    before = entries_raw(img)
    assert before[0] == first
    snap_cmd("-c", "mine", str(img))
    snap_cmd("-d", "other", str(img))
    after = entries_raw(img)
    assert after[0] == first
    assert len(after) == 2
    assert_clean(img)
    info = open_disk(str(img), read_only=True)
    try:
        s = info.top.snapshots()[0]
        assert (s.vm_state_size, s.vm_clock_nsec, s.icount) == (0x1234, 123_456_789_012, 42)
    finally:
        info.close()
    qemu_listing = qemu_list(img)
    assert "4.55 KiB" in qemu_listing and "00:02:03.456" in qemu_listing
    disk = open_disk(str(img), read_only=True)
    try:
        from imgfs.cmd_snapshot import format_list

        assert format_list(disk.top.snapshots()) == qemu_listing
    finally:
        disk.close()


# -- hostile snapshot tables ---------------------------------------------------------------------


def _qemu_image_with_snapshot(tmp_path: Path) -> Path:
    img = create(tmp_path / "h.qcow2", MiB, "cluster_size=4096")
    qemu_io(img, "write -P 1 0 64k")
    run("qemu-img", "snapshot", "-c", "s", str(img))
    return img


def _poke(img: Path, offset: int, fmt: str, value: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _table_offset(img: Path) -> int:
    return struct.unpack_from(">Q", img.read_bytes(), 64)[0]


@pytest.mark.parametrize(
    ("where", "fmt", "value", "needle"),
    [
        ("offset", ">Q", 1 << 40, "snapshots_offset"),
        ("offset", ">Q", 0, "snapshots_offset"),
        ("offset", ">Q", 4096 * 3, "overlaps"),  # the refcount table or L1 table
        ("count", ">I", 60000, "past the end"),
        ("count", ">I", 70000, "nb_snapshots"),
        ("l1_offset", ">Q", 1 << 40, "L1 table offset"),
        ("l1_offset", ">Q", 4097, "L1 table offset"),
        ("l1_offset", ">Q", 0, "L1 table offset"),
        ("l1_offset", ">Q", 4096 * 3, "overlaps"),
        ("l1_size", ">I", 1 << 30, "l1_size"),
        ("extra", ">I", 5000, "extra data"),
        ("id_len", ">H", 0, "empty id"),
        ("name_len", ">H", 65535, "past the end"),
        ("disk_size", ">Q", 1 << 50, "disk size"),
    ],
)
def test_malformed_tables_are_corrupt_images(
    tmp_path: Path, where: str, fmt: str, value: int, needle: str
) -> None:
    img = _qemu_image_with_snapshot(tmp_path)
    entry = _table_offset(img)
    at = {
        "offset": 64, "count": 60, "l1_offset": entry, "l1_size": entry + 8,
        "id_len": entry + 12, "name_len": entry + 14, "extra": entry + 36,
        "disk_size": entry + 48,
    }[where]  # fmt: skip
    if value == 4096 * 3:
        value = struct.unpack_from(">Q", img.read_bytes(), 48)[0]  # the refcount table
    _poke(img, at, fmt, value)
    with pytest.raises(CorruptImage, match=needle) as e:
        open_disk(str(img), read_only=True)
    assert "\n" not in str(e.value)


def test_snapshot_table_past_64_mib_is_refused(tmp_path: Path) -> None:
    img = _qemu_image_with_snapshot(tmp_path)
    entry = _table_offset(img)
    data = img.read_bytes()
    l1_offset, l1_size = struct.unpack_from(">QI", data, entry)
    # 65536 entries with 1024 bytes of extra data each: a table of more than 64 MiB.
    one = SNAPSHOT_ENTRY.pack(l1_offset, l1_size, 1, 0, 0, 0, 0, 0, 1024) + bytes(1024) + b"1"
    one += bytes(-len(one) % 8)
    with open(img, "r+b") as f:
        f.seek(entry)
        f.write(one * 65536)
    _poke(img, 60, ">I", 65536)
    with pytest.raises(CorruptImage, match="exceeds"):
        open_disk(str(img), read_only=True)


# -- through a real FUSE mount -------------------------------------------------------------------


def test_mount_exports_snapshots_read_only(images: Path, mount, tmp_path: Path) -> None:
    img = create(images / "vm.qcow2", 2 * MiB, "cluster_size=4096")
    qemu_io(img, "write -P 1 0 1M")
    run("qemu-img", "snapshot", "-c", "before", str(img))
    qemu_io(img, "write -P 2 512k 1M")
    run("qemu-img", "snapshot", "-c", "a/b", str(img))  # not a file name: exported by its id
    qemu_io(img, "write -P 3 0 64k")
    expected = {
        "before": qemu_snapshot_bytes(img, "before", tmp_path),
        "2": qemu_snapshot_bytes(img, "2", tmp_path),
    }
    m = mount(images)
    assert sorted(os.listdir(m.path)) == ["vm.qcow2.raw", "vm.qcow2@2.raw", "vm.qcow2@before.raw"]
    for key, data in expected.items():
        exported = m.path / f"vm.qcow2@{key}.raw"
        st = exported.stat()
        assert st.st_size == 2 * MiB
        assert st.st_mode & 0o222 == 0
        assert exported.read_bytes() == data
        with pytest.raises(OSError) as e:
            os.open(exported, os.O_RDWR)
        assert e.value.errno in (errno.EACCES, errno.EROFS)
    assert "exported by its id as vm.qcow2@2.raw" in m.log_text()
    # A real write to the active disk while a snapshot view is open: the view is unchanged.
    view = os.open(m.path / "vm.qcow2@before.raw", os.O_RDONLY)
    try:
        fd = os.open(m.file("vm.qcow2"), os.O_RDWR)
        try:
            os.pwrite(fd, b"\x44" * 100_000, 4000)
            os.pwrite(fd, b"\x55" * 3 * 4096, MiB + 4096)
            os.fsync(fd)
            assert os.pread(fd, 100_000, 4000) == b"\x44" * 100_000
        finally:
            os.close(fd)
        assert os.pread(view, MiB, 0) == b"\1" * MiB
    finally:
        os.close(view)
    active = bytearray(qemu_convert_raw_bytes(img, tmp_path))
    m.umount()
    assert_clean(img)
    assert active[4000:104000] == b"\x44" * 100_000
    assert_active(img, bytes(active), tmp_path)
    assert_snapshots(img, expected, tmp_path)


def qemu_convert_raw_bytes(img: Path, tmp: Path) -> bytes:
    out = tmp / "active-now.raw"
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(img), str(out))
    return out.read_bytes()


# -- snapshots with VM state (made by qemu-system-x86_64's savevm) -------------------------------


def hmp(img: Path, *commands: str) -> str:
    """Run HMP commands in a device-less QEMU with the image as its only drive."""
    script = "".join(c + "\n" for c in commands) + "quit\n"
    result = subprocess.run(
        ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none", "-S",
         "-monitor", "stdio", "-drive", f"file={img},if=none,id=d0,format=qcow2"],
        input=script, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_vm_state_snapshots_survive_imgfs(tmp_path: Path) -> None:
    img = create(tmp_path / "vm.qcow2", 2 * MiB, "cluster_size=4096")
    qemu_io(img, "write -P 1 0 1M")
    hmp(img, "savevm with-state")
    assert "Error" not in hmp(img, "loadvm with-state")
    vm_entry = entries_raw(img)[0]
    assert SNAPSHOT_ENTRY.unpack_from(vm_entry)[7] > 0  # it has VM state
    from imgfs.cli import main

    # imgfs writes the active layer, makes and deletes other snapshots around it.
    disk = open_disk(str(img))
    try:
        disk.write(4096, b"\2" * MiB)
    finally:
        disk.close()
    snap_cmd("-c", "disk-only", str(img))
    assert main(["snapshot", "-d", "disk-only", str(img)]) == 0
    snap_cmd("-c", "again", str(img))
    assert_clean(img)
    assert entries_raw(img)[0] == vm_entry
    disk = open_disk(str(img), read_only=True)
    try:
        from imgfs.cmd_snapshot import format_list

        assert format_list(disk.top.snapshots()) == qemu_list(img)
    finally:
        disk.close()
    assert "Error" not in hmp(img, "loadvm with-state")  # QEMU still loads its VM state
    assert_snapshots(img, {"with-state": b"\1" * MiB + bytes(MiB)}, tmp_path)
    # Applying it with imgfs brings back its disk; QEMU still loads it afterwards.
    snap_cmd("-a", "with-state", str(img))
    assert_clean(img)
    assert_active(img, b"\1" * MiB + bytes(MiB), tmp_path)
    assert "Error" not in hmp(img, "loadvm with-state")
    snap_cmd("-d", "with-state", str(img))
    snap_cmd("-d", "again", str(img))
    assert_clean(img)


# -- a bigger matrix (slow tier) -------------------------------------------------------------------


MATRIX = [
    f"compat={compat},cluster_size={cs},refcount_bits={rb}" + extra
    for compat, cs, rb, extra in [
        ("0.10", 512, 16, ""), ("0.10", 65536, 16, ""), ("1.1", 512, 4, ""),
        ("1.1", 4096, 8, ""), ("1.1", 65536, 32, ""), ("1.1", 2 * MiB, 16, ""),
        ("1.1", 32768, 64, ",extended_l2=on"), ("1.1", 4096, 16, ",lazy_refcounts=on"),
    ]
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("opts", MATRIX)
@pytest.mark.parametrize("with_backing", [False, True], ids=["plain", "backing"])
def test_random_snapshot_workload(tmp_path: Path, opts: str, with_backing: bool) -> None:
    """Random rounds of imgfs and qemu writes, snapshots made, applied and deleted by both;
    after every round qemu-img check is clean and every snapshot reads as the model says."""
    size = 5 * MiB + 3 * 512
    rng = random.Random(opts + str(with_backing))
    base_data = bytes(size)
    backing = None
    if with_backing:
        backing = create(tmp_path / "base.qcow2", size, "cluster_size=65536")
        qemu_io(backing, "write -P 0x61 0 2M", "write -P 0x62 3M 1M")
        base_data = b"\x61" * 2 * MiB + bytes(MiB) + b"\x62" * MiB + bytes(size - 4 * MiB)
    img = create(tmp_path / "m.qcow2", size, opts, backing=backing)
    model = bytearray(base_data)
    snapshots: dict[str, bytes] = {}
    serial = 0
    for _ in range(10):
        action = rng.choice(["ours", "ours", "qemu", "snap", "qsnap", "apply", "delete"])
        if action == "ours":
            disk = open_disk(str(img))
            try:
                n = 20
                for _ in range(n):
                    length = rng.choice([1, 4095, 65536 + 9, 300 * KiB])
                    off = rng.randrange(0, size - length)
                    if rng.random() < 0.8:
                        data = bytes([rng.randrange(1, 256)]) * length
                        disk.write(off, data)
                        model[off : off + length] = data
                    else:
                        disk.write_zeroes(off, length, may_unmap=rng.random() < 0.5)
                        model[off : off + length] = bytes(length)
            finally:
                disk.close()
        elif action == "qemu":
            off = rng.randrange(0, size - 200 * KiB) // 512 * 512
            value = rng.randrange(1, 256)
            qemu_io(img, f"write -P {value} {off} 200k")
            model[off : off + 200 * KiB] = bytes([value]) * 200 * KiB
        elif action in ("snap", "qsnap"):
            serial += 1
            name = f"n{serial}"
            if action == "snap":
                snap_cmd("-c", name, str(img))
            else:
                run("qemu-img", "snapshot", "-c", name, str(img))
            snapshots[name] = bytes(model)
        elif snapshots:
            name = rng.choice(sorted(snapshots))
            who = rng.choice(["imgfs", "qemu"])
            flag = "-a" if action == "apply" else "-d"
            if who == "imgfs":
                snap_cmd(flag, name, str(img))
            else:
                run("qemu-img", "snapshot", flag, name, str(img))
            if action == "apply":
                model[:] = snapshots[name]
            else:
                del snapshots[name]
        assert_clean(img)
    assert_active(img, bytes(model), tmp_path)
    assert_snapshots(img, snapshots, tmp_path)
    for name in list(snapshots):
        snap_cmd("-d", name, str(img))
    assert_clean(img)
    assert_active(img, bytes(model), tmp_path)


# -- a real image from another producer ----------------------------------------------------------


def _sha256_imgfs(img: Path, snapshot: str | None) -> str:
    import hashlib

    h = hashlib.sha256()
    disk = open_disk(str(img), read_only=True, snapshot=snapshot)
    try:
        for pos in range(0, disk.size, 8 * MiB):
            h.update(disk.read(pos, min(8 * MiB, disk.size - pos)))
    finally:
        disk.close()
    return h.hexdigest()


def _sha256_qemu(img: Path, snapshot: str | None, tmp: Path) -> str:
    from tests.oracle import sha256_file

    out = tmp / "qemu.raw"
    args = ["qemu-img", "convert", "-f", "qcow2", "-O", "raw"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    run(*args, str(img), str(out))
    digest = sha256_file(out)
    out.unlink()
    return digest


@pytest.mark.slow  # 512 MiB disks hashed six times: ~30 s here
def test_corpus_image_snapshots(tmp_path: Path) -> None:
    import gzip

    from tests.conftest import SHARED

    img = tmp_path / "snapshot.qcow2"
    with gzip.open(SHARED / "corpus" / "qcow2" / "dissect-hypervisor" / "snapshot.qcow2.gz") as f:
        img.write_bytes(f.read())
    disk = open_disk(str(img), read_only=True)
    try:
        names = [s.name for s in disk.top.snapshots()]
    finally:
        disk.close()
    assert len(names) == 2
    before = {n: _sha256_qemu(img, n, tmp_path) for n in names}
    for name in names:
        assert _sha256_imgfs(img, name) == before[name]
    disk = open_disk(str(img))
    try:
        disk.write(12345, b"\x77" * 300_000)
    finally:
        disk.close()
    assert_clean(img)
    for name in names:
        assert _sha256_qemu(img, name, tmp_path) == before[name]
    assert _sha256_imgfs(img, None) == _sha256_qemu(img, None, tmp_path)


def test_small_l2_cache_evicts_during_cow_and_snapshot_operations(tmp_path: Path) -> None:
    """Eight L2 tables through a two-table cache: copies of shared tables and the snapshot
    operations' table walks evict dirty tables all the time; the ordering must hold."""
    size = 16 * MiB
    img = create(tmp_path / "e.qcow2", size, "cluster_size=4096")
    rng = random.Random(7)
    model = bytearray(size)
    small = {"l2-cache-size": "8k"}

    def writes(n: int) -> None:
        disk = open_disk(str(img), driver_options=small)
        try:
            for _ in range(n):
                off = rng.randrange(0, size - 70_000)
                data = bytes([rng.randrange(1, 256)]) * rng.choice([1, 5000, 70_000])
                disk.write(off, data)
                model[off : off + len(data)] = data
        finally:
            disk.close()

    def op(fn, key: str) -> None:
        disk = open_disk(str(img), driver_options=small)
        try:
            fn(disk.top, key)
        finally:
            disk.close()

    writes(60)
    op(qsnap.create, "a")
    a = bytes(model)
    writes(60)
    op(qsnap.create, "b")
    b = bytes(model)
    writes(40)
    assert_clean(img)
    assert_active(img, bytes(model), tmp_path)
    assert_snapshots(img, {"a": a, "b": b}, tmp_path)
    op(qsnap.apply, "a")
    model[:] = a
    writes(30)
    op(qsnap.delete, "b")
    assert_clean(img)
    assert_active(img, bytes(model), tmp_path)
    assert_snapshots(img, {"a": a}, tmp_path)


def test_concurrent_fuse_writers_with_a_snapshot(images: Path, mount, tmp_path: Path) -> None:
    size = 8 * MiB
    img = create(images / "c.qcow2", size, "cluster_size=16384")
    qemu_io(img, "write -P 0x11 0 8M")
    run("qemu-img", "snapshot", "-c", "base", str(img))
    model = bytearray(b"\x11" * size)
    m = mount(images)
    exported = m.file("c.qcow2")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        rng = random.Random(n)
        fd = os.open(exported, os.O_RDWR)
        try:
            for _ in range(30):
                off = n * 2 * MiB + rng.randrange(0, 2 * MiB - 100_000)
                data = rng.randbytes(rng.choice([1, 513, 16384, 40_000, 99_999]))
                assert os.pwrite(fd, data, off) == len(data)
                model[off : off + len(data)] = data  # each writer owns its 2 MiB
                assert os.pread(fd, len(data), off) == data
            os.fsync(fd)
        except BaseException as e:
            errors.append(e)
        finally:
            os.close(fd)

    import threading

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with open(m.path / "c.qcow2@base.raw", "rb") as f:
        assert f.read() == b"\x11" * size
    m.umount()
    assert_clean(img)
    assert_active(img, bytes(model), tmp_path)
    assert_snapshots(img, {"base": b"\x11" * size}, tmp_path)


# -- running out of space ------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 3 MiB tmpfs (needs root, as every FUSE test here does; CI runs as root)."""
    assert os.geteuid() == 0, "mounting a tmpfs needs root"
    point = tmp_path / "small"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def _fill(directory: Path, leave: int) -> None:
    """Use up the file system but ``leave`` bytes (whole pages)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError:
            pass
        os.ftruncate(fd, os.fstat(fd).st_size // 4096 * 4096 - leave)
    finally:
        os.close(fd)


def test_running_out_of_space_while_copying_shared_clusters(small_fs: Path, tmp_path: Path) -> None:
    img = create(small_fs / "t.qcow2", 8 * MiB, "cluster_size=4096")
    qemu_io(img, "write -P 1 0 2M")
    run("qemu-img", "snapshot", "-c", "s", str(img))
    disk = open_disk(str(img))
    from imgfs.errors import HostIOError

    with pytest.raises(HostIOError, match="No space"):
        try:
            for off in range(0, 2 * MiB, 64 * KiB):
                disk.write(off, b"\2" * 64 * KiB)
        finally:
            with pytest.raises(HostIOError):
                disk.close()
    status, data = qemu_check(img, "qcow2")
    assert status in (0, 3) and not data.get("corruptions"), data  # leaks at most
    assert qemu_snapshot_bytes(img, "s", tmp_path) == b"\1" * 2 * MiB + bytes(6 * MiB)


@pytest.mark.parametrize("free_pages", [0, 1])
def test_running_out_of_space_while_snapshotting(
    small_fs: Path, tmp_path: Path, free_pages: int
) -> None:
    """No space for the L1 copy (0 pages free) or for the new snapshot table (1 page free):
    the command fails, and the image keeps its data, its snapshot, and no corruption."""
    img = create(small_fs / "t.qcow2", 8 * MiB, "cluster_size=4096")
    qemu_io(img, "write -P 1 0 1M")
    run("qemu-img", "snapshot", "-c", "old", str(img))
    qemu_io(img, "write -P 2 0 64k")
    _fill(small_fs, free_pages * 4096)
    from imgfs.cli import main

    assert main(["snapshot", "-c", "new", str(img)]) == 1
    status, data = qemu_check(img, "qcow2")
    # No room for the L1 copy: nothing changed. No room for the table: the L1 copy and the
    # raised refcounts are leaked (the header never pointed at them).
    assert status == (0 if free_pages == 0 else 3) and not data.get("corruptions"), data
    assert [line.split()[1] for line in qemu_list(img).splitlines()[2:]] == ["old"]
    assert qemu_snapshot_bytes(img, "old", tmp_path)[: 2 * MiB] == b"\1" * MiB + bytes(MiB)
    expected = bytearray(8 * MiB)
    expected[:MiB] = b"\1" * MiB
    expected[: 64 * KiB] = b"\2" * 64 * KiB
    assert imgfs_read(img) == bytes(expected)
