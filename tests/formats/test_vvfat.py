"""vvfat: a directory exported as a FAT32 disk, checked with mtools, fsck.vfat and (where the
kernel has vfat) a loop mount."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.errors import ReadOnly, Unsupported

MiB = 1024 * 1024
PARTITION_OFFSET = MiB
ENV = dict(os.environ, LC_ALL="C.UTF-8", MTOOLS_SKIP_CHECK="1")


def make_tree(root: Path) -> dict[str, bytes]:
    """Nested directories, long and non-ASCII names, empty files, a file spanning many
    clusters, and a directory with more entries than one cluster holds. Returns
    {relative path: content}."""
    rng = random.Random(42)
    files: dict[str, bytes] = {
        "README.TXT": b"an exact 8.3 name\n",
        "a long name with spaces.txt": b"spaces\n",
        "Ünïcödé — 名前.dat": "non-ASCII ✓\n".encode(),
        "empty": b"",
        "lower.txt": b"lower case 8.3\n",
        "two.dots.in.name.tar.gz": rng.randbytes(5000),
        "sub/deeper/deepest/big.bin": rng.randbytes(3 * MiB + 12345),
        "sub/deeper/empty-too": b"",
        "sub/" + "x" * 200 + ".long": b"a 204-character name\n",
    }
    for i in range(300):
        files[f"many/file number {i:04d}.text"] = f"file {i}\n".encode() * (i % 7)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "empty-dir").mkdir()
    os.utime(root / "README.TXT", (981173106, 981173106))  # 2001-02-03 04:05:06 UTC
    return files


def export(disk_dir: Path, out: Path) -> Path:
    """The whole exported disk into a sparse file."""
    disk = open_disk(str(disk_dir))
    try:
        with open(out, "wb") as f:
            for off in range(0, disk.size, 4 * MiB):
                data = bytes(disk.read(off, 4 * MiB))
                if data.count(0) == len(data):
                    f.seek(len(data), os.SEEK_CUR)
                else:
                    f.write(data)
            f.truncate(disk.size)
    finally:
        disk.close()
    return out


def partition(image: Path, out: Path) -> Path:
    """The FAT32 partition of the disk image, sparse, for fsck.vfat (which has no offset)."""
    with open(image, "rb") as src, open(out, "wb") as dst:
        src.seek(PARTITION_OFFSET)
        while chunk := src.read(4 * MiB):
            if chunk.count(0) == len(chunk):
                dst.seek(len(chunk), os.SEEK_CUR)
            else:
                dst.write(chunk)
        dst.truncate(os.path.getsize(image) - PARTITION_OFFSET)
    return out


def mtools_copy_all(image: Path, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(
        ["mcopy", "-s", "-n", "-m", "-i", f"{image}@@{PARTITION_OFFSET}", "::*", str(dest)],
        check=True, env=ENV, capture_output=True, timeout=120,
    )  # fmt: skip


def read_tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "files.vvfat"
    root.mkdir()
    return root, make_tree(root)


def test_mtools_reads_every_file_back(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, files = tree
    image = export(root, tmp_path / "disk.img")
    mtools_copy_all(image, tmp_path / "copy")
    assert read_tree(tmp_path / "copy") == files
    assert (tmp_path / "copy" / "empty-dir").is_dir()
    listing = subprocess.run(
        ["mdir", "-i", f"{image}@@{PARTITION_OFFSET}", "::/"],
        check=True, env=ENV, capture_output=True, text=True,
    ).stdout  # fmt: skip
    readme = next(line for line in listing.splitlines() if line.startswith("README   TXT"))
    expected_time = time.localtime(981173106)
    assert time.strftime("%Y-%m-%d", expected_time) in readme  # timestamps from mtime
    # the MBR: one partition of type 0x0c at 1 MiB covering the rest of the disk
    with open(image, "rb") as f:
        mbr = f.read(512)
    assert mbr[510:] == b"\x55\xaa" and mbr[446 + 4] == 0x0C
    assert int.from_bytes(mbr[446 + 8 : 446 + 12], "little") == 2048
    total = int.from_bytes(mbr[446 + 12 : 446 + 16], "little")
    assert (2048 + total) * 512 == os.path.getsize(image)


def test_convert_skips_free_clusters(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, files = tree
    out = tmp_path / "copy.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(export(root, tmp_path / "d.img")),
         str(tmp_path / "expected.qcow2")], check=True, timeout=120,
    )  # fmt: skip
    from imgfs.convert import convert

    convert(str(root), str(out), src_fmt="vvfat", dst_fmt="qcow2", options={})
    result = subprocess.run(
        ["qemu-img", "compare", str(tmp_path / "expected.qcow2"), str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # the 250 MiB of free clusters were not written: the copy holds about the data
    assert out.stat().st_size < sum(len(d) for d in files.values()) + 8 * MiB


def test_fsck_vfat_finds_nothing(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, _ = tree
    part = partition(export(root, tmp_path / "disk.img"), tmp_path / "part.img")
    result = subprocess.run(
        ["fsck.vfat", "-n", "-v", str(part)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 FATs, 32 bit entries" in result.stdout, result.stdout
    assert "Auto-" not in result.stdout and "Free cluster summary" not in result.stdout


def test_through_a_mount_and_read_only(
    tree: tuple[Path, dict[str, bytes]], images: Path, tmp_path: Path, mount
) -> None:
    root, files = tree
    os.rename(root, images / "files.vvfat")
    m = mount(images)
    exported = m.file("files.vvfat")
    assert exported.stat().st_mode & 0o222 == 0
    mtools_copy_all(exported, tmp_path / "copy")
    assert read_tree(tmp_path / "copy") == files
    with pytest.raises(OSError):
        open(exported, "r+b").close()


def test_mount_vvfat_option(
    tree: tuple[Path, dict[str, bytes]], images: Path, tmp_path: Path, mount
) -> None:
    root, files = tree  # outside IMAGES_DIR: named on the command line, so allowed
    m = mount(images, "--vvfat", f"share={root}")
    assert os.listdir(m.path) == ["share.raw"]
    mtools_copy_all(m.file("share"), tmp_path / "copy")
    assert read_tree(tmp_path / "copy") == files


@pytest.mark.skipif(
    "vfat" not in Path("/proc/filesystems").read_text() or os.geteuid() != 0,
    reason="this kernel has no vfat file system (or not root): loop mount impossible",
)
def test_loop_mount(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, files = tree
    image = export(root, tmp_path / "disk.img")
    point = tmp_path / "loop"
    point.mkdir()
    subprocess.run(
        ["mount", "-t", "vfat", "-o", f"loop,ro,offset={PARTITION_OFFSET},utf8", str(image),
         str(point)],
        check=True, timeout=60,
    )  # fmt: skip
    try:
        assert read_tree(point) == files
    finally:
        subprocess.run(["umount", str(point)], check=True, timeout=60)


def test_snapshot_at_open_and_read_only(tmp_path: Path) -> None:
    root = tmp_path / "snap.vvfat"
    root.mkdir()
    (root / "a.txt").write_bytes(b"first version")
    disk = open_disk(str(root))
    try:
        with pytest.raises(ReadOnly):
            disk.write(0, b"x")
        (root / "added-later.txt").write_bytes(b"not in the snapshot")
        (root / "a.txt").write_bytes(b"FIRST VERSION, and longer")  # same inode, new bytes
        image = tmp_path / "disk.img"
        with open(image, "wb") as f:
            for off in range(0, disk.size, 4 * MiB):
                f.write(bytes(disk.read(off, 4 * MiB)))
    finally:
        disk.close()
    mtools_copy_all(image, tmp_path / "copy")
    # the tree (names, sizes) is the one scanned at open; bytes are read when asked
    assert read_tree(tmp_path / "copy") == {"a.txt": b"FIRST VERSION"}


def test_symlinks_and_unrepresentable_names_are_left_out(tmp_path: Path) -> None:
    root = tmp_path / "links.vvfat"
    root.mkdir()
    (root / "kept.txt").write_bytes(b"kept")
    (root / "link").symlink_to("/etc/passwd")
    (root / "what?.txt").write_bytes(b"? is not allowed in FAT names")
    image = export(root, tmp_path / "disk.img")
    mtools_copy_all(image, tmp_path / "copy")
    assert read_tree(tmp_path / "copy") == {"kept.txt": b"kept"}


def test_file_of_4_gib_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "big.vvfat"
    root.mkdir()
    with open(root / "huge.bin", "wb") as f:
        f.truncate(4 * 1024**3)
    with pytest.raises(Unsupported, match="FAT32 cannot hold a file of 4 GiB"):
        open_disk(str(root))


def test_tree_too_large_for_fat32_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "huge.vvfat"
    root.mkdir()
    for i in range(2200):  # 2200 sparse files of 4 GiB - 1: 8.6 TiB, more than FAT32 holds
        with open(root / f"f{i}", "wb") as f:
            f.truncate(4 * 1024**3 - 1)
    with pytest.raises(Unsupported, match="FAT32 holds at most"):
        open_disk(str(root))


def test_directory_with_too_many_entries_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "wide.vvfat"
    (root / "d").mkdir(parents=True)
    for i in range(22000):  # each needs a long name entry: over 65,536 entries
        (root / "d" / f"long name {i:05d}").touch()
    with pytest.raises(Unsupported, match="a FAT directory holds at most 65536"):
        open_disk(str(root))


def test_plain_directory_is_not_a_disk(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(Exception, match="(?i)is a directory"):
        open_disk(str(plain))
    disk = open_disk(str(plain), "vvfat")  # unless the format is named
    disk.close()
