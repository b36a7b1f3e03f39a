"""Hostile input: seeded mutants of small valid images of every merged format, through the driver
API (in a worker process with an address-space limit and a per-mutant deadline) and through a
real FUSE mount. Only ImgfsError may come out; nothing may crash, hang or eat memory.

The harness lives in tests/formats/hostile.py; a failure names the base, the seed and the
mutation, and ``run_mutants([base], [seed], dir)`` reproduces it.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from imgfs.block.chain import Containment
from imgfs.block.disk import open_disk
from imgfs.errors import CorruptImage, ImgfsError, Unsupported
from tests.formats import hostile
from tests.formats.hostile import Base, make_bases, make_mutant, run_mutants, scratch_dir

FORMATS = ["raw", "qed", "qcow", "vdi", "parallels", "parallels-hdd", "cow", "bochs", "cloop",
           "dmg", "asif", "qcow2", "vmdk", "vpc", "vhdx"]  # fmt: skip
DEFAULT_MUTANTS = 50
SLOW_MUTANTS = 2000
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Base]]:
    return make_bases(tmp_path_factory.mktemp("bases"))


def assert_no_failures(fmt: str, outcome: hostile.Outcome, count: int) -> None:
    assert len(outcome.results) + len(outcome.failures) >= count
    assert not outcome.failures, f"{fmt}: {len(outcome.failures)} bad mutants:\n" + "\n".join(
        f[:3000] for f in outcome.failures
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutants_give_clear_errors(fmt: str, bases, tmp_path: Path) -> None:
    outcome = run_mutants(bases[fmt], range(DEFAULT_MUTANTS), scratch_dir(tmp_path))
    assert_no_failures(fmt, outcome, DEFAULT_MUTANTS)
    # The mutants reach past the header checks: some open (and some of those fail later) and
    # some are refused.
    opened = sum(r["opened"] for r in outcome.results)
    assert 0 < opened, opened
    if fmt != "raw":  # every raw file is a valid raw image
        assert opened < len(outcome.results), opened


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_many_mutants_give_clear_errors(fmt: str, bases, tmp_path: Path) -> None:
    start = time.monotonic()
    outcome = run_mutants(bases[fmt], range(10_000, 10_000 + SLOW_MUTANTS), scratch_dir(tmp_path))
    elapsed = time.monotonic() - start
    print(f"{fmt}: {len(outcome.results)} mutants in {elapsed:.0f} s")
    assert_no_failures(fmt, outcome, SLOW_MUTANTS)


def test_unmutated_bases_open_cleanly(bases) -> None:
    """The harness starts from valid images: each reads end to end and checks clean."""
    for fmt, group in bases.items():
        for base in group:
            disk = open_disk(str(base.directory / base.image), fmt, read_only=True)
            try:
                for off in range(0, min(disk.size, 64 * MiB), MiB):
                    disk.read(off, min(MiB, disk.size - off))
                disk.info()
            finally:
                disk.close()


# -- the harness itself catches what it should ----------------------------------------------


def test_harness_reports_a_dead_worker_and_goes_on(bases, tmp_path: Path) -> None:
    """A worker that dies is reported with the mutant it was on; later ones still run."""
    base = bases["raw"][0]
    jobs_dir = scratch_dir(tmp_path)
    # A base whose directory has no base.json makes the worker crash on that job.
    broken = tmp_path / "broken"
    broken.mkdir()
    outcome = run_mutants([base, Base(broken, "raw", "x", {"x": [(0, 1)]}), base], range(3),
                          jobs_dir)  # fmt: skip
    assert [r["seed"] for r in outcome.results] == [0, 2]
    assert len(outcome.failures) == 1 and "seed 1" in outcome.failures[0]


# -- regressions found by the mutants --------------------------------------------------------


def patch(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) >= 1, old
    path.write_bytes(data.replace(old, new, 1))


def open_fails(path: Path, fmt: str, match: str, error: type[ImgfsError] = CorruptImage) -> None:
    with pytest.raises(error, match=match):
        open_disk(str(path), fmt, read_only=True, containment=Containment(str(path.parent)))


@pytest.mark.parametrize("fmt,name", [("qed", "qed-backing"), ("qcow", "qcow-backing")])
def test_backing_name_with_nul_is_corrupt(fmt: str, name: str, bases, tmp_path: Path) -> None:
    """A NUL in the stored backing name made the chain layer's path calls raise ValueError."""
    base = next(b for b in bases[fmt] if b.directory.name == name)
    image = tmp_path / "disk"
    shutil.copyfile(base.directory / base.image, image)
    patch(image, b"base.raw", b"ba\0e.raw")
    open_fails(image, fmt, r"backing file name b'ba\\x00e.raw' holds a NUL byte")


def test_descriptor_with_unknown_encoding_is_corrupt(bases, tmp_path: Path) -> None:
    base = bases["parallels-hdd"][0]
    bundle = tmp_path / "b.hdd"
    shutil.copytree(base.directory, bundle)
    patch(bundle / "DiskDescriptor.xml", b"encoding='UTF-8'", b"encoding='UTF-0'")
    open_fails(bundle / "DiskDescriptor.xml", "parallels-hdd", "unknown encoding: UTF-0")


def test_descriptor_with_unicode_digits_is_corrupt(bases, tmp_path: Path) -> None:
    """str.isdigit() accepts '²', which int() refuses."""
    base = bases["parallels-hdd"][0]
    bundle = tmp_path / "b.hdd"
    shutil.copytree(base.directory, bundle)
    patch(bundle / "DiskDescriptor.xml", b"<Disk_size>4096", "<Disk_size>4²".encode())
    open_fails(bundle / "DiskDescriptor.xml", "parallels-hdd", "bad <Disk_size> '4²'")


def test_dmg_plist_with_unknown_encoding_is_corrupt(bases, tmp_path: Path) -> None:
    base = next(b for b in bases["dmg"] if b.directory.name == "dmg-xml")
    image = tmp_path / "disk.dmg"
    shutil.copyfile(base.directory / base.image, image)
    patch(image, b'encoding="UTF-8"', b'encoding="WTF-8"')
    open_fails(image, "dmg", "bad XML plist: unknown encoding: WTF-8")


def test_asif_metadata_with_unknown_encoding_is_a_note(bases, tmp_path: Path) -> None:
    base = bases["asif"][0]
    image = tmp_path / "disk.asif"
    shutil.copyfile(base.directory / base.image, image)
    patch(image, b'encoding="UTF-8"', b'encoding="WTF-8"')
    disk = open_disk(str(image), "asif", read_only=True)
    try:
        (info,) = disk.info()
        assert any("unknown encoding: WTF-8" in note for note in info.notes), info.notes
    finally:
        disk.close()


# -- through a real FUSE mount ----------------------------------------------------------------

# Bases without companion files (their whole image is one file), plus the bundle and cow's pair.
FUSE_BASES = ["raw", "qed-small", "qcow-plain", "qcow-compressed", "vdi-dynamic", "parallels",
              "bochs-built", "cloop-4096", "dmg-xml", "dmg-rsrc", "asif", "cow"]  # fmt: skip


def classify(path: Path, fmt: str | None) -> tuple[str, dict[int, bytes | None]]:
    """('refused', {}) when the open fails, else ('open', {piece offset: bytes or None when the
    read fails}) for the first 8 MiB. ``fmt`` None probes, as the mount does."""
    try:
        disk = open_disk(str(path), fmt, read_only=True, containment=Containment(str(path.parent)))
    except ImgfsError:
        return "refused", {}
    pieces: dict[int, bytes | None] = {}
    try:
        for off in range(0, min(disk.size, 8 * MiB), MiB):
            try:
                pieces[off] = bytes(disk.read(off, min(MiB, disk.size - off)))
            except ImgfsError:
                pieces[off] = None
    finally:
        disk.close()
    return "open", pieces


def pick_mutants(bases, work: Path) -> list[tuple[str, Path, str, str]]:
    """Two refused mutants and two that open but fail a read, from the first seeds that give
    them: (format, path of the mutated single-file image, name, kind)."""
    chosen: list[tuple[str, Path, str, str]] = []
    want = {"refused": 2, "eio": 2}
    candidates = [b for g in bases.values() for b in g if b.directory.name in
                  ("qcow-plain", "qed-small", "vdi-dynamic", "cloop-4096", "dmg-xml")]  # fmt: skip
    for seed in range(500):
        if not any(want.values()):
            break
        base = candidates[seed % len(candidates)]
        dest = work / f"m{seed}"
        name, _ = make_mutant(base, seed, dest)
        kind, pieces = classify(dest / base.image, None)
        if kind == "open":
            kind = "eio" if None in pieces.values() else "fine"
        if want.get(kind):
            want[kind] -= 1
            chosen.append((base.fmt, dest / base.image, f"hostile{seed}.{base.fmt}", kind))
    assert not any(want.values()), f"no mutants of kinds {want}"
    return chosen


def fuse_read(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def test_fuse_mount_survives_hostile_images(bases, images: Path, mount, tmp_path: Path) -> None:
    by_name = {b.directory.name: b for g in bases.values() for b in g}
    valid: dict[str, tuple[str, Path]] = {}
    for key in FUSE_BASES:
        base = by_name[key]
        name = f"{key}.{base.fmt}" if base.fmt != "raw" else f"{key}.img"
        for companion in os.listdir(base.directory):
            if companion not in (base.image, "base.json"):
                shutil.copyfile(base.directory / companion, images / companion)
        shutil.copyfile(base.directory / base.image, images / name)
        valid[name] = (base.fmt, images / name)
        if base.fmt == "cow":
            # uml_mkcow stored the backing name relative to the base directory: same here.
            valid["base.raw"] = ("raw", images / "base.raw")
    shutil.copytree(by_name["bundle.hdd"].directory, images / "bundle.hdd")
    (images / "bundle.hdd" / "base.json").unlink()
    valid["bundle.hdd"] = ("parallels-hdd", images / "bundle.hdd" / "DiskDescriptor.xml")

    mutants = pick_mutants(bases, tmp_path / "mutants")
    for _fmt, path, name, _kind in mutants:
        shutil.copyfile(path, images / name)

    # What the driver API says each image holds, read before the mount.
    expected = {name: classify(path, fmt)[1] for name, (fmt, path) in valid.items()}
    hostile_pieces = {
        name: classify(images / name, None)[1] for _f, _p, name, kind in mutants if kind == "eio"
    }

    m = mount(images)
    m.expected_log_errors += [f"{name}: not exported" for _f, _p, name, k in mutants
                              if k == "refused"]  # fmt: skip
    listing = set(os.listdir(m.path))
    for name in valid:
        assert f"{name}.raw" in listing, (name, sorted(listing))
    for _fmt, _path, name, kind in mutants:
        assert (f"{name}.raw" in listing) == (kind == "eio"), (name, kind, sorted(listing))

    def check_valid() -> None:
        for name, pieces in expected.items():
            assert all(p is not None for p in pieces.values()), name
            for off, data in pieces.items():
                assert fuse_read(m.file(name), off, len(data)) == data, (name, off)

    check_valid()
    for name, pieces in hostile_pieces.items():
        for off, data in pieces.items():
            if data is None:
                with pytest.raises(OSError) as e:
                    fuse_read(m.file(name), off, MiB)
                assert e.value.errno == errno.EIO, (name, off)
            else:
                assert fuse_read(m.file(name), off, len(data)) == data, (name, off)
    # The bad reads took nothing down: every valid image still reads right.
    check_valid()
    log = m.log_text()
    for _fmt, _path, name, kind in mutants:
        if kind == "refused":
            assert log.count(f"{name}: not exported") == 1, log
    m.umount()


def test_seeds_are_deterministic(bases, tmp_path: Path) -> None:
    base = bases["qcow"][0]
    a = make_mutant(base, 7, tmp_path / "a")
    b = make_mutant(base, 7, tmp_path / "b")
    assert a == b
    assert (tmp_path / "a" / base.image).read_bytes() == (tmp_path / "b" / base.image).read_bytes()
    assert random.Random(7).random() == random.Random(7).random()


def test_parallels_bat_shorter_than_a_huge_disk_walks_in_few_calls(bases, tmp_path: Path) -> None:
    """nb_sectors far past the BAT: block status stepped 65536 blocks per call through the
    unallocated rest, so walking the disk took minutes (a hang for a mutant)."""
    base = bases["parallels"][0]
    image = tmp_path / "disk.parallels"
    shutil.copyfile(base.directory / base.image, image)
    with open(image, "r+b") as f:
        f.seek(36)
        f.write((1 << 40).to_bytes(8, "little"))  # nb_sectors: 512 TiB
    disk = open_disk(str(image), "parallels", read_only=True)
    try:
        assert disk.size == 1 << 49
        offset = 0
        for _ in range(20):
            ext = disk.block_status(offset, disk.size - offset)
            offset += ext.length
            if offset == disk.size:
                break
        assert offset == disk.size, f"20 block-status calls covered {offset} bytes"
        assert ext.allocation.name == "UNALLOCATED"
        assert disk.read(disk.size - MiB, MiB) == bytes(MiB)
    finally:
        disk.close()


def test_worker_limit_turns_a_huge_allocation_into_memory_error() -> None:
    """The worker's address-space limit is what makes an unbounded allocation a failure
    (MemoryError, reported with the seed) instead of a machine that swaps."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({hostile.ADDRESS_SPACE_LIMIT},) * 2)\n"
        "import imgfs.block.disk, imgfs.formats.dmg, zstandard\n"
        "try:\n    bytearray(2 << 30)\nexcept MemoryError:\n    print('limited')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert out.stdout.strip() == "limited", out.stderr


def test_qcow_block_status_over_a_huge_empty_disk_is_quick(tmp_path: Path) -> None:
    """_map walked cluster by cluster with no cap: one block-status request over an empty
    64 GiB qcow looked at 2**24 entries (a mutant with a big size field hung)."""
    import subprocess

    image = tmp_path / "big.qcow"
    subprocess.run(["qemu-img", "create", "-f", "qcow", str(image), "64G"], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    disk = open_disk(str(image), "qcow", read_only=True)
    try:
        start = time.monotonic()
        offset = 0
        for _ in range(100):
            ext = disk.block_status(offset, disk.size - offset)
            assert ext.allocation.name == "UNALLOCATED"
            offset += ext.length
            if offset == disk.size:
                break
        assert offset == disk.size, f"100 block-status calls covered {offset} bytes"
        assert time.monotonic() - start < 5
    finally:
        disk.close()


def test_qed_block_status_over_a_huge_empty_disk_is_quick(tmp_path: Path) -> None:
    """As qcow: qed's _map stepped through every cluster of an unallocated run, 2**24 of them
    for one request over this empty 64 GiB disk."""
    import subprocess

    image = tmp_path / "big.qed"
    subprocess.run(["qemu-img", "create", "-f", "qed", "-o", "cluster_size=4096,table_size=16",
                    str(image), "64G"], check=True, capture_output=True, timeout=60)  # fmt: skip
    disk = open_disk(str(image), "qed", read_only=True)
    try:
        start = time.monotonic()
        offset = 0
        for _ in range(100):
            ext = disk.block_status(offset, disk.size - offset)
            assert ext.allocation.name == "UNALLOCATED"
            offset += ext.length
            if offset == disk.size:
                break
        assert offset == disk.size, f"100 block-status calls covered {offset} bytes"
        assert time.monotonic() - start < 5
    finally:
        disk.close()


def sparse_with_header(path: Path, header: bytes, size: int) -> None:
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)


def test_qcow_l1_table_in_a_sparse_file_is_capped(tmp_path: Path) -> None:
    """The L1 table was limited only by the file size, and a sparse file is any size: a
    64 TiB disk's 256 MiB L1 was read into memory whole."""
    import struct

    image = tmp_path / "sparse.qcow"
    l1 = 256 * MiB
    header = struct.pack(">4sIQIIQBBHIQ", b"QFI\xfb", 1, 0, 0, 0, (l1 // 8) << 21, 12, 9, 0, 0, 48)
    sparse_with_header(image, header, 48 + l1)
    open_fails(image, "qcow", "qcow L1 table of 268435456 bytes", Unsupported)


def test_qcow_block_status_over_empty_l2_tables_is_quick(tmp_path: Path) -> None:
    """Present but empty L2 tables (a mutant's L1 pointing into zeros) were walked one entry
    per step: 65536 entries per call, hundreds of calls for a 64 GiB disk."""
    import struct

    image = tmp_path / "empty-tables.qcow"
    size = 64 << 30
    entries = size >> 21  # cluster_bits 12, l2_bits 9: 2 MiB per L1 entry
    l2 = 4096 + entries * 8
    header = struct.pack(">4sIQIIQBBHIQ", b"QFI\xfb", 1, 0, 0, 0, size, 12, 9, 0, 0, 4096)
    with open(image, "wb") as f:
        f.write(header)
        f.seek(4096)
        f.write(struct.pack(f">{entries}Q", *([l2] * entries)))  # every entry: one zero table
        f.truncate(l2 + 4096)
    disk = open_disk(str(image), "qcow", read_only=True)
    try:
        start = time.monotonic()
        offset = 0
        for _ in range(20):
            ext = disk.block_status(offset, disk.size - offset)
            assert ext.allocation.name == "UNALLOCATED"
            offset += ext.length
            if offset == disk.size:
                break
        assert offset == disk.size, f"20 block-status calls covered {offset} bytes"
        assert time.monotonic() - start < 5
    finally:
        disk.close()


def test_qed_block_status_over_empty_l2_tables_is_quick(tmp_path: Path) -> None:
    """As qcow: every L1 entry pointing at one zero L2 table made each block-status call walk
    65536 entries one by one."""
    import struct

    from tests.formats.test_qed import header

    cs, table = 4096, 16
    size = 64 << 30
    span = (table * cs // 8) * cs  # 32 MiB per L1 entry
    l1, l2 = cs, cs + table * cs
    image = tmp_path / "empty-tables.qed"
    with open(image, "wb") as f:
        f.write(header(cluster_size=cs, table_size=table, l1=l1, image_size=size))
        f.seek(l1)
        f.write(struct.pack(f"<{size // span}Q", *([l2] * (size // span))))
        f.truncate(l2 + table * cs)
    disk = open_disk(str(image), "qed", read_only=True)
    try:
        start = time.monotonic()
        offset = 0
        for _ in range(20):
            ext = disk.block_status(offset, disk.size - offset)
            assert ext.allocation.name == "UNALLOCATED"
            offset += ext.length
            if offset == disk.size:
                break
        assert offset == disk.size, f"20 block-status calls covered {offset} bytes"
        assert time.monotonic() - start < 5
    finally:
        disk.close()


# -- writes through a FUSE mount to hostile-but-openable images --------------------------------

WRITE_BASES = ["qcow2-512-rc1", "vmdk-sparse", "vpc-small-blocks", "vhdx-dynamic"]
FUSE_WRITES = [(0, 4096), (65536 + 3, 70000), (2 * MiB + 100, 511)]


def driver_write_outcome(image: Path) -> str | None:
    """None when a writable open (probing, as the mount does) fails; else 'fails' when a write
    or the flush raises an ImgfsError, 'ok' when all of them work. Writes to ``image``."""
    try:
        disk = open_disk(str(image), None, containment=Containment(str(image.parent)))
    except ImgfsError:
        return None
    outcome = "ok"
    try:
        for off, n in FUSE_WRITES:
            if off + n <= disk.size:
                try:
                    disk.write(off, b"\xa5" * n)
                except ImgfsError:
                    outcome = "fails"
        try:
            disk.flush()
        except ImgfsError:
            outcome = "fails"
    finally:
        try:
            disk.close()
        except ImgfsError:
            outcome = "fails"
    return outcome


def pick_write_mutants(bases, work: Path) -> list[tuple[Path, str, str]]:
    """Two mutants whose writes fail in the driver and two whose writes work, from the first
    seeds that give them: (path of the unwritten mutant, export name, kind)."""
    by_name = {b.directory.name: b for g in bases.values() for b in g}
    chosen: list[tuple[Path, str, str]] = []
    want = {"fails": 2, "ok": 2}
    for seed in range(2000):
        if not any(want.values()):
            break
        base = by_name[WRITE_BASES[seed % len(WRITE_BASES)]]
        dest = work / f"w{seed}"
        make_mutant(base, seed, dest)
        trial = work / f"t{seed}" / base.image
        trial.parent.mkdir()
        shutil.copyfile(dest / base.image, trial)
        kind = driver_write_outcome(trial)
        if kind is not None and want[kind]:
            want[kind] -= 1
            chosen.append((dest / base.image, f"hostile-w{seed}.{base.fmt}", kind))
    assert not any(want.values()), f"no mutants of kinds {want}"
    return chosen


def test_fuse_writes_to_hostile_images(bases, images: Path, mount, tmp_path: Path) -> None:
    """Writes to hostile images that open give EIO or work (and then read back); the mount
    stays up and the valid images beside them take writes that qemu-img check finds clean."""
    from tests.oracle import assert_qemu_check_clean

    by_name = {b.directory.name: b for g in bases.values() for b in g}
    valid: dict[str, str] = {}
    for key in WRITE_BASES:
        base = by_name[key]
        name = f"{key}{Path(base.image).suffix}"
        shutil.copyfile(base.directory / base.image, images / name)
        valid[name] = base.fmt
    mutants = pick_write_mutants(bases, tmp_path / "mutants")
    for path, name, _kind in mutants:
        shutil.copyfile(path, images / name)

    m = mount(images)
    m.expected_log_errors += [name for _p, name, _k in mutants]
    eio = 0
    for _path, name, kind in mutants:
        try:
            fd = os.open(m.file(name), os.O_RDWR)
        except OSError as e:
            assert e.errno in (errno.EIO, errno.EACCES, errno.EROFS), (name, kind, e)
            continue
        try:
            size = os.fstat(fd).st_size
            for off, n in FUSE_WRITES:
                if off + n > size:
                    continue
                data = bytes([off % 251 + 1]) * n
                try:
                    assert os.pwrite(fd, data, off) == n, (name, off)
                except OSError as e:
                    assert e.errno == errno.EIO, (name, kind, off, e)
                    eio += 1
                    continue
                try:
                    assert os.pread(fd, n, off) == data, (name, kind, off)
                except OSError as e:
                    assert e.errno == errno.EIO, (name, kind, off, e)
            try:
                os.fsync(fd)
            except OSError as e:
                assert e.errno == errno.EIO, (name, kind, e)
                eio += 1
        finally:
            try:
                os.close(fd)
            except OSError as e:
                assert e.errno == errno.EIO, (name, kind, e)
    assert eio, "no write through the mount failed"
    # The mount is up and the valid images take writes.
    assert {f"{n}.raw" for n in valid} <= set(os.listdir(m.path))
    for name in valid:
        fd = os.open(m.file(name), os.O_RDWR)
        try:
            os.pwrite(fd, b"\x3c" * 70000, MiB + 5)
            os.fsync(fd)
            assert os.pread(fd, 70000, MiB + 5) == b"\x3c" * 70000, name
        finally:
            os.close(fd)
    m.umount()
    for name, fmt in valid.items():
        assert_qemu_check_clean(images / name, fmt)


# -- regressions in qcow2, vmdk, vpc and vhdx ------------------------------------------------


def copy_base(bases, name: str, dest: Path) -> Base:
    base = next(b for g in bases.values() for b in g if b.directory.name == name)
    shutil.copytree(base.directory, dest)
    return Base(dest, base.fmt, base.image, base.regions)


def test_vmdk_flat_extent_offset_past_any_file_is_corrupt(bases, tmp_path: Path) -> None:
    """A flat extent's sector offset of 2**64 reached os.pread, which raised OverflowError."""
    base = copy_base(bases, "vmdk-flat", tmp_path / "flat")
    patch(
        base.directory / "disk.vmdk",
        b'"disk-flat.vmdk" 0',
        b'"disk-flat.vmdk" 18446744073709551616',
    )
    open_fails(base.directory / "disk.vmdk", "vmdk", "starts at sector 18446744073709551616, past")


def test_vmdk_stream_grain_past_the_end_makes_it_read_only(bases, tmp_path: Path) -> None:
    """A GT entry far past the end of a streamOptimized file: new grains were appended after
    it, at a sector number a GT entry cannot hold (OverflowError)."""
    import struct

    from imgfs.errors import ReadOnly

    base = copy_base(bases, "vmdk-stream", tmp_path / "stream")
    image = base.directory / base.image
    data = bytearray(image.read_bytes())
    (gd_sector,) = struct.unpack_from("<Q", data, 56)
    (gt_sector,) = struct.unpack_from("<I", data, gd_sector * 512)
    struct.pack_into("<I", data, gt_sector * 512 + 4, 0xFFFFFF00)  # grain 1
    image.write_bytes(data)
    disk = open_disk(str(image), "vmdk", containment=Containment(str(base.directory)))
    try:
        assert disk.read(0, 65536) == hostile.compressible(65536)
        with pytest.raises(ReadOnly):
            disk.write(3 * MiB, b"x" * 512)
    finally:
        disk.close()
    assert image.stat().st_size == len(data)


def run_limited(code: str) -> str:
    """Run ``code`` in a Python with the worker's address-space limit; its stdout."""
    import subprocess
    import sys

    prelude = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({hostile.ADDRESS_SPACE_LIMIT},) * 2)\n"
    )
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def set_grain_sectors(image: Path, sectors: int) -> None:
    import struct

    data = bytearray(image.read_bytes())
    struct.pack_into("<Q", data, 20, sectors)  # grainSize in the KDMV header
    image.write_bytes(data)


def test_vmdk_compressed_grain_of_a_gibibyte_is_refused(bases, tmp_path: Path) -> None:
    """A 1 GiB compressed grain (a 1 MiB zlib bomb) was inflated into memory whole."""
    base = copy_base(bases, "vmdk-stream", tmp_path / "stream")
    set_grain_sectors(base.directory / base.image, 1 << 21)
    open_fails(base.directory / base.image, "vmdk", "compressed grains of 2097152 sectors",
               Unsupported)  # fmt: skip


def test_vmdk_write_into_a_gibibyte_grain_builds_it_in_pieces(tmp_path: Path) -> None:
    """Writing 512 bytes into an unallocated 1 GiB grain (qemu's largest) built the whole
    grain in one buffer: a MemoryError under the worker's limit. Now the grain is written in
    pieces, zero pieces left as holes, and the result reads right and checks clean."""
    import subprocess

    from tests.oracle import assert_qemu_check_clean, qemu_raw

    parent, child = tmp_path / "parent.vmdk", tmp_path / "child.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(parent), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 7 0 4M", str(parent)], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", "parent.vmdk", "-F", "vmdk",
                    str(child)], check=True, cwd=tmp_path)  # fmt: skip
    set_grain_sectors(child, 1 << 21)
    out = run_limited(
        "from imgfs.block.disk import open_disk\n"
        f"d = open_disk({str(child)!r}, 'vmdk')\n"
        "d.write(3 << 20, b'x' * 512); d.flush(); d.close(); print('wrote')\n"
    )
    assert out.strip() == "wrote"
    assert child.stat().st_blocks * 512 < 16 * MiB
    assert_qemu_check_clean(child, "vmdk")
    expected = bytearray(b"\x07" * 4 * MiB)
    expected[3 * MiB : 3 * MiB + 512] = b"x" * 512
    assert qemu_raw(child, tmp_path / "child.raw").read_bytes() == expected


def test_vhdx_bat_of_a_huge_disk_in_a_sparse_file_is_capped(tmp_path: Path) -> None:
    """A 64 TiB disk in 1 MiB blocks has a 512 MiB BAT; a sparse file holds its region for
    nothing, and the BAT was read into memory (four copies): MemoryError under 1 GiB."""
    import struct

    from imgfs.formats import vhdx
    from imgfs.formats.vhdx import VhdxDriver

    image = tmp_path / "huge.vhdx"
    VhdxDriver.create(str(image), 4 * MiB, {"block_size": "1M"})
    data = bytearray(image.read_bytes())
    table = vhdx.REGION_TABLE_OFFSETS[0]
    (count,) = struct.unpack_from("<I", data, table + 8)
    regions = {}
    for i in range(count):
        at = table + 16 + 32 * i
        regions[bytes(data[at : at + 16])] = at
    meta_offset, _ = struct.unpack_from("<QI", data, regions[vhdx.METADATA_GUID] + 16)
    (items,) = struct.unpack_from("<H", data, meta_offset + 10)
    for i in range(items):
        at = meta_offset + 32 + 32 * i
        if bytes(data[at : at + 16]) == vhdx.VIRTUAL_DISK_SIZE:
            (item,) = struct.unpack_from("<I", data, at + 16)
            struct.pack_into("<Q", data, meta_offset + item, 64 << 40)
    bat_at = -(-len(data) // MiB) * MiB
    struct.pack_into("<QI", data, regions[vhdx.BAT_GUID] + 16, bat_at, 520 * MiB)
    struct.pack_into("<I", data, table + 4, 0)
    crc = vhdx.crc32c(data[table : table + vhdx.REGION_TABLE_SIZE])
    struct.pack_into("<I", data, table + 4, crc)
    copy = vhdx.REGION_TABLE_OFFSETS[1]
    data[copy : copy + vhdx.REGION_TABLE_SIZE] = data[table : table + vhdx.REGION_TABLE_SIZE]
    sparse_with_header(image, bytes(data), bat_at + 520 * MiB)
    open_fails(image, "vhdx", r"a BAT of \d+ entries \(\d+ bytes\) is over", Unsupported)
    # create does not make what open would refuse.
    from imgfs.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="use bigger blocks"):
        VhdxDriver.create(str(tmp_path / "no.vhdx"), 64 << 40, {"block_size": "1M"})
    assert not (tmp_path / "no.vhdx").exists()


def test_vpc_bat_of_a_huge_disk_in_a_sparse_file_is_capped(tmp_path: Path) -> None:
    """Max Table Entries of 2**28 (a 1 TiB disk in 512-byte blocks) with the table in a sparse
    file: the 1 GiB table was read into memory and unpacked into a list (MemoryError)."""
    import struct

    from imgfs.errors import InvalidRequest
    from imgfs.formats.vpc import VpcDriver

    small = tmp_path / "small.vhd"
    VpcDriver.create(str(small), 4 * MiB, {"block_size": "512"})
    data = bytearray(small.read_bytes())
    footer = bytearray(data[-512:])
    del data[-512:]
    for buf in (data, footer):  # the copy at 0 and the footer: 1 TiB, CHS at its maximum
        struct.pack_into(">QQHBB", buf, 40, 1 << 40, 1 << 40, 65535, 16, 255)
        struct.pack_into(">I", buf, 64, 0)
        struct.pack_into(">I", buf, 64, ~sum(buf[:512]) & 0xFFFFFFFF)
    entries = 1 << 28
    struct.pack_into(">I", data, 512 + 28, entries)  # dynamic header: Max Table Entries
    (table,) = struct.unpack_from(">Q", data, 512 + 16)
    image = tmp_path / "huge.vhd"
    sparse_with_header(image, bytes(data), table + entries * 4)
    with open(image, "ab") as f:
        f.write(footer)
    open_fails(image, "vpc", "Max Table Entries 268435456 is over imgfs's limit", Unsupported)
    # create does not make what open would refuse.
    with pytest.raises(InvalidRequest, match="use bigger blocks"):
        VpcDriver.create(str(tmp_path / "no.vhd"), 1 << 40, {"block_size": "512"})
    assert not (tmp_path / "no.vhd").exists()


def qcow2_with_one_cluster(path: Path) -> bytearray:
    import subprocess

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                    str(path), "4M"], check=True)  # fmt: skip
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4096", str(path)], check=True,
                   capture_output=True)  # fmt: skip
    return bytearray(path.read_bytes())


@pytest.mark.parametrize("table", ["L2", "refcount"])
def test_qcow2_pointer_past_the_end_is_not_written_through(table: str, tmp_path: Path) -> None:
    """An L2 entry (written in place) or a refcount table entry (written at flush) pointing
    1 TiB past the end of a 100 KiB file: the write made it a 1 TiB sparse file."""
    import struct

    from imgfs.block.driver import RepairMode

    image = tmp_path / "disk.qcow2"
    data = qcow2_with_one_cluster(image)
    far = 1 << 40
    if table == "L2":
        (l1,) = struct.unpack_from(">Q", data, 40)
        (l2,) = struct.unpack_from(">Q", data, l1)
        struct.pack_into(">Q", data, l2 & 0x00FFFFFFFFFFFE00, far | 1 << 63)
    else:
        (reftable,) = struct.unpack_from(">Q", data, 48)
        struct.pack_into(">Q", data, reftable, far)
    image.write_bytes(data)
    disk = open_disk(str(image), "qcow2")
    try:
        with pytest.raises(CorruptImage, match=f"{far}|{far + 0}.*past the end"):
            disk.write(0, b"\x02" * 4096)
            disk.write(MiB, b"\x03" * 4096)  # a new cluster: its refcount goes up
            disk.flush()
        try:
            disk.check(RepairMode.ALL)
        except ImgfsError:
            pass
    finally:
        try:
            disk.close()
        except ImgfsError:
            pass
    assert image.stat().st_size < MiB


def test_vmdk_flat_extent_past_the_end_of_its_file_is_read_only(bases, tmp_path: Path) -> None:
    """A flat extent at sector 2**32 of a 4 MiB file: writes made it a 2 TiB sparse file."""
    from imgfs.errors import ReadOnly

    base = copy_base(bases, "vmdk-flat", tmp_path / "flat")
    patch(base.directory / "disk.vmdk", b'"disk-flat.vmdk" 0', b'"disk-flat.vmdk" 4294967296')
    disk = open_disk(str(base.directory / "disk.vmdk"), "vmdk",
                     containment=Containment(str(base.directory)))  # fmt: skip
    try:
        assert disk.read(0, 4096) == bytes(4096)
        with pytest.raises(ReadOnly):
            disk.write(0, b"x" * 4096)
        (info,) = disk.info()
        assert any("past the end of its file (4194304 bytes)" in n for n in info.notes), info
    finally:
        disk.close()
    assert (base.directory / "disk-flat.vmdk").stat().st_size == 4 * MiB


def test_qcow2_data_file_cluster_past_the_end_is_not_written(tmp_path: Path) -> None:
    """As above, for an L2 entry of an image with an external data file (not raw)."""
    import struct
    import subprocess

    image, data_file = tmp_path / "disk.qcow2", tmp_path / "disk.data"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "cluster_size=4096,data_file=disk.data", "disk.qcow2", "4M"],
                   check=True, cwd=tmp_path)  # fmt: skip
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4096", "disk.qcow2"],
                   check=True, capture_output=True, cwd=tmp_path)  # fmt: skip
    data = bytearray(image.read_bytes())
    (l1,) = struct.unpack_from(">Q", data, 40)
    (l2,) = struct.unpack_from(">Q", data, l1)
    struct.pack_into(">Q", data, l2 & 0x00FFFFFFFFFFFE00, 1 << 40 | 1 << 63)
    image.write_bytes(data)
    before = data_file.stat().st_size
    disk = open_disk(str(image), "qcow2", containment=Containment(str(tmp_path)))
    try:
        with pytest.raises(CorruptImage, match="past the end of the file"):
            disk.write(0, b"\x02" * 4096)
    finally:
        disk.close()
    assert data_file.stat().st_size == before


def test_qcow2_check_of_an_l1_pointing_everywhere_at_one_l2_table_is_quick(tmp_path: Path) -> None:
    """Every entry of an 8192-entry L1 table pointing at the same L2 table: check walked that
    table's 8192 entries once per L1 entry (a 5 s mutant; 2 MiB clusters made it hours)."""
    import struct
    import subprocess

    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", str(image)], check=True,
                   capture_output=True)  # fmt: skip
    data = bytearray(image.read_bytes())
    (l1,) = struct.unpack_from(">Q", data, 40)
    (first,) = struct.unpack_from(">Q", data, l1)
    struct.pack_into(">I", data, 36, 8192)  # l1_size: the whole L1 cluster
    struct.pack_into(">8192Q", data, l1, *([first] * 8192))
    image.write_bytes(data)
    disk = open_disk(str(image), "qcow2", read_only=True)
    try:
        start = time.monotonic()
        result = disk.check()
        assert time.monotonic() - start < 5
    finally:
        disk.close()
    assert result.corruptions > 0
    assert any("referenced twice by one L1 table" in m for m in result.messages), result.messages
