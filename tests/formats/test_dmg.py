"""dmg (UDIF): corpus images against qemu-img, dmg2img and the MANIFEST hashes; hand-assembled
images for every chunk codec, both blkx-table carriers, and malformed variants."""

from __future__ import annotations

import bz2
import errno
import hashlib
import lzma
import os
import plistlib
import shutil
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import lzfse
import pytest

from imgfs.block.disk import open_disk
from imgfs.block.driver import RepairMode
from imgfs.block.extent import Allocation
from imgfs.errors import CorruptImage, InvalidRequest, ReadOnly, Unsupported
from imgfs.formats import dmg as dmgmod
from imgfs.formats._chunkcache import ChunkCache
from tests.conftest import SHARED
from tests.oracle import assert_export_matches_qemu, sha256_file

CORPUS = SHARED / "corpus"
SAME_DISK_SHA = "0786ad1fdcba31a3f03ee80eb1d6e8c7ee2f4647a2b4b6f1855c9fe0719784de"
SECTOR = 512


def manifest() -> dict[str, tuple[str, str]]:
    """corpus path -> (qemu reads it: 'yes'/'no', raw sha256 or '-')."""
    rows = {}
    for line in (CORPUS / "MANIFEST.tsv").read_text().splitlines():
        cols = line.split("\t")
        if len(cols) > 6 and cols[1] == "dmg":
            rows[cols[0]] = (cols[5], cols[6])
    return rows


MANIFEST = manifest()


def export_bytes(path: Path, fmt: str | None = "dmg", **kw) -> bytes:
    disk = open_disk(str(path), fmt, read_only=True, **kw)
    try:
        out = bytearray()
        while len(out) < disk.size:
            out += disk.read(len(out), 1 << 20)
        return bytes(out)
    finally:
        disk.close()


def corpus_image(rel: str, tmp_path: Path) -> Path:
    src = CORPUS / rel
    if rel.endswith(".xz"):
        out = tmp_path / Path(rel).name[: -len(".xz")]
        out.write_bytes(lzma.decompress(src.read_bytes()))
        return out
    return src


# -- the corpus ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", sorted(MANIFEST))
def test_corpus_exports_the_manifest_disk(rel: str, tmp_path: Path) -> None:
    image = corpus_image(rel, tmp_path)
    qemu_reads, sha = MANIFEST[rel]
    if sha == "-":
        assert "compression-" in rel
        sha = SAME_DISK_SHA  # the five node-udif compression variants hold one disk
    data = export_bytes(image)
    assert hashlib.sha256(data).hexdigest() == sha
    disk = open_disk(str(image), "dmg", read_only=True)
    try:
        result = disk.check()  # every CRC32 the image carries matches
        assert result.exit_status == 0, result.messages
    finally:
        disk.close()
    if qemu_reads == "yes":
        out = tmp_path / "export.raw"
        out.write_bytes(data)
        assert_export_matches_qemu(image, out, tmp_path, "dmg")


@pytest.mark.parametrize("codec", ["adc", "bz2", "zlib", "raw"])
def test_node_udif_variants_match_dmg2img(codec: str, tmp_path: Path) -> None:
    # dmg2img decodes raw, zlib, bzip2 and ADC correctly (not lzfse: see PITFALLS.md).
    image = CORPUS / "dmg/node-udif" / f"compression-{codec}.dmg"
    out = tmp_path / "dmg2img.img"
    subprocess.run(
        ["dmg2img", "-s", "-i", str(image), "-o", str(out)], check=True, capture_output=True
    )
    assert export_bytes(image) == out.read_bytes()


def test_hand_made_adc_and_bzip2_chunks_match_dmg2img(tmp_path: Path) -> None:
    # An independent ADC decoder checks our reading of the format (2- and 3-byte matches,
    # overlapping copies, literal runs).
    image = tmp_path / "adc.dmg"
    datas = [sample(64, 5), bytes(300 * SECTOR), sample(2048, 6)]
    chunks = [Chunk(dmgmod.CT_ADC, len(d) // SECTOR, adc_encode(d), d) for d in datas]
    chunks.append(Chunk(dmgmod.CT_BZIP2, 100, bz2.compress(sample(100, 7)), sample(100, 7)))
    total = sum(c.sectors for c in chunks)
    build_udif(image, [Table(0, total, chunks)], total)
    out = tmp_path / "dmg2img.img"
    subprocess.run(
        ["dmg2img", "-s", "-i", str(image), "-o", str(out)], check=True, capture_output=True
    )
    exported = export_bytes(image)
    assert exported == b"".join(datas) + sample(100, 7)
    assert exported == out.read_bytes()


def test_corpus_info_and_block_status() -> None:
    disk = open_disk(str(CORPUS / "dmg/qemu-iotests/simple-dmg.dmg"), read_only=True)
    try:
        assert type(disk.top).__name__ == "DmgDriver"  # probed from the koly trailer
        info = disk.info()[0]
        spec = info.format_specific
        assert spec["chunks"] == {"ignore": 4, "zero": 2, "zlib": 8}
        assert [p["first-sector"] for p in spec["partitions"]] == [
            0,
            1,
            2,
            34,
            40,
            3480,
            3481,
            3513,
        ]
        assert spec["blkx-source"] == "xml"
        assert any("read-only" in n for n in info.notes)
        assert disk.read_only
        # Sector 0 (protective MBR) is zlib data; the zero and ignore chunks read as zeros.
        assert disk.block_status(0, SECTOR).allocation is Allocation.DATA
        zero_runs = [r for r in disk.top._runs if r.kind in (dmgmod.CT_ZERO, dmgmod.CT_IGNORE)]
        for run in zero_runs:
            ext = disk.block_status(run.start * SECTOR, run.sectors * SECTOR)
            assert ext.allocation is Allocation.ZERO
            assert disk.read(run.start * SECTOR, run.sectors * SECTOR) == bytes(
                run.sectors * SECTOR
            )
    finally:
        disk.close()


# -- hand-assembled UDIF images --------------------------------------------------------------------


@dataclass
class Chunk:
    kind: int
    sectors: int
    payload: bytes = b""  # stored bytes (compressed or raw)
    plain: bytes | None = None  # the decoded bytes, for the table's checksum


def table_crc(chunks: list[Chunk]) -> int | None:
    """A blkx table's CRC32: over its chunks' decoded data, ignore chunks left out; None when
    a compressed chunk's decoded bytes are not known."""
    crc = 0
    for c in chunks:
        if c.kind == dmgmod.CT_IGNORE:
            continue
        if c.kind == dmgmod.CT_ZERO:
            crc = dmgmod.crc32_zeros(crc, c.sectors * SECTOR)  # checked against zlib below
            continue
        if c.kind == dmgmod.CT_RAW:
            plain: bytes | None = c.payload
        else:
            plain = c.plain
        if plain is None:
            return None
        crc = zlib.crc32(plain, crc)
    return crc


@dataclass
class Table:
    first: int
    sectors: int
    chunks: list[Chunk]
    name: str = "part"
    extra_entries: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)


def mish(table: Table, data_fork: bytearray) -> bytes:
    """A mish table whose chunks' payloads are appended to ``data_fork``."""
    entries = []
    sector = 0
    for c in table.chunks:
        entries.append((c.kind, 0, sector, c.sectors, len(data_fork), len(c.payload)))
        data_fork += c.payload
        sector += c.sectors
    entries.append((dmgmod.CT_COMMENT, 0, sector, 0, len(data_fork), 0))
    entries += table.extra_entries
    entries.append((dmgmod.CT_TERMINATOR, 0, sector, 0, len(data_fork), 0))
    crc = table_crc(table.chunks)
    checksum = (0, 0, b"") if crc is None else (2, 32, struct.pack(">I", crc))
    head = dmgmod.MISH.pack(
        b"mish", 1, table.first, table.sectors, 0, 0, 0, b"", *checksum, len(entries)
    )
    return head + b"".join(dmgmod.CHUNK.pack(*e) for e in entries)


def koly(
    disk_sectors: int,
    data_len: int,
    xml: tuple[int, int] = (0, 0),
    rsrc: tuple[int, int] = (0, 0),
    segments: tuple[int, int] = (1, 1),
    data_crc: int | None = None,
    master_crc: int | None = None,
) -> bytes:
    def checksum(crc: int | None) -> tuple[int, int, bytes]:
        return (0, 0, b"") if crc is None else (2, 32, struct.pack(">I", crc))

    return dmgmod.KOLY.pack(
        b"koly", 4, 512, 1, 0, 0, data_len, rsrc[0], rsrc[1], segments[0], segments[1],
        b"\x11" * 16, *checksum(data_crc), xml[0], xml[1], b"", *checksum(master_crc), 1,
        disk_sectors, b"",
    )  # fmt: skip


def resource_fork(resources: list[tuple[bytes, int, bytes]]) -> bytes:
    """A classic resource fork holding (type, id, data) resources, with names for blkx."""
    by_type: dict[bytes, list[tuple[int, bytes]]] = {}
    for rtype, ident, data in resources:
        by_type.setdefault(rtype, []).append((ident, data))
    data_area = bytearray()
    type_list = bytearray(struct.pack(">H", len(by_type) - 1))
    ref_lists = bytearray()
    names = bytearray()
    refs_base = 2 + 8 * len(by_type)
    for rtype, items in by_type.items():
        type_list += struct.pack(">4sHH", rtype, len(items) - 1, refs_base + len(ref_lists))
        for ident, data in items:
            name = f"res {ident}".encode()
            name_off = len(names)
            names += bytes([len(name)]) + name
            off3 = len(data_area).to_bytes(3, "big")
            ref_lists += struct.pack(">hhB3sI", ident, name_off, 0, off3, 0)
            data_area += struct.pack(">I", len(data)) + data
    types_off = 28
    names_off = types_off + len(type_list) + len(ref_lists)
    rmap = bytes(16) + struct.pack(">IHHHH", 0, 0, 0, types_off, names_off)
    rmap += type_list + ref_lists + names
    data_off = 256
    header = struct.pack(">IIII", data_off, data_off + len(data_area), len(data_area), len(rmap))
    return header.ljust(data_off, b"\0") + data_area + rmap


def build_udif(
    path: Path,
    tables: list[Table],
    disk_sectors: int,
    *,
    carrier: str = "xml",
    segments: tuple[int, int] = (1, 1),
) -> None:
    data_fork = bytearray()
    mishes = [mish(t, data_fork) for t in tables]
    crcs = [table_crc(t.chunks) for t in tables]
    sums = {"data_crc": zlib.crc32(data_fork)}
    if None not in crcs:
        sums["master_crc"] = zlib.crc32(b"".join(struct.pack(">I", c) for c in crcs))
    out = bytearray(data_fork)
    if carrier == "xml":
        blkx = [
            {"Attributes": "0x0050", "CFName": t.name, "Data": m, "ID": str(i - 1), "Name": t.name}
            for i, (t, m) in enumerate(zip(tables, mishes, strict=True))
        ]
        plist = plistlib.dumps({"resource-fork": {"blkx": blkx, "plst": []}})
        trailer = koly(
            disk_sectors, len(data_fork), xml=(len(out), len(plist)), segments=segments, **sums
        )
        out += plist
    else:
        resources = [(b"plst", 0, b"ignored")] + [(b"blkx", i, m) for i, m in enumerate(mishes)]
        fork = resource_fork(resources)
        trailer = koly(
            disk_sectors, len(data_fork), rsrc=(len(out), len(fork)), segments=segments, **sums
        )
        out += fork
    path.write_bytes(bytes(out + trailer))


def adc_encode(data: bytes) -> bytes:
    """A small ADC encoder for tests: byte runs as overlapping 3-byte matches (distance 1),
    repeats of the previous 8 bytes as 2-byte matches, everything else as literals."""
    out = bytearray()
    literal = bytearray()

    def flush() -> None:
        for i in range(0, len(literal), 128):
            piece = literal[i : i + 128]
            out.append(0x80 | (len(piece) - 1))
            out.extend(piece)
        literal.clear()

    i = 0
    while i < len(data):
        if i >= 1:
            run = 0
            while i + run < len(data) and data[i + run] == data[i - 1] and run < 67:
                run += 1
            if run >= 4:
                flush()
                out += bytes([0x40 | (run - 4), 0, 0])  # distance 1
                i += run
                continue
        if i >= 8:
            n = 0
            while i + n < len(data) and data[i + n] == data[i + n - 8] and n < 18:
                n += 1
            if n >= 3:
                flush()
                distance = 8 - 1
                out += bytes([((n - 3) << 2) | (distance >> 8), distance & 0xFF])
                i += n
                continue
        literal.append(data[i])
        i += 1
    flush()
    return bytes(out)


def sample(sectors: int, seed: int) -> bytes:
    """Compressible but not trivial data: text lines, byte runs and repeats."""
    parts = bytearray()
    n = 0
    while len(parts) < sectors * SECTOR:
        parts += f"seed {seed} line {n} ".encode() + bytes([n % 251]) * (n % 13) + b"abcdefgh" * 2
        n += 1
    return bytes(parts[: sectors * SECTOR])


CODECS = {
    dmgmod.CT_ADC: adc_encode,
    dmgmod.CT_ZLIB: zlib.compress,
    dmgmod.CT_BZIP2: bz2.compress,
    dmgmod.CT_LZFSE: lzfse.compress,
    dmgmod.CT_LZMA: lzma.compress,
    dmgmod.CT_RAW: bytes,
}


def every_codec_image(path: Path, carrier: str = "xml") -> bytes:
    """Two tables with a gap between them (reads as zeros) and every chunk kind; returns the
    disk's expected bytes."""
    expected = bytearray()
    chunks = []
    for seed, (kind, encode) in enumerate(CODECS.items()):
        data = sample(9 + seed, seed)
        chunks.append(Chunk(kind, len(data) // SECTOR, encode(data), data))
        expected += data
        if kind == dmgmod.CT_ZLIB:
            chunks.append(Chunk(dmgmod.CT_ZERO, 3))
            expected += bytes(3 * SECTOR)
    chunks.append(Chunk(dmgmod.CT_IGNORE, 2))
    expected += bytes(2 * SECTOR)
    first_sectors = len(expected) // SECTOR
    gap = 5
    second_data = sample(2048, 99)  # one 1 MiB zlib chunk, as hdiutil writes them
    tables = [
        Table(0, first_sectors, chunks, "first"),
        Table(
            first_sectors + gap,
            2048 + 4,
            [
                Chunk(dmgmod.CT_ZLIB, 2048, zlib.compress(second_data), second_data),
                Chunk(dmgmod.CT_ZERO, 4),
            ],
            "second",
        ),
    ]
    expected += bytes(gap * SECTOR) + second_data + bytes(4 * SECTOR)
    tail = 7  # sectors after the last table
    expected += bytes(tail * SECTOR)
    build_udif(path, tables, len(expected) // SECTOR, carrier=carrier)
    return bytes(expected)


@pytest.mark.parametrize("carrier", ["xml", "rsrc"])
def test_every_codec_reads_back(carrier: str, tmp_path: Path) -> None:
    image = tmp_path / "codecs.dmg"
    expected = every_codec_image(image, carrier)
    assert export_bytes(image, None) == expected  # probed
    disk = open_disk(str(image), "dmg", read_only=True)
    try:
        for offset, length in [(0, 1), (511, 2), (4000, 9000), (12345, 54321), (0, len(expected))]:
            assert disk.read(offset, length) == expected[offset : offset + length]
        info = disk.info()[0].format_specific
        assert info["chunks"] == {
            "adc": 1, "bzip2": 1, "ignore": 1, "lzfse": 1, "lzma": 1, "raw": 1, "zero": 2,
            "zlib": 2,
        }  # fmt: skip
        assert info["blkx-source"] == ("xml" if carrier == "xml" else "resource-fork")
        assert [p["name"] for p in info["partitions"]] == (
            ["first", "second"] if carrier == "xml" else ["res 0", "res 1"]
        )
        # A gap between tables and the zero/ignore chunks are ZERO; codec chunks are DATA.
        for offset in range(0, len(expected), SECTOR):
            ext = disk.block_status(offset, SECTOR)
            if ext.allocation is Allocation.DATA:
                continue
            assert ext.allocation is Allocation.ZERO
            assert expected[offset : offset + SECTOR] == bytes(SECTOR)
        raw_run = next(r for r in disk.top._runs if r.kind == dmgmod.CT_RAW)
        ext = disk.block_status(raw_run.start * SECTOR + 100, 10)
        assert ext.allocation is Allocation.DATA and ext.host_offset == raw_run.file_offset + 100
    finally:
        disk.close()


def test_check_finds_damaged_chunks(tmp_path: Path) -> None:
    image = tmp_path / "codecs.dmg"
    every_codec_image(image)
    disk = open_disk(str(image), "dmg", read_only=True)
    try:
        result = disk.check()
        assert result.exit_status == 0 and result.messages == []
        raw_run = next(r for r in disk.top._runs if r.kind == dmgmod.CT_RAW)
        zlib_run = next(r for r in disk.top._runs if r.kind == dmgmod.CT_ZLIB)
        with pytest.raises(ReadOnly):
            disk.check(RepairMode.ALL)
    finally:
        disk.close()
    data = bytearray(image.read_bytes())
    data[raw_run.file_offset + 10] ^= 0xFF
    image.write_bytes(bytes(data))
    disk = open_disk(str(image), "dmg", read_only=True)
    try:
        result = disk.check()
        assert result.exit_status == 2
        assert result.corruptions == 2  # the data fork's CRC and the table's
        assert any("data fork CRC32" in m for m in result.messages)
        assert any("blkx table 'first'" in m for m in result.messages)
    finally:
        disk.close()
    data[zlib_run.file_offset + 5 : zlib_run.file_offset + 9] = b"\xff" * 4  # undecodable
    image.write_bytes(bytes(data))
    disk = open_disk(str(image), "dmg", read_only=True)
    try:
        result = disk.check()
        assert result.exit_status == 2
        assert any("zlib chunk at sector" in m for m in result.messages)
    finally:
        disk.close()


def test_crc32_of_zeros_matches_zlib() -> None:
    for crc in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
        for n in (0, 1, 2, 3, 511, 512, 4096, 100_003, 1 << 20):
            assert dmgmod.crc32_zeros(crc, n) == zlib.crc32(bytes(n), crc), (crc, n)


def test_zlib_raw_zero_image_matches_qemu(tmp_path: Path) -> None:
    # qemu reads zlib, raw and zero chunks: it checks that the hand assembly is real UDIF.
    image = tmp_path / "qemu.dmg"
    a, b = sample(300, 1), sample(40, 2)
    tables = [Table(0, 350, [Chunk(dmgmod.CT_ZLIB, 300, zlib.compress(a)),
                             Chunk(dmgmod.CT_ZERO, 10), Chunk(dmgmod.CT_RAW, 40, b)])]  # fmt: skip
    build_udif(image, tables, 350)
    out = tmp_path / "export.raw"
    out.write_bytes(export_bytes(image))
    assert out.read_bytes() == a + bytes(10 * SECTOR) + b
    assert_export_matches_qemu(image, out, tmp_path, "dmg")


def test_chunk_cache_decodes_once_and_stays_bounded(tmp_path: Path) -> None:
    image = tmp_path / "cache.dmg"
    datas = [sample(2048, i) for i in range(4)]
    chunks = [Chunk(dmgmod.CT_ZLIB, 2048, zlib.compress(d)) for d in datas]
    build_udif(image, [Table(0, 4 * 2048, chunks)], 4 * 2048)
    budget = 2 * 1024 * 1024 + 1
    disk = open_disk(
        str(image), "dmg", read_only=True, driver_options={"chunk-cache-size": str(budget)}
    )
    try:
        cache = disk.top._cache
        for off in range(0, 1 << 20, 4096):
            assert disk.read(off, 4096) == datas[0][off : off + 4096]
        assert (cache.misses, cache.hits) == (1, 255)
        assert disk.read(0, 4 << 20) == b"".join(datas)
        assert cache.cached_bytes <= budget
    finally:
        disk.close()


def test_streaming_decode_reads_in_any_order(tmp_path: Path) -> None:
    """zlib, bzip2 and lzma chunks decode only as far as reads need and carry on later: reads
    backwards, forwards, across chunks and at odd offsets all see the right bytes."""
    image = tmp_path / "stream.dmg"
    datas = [sample(2048, 10 + i) for i in range(3)]
    codecs = [(dmgmod.CT_ZLIB, zlib.compress), (dmgmod.CT_BZIP2, bz2.compress),
              (dmgmod.CT_LZMA, lzma.compress)]  # fmt: skip
    chunks = [
        Chunk(kind, 2048, encode(d), d) for (kind, encode), d in zip(codecs, datas, strict=True)
    ]
    build_udif(image, [Table(0, 3 * 2048, chunks)], 3 * 2048)
    expected = b"".join(datas)
    disk = open_disk(str(image), "dmg", read_only=True, driver_options={"read-ahead": "0"})
    try:
        for base in (0, 1 << 20, 2 << 20):
            assert disk.read(base + 5, 4096) == expected[base + 5 : base + 5 + 4096]
            chunk = disk.top._cache.get(base // SECTOR, lambda: pytest.fail("not cached"))
            assert 0 < chunk._filled < len(chunk)  # only the start is decoded
        for offset, length in [(900_000, 70_000), (100, 10), (1_000_000, 200_000),
                               (2_500_000, 1), (1_500_000, 1_500_000), (0, 3 << 20)]:  # fmt: skip
            assert disk.read(offset, length) == expected[offset : offset + length]
        assert disk.top._cache.misses == 3
    finally:
        disk.close()


@pytest.mark.parametrize(
    "kind,encode",
    [
        (dmgmod.CT_ZLIB, zlib.compress),
        # bzip2 decodes whole blocks (100-900 kB): small ones, so the first survive the cut
        (dmgmod.CT_BZIP2, lambda data: bz2.compress(data, 1)),
        (dmgmod.CT_LZMA, lzma.compress),
    ],
)
def test_truncated_stream_fails_where_the_data_ends(kind: int, encode, tmp_path: Path) -> None:
    image = tmp_path / "short.dmg"
    data = os.urandom(600_000) + bytes(2048 * SECTOR - 600_000)  # the cut is in the random part
    stream = encode(data)
    build_udif(image, [Table(0, 2048, [Chunk(kind, 2048, stream[: len(stream) // 2])])], 2048)
    disk = open_disk(str(image), "dmg", read_only=True)
    name = dmgmod.CHUNK_TYPE_NAMES[kind]
    try:
        assert disk.read(0, 4096) == data[:4096]  # decodable before the cut
        with pytest.raises(CorruptImage, match=f"{name} chunk at sector 0: decompressed to"):
            disk.read(len(data) - 4096, 4096)
        with pytest.raises(CorruptImage, match="decompressed to"):
            disk.read(len(data) - 4096, 4096)  # again: the same clear error
    finally:
        disk.close()


@pytest.mark.parametrize("ahead", [0, 512 * 1024])
def test_read_ahead_decodes_the_next_chunks(ahead: int, tmp_path: Path) -> None:
    image = tmp_path / "ahead.dmg"
    datas = [sample(512, 20 + i) for i in range(8)]  # 256 KiB chunks
    chunks = [Chunk(dmgmod.CT_ZLIB, 512, zlib.compress(d), d) for d in datas]
    build_udif(image, [Table(0, 8 * 512, chunks)], 8 * 512)
    chunk_bytes = 512 * SECTOR
    disk = open_disk(str(image), "dmg", read_only=True, driver_options={"read-ahead": str(ahead)})
    try:
        driver = disk.top
        assert disk.read(0, chunk_bytes) == datas[0]
        assert disk.read(chunk_bytes, chunk_bytes) == datas[1]  # sequential: 2 and 3 ahead
        with driver._ahead_lock:
            pending = list(driver._ahead)
        for future in pending:
            future.result(10)
        cached = [i for i in range(8) if i * 512 in driver._cache]
        assert cached == ([0, 1, 2, 3] if ahead else [0, 1])
        assert (
            disk.read(2 * chunk_bytes + 7, 3 * chunk_bytes)
            == b"".join(datas)[2 * chunk_bytes + 7 : 5 * chunk_bytes + 7]
        )
        assert disk.read(0, 8 * chunk_bytes) == b"".join(datas)
    finally:
        disk.close()  # waits for read-ahead still in flight
    assert not driver._ahead


@pytest.mark.parametrize("value", ["-1", "x", "65M", "2q"])
def test_bad_read_ahead_option(value: str, tmp_path: Path) -> None:
    image = tmp_path / "opt.dmg"
    small_image(image)
    with pytest.raises(InvalidRequest, match="read-ahead"):
        open_disk(str(image), "dmg", read_only=True, driver_options={"read-ahead": value})


def test_chunk_cache_single_flight() -> None:
    import threading

    calls = []
    gate = threading.Event()

    def load() -> bytes:
        calls.append(1)
        gate.wait(5)
        return b"x" * 10

    cache = ChunkCache(100)
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("k", load))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join(5)
    assert results == [b"x" * 10] * 4 and len(calls) == 1

    def boom() -> bytes:
        raise CorruptImage("bad chunk")

    with pytest.raises(CorruptImage):
        cache.get("other", boom)
    assert cache.get("other", lambda: b"ok") == b"ok"  # a failure is not cached
    cache.get("big", lambda: b"y" * 1000)  # bigger than the budget: returned, not kept
    assert cache.cached_bytes <= 100


# -- malformed images ------------------------------------------------------------------------------


def small_image(path: Path, **kw) -> None:
    data = sample(8, 0)
    build_udif(path, [Table(0, 8, [Chunk(dmgmod.CT_ZLIB, 8, zlib.compress(data))])], 8, **kw)


def open_fails(path: Path, error: type[Exception], match: str) -> None:
    start = time.monotonic()
    with pytest.raises(error, match=match):
        disk = open_disk(str(path), "dmg", read_only=True)
        try:
            disk.read(0, disk.size)
        finally:
            disk.close()
    assert time.monotonic() - start < 2


def test_truncated_koly(tmp_path: Path) -> None:
    image = tmp_path / "t.dmg"
    small_image(image)
    data = image.read_bytes()
    image.write_bytes(data[:-100])
    open_fails(image, CorruptImage, "koly")
    image.write_bytes(data[-300:])
    open_fails(image, CorruptImage, "passes the end|koly")
    image.write_bytes(b"koly")
    open_fails(image, CorruptImage, "too small")


def test_chunk_past_end_of_data_fork(tmp_path: Path) -> None:
    image = tmp_path / "p.dmg"
    table = Table(0, 8, [Chunk(dmgmod.CT_ZLIB, 8, zlib.compress(sample(8, 0)))])
    table.extra_entries = [(dmgmod.CT_RAW, 0, 8, 0, 10**9, 4096)]  # zero sectors: skipped
    build_udif(image, [table], 8)
    assert export_bytes(image) == sample(8, 0)
    table = Table(0, 16, [Chunk(dmgmod.CT_ZLIB, 8, zlib.compress(sample(8, 0)))])
    table.extra_entries = [(dmgmod.CT_RAW, 0, 8, 8, 10**9, 4096)]
    build_udif(image, [table], 16)
    open_fails(image, CorruptImage, "passes the end of the data fork")


def test_chunk_claiming_a_terabyte_is_refused_fast(tmp_path: Path) -> None:
    image = tmp_path / "tb.dmg"
    sectors = (1 << 40) // SECTOR
    build_udif(
        image, [Table(0, sectors, [Chunk(dmgmod.CT_ZLIB, sectors, zlib.compress(b"x"))])], sectors
    )
    open_fails(image, CorruptImage, r"decompresses to 1099511627776 bytes \(limit")
    # A terabyte of zero-fill is fine: it costs nothing.
    build_udif(image, [Table(0, sectors, [Chunk(dmgmod.CT_ZERO, sectors)])], sectors)
    disk = open_disk(str(image), "dmg", read_only=True)
    try:
        assert disk.size == 1 << 40
        assert disk.read((1 << 40) - 4096, 4096) == bytes(4096)
        assert disk.block_status(0, 1 << 40).length == 1 << 40
        start = time.monotonic()
        assert disk.check().exit_status == 0  # CRC32 of a terabyte of zero-fill, at once
        assert time.monotonic() - start < 1
    finally:
        disk.close()


def test_malformed_tables(tmp_path: Path) -> None:
    image = tmp_path / "m.dmg"
    z = zlib.compress(sample(8, 0))
    cases = [
        ([Table(0, 16, [Chunk(dmgmod.CT_ZLIB, 8, z)])], 8, CorruptImage, "past the disk"),
        ([Table(0, 4, [Chunk(dmgmod.CT_ZLIB, 8, z)])], 8, CorruptImage, "past the table"),
        ([Table(0, 8, [Chunk(0x80000009, 8, z)])], 8, Unsupported, "unknown type 0x80000009"),
        ([Table(0, 8, [Chunk(dmgmod.CT_RAW, 8, b"short")])], 8, CorruptImage, "holds 5 bytes"),
        (
            [Table(0, 8, [Chunk(dmgmod.CT_ZLIB, 8, z)]), Table(4, 4, [Chunk(dmgmod.CT_ZERO, 4)])],
            8,
            CorruptImage,
            "overlap",
        ),
        ([Table(0, 8, [Chunk(dmgmod.CT_ZLIB, 8, z[:-9])])], 8, CorruptImage, "decompress"),
        ([Table(0, 8, [Chunk(dmgmod.CT_ZLIB, 8, zlib.compress(bytes(100)))])], 8, CorruptImage,
         "decompressed to 100 bytes"),
        ([Table(0, 8, [Chunk(dmgmod.CT_BZIP2, 8, b"BZh9garbage")])], 8, CorruptImage, "decompress"),
        ([Table(0, 8, [Chunk(dmgmod.CT_LZMA, 8, b"\xfd7zXZ\0garbage")])], 8, CorruptImage,
         "decompress"),
        # An lzfse stream declaring more output than the chunk holds is refused before decoding.
        ([Table(0, 8, [Chunk(dmgmod.CT_LZFSE, 8, lzfse.compress(bytes(1 << 20)))])], 8,
         CorruptImage, "declares 1048576 bytes"),
        ([Table(0, 8, [Chunk(dmgmod.CT_LZFSE, 8, b"bvx9" + bytes(20))])], 8, Unsupported,
         "LZFSE block type"),
        ([Table(0, 8, [Chunk(dmgmod.CT_ADC, 8, bytes([0x40, 0, 5]))])], 8, CorruptImage,
         "before the start"),
        ([Table(0, 8, [Chunk(dmgmod.CT_ADC, 8, bytes([0x85, 1]))])], 8, CorruptImage,
         "passes the end"),
    ]  # fmt: skip
    for tables, disk_sectors, error, match in cases:
        build_udif(image, tables, disk_sectors)
        open_fails(image, error, match)


def test_mish_claiming_too_many_chunks(tmp_path: Path) -> None:
    image = tmp_path / "n.dmg"
    small_image(image)
    data = bytearray(image.read_bytes())
    # Rewrite the plist's mish with a chunk count of 2**32 - 1.
    xml_off, xml_len = struct.unpack_from(">QQ", data, len(data) - 512 + 216)
    plist = plistlib.loads(bytes(data[xml_off : xml_off + xml_len]))
    m = bytearray(plist["resource-fork"]["blkx"][0]["Data"])
    struct.pack_into(">I", m, 200, 0xFFFFFFFF)
    plist["resource-fork"]["blkx"][0]["Data"] = bytes(m)
    text = plistlib.dumps(plist)
    trailer = koly(8, xml_off, xml=(xml_off, len(text)))
    image.write_bytes(bytes(data[:xml_off]) + text + trailer)
    open_fails(image, CorruptImage, "claims 4294967295 chunks")
    image.write_bytes(
        bytes(data[:xml_off]) + b"<plist><dict>" + koly(8, xml_off, xml=(xml_off, 13))
    )
    open_fails(image, CorruptImage, "bad XML plist")
    no_blkx = plistlib.dumps({"resource-fork": {}})
    image.write_bytes(
        bytes(data[:xml_off]) + no_blkx + koly(8, xml_off, xml=(xml_off, len(no_blkx)))
    )
    open_fails(image, CorruptImage, "no resource-fork/blkx")


def test_segmented_and_forkless_images_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "s.dmg"
    small_image(image, segments=(1, 3))
    open_fails(image, Unsupported, "segmented")
    image.write_bytes(koly(8, 0))
    open_fails(image, CorruptImage, "neither an XML plist nor a resource fork")


def test_encrypted_images_are_claimed_and_refused(tmp_path: Path) -> None:
    image = tmp_path / "e.dmg"
    image.write_bytes(b"encrcdsa" + bytes(8184))
    with pytest.raises(Unsupported, match="encrypted dmg"):
        open_disk(str(image), read_only=True)  # probed as dmg, not exported as raw
    image.write_bytes(bytes(8184) + b"cdsaencr")
    with pytest.raises(Unsupported, match="encrypted dmg"):
        open_disk(str(image), read_only=True)


def test_bad_resource_fork(tmp_path: Path) -> None:
    image = tmp_path / "r.dmg"
    fork = bytearray(resource_fork([(b"blkx", 0, b"mish" + bytes(300))]))
    struct.pack_into(">I", fork, 4, 10**6)  # map offset past the fork
    image.write_bytes(bytes(fork) + koly(8, 0, rsrc=(0, len(fork))))
    open_fails(image, CorruptImage, "passes its end")


# -- through a real FUSE mount ---------------------------------------------------------------------


def test_fuse_export_is_read_only_and_correct(images: Path, mount, tmp_path: Path) -> None:
    for codec in ("adc", "lzfse"):
        shutil.copyfile(CORPUS / f"dmg/node-udif/compression-{codec}.dmg", images / f"{codec}.dmg")
        os.chmod(images / f"{codec}.dmg", 0o644)
    expected = every_codec_image(images / "codecs.dmg")
    m = mount(images)
    for codec in ("adc", "lzfse"):
        exported = m.file(f"{codec}.dmg")
        st = os.stat(exported)
        assert st.st_size == 5242880
        assert st.st_mode & 0o222 == 0, oct(st.st_mode)
        assert sha256_file(exported) == SAME_DISK_SHA
    exported = m.file("codecs.dmg")
    assert exported.read_bytes() == expected
    with pytest.raises(OSError) as e:
        os.open(exported, os.O_WRONLY)
    assert e.value.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
    m.umount()
