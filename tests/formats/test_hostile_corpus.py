"""Hostile input from outside: every image of the shared corpus (its malformed/ directory
included), the inputs the fuzz campaign ever crashed a driver with (tests/formats/regressions/),
and a mounted directory of hostile images beside good ones.

Each malformed image gives one line of error (CorruptImage/Unsupported/...) and no traceback;
the regression inputs go through the hostile harness's full exercise (reads, block status,
info, check, and writes for writable formats) with only ImgfsError allowed out.
"""

from __future__ import annotations

import csv
import gzip
import os
import shutil
from pathlib import Path

import pytest

from imgfs.block.chain import Containment
from imgfs.block.disk import open_disk
from imgfs.block.extent import Allocation
from imgfs.errors import CorruptImage, ImgfsError
from tests.conftest import SHARED
from tests.formats import hostile
from tests.formats.fuzz_campaign import CORPUS_FORMATS, copy_decompressed, unpacked_name
from tests.oracle import pattern_image

MiB = 1024 * 1024
CORPUS = SHARED / "corpus"
REGRESSIONS = Path(__file__).parent / "regressions"


def all_rows() -> list[dict[str, str]]:
    with open(CORPUS / "MANIFEST.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def manifest_rows() -> list[dict[str, str]]:
    return [r for r in all_rows() if r["format"] in CORPUS_FORMATS]


def malformed_rows() -> list[dict[str, str]]:
    return [r for r in manifest_rows() if r["path"].startswith("malformed/")]


def unpack(row: dict[str, str], dest: Path) -> Path:
    path = dest / unpacked_name(row["path"], row["stored_compression"])
    copy_decompressed(CORPUS / row["path"], row["stored_compression"], path)
    return path


@pytest.mark.parametrize("row", malformed_rows(), ids=lambda r: Path(r["path"]).name)
def test_malformed_corpus_images_give_one_line_of_error(row, tmp_path: Path) -> None:
    image = unpack(row, tmp_path)
    for fmt in (CORPUS_FORMATS[row["format"]], None):  # named, and probed
        for read_only in (True, False):
            with pytest.raises(ImgfsError) as info:
                open_disk(str(image), fmt, read_only=read_only,
                          containment=Containment(str(tmp_path)))  # fmt: skip
            message = str(info.value)
            assert message and "\n" not in message, message
            assert image.name in message, message


def test_every_malformed_corpus_image_is_tested() -> None:
    """The malformed/ directory is all in MANIFEST.tsv, so nothing there escapes the test."""
    on_disk = {str(p.relative_to(CORPUS)) for p in (CORPUS / "malformed").rglob("*") if p.is_file()}
    listed = {r["path"] for r in malformed_rows()}
    assert on_disk and on_disk <= listed, on_disk - listed


@pytest.mark.parametrize(
    "row",
    [r for r in manifest_rows() if not r["path"].startswith("malformed/")],
    ids=lambda r: r["path"],
)
def test_corpus_images_open_or_fail_in_one_line(row, tmp_path: Path) -> None:
    """Every other corpus image, alone in a directory (so companions it names are missing or
    present as the corpus has them): it opens and reads, or says in one line why not."""
    source_dir = (CORPUS / row["path"]).parent
    rows = [r for r in manifest_rows() if (CORPUS / r["path"]).parent == source_dir]
    if len(Path(row["path"]).parts) >= 4:  # a directory of its own: bring the siblings
        for sibling in rows:
            if sibling is not row:
                unpack(sibling, tmp_path)
    # Companions (extents, data files) that MANIFEST lists under another format.
    for sibling in all_rows():
        if (CORPUS / sibling["path"]).parent == source_dir and sibling["format"] in (
            "vmdk-extent", "raw"):  # fmt: skip
            unpack(sibling, tmp_path)
    image = unpack(row, tmp_path)
    try:
        disk = open_disk(str(image), CORPUS_FORMATS[row["format"]], read_only=True,
                         containment=Containment(str(tmp_path)))  # fmt: skip
    except ImgfsError as e:
        assert "\n" not in str(e), str(e)
        return
    try:
        for off in range(0, min(disk.size, 4 * MiB), MiB):
            disk.read(off, min(MiB, disk.size - off))
        disk.info()
    finally:
        disk.close()


# -- regressions: inputs that once crashed a driver ------------------------------------------------


def regression_inputs() -> list[Path]:
    return sorted(p for p in REGRESSIONS.glob("*") if p.is_file() and not p.name.endswith(".md"))


def regression_format(path: Path) -> str:
    """regressions/FMT--what.ext[.gz]: the format is the part before the double dash."""
    return path.name.split("--", 1)[0]


def test_regression_inputs_exist() -> None:
    assert regression_inputs(), "tests/formats/regressions/ is empty"
    for path in regression_inputs():
        assert "--" in path.name, f"{path.name}: name it FMT--what.ext[.gz]"


@pytest.mark.parametrize("path", regression_inputs(), ids=lambda p: p.name)
def test_regression_inputs_give_clear_errors(path: Path, tmp_path: Path) -> None:
    fmt = regression_format(path)
    name = path.name.split("--", 1)[1].removesuffix(".gz")
    (tmp_path / "base").mkdir()
    image = tmp_path / "base" / name
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as f, open(image, "wb") as out:
            shutil.copyfileobj(f, out)
    else:
        shutil.copyfile(path, image)
    base = hostile.Base(tmp_path / "base", fmt, name, {name: [(0, image.stat().st_size)]})
    base.save()
    # The worker's job runs an unmutated copy when the seed is negative.
    outcome = hostile.run_mutants([base], [-1], hostile.scratch_dir(tmp_path))
    assert not outcome.failures, "\n".join(outcome.failures)
    assert len(outcome.results) == 1


# -- a mounted directory of hostile images beside good ones ---------------------------------------


def test_mount_of_malformed_and_good_images(images: Path, mount) -> None:
    for row in malformed_rows():
        unpack(row, images)
    for path in regression_inputs():
        name = path.name.split("--", 1)[1].removesuffix(".gz")
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f, open(images / name, "wb") as out:
            shutil.copyfileobj(f, out)
    pattern_image(images / "good.img", MiB)
    good = images / "good.img"
    m = mount(images)
    m.expected_log_errors.append("not exported")
    exported = os.listdir(m.path)
    assert "good.img.raw" in exported
    with open(m.file("good.img"), "r+b") as f:
        f.write(b"still works")
        f.seek(0)
        assert f.read(11) == b"still works"
    for row in malformed_rows():
        name = unpacked_name(row["path"], row["stored_compression"])
        assert name + ".raw" not in exported, name
        lines = [line for line in m.log_text().splitlines() if f" {name}: " in line]
        assert len(lines) == 1 and "not exported" in lines[0], lines
    m.umount()
    assert good.read_bytes()[:11] == b"still works"


# -- regressions as code ------------------------------------------------------------------------


def test_block_status_run_stops_before_a_bad_table_entry(tmp_path: Path) -> None:
    """A bad BAT entry far into an unallocated run ends the run instead of failing the whole
    call: a walk that steps past errors (SEEK_DATA, a map) no longer rescans the same entries
    on every call (the fuzz campaign's parallels seeds 3000077/3000106/3000128 took 5-14 s)."""
    import subprocess

    image = tmp_path / "disk.parallels"
    # 4 KiB clusters: the BAT fills 64 KiB, so BAT entry values below 17 point into it.
    subprocess.run(["qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=4k",
                    str(image), "64M"], check=True)  # fmt: skip
    subprocess.run(["qemu-io", "-f", "parallels", "-c", "write -P 7 0 4k", str(image)],
                   check=True, capture_output=True)  # fmt: skip
    data = bytearray(image.read_bytes())
    data[64 + 4 * 2560 : 64 + 4 * 2561] = (1).to_bytes(4, "little")  # block 2560 (10 MiB)
    image.write_bytes(data)
    disk = open_disk(str(image), "parallels", read_only=True)
    try:
        ext = disk.block_status(MiB, disk.size - MiB)
        assert (ext.offset, ext.length) == (MiB, 9 * MiB), ext
        with pytest.raises(CorruptImage, match="entry 1 points before the data area"):
            disk.block_status(10 * MiB, MiB)
        ext = disk.block_status(10 * MiB + 4096, MiB)  # and after it, the walk goes on
        assert (ext.offset, ext.length) == (10 * MiB + 4096, MiB), ext
    finally:
        disk.close()


def test_qcow2_block_status_run_stops_before_a_bad_l2_entry(tmp_path: Path) -> None:
    """As for block tables: the run ends before a bad L2 entry, and costs about its own length
    (the fuzz campaign's qcow2 seed 3000147 took 11-20 s to walk)."""
    import struct
    import subprocess

    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", str(image)],
                   check=True, capture_output=True)  # fmt: skip
    data = bytearray(image.read_bytes())
    (l1_offset,) = struct.unpack_from(">Q", data, 40)
    (l2_offset,) = struct.unpack_from(">Q", data, l1_offset)
    l2_offset &= (1 << 56) - 512
    struct.pack_into(">Q", data, l2_offset + 8 * 100, (1 << 63) | 0x10200)  # unaligned
    image.write_bytes(data)
    disk = open_disk(str(image), "qcow2", read_only=True)
    try:
        cluster = 65536
        # Unallocated runs from cluster 1 end at or before the bad entry (at 100), in a few
        # calls; the call that starts there reports it.
        pos, calls = cluster, 0
        while pos < 100 * cluster:
            ext = disk.block_status(pos, disk.size - pos)
            assert ext.allocation is Allocation.UNALLOCATED and ext.offset == pos, ext
            pos += ext.length
            calls += 1
        assert pos == 100 * cluster and calls <= 8, (pos, calls)
        with pytest.raises(CorruptImage, match="unaligned"):
            disk.block_status(100 * cluster, cluster)
    finally:
        disk.close()


def test_qcow2_check_does_not_walk_l2_tables_outside_the_file_or_unaligned(tmp_path: Path) -> None:
    """A corrupt L1 naming thousands of distinct L2 tables past the end of the file or at
    unaligned offsets: each is reported, none is walked (the fuzz campaign's seed 6000179
    made check take 30 s walking tables of zeros)."""
    import struct
    import subprocess
    import time

    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1T"], check=True)
    data = bytearray(image.read_bytes())
    (l1_size,) = struct.unpack_from(">I", data, 36)
    (l1_offset,) = struct.unpack_from(">Q", data, 40)
    assert l1_size == 2048
    for i in range(l1_size):
        target = (1 << 30) + i * 65536 if i % 2 else 0x30000 + 512 * (i % 64 + 1)
        struct.pack_into(">Q", data, l1_offset + 8 * i, target)
    image.write_bytes(data)
    disk = open_disk(str(image), "qcow2", read_only=True)
    try:
        start = time.monotonic()
        result = disk.check()
        elapsed = time.monotonic() - start
    finally:
        disk.close()
    past = [m for m in result.messages if "past the end of the file; not walked" in m]
    unaligned = [m for m in result.messages if "not cluster aligned; not walked" in m]
    assert len(past) == 1024 and len(unaligned) == 1024, result.messages[:5]
    assert result.corruptions >= 2048
    assert elapsed < 5, elapsed  # walking them took ~15 s
