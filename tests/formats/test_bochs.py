"""bochs: growing redolog images from bximage and assembled from the layout, against qemu-img."""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from imgfs.block.chain import chain_block_status
from imgfs.block.disk import open_disk
from imgfs.block.extent import Allocation
from imgfs.block.hostfile import CacheMode
from imgfs.errors import CorruptImage, ImgfsError, ReadOnly, Unsupported
from tests.conftest import SHARED
from tests.oracle import assert_export_matches_qemu, qemu_info, qemu_raw, sha256_file

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512
CORPUS = SHARED / "corpus" / "bochs"


def bximage(*args: str) -> None:
    subprocess.run(["bximage", *args], check=True, capture_output=True, timeout=120)


def build_growing(
    path: Path,
    disk_size: int,
    sectors: dict[int, bytes],
    *,
    extent_size: int = 4096,
    bitmap_bytes: int | None = None,
    version: int = 2,
    catalog_len: int | None = None,
    subtype: bytes = b"Growing",
    seed: int = 0,
) -> None:
    """A growing redolog holding ``sectors`` (sector number -> 512 bytes), its extents stored
    in a shuffled order, assembled from the layout."""
    per_extent = extent_size // SECTOR
    bitmap_bytes = bitmap_bytes if bitmap_bytes is not None else max(1, -(-per_extent // 8))
    catalog_len = catalog_len if catalog_len is not None else -(-disk_size // extent_size)
    header = bytearray(512)
    struct.pack_into("<32s16s16sII", header, 0, b"Bochs Virtual HD Image", b"Redolog", subtype,
                     0x00020000 if version == 2 else 0x00010000, 512)  # fmt: skip
    if version == 2:
        struct.pack_into("<IIIIQ", header, 72, catalog_len, bitmap_bytes, extent_size, 0,
                         disk_size)  # fmt: skip
    else:
        struct.pack_into("<IIIQ", header, 72, catalog_len, bitmap_bytes, extent_size, disk_size)
    extents = sorted({s // per_extent for s in sectors})
    order = extents[:]
    random.Random(seed).shuffle(order)
    catalog = [0xFFFFFFFF] * catalog_len
    for slot, extent in enumerate(order):
        catalog[extent] = slot
    bitmap_span = -(-bitmap_bytes // SECTOR) * SECTOR
    slot_size = bitmap_span + extent_size
    body = bytearray(len(order) * slot_size)
    for sector, data in sectors.items():
        assert len(data) == SECTOR
        extent, within = divmod(sector, per_extent)
        base = catalog[extent] * slot_size
        body[base + within // 8] |= 1 << (within % 8)
        pos = base + bitmap_span + within * SECTOR
        body[pos : pos + SECTOR] = data
    path.write_bytes(bytes(header) + struct.pack(f"<{catalog_len}I", *catalog) + bytes(body))


def random_sectors(disk_size: int, count: int, seed: int) -> tuple[dict[int, bytes], bytes]:
    rng = random.Random(seed)
    sectors = {}
    expected = bytearray(disk_size)
    for _ in range(count):
        s = rng.randrange(disk_size // SECTOR)
        data = rng.randbytes(SECTOR)
        sectors[s] = data
        expected[s * SECTOR : (s + 1) * SECTOR] = data
    return sectors, bytes(expected)


def read_all(path: Path, fmt: str | None = "bochs") -> bytes:
    disk = open_disk(str(path), fmt, read_only=True)
    try:
        return bytes(disk.read(0, disk.size))
    finally:
        disk.close()


@pytest.mark.parametrize("size", ["10M", "1G", "100G"])
def test_bximage_empty_growing(tmp_path: Path, size: str) -> None:
    image = tmp_path / "empty.bochs"
    bximage("-func=create", f"-hd={size}", "-imgmode=growing", "-q", str(image))
    disk = open_disk(str(image), None, read_only=True)  # probed
    try:
        assert disk.top.format_name == "bochs"
        assert disk.size == qemu_info(image)["virtual-size"]
        ext = chain_block_status(disk.top, 0, disk.size)
        assert (ext.length, ext.allocation) == (disk.size, Allocation.UNALLOCATED)
        for off in (0, disk.size // 3 + 17, disk.size - 4096):
            assert bytes(disk.read(off, 4096)) == bytes(4096)
    finally:
        disk.close()
    if size == "10M":
        assert read_all(image) == qemu_raw(image, tmp_path / "q.raw").read_bytes()


def test_bximage_converted_flat_image(tmp_path: Path) -> None:
    flat = tmp_path / "flat.img"
    bximage("-func=create", "-hd=10M", "-imgmode=flat", "-q", str(flat))
    rng = random.Random(5)
    data = bytearray(flat.read_bytes())
    for _ in range(60):  # scattered runs, most extents left empty
        off = rng.randrange(0, len(data) - 70 * KiB)
        n = rng.randrange(1, 70 * KiB)
        data[off : off + n] = rng.randbytes(n)
    flat.write_bytes(data)
    image = tmp_path / "grown.bochs"
    bximage("-func=convert", "-imgmode=growing", "-q", str(flat), str(image))
    assert image.stat().st_size < len(data)  # really sparse
    exported = read_all(image)
    assert exported == bytes(data)
    assert exported == qemu_raw(image, tmp_path / "q.raw", "bochs").read_bytes()


@pytest.mark.parametrize(
    "version, extent_size, bitmap_bytes",
    [(2, 4096, None), (1, 4096, None), (2, 512, None), (2, 65536, 512), (1, 16384, 1000),
     (2, 8 * MiB, None)],
)  # fmt: skip
def test_assembled_images_match_qemu(
    tmp_path: Path, version: int, extent_size: int, bitmap_bytes: int | None
) -> None:
    disk_size = 3 * MiB + 7 * SECTOR
    sectors, expected = random_sectors(disk_size, 400, seed=extent_size + version)
    image = tmp_path / "disk.bochs"
    build_growing(image, disk_size, sectors, extent_size=extent_size, bitmap_bytes=bitmap_bytes,
                  version=version, catalog_len=-(-disk_size // extent_size) + 3)  # fmt: skip
    exported = read_all(image, None)
    assert exported == expected
    assert exported == qemu_raw(image, tmp_path / "q.raw").read_bytes()
    disk = open_disk(str(image), "bochs", read_only=True)
    try:
        rng = random.Random(2)
        for _ in range(200):
            off = rng.randrange(disk_size)
            n = rng.randrange(1, min(100 * KiB, disk_size - off) + 1)
            assert bytes(disk.read(off, n)) == expected[off : off + n]
        with pytest.raises(ReadOnly):
            disk.write(0, b"x")
        # block status: allocated sectors are data, the rest unallocated (reads zeros).
        pos = 0
        while pos < disk_size:
            ext = chain_block_status(disk.top, pos, disk_size - pos)
            assert ext.length > 0
            is_data = ext.allocation is Allocation.DATA
            for s in range(pos // SECTOR, (pos + ext.length) // SECTOR):
                assert (s in sectors) == is_data, (pos, ext)
            pos += ext.length
    finally:
        disk.close()


def make_undoable(directory: Path, seed: int) -> tuple[Path, bytes]:
    """A bximage flat base image with random data and an undoable redolog beside it, named the
    way Bochs names it (BASE.redolog). Returns the redolog and the disk it should show."""
    base = directory / "base.img"
    bximage("-func=create", "-hd=10M", "-imgmode=flat", "-q", str(base))
    rng = random.Random(seed)
    data = bytearray(base.read_bytes())
    data[: 2 * MiB] = rng.randbytes(2 * MiB)
    base.write_bytes(data)
    sectors, _ = random_sectors(len(data), 300, seed)
    redolog = directory / "base.img.redolog"
    build_growing(redolog, len(data), sectors, extent_size=16 * KiB, subtype=b"Undoable")
    for sector, piece in sectors.items():
        data[sector * SECTOR : (sector + 1) * SECTOR] = piece
    return redolog, bytes(data)


def test_undoable_redolog_reads_through_to_its_base(tmp_path: Path) -> None:
    redolog, expected = make_undoable(tmp_path, seed=21)
    disk = open_disk(str(redolog), None, read_only=True)
    try:
        assert disk.top.format_name == "bochs"
        assert disk.top.backing is not None and disk.top.backing.format_name == "raw"
        assert bytes(disk.read(0, disk.size)) == expected
        rng = random.Random(4)
        for _ in range(100):
            off = rng.randrange(len(expected))
            n = rng.randrange(1, min(50 * KiB, len(expected) - off) + 1)
            assert bytes(disk.read(off, n)) == expected[off : off + n]
    finally:
        disk.close()
    # Bochs' own tool is the oracle (qemu reads only Growing images): commit into a copy.
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "base.img", tmp_path / "copy" / "base.img")
    bximage("-func=commit", "-q", str(tmp_path / "copy" / "base.img"), str(redolog))
    assert (tmp_path / "copy" / "base.img").read_bytes() == expected


def test_undoable_redolog_not_named_after_its_base_is_unsupported(tmp_path: Path) -> None:
    redolog, _ = make_undoable(tmp_path, seed=1)
    redolog.rename(tmp_path / "journal.bin")
    with pytest.raises(Unsupported, match="redolog"):
        open_disk(str(tmp_path / "journal.bin"), "bochs", read_only=True)
    os.unlink(tmp_path / "base.img")
    shutil.copy(tmp_path / "journal.bin", tmp_path / "base.img.redolog")
    with pytest.raises(CorruptImage, match="not found"):
        open_disk(str(tmp_path / "base.img.redolog"), "bochs", read_only=True)


def test_reads_with_o_direct(tmp_path: Path) -> None:
    disk_size = 2 * MiB
    sectors, expected = random_sectors(disk_size, 300, seed=13)
    build_growing(tmp_path / "d.bochs", disk_size, sectors, extent_size=8192)
    disk = open_disk(str(tmp_path / "d.bochs"), cache=CacheMode.NONE)
    try:
        assert disk.read_only
        rng = random.Random(3)
        for _ in range(100):
            off = rng.randrange(disk_size)
            n = rng.randrange(1, min(64 * KiB, disk_size - off) + 1)
            assert bytes(disk.read(off, n)) == expected[off : off + n]
    finally:
        disk.close()


def test_disk_size_not_a_sector_multiple_is_floored_like_qemu(tmp_path: Path) -> None:
    image = tmp_path / "odd.bochs"
    build_growing(image, 1 * MiB + 100, {0: b"a" * SECTOR})
    exported = read_all(image)
    assert len(exported) == 1 * MiB == qemu_info(image)["virtual-size"]
    assert exported == qemu_raw(image, tmp_path / "q.raw").read_bytes()


def test_corpus_empty_bochs(tmp_path: Path) -> None:
    image = CORPUS / "qemu-iotests" / "empty.bochs"
    exported = tmp_path / "exported.raw"
    exported.write_bytes(read_all(image, None))
    assert_export_matches_qemu(image, exported, tmp_path)
    manifest = (SHARED / "corpus" / "MANIFEST.tsv").read_text().splitlines()
    row = next(r.split("\t") for r in manifest if r.startswith("bochs/qemu-iotests/"))
    assert sha256_file(exported) == row[6]


def test_fuse_export_is_right_and_read_only(images: Path, mount, tmp_path: Path) -> None:
    disk_size = 4 * MiB
    sectors, expected = random_sectors(disk_size, 800, seed=42)
    build_growing(images / "disk.bochs", disk_size, sectors, extent_size=32 * KiB)
    shutil.copy(CORPUS / "qemu-iotests" / "empty.bochs", images / "empty.bochs")
    bximage("-func=create", "-hd=10M", "-imgmode=growing", "-q", str(images / "bx.img"))
    _, undone = make_undoable(images, seed=5)
    m = mount(images)
    assert sorted(os.listdir(m.path)) == [
        "base.img.raw", "base.img.redolog.raw", "bx.img.raw", "disk.bochs.raw", "empty.bochs.raw"
    ]  # fmt: skip
    assert m.file("base.img.redolog").read_bytes() == undone
    assert os.stat(m.file("base.img.redolog")).st_mode & 0o222 == 0
    for name in ("disk.bochs", "empty.bochs", "bx.img"):
        assert_export_matches_qemu(images / name, m.file(name), tmp_path)
        assert os.stat(m.file(name)).st_mode & 0o222 == 0
    assert m.file("disk.bochs").read_bytes() == expected
    with pytest.raises(OSError) as e:
        os.open(m.file("disk.bochs"), os.O_RDWR)
    assert e.value.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
    m.umount()


# -- malformed images -----------------------------------------------------------------------


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "name, mutate, error",
    [
        ("truncated", lambda p: os.truncate(p, 300), CorruptImage),
        ("catalog-truncated", lambda p: os.truncate(p, 520), CorruptImage),
        ("version", lambda p: patch(p, 64, struct.pack("<I", 0x30000)), Unsupported),
        ("undoable", lambda p: patch(p, 48, b"Undoable\0"), Unsupported),
        ("volatile", lambda p: patch(p, 48, b"Volatile\0"), Unsupported),
        ("subtype", lambda p: patch(p, 48, b"Weird\0\0\0"), CorruptImage),
        ("header-size", lambda p: patch(p, 68, struct.pack("<I", 1 << 30)), CorruptImage),
        ("catalog-huge", lambda p: patch(p, 72, struct.pack("<I", 0xFFFFFFFF)), CorruptImage),
        ("catalog-small", lambda p: patch(p, 72, struct.pack("<I", 2)), CorruptImage),
        ("bitmap-0", lambda p: patch(p, 76, struct.pack("<I", 0)), CorruptImage),
        ("bitmap-huge", lambda p: patch(p, 76, struct.pack("<I", 0xFFFFFFFF)), CorruptImage),
        ("extent-0", lambda p: patch(p, 80, struct.pack("<I", 0)), CorruptImage),
        ("extent-1536", lambda p: patch(p, 80, struct.pack("<I", 1536)), CorruptImage),
        ("extent-huge", lambda p: patch(p, 80, struct.pack("<I", 1 << 31)), CorruptImage),
        ("disk-huge", lambda p: patch(p, 88, struct.pack("<Q", 1 << 62)), CorruptImage),
        ("entry-past-eof", lambda p: patch(p, 512, struct.pack("<I", 0x7FFFFFFF)), CorruptImage),
    ],
)
def test_malformed_headers(tmp_path: Path, name: str, mutate, error: type[ImgfsError]) -> None:
    image = tmp_path / "bad.bochs"
    build_growing(image, 64 * KiB, {0: b"a" * SECTOR, 20: b"b" * SECTOR})
    assert read_all(image)[:SECTOR] == b"a" * SECTOR
    mutate(image)
    with pytest.raises(error) as e:
        open_disk(str(image), "bochs", read_only=True)
    assert "\n" not in str(e.value)
