"""Hostile-input harness: seeded mutants of small valid images, exercised through the driver API
in a worker process with an address-space limit.

A *base* is a directory holding one valid image (plus its companions: a backing file, a bundle's
parts) and a ``base.json`` naming the image, its format, and, per mutable file, the byte regions
where metadata lives. A *mutant* is a copy of the base directory with one file changed by a
deterministic mutation derived from a seed. The worker (``python -m tests.formats.hostile``)
reads jobs from stdin, one JSON object a line, and answers one JSON line per mutant.

Only :class:`~imgfs.errors.ImgfsError` may come out of the driver API; anything else, a mutant
that runs past its deadline, or one that needs more memory than the worker's limit, is a bug.
"""

from __future__ import annotations

import json
import os
import queue
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
PIECE = MiB
# Reads cover the whole disk up to this size; past it, spread samples plus the last piece (a
# mutant may claim an exabyte disk, whose zeros are not worth reading).
READ_ALL_LIMIT = 16 * MiB
SAMPLE_READS = 16
MAX_EXTENTS = 4096
# A mutant must finish all its operations within this many seconds (measured in the worker).
MUTANT_DEADLINE = 5.0
# The parent kills a worker that reports nothing for this long (a hang) and names the mutant.
HANG_TIMEOUT = 60.0
# The worker's address-space limit: imports and a few MiB-sized buffers fit easily; an
# allocation sized from a hostile field does not.
ADDRESS_SPACE_LIMIT = 1024 * MiB

WRITABLE_FORMATS = {"raw", "qed", "qcow", "cow", "vdi", "parallels", "parallels-hdd", "qcow2",
                    "vmdk", "vpc", "vhdx"}  # fmt: skip


# -- bases ------------------------------------------------------------------------------------


@dataclass
class Base:
    directory: Path
    fmt: str
    image: str  # the name open_disk gets, relative to the directory
    # file name -> list of [start, end) metadata regions in it
    regions: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def save(self) -> None:
        (self.directory / "base.json").write_text(
            json.dumps({"fmt": self.fmt, "image": self.image, "regions": self.regions})
        )

    @classmethod
    def load(cls, directory: Path) -> Base:
        spec = json.loads((directory / "base.json").read_text())
        regions = {k: [tuple(r) for r in v] for k, v in spec["regions"].items()}
        return cls(directory, spec["fmt"], spec["image"], regions)  # type: ignore[arg-type]


def uniform_sector_regions(data: bytes, sector: int = 512) -> list[tuple[int, int]]:
    """Sectors that are neither one repeated byte (guest data written with a pattern) nor
    zeros: in an image of pattern-filled data these are its header and tables."""
    out: list[tuple[int, int]] = []
    for start in range(0, len(data), sector):
        piece = data[start : start + sector]
        if piece.count(piece[:1]) != len(piece):
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], start + len(piece))
            else:
                out.append((start, start + len(piece)))
    return out


def standard_regions(path: Path, extra: list[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """The first 64 KiB, the last 4 KiB and the non-uniform sectors of ``path``."""
    data = path.read_bytes()
    size = len(data)
    regions = [(0, min(size, 64 * KiB)), (max(0, size - 4 * KiB), size)]
    regions += uniform_sector_regions(data)
    regions += [(a, min(b, size)) for a, b in extra if a < size]
    return [r for r in regions if r[1] > r[0]]


def dmg_regions(path: Path) -> list[tuple[int, int]]:
    """koly (the last 512 bytes), the XML plist and the resource fork it points at."""
    data = path.read_bytes()
    size = len(data)
    regions = [(max(0, size - 512), size), (0, min(size, 4 * KiB))]
    koly = data[-512:]
    if koly[:4] == b"koly":
        rsrc_off, rsrc_len = struct.unpack_from(">QQ", koly, 40)
        xml_off, xml_len = struct.unpack_from(">QQ", koly, 216)
        for off, n in ((rsrc_off, rsrc_len), (xml_off, xml_len)):
            if n and off + n <= size:
                regions.append((off, off + n))
    return regions


def qemu(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=120)


def qemu_writes(image: Path, fmt: str, writes: list[tuple[int, int, int]]) -> None:
    cmds: list[str] = []
    for pattern, off, n in writes:
        cmds += ["-c", f"write -P {pattern} {off} {n}"]
    qemu("qemu-io", "-f", fmt, *cmds, str(image))


def _new(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    return d


def make_bases(root: Path) -> dict[str, list[Base]]:
    """Small valid images of every merged format, two or three settings each."""
    bases: dict[str, list[Base]] = {}

    def add(base: Base) -> None:
        base.save()
        bases.setdefault(base.fmt, []).append(base)

    # raw: nothing to corrupt but its size; truncations and any byte are still valid.
    d = _new(root, "raw")
    (d / "disk.img").write_bytes(bytes(range(256)) * 4096 + b"\x01" * 1000)
    add(Base(d, "raw", "disk.img", {"disk.img": [(0, 64 * KiB)]}))

    writes = [(0x11, 0, 4096), (0x22, 65536 + 512, 8192), (0x33, 3 * MiB - 4096, 69632)]

    # qed: small clusters and tables so the L1 and L2 tables sit among the data; one with a
    # raw backing file named relatively.
    d = _new(root, "qed-small")
    qemu("qemu-img", "create", "-f", "qed", "-o", "cluster_size=4096,table_size=4",
         str(d / "disk.qed"), "4M")  # fmt: skip
    qemu_writes(d / "disk.qed", "qed", writes)
    add(Base(d, "qed", "disk.qed", {"disk.qed": standard_regions(d / "disk.qed")}))
    d = _new(root, "qed-backing")
    (d / "base.raw").write_bytes(b"\x5a" * 2 * MiB)
    qemu("qemu-img", "create", "-f", "qed", "-b", "base.raw", "-F", "raw",
         str(d / "disk.qed"), "4M")  # fmt: skip
    qemu_writes(d / "disk.qed", "qed", writes)
    add(Base(d, "qed", "disk.qed", {"disk.qed": standard_regions(d / "disk.qed")}))

    # qcow (v1): plain, over a backing file, and with compressed clusters.
    d = _new(root, "qcow-plain")
    qemu("qemu-img", "create", "-f", "qcow", str(d / "disk.qcow"), "4M")
    qemu_writes(d / "disk.qcow", "qcow", writes)
    add(Base(d, "qcow", "disk.qcow", {"disk.qcow": standard_regions(d / "disk.qcow")}))
    d = _new(root, "qcow-backing")
    (d / "base.raw").write_bytes(b"\x5a" * 2 * MiB)
    qemu("qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw",
         str(d / "disk.qcow"), "4M")  # fmt: skip
    qemu_writes(d / "disk.qcow", "qcow", writes)
    add(Base(d, "qcow", "disk.qcow", {"disk.qcow": standard_regions(d / "disk.qcow")}))
    d = _new(root, "qcow-compressed")
    src = d / "src.raw"
    src.write_bytes(b"".join(f"block {i} ".encode() * 500 for i in range(300))[: 2 * MiB])
    # qemu-img 7.2 exits 1 after a compressed convert to qcow that did write every cluster.
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow", str(src),
                    str(d / "disk.qcow")], capture_output=True, timeout=120)  # fmt: skip
    qemu("qemu-img", "compare", "-f", "raw", "-F", "qcow", str(src), str(d / "disk.qcow"))
    src.unlink()
    add(Base(d, "qcow", "disk.qcow", {"disk.qcow": standard_regions(d / "disk.qcow")}))

    # vdi: dynamic and static.
    for static in (False, True):
        d = _new(root, f"vdi-{'static' if static else 'dynamic'}")
        opts = ["-o", "static=on"] if static else []
        qemu("qemu-img", "create", "-f", "vdi", *opts, str(d / "disk.vdi"), "4M")
        qemu_writes(d / "disk.vdi", "vdi", writes)
        add(Base(d, "vdi", "disk.vdi", {"disk.vdi": standard_regions(d / "disk.vdi")}))

    # parallels: small clusters so the BAT has many entries.
    d = _new(root, "parallels")
    qemu("qemu-img", "create", "-f", "parallels", "-o", "cluster_size=4k",
         str(d / "disk.parallels"), "4M")  # fmt: skip
    qemu_writes(d / "disk.parallels", "parallels", writes)
    add(Base(d, "parallels", "disk.parallels",
             {"disk.parallels": standard_regions(d / "disk.parallels")}))  # fmt: skip

    # parallels-hdd: a bundle with a Plain root snapshot under an expandable top, split into
    # two storages.
    from imgfs.formats.parallels import ParallelsDriver

    d = _new(root, "bundle.hdd")
    base_guid = "{11111111-0000-0000-0000-000000000001}"
    top_guid = "{22222222-0000-0000-0000-000000000002}"
    (d / "base0.hds").write_bytes(b"B" * MiB)
    (d / "base1.hds").write_bytes(b"C" * MiB)
    for part in ("top0.hds", "top1.hds"):
        ParallelsDriver.create(str(d / part), MiB, {"cluster_size": "4k"})
        qemu_writes(d / part, "parallels", [(0x54, 64 * KiB, 64 * KiB), (0x55, 4096, 512)])

    def image(guid: str, kind: str, file: str) -> str:
        return f"<Image><GUID>{guid}</GUID><Type>{kind}</Type><File>{file}</File></Image>"

    storages = "".join(
        f"<Storage><Start>{i * 2048}</Start><End>{(i + 1) * 2048}</End><Blocksize>8</Blocksize>"
        f"{image(base_guid, 'Plain', f'base{i}.hds')}"
        f"{image(top_guid, 'Compressed', f'top{i}.hds')}</Storage>"
        for i in range(2)
    )
    xml = (
        "<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image Version=\"1.0\">"
        "<Disk_Parameters><Disk_size>4096</Disk_size><Padding>0</Padding></Disk_Parameters>"
        f"<StorageData>{storages}</StorageData><Snapshots><TopGUID>{top_guid}</TopGUID>"
        f"<Shot><GUID>{base_guid}</GUID><ParentGUID>{{00000000-0000-0000-0000-000000000000}}"
        f"</ParentGUID></Shot><Shot><GUID>{top_guid}</GUID><ParentGUID>{base_guid}</ParentGUID>"
        "</Shot></Snapshots></Parallels_disk_image>"
    ).encode()
    (d / "DiskDescriptor.xml").write_bytes(xml)
    add(Base(d, "parallels-hdd", "DiskDescriptor.xml", {
        "DiskDescriptor.xml": [(0, len(xml))],
        "top0.hds": standard_regions(d / "top0.hds"),
        "top1.hds": standard_regions(d / "top1.hds"),
    }))  # fmt: skip

    # cow: version 3 from create() and version 2 assembled from the layout, both naming their
    # backing file relatively (uml_mkcow stores an absolute name, which the containment check
    # would refuse in every mutant's copy), with writes through the driver.
    from imgfs.block.disk import open_disk
    from imgfs.formats.cow import CowDriver
    from tests.formats.test_cow import build_v2

    d = _new(root, "cow")
    (d / "base.raw").write_bytes(b"\x5a" * 2 * MiB)
    CowDriver.create(str(d / "disk.cow"), 2 * MiB, {"backing_file": "base.raw"})
    disk = open_disk(str(d / "disk.cow"), "cow")
    for pattern, off, n in writes[:2]:
        disk.write(off, bytes([pattern]) * n)
    disk.close()
    add(Base(d, "cow", "disk.cow", {"disk.cow": standard_regions(d / "disk.cow")}))
    d = _new(root, "cow-v2")
    (d / "base.raw").write_bytes(b"\x5a" * MiB)
    build_v2(d / "disk.cow", "base.raw", MiB, {s: bytes([s % 250 + 1]) * 512 for s in (0, 3, 700)})
    add(Base(d, "cow", "disk.cow", {"disk.cow": standard_regions(d / "disk.cow")}))

    # bochs: a bximage growing image and one assembled with shuffled extents.
    from tests.formats.test_bochs import build_growing

    d = _new(root, "bochs-bximage")
    qemu("bximage", "-func=create", "-hd=10M", "-imgmode=growing", "-q", str(d / "disk.bochs"))
    add(Base(d, "bochs", "disk.bochs", {"disk.bochs": standard_regions(d / "disk.bochs")}))
    d = _new(root, "bochs-built")
    sectors = {s: bytes([s % 251 + 1]) * 512 for s in (0, 1, 9, 100, 4000, 4001, 8191)}
    build_growing(d / "disk.bochs", 4 * MiB, sectors, seed=3)
    add(Base(d, "bochs", "disk.bochs", {"disk.bochs": standard_regions(d / "disk.bochs")}))

    # cloop: create_compressed_fs at two block sizes.
    for block in ("65536", "4096"):
        d = _new(root, f"cloop-{block}")
        src = d / "src"
        src.write_bytes(b"".join(f"cloop {i} ".encode() * 300 for i in range(200))[: MiB + 777])
        qemu_cwd(["create_compressed_fs", "-q", "-B", block, "src", "disk.cloop"], d)
        src.unlink()
        data = (d / "disk.cloop").read_bytes()
        add(Base(d, "cloop", "disk.cloop", {"disk.cloop": [(0, min(len(data), 64 * KiB))]}))

    # dmg: every chunk kind with the tables in the XML plist and in the resource fork; a
    # corpus image from another producer.
    from tests.conftest import SHARED
    from tests.formats.test_dmg import every_codec_image

    for carrier in ("xml", "rsrc"):
        d = _new(root, f"dmg-{carrier}")
        every_codec_image(d / "disk.dmg", carrier=carrier)
        add(Base(d, "dmg", "disk.dmg", {"disk.dmg": dmg_regions(d / "disk.dmg")}))
    d = _new(root, "dmg-corpus")
    shutil.copyfile(SHARED / "corpus/dmg/node-udif/compression-zlib.dmg", d / "disk.dmg")
    add(Base(d, "dmg", "disk.dmg", {"disk.dmg": dmg_regions(d / "disk.dmg")}))

    # asif: assembled from the layout with pattern-byte chunks, so the tables stand out.
    from tests.formats.test_asif import CHUNK, AsifBuilder

    d = _new(root, "asif")
    per_table = AsifBuilder(CHUNK, sectors=0).per_table
    b = AsifBuilder(CHUNK, sectors=(per_table + 10) * CHUNK // 512,
                    max_sectors=3 * per_table * CHUNK // 512)  # fmt: skip
    b.write_full(0, b"\x41" * CHUNK)
    b.write_full(2, b"\x42" * CHUNK)
    b.write_partial(3, {0: b"\x43" * 512, 7: b"\x44" * 512})
    b.write_partial(2048, {5: b"\x45" * 512})
    b.write_metadata(3 * per_table - 1, "00000000-1111-2222-3333-444444444444")
    b.save(d / "disk.asif")
    add(Base(d, "asif", "disk.asif", {"disk.asif": standard_regions(d / "disk.asif")}))

    make_qcow2_bases(root, add, writes)
    make_vmdk_bases(root, add, writes)
    make_vpc_bases(root, add, writes)
    make_vhdx_bases(root, add, writes)
    return bases


def compressible(size: int) -> bytes:
    return b"".join(f"block {i} ".encode() * 500 for i in range(size // 4000 + 1))[:size]


def single(add, d: Path, fmt: str, image: str) -> None:  # type: ignore[no-untyped-def]
    add(Base(d, fmt, image, {image: standard_regions(d / image)}))


def make_qcow2_bases(root: Path, add, writes) -> None:  # type: ignore[no-untyped-def]
    """v2 and v3; small clusters so the L2 and refcount tables are many; refcount widths 1 and
    64; extended L2; a raw backing file; zlib and zstd compressed clusters; a data file."""
    odd = writes + [(0x44, 1 << 20 | 1536, 1024)]  # sub-cluster writes for extended L2
    for name, opts in (
        ("qcow2-v2", "compat=0.10,cluster_size=4096"),
        ("qcow2-512-rc1", "cluster_size=512,refcount_bits=1"),
        ("qcow2-1k-rc64", "cluster_size=1024,refcount_bits=64"),
        ("qcow2-extl2", "cluster_size=16384,extended_l2=on"),
    ):
        d = _new(root, name)
        qemu("qemu-img", "create", "-f", "qcow2", "-o", opts, str(d / "disk.qcow2"), "4M")
        qemu_writes(d / "disk.qcow2", "qcow2", odd)
        single(add, d, "qcow2", "disk.qcow2")
    d = _new(root, "qcow2-backing")
    (d / "base.raw").write_bytes(b"\x5a" * 2 * MiB)
    qemu_cwd(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw",
              "-F", "raw", "disk.qcow2", "4M"], d)  # fmt: skip
    qemu_writes(d / "disk.qcow2", "qcow2", writes)
    single(add, d, "qcow2", "disk.qcow2")
    for codec in ("zlib", "zstd"):
        d = _new(root, f"qcow2-{codec}")
        (d / "src.raw").write_bytes(compressible(2 * MiB))
        opts = f"cluster_size=4096,compression_type={codec}"
        qemu_cwd(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts,
                  "src.raw", "disk.qcow2"], d)  # fmt: skip
        (d / "src.raw").unlink()
        single(add, d, "qcow2", "disk.qcow2")
    d = _new(root, "qcow2-datafile")
    qemu_cwd(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096,data_file=disk.data",
              "disk.qcow2", "4M"], d)  # fmt: skip
    # qemu-io finds the data file relative to its working directory.
    qemu_cwd(["qemu-io", "-f", "qcow2"] + [a for p, o, n in writes
              for a in ("-c", f"write -P {p} {o} {n}")] + ["disk.qcow2"], d)  # fmt: skip
    single(add, d, "qcow2", "disk.qcow2")


def text_regions(path: Path) -> list[tuple[int, int]]:
    return [(0, path.stat().st_size)]


def make_vmdk_bases(root: Path, add, writes) -> None:  # type: ignore[no-untyped-def]
    """monolithicSparse (plain and zeroed-grain), streamOptimized, twoGbMaxExtentSparse with
    its descriptor in a file of its own, monolithicFlat, a child naming its parent, and the
    corpus's seSparse extent."""
    from tests.conftest import SHARED

    d = _new(root, "vmdk-sparse")
    qemu("qemu-img", "create", "-f", "vmdk", str(d / "disk.vmdk"), "4M")
    qemu_writes(d / "disk.vmdk", "vmdk", writes)
    single(add, d, "vmdk", "disk.vmdk")
    d = _new(root, "vmdk-zeroed")
    qemu("qemu-img", "create", "-f", "vmdk", "-o", "zeroed_grain=on", str(d / "disk.vmdk"), "4M")
    qemu_writes(d / "disk.vmdk", "vmdk", writes)
    qemu("qemu-io", "-f", "vmdk", "-c", "write -z 65536 65536", str(d / "disk.vmdk"))
    single(add, d, "vmdk", "disk.vmdk")
    d = _new(root, "vmdk-stream")
    (d / "src.raw").write_bytes(compressible(2 * MiB) + bytes(MiB) + compressible(MiB))
    qemu_cwd(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
              "subformat=streamOptimized", "src.raw", "disk.vmdk"], d)  # fmt: skip
    (d / "src.raw").unlink()
    single(add, d, "vmdk", "disk.vmdk")
    d = _new(root, "vmdk-2gb")
    qemu_cwd(["qemu-img", "create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
              "disk.vmdk", "4M"], d)  # fmt: skip
    qemu_writes(d / "disk.vmdk", "vmdk", writes)
    add(Base(d, "vmdk", "disk.vmdk", {"disk.vmdk": text_regions(d / "disk.vmdk"),
             "disk-s001.vmdk": standard_regions(d / "disk-s001.vmdk")}))  # fmt: skip
    d = _new(root, "vmdk-flat")
    qemu_cwd(["qemu-img", "create", "-f", "vmdk", "-o", "subformat=monolithicFlat",
              "disk.vmdk", "4M"], d)  # fmt: skip
    qemu_writes(d / "disk.vmdk", "vmdk", writes)
    add(Base(d, "vmdk", "disk.vmdk", {"disk.vmdk": text_regions(d / "disk.vmdk"),
             "disk-flat.vmdk": [(0, 4096)]}))  # fmt: skip
    d = _new(root, "vmdk-child")
    qemu_cwd(["qemu-img", "create", "-f", "vmdk", "parent.vmdk", "4M"], d)
    qemu_writes(d / "parent.vmdk", "vmdk", writes[:2])
    qemu_cwd(["qemu-img", "create", "-f", "vmdk", "-b", "parent.vmdk", "-F", "vmdk",
              "disk.vmdk"], d)  # fmt: skip
    qemu_writes(d / "disk.vmdk", "vmdk", [(0x66, 4096 + 512, 4096), (0x67, 2 * MiB, 512)])
    add(Base(d, "vmdk", "disk.vmdk", {"disk.vmdk": standard_regions(d / "disk.vmdk"),
             "parent.vmdk": standard_regions(d / "parent.vmdk")}))  # fmt: skip
    d = _new(root, "vmdk-sesparse")
    src = SHARED / "corpus/vmdk/dissect-hypervisor/sesparse"
    shutil.copyfile(src / "sesparse-descriptor.vmdk", d / "disk.vmdk")
    gunzip(src / "sesparse.vmdk.gz", d / "sesparse.vmdk")
    add(Base(d, "vmdk", "disk.vmdk", {"disk.vmdk": text_regions(d / "disk.vmdk"),
             "sesparse.vmdk": standard_regions(d / "sesparse.vmdk")}))  # fmt: skip


def gunzip(src: Path, dest: Path) -> None:
    import bz2
    import gzip

    opener = gzip.open if src.suffix == ".gz" else bz2.open
    with opener(src, "rb") as f, open(dest, "wb") as out:
        shutil.copyfileobj(f, out)


def make_vpc_bases(root: Path, add, writes) -> None:  # type: ignore[no-untyped-def]
    """Dynamic (qemu's, and one of imgfs with small blocks so the BAT has many entries),
    fixed, and a differencing child made by imgfs create -o backing_file."""
    from imgfs.block.disk import open_disk
    from imgfs.formats.vpc import VpcDriver

    d = _new(root, "vpc-dynamic")
    qemu("qemu-img", "create", "-f", "vpc", str(d / "disk.vhd"), "4M")
    qemu_writes(d / "disk.vhd", "vpc", writes)
    single(add, d, "vpc", "disk.vhd")
    d = _new(root, "vpc-small-blocks")
    VpcDriver.create(str(d / "disk.vhd"), 4 * MiB, {"block_size": "64K"})
    qemu_writes(d / "disk.vhd", "vpc", writes)
    single(add, d, "vpc", "disk.vhd")
    d = _new(root, "vpc-fixed")
    qemu("qemu-img", "create", "-f", "vpc", "-o", "subformat=fixed", str(d / "disk.vhd"), "4M")
    qemu_writes(d / "disk.vhd", "vpc", writes)
    add(Base(d, "vpc", "disk.vhd", {"disk.vhd": [(0, 4096), (d.joinpath("disk.vhd").stat()
             .st_size - 512, d.joinpath("disk.vhd").stat().st_size)]}))  # fmt: skip
    d = _new(root, "vpc-diff")
    VpcDriver.create(str(d / "parent.vhd"), 4 * MiB, {"block_size": "64K"})
    qemu_writes(d / "parent.vhd", "vpc", writes[:2])
    VpcDriver.create(str(d / "disk.vhd"), 4 * MiB, {"backing_file": "parent.vhd",
                                                    "block_size": "64K"})  # fmt: skip
    driver_writes(open_disk, d / "disk.vhd", "vpc")
    add(Base(d, "vpc", "disk.vhd", {"disk.vhd": standard_regions(d / "disk.vhd"),
             "parent.vhd": standard_regions(d / "parent.vhd")}))  # fmt: skip


def driver_writes(open_disk, image: Path, fmt: str) -> None:  # type: ignore[no-untyped-def]
    disk = open_disk(str(image), fmt)
    try:
        for pattern, off, n in [(0x66, 4096 + 512, 4096), (0x67, 2 * MiB, 512),
                                (0x68, 3 * MiB + 100, 70000)]:  # fmt: skip
            disk.write(off, bytes([pattern]) * n)
        disk.flush()
    finally:
        disk.close()


def make_vhdx_bases(root: Path, add, writes) -> None:  # type: ignore[no-untyped-def]
    """Dynamic, fixed, 4096-byte logical sectors, a differencing child made by imgfs, and the
    corpus image whose log was left unreplayed."""
    from imgfs.block.disk import open_disk
    from imgfs.formats.vhdx import VhdxDriver
    from tests.conftest import SHARED

    for name, opts in (
        ("vhdx-dynamic", "block_size=1M"),
        ("vhdx-fixed", "subformat=fixed"),
        ("vhdx-4k", "block_size=1M,logical_sector_size=4096"),
    ):
        d = _new(root, name)
        if "logical" in opts:  # qemu 7.2 neither makes nor writes 4096-byte sectors
            VhdxDriver.create(str(d / "disk.vhdx"), 4 * MiB,
                              dict(kv.split("=") for kv in opts.split(",")))  # fmt: skip
            driver_writes(open_disk, d / "disk.vhdx", "vhdx")
        else:
            qemu("qemu-img", "create", "-f", "vhdx", "-o", opts, str(d / "disk.vhdx"), "4M")
            qemu_writes(d / "disk.vhdx", "vhdx", writes)
        single(add, d, "vhdx", "disk.vhdx")
    d = _new(root, "vhdx-diff")
    VhdxDriver.create(str(d / "parent.vhdx"), 4 * MiB, {"block_size": "1M"})
    qemu_writes(d / "parent.vhdx", "vhdx", writes[:2])
    VhdxDriver.create(str(d / "disk.vhdx"), 4 * MiB, {"backing_file": "parent.vhdx",
                                                      "block_size": "1M"})  # fmt: skip
    driver_writes(open_disk, d / "disk.vhdx", "vhdx")
    add(Base(d, "vhdx", "disk.vhdx", {"disk.vhdx": standard_regions(d / "disk.vhdx"),
             "parent.vhdx": standard_regions(d / "parent.vhdx")}))  # fmt: skip
    d = _new(root, "vhdx-dirtylog")
    gunzip(SHARED / "corpus/vhdx/qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2", d / "disk.vhdx")
    single(add, d, "vhdx", "disk.vhdx")


def qemu_cwd(args: list[str], cwd: Path) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=120, cwd=cwd)


# -- mutations --------------------------------------------------------------------------------


def interesting_values(size: int, at: int, rng: random.Random) -> list[int]:
    return [
        0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0x1000, 0xFFFF, 0x10000,
        0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 32) + 1, 1 << 40,
        (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 62) + 3,
        size, size - 1, size + 1, size + 512, size * 2, size // 2 | 1, size & ~511,
        at, at & ~511, at & ~4095, at + 1, rng.getrandbits(64), rng.getrandbits(32),
    ]  # fmt: skip


def mutate(data: bytearray, regions: list[tuple[int, int]], rng: random.Random) -> str:
    """Change ``data`` in place; returns a short description of what was done."""
    size = len(data)
    if size == 0:
        return "empty"
    regions = [r for r in regions if r[1] > r[0]] or [(0, size)]

    def pick() -> int:
        a, b = rng.choice(regions)
        at = rng.randrange(a, b)
        return at if at < len(data) else rng.randrange(len(data))  # after a truncation

    kind = rng.choices(["flip", "byte", "value", "truncate", "mix"], [3, 2, 5, 1, 2])[0]
    done: list[str] = []
    steps = rng.randint(2, 4) if kind == "mix" else 1
    for _ in range(steps):
        k = rng.choice(["flip", "byte", "value", "truncate"]) if kind == "mix" else kind
        if k == "flip":
            for _ in range(rng.randint(1, 8)):
                at = pick()
                bit = rng.randrange(8)
                data[at] ^= 1 << bit
                done.append(f"flip {at}.{bit}")
        elif k == "byte":
            for _ in range(rng.randint(1, 4)):
                at = pick()
                data[at] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
                done.append(f"byte {at}={data[at]:#x}")
        elif k == "value":
            for _ in range(rng.randint(1, 3)):
                width = rng.choice([2, 4, 4, 8, 8])
                at = pick() & ~(width - 1) if rng.random() < 0.8 else pick()
                if at + width > len(data):
                    continue
                value = rng.choice(interesting_values(size, at, rng)) & ((1 << (8 * width)) - 1)
                order = rng.choice("<>")
                data[at : at + width] = value.to_bytes(width, "little" if order == "<" else "big")
                done.append(f"store {order}{width}@{at}={value:#x}")
        else:
            cut = rng.choice([pick(), rng.randrange(len(data) + 1), len(data) - 1, 0])
            del data[max(0, cut) :]
            done.append(f"truncate {cut}")
            if not data:
                break
    return "; ".join(done)


def xml_mutate(data: bytearray, rng: random.Random) -> str | None:
    """For text metadata: replace a number with a hostile one, or a tag's text with junk."""
    import re

    numbers = [m.span() for m in re.finditer(rb"\d+", data)]
    if not numbers or rng.random() < 0.4:
        return None
    a, b = rng.choice(numbers)
    value = rng.choice([b"0", b"1", b"-1", b"4294967296", b"18446744073709551616",
                        b"99999999999999999999999", b"2047", b"2049", b"4097", b"1" * 5000,
                        b"0x10", b" 7 ", b"8" * 20])  # fmt: skip
    data[a:b] = value
    return f"number at {a} = {value[:24]!r}"


# Seeds from here on (the fuzz campaign's) also get structural edits, from a second generator,
# so that the mutants of the lower seeds the tests use stay what they were.
STRUCTURAL_SEEDS_FROM = 1_000_000
STRUCTURAL_SHARE = 0.35


def structural_mutate(data: bytearray, regions: list[tuple[int, int]], rng: random.Random) -> str:
    """Edits that move metadata rather than change a value: a table sector copied over another,
    a sector zeroed, a table entry duplicated or swapped, bytes inserted or cut out."""
    size = len(data)
    regions = [r for r in regions if r[1] > r[0] and r[0] < size] or [(0, size)]

    def pick(align: int) -> int:
        a, b = rng.choice(regions)
        return min(rng.randrange(a, min(b, size)), size - 1) & ~(align - 1)

    kind = rng.choice(["copy-sector", "zero-sector", "dup-entry", "swap-entries", "shift"])
    if kind == "copy-sector":
        src, dst = pick(512), pick(512)
        data[dst : dst + 512] = data[src : src + 512]
        del data[size:]
        return f"copy sector {src} over {dst}"
    if kind == "zero-sector":
        at = pick(512)
        data[at : at + 512] = bytes(len(data[at : at + 512]))
        return f"zero sector {at}"
    width = rng.choice([4, 8])
    if kind in ("dup-entry", "swap-entries"):
        a = pick(width)
        b = a + width if kind == "dup-entry" or rng.random() < 0.5 else pick(width)
        if b + width > size or a + width > size:
            return "nothing (entry at the end)"
        first, second = bytes(data[a : a + width]), bytes(data[b : b + width])
        data[b : b + width] = first
        if kind == "swap-entries":
            data[a : a + width] = second
        return f"{kind} {width}@{a},{b}"
    at = pick(1)
    n = rng.randint(1, 16)
    if rng.random() < 0.5:
        data[at:at] = bytes(rng.getrandbits(8) for _ in range(n))
        return f"insert {n} bytes at {at}"
    del data[at : at + n]
    return f"cut {n} bytes at {at}"


#: (file name, offset, bytes): a mutation chosen by the caller (hypothesis) instead of a seed
Patch = tuple[str, int, bytes]


def make_mutant(
    base: Base, seed: int, dest: Path, patches: list[Patch] | None = None
) -> tuple[str, str]:
    """Copy ``base`` into ``dest`` and mutate one file (or apply ``patches``); returns (file
    name, description)."""
    shutil.copytree(base.directory, dest)
    if patches:
        for name, offset, new in patches:
            with open(dest / name, "r+b") as f:
                f.seek(offset)
                f.write(new)
        return patches[0][0], "patches " + ", ".join(f"{n}@{o}={b.hex()}" for n, o, b in patches)
    if seed < 0:  # a stored input replayed as it is (tests/formats/regressions/)
        return sorted(base.regions)[0], "unmutated"
    rng = random.Random(seed)
    name = rng.choice(sorted(base.regions))
    path = dest / name
    data = bytearray(path.read_bytes())
    text = name.endswith(".xml") or data[:21] == b"# Disk DescriptorFile"
    what = xml_mutate(data, rng) if text else None
    structural = random.Random(seed * 7919 + 1)
    if what is None and seed >= STRUCTURAL_SEEDS_FROM and structural.random() < STRUCTURAL_SHARE:
        if data:
            what = structural_mutate(data, base.regions[name], structural)
    if what is None:
        what = mutate(data, base.regions[name], rng)
    path.write_bytes(data)
    return name, what


# -- exercising one mutant --------------------------------------------------------------------


class Bug(Exception):
    """The driver answered wrongly without raising (a short read, a bad extent)."""


def exercise(
    path: str, fmt: str, root: str, seed: int, writable: bool, opened: list[bool]
) -> list[str]:
    """Every read-side operation on a read-only open, and for writable formats a writable open
    with a few writes, a flush and a repair. Returns the ImgfsError messages met (for the log);
    raises anything else. Appends to ``opened`` whether the read-only open worked."""
    from imgfs.block.chain import Containment
    from imgfs.block.disk import open_disk
    from imgfs.block.driver import RepairMode
    from imgfs.errors import ImgfsError, Unsupported

    errors: list[str] = []
    containment = Containment(root)

    def step(fn, *args):
        try:
            return fn(*args)
        except Unsupported as e:
            errors.append(f"{type(e).__name__}: {e}")
        except ImgfsError as e:
            errors.append(f"{type(e).__name__}: {e}")
        return None

    # Every driver's probe and companion_files must take any file without raising.
    from imgfs.block import registry

    probe_input = registry.read_probe_input(path) if os.path.isfile(path) else None
    for cls in registry.all_drivers():
        if probe_input is not None:
            score = cls.probe(probe_input)
            if not 0 <= score <= 100:
                raise Bug(f"{cls.format_name} probe scored {score}")
        cls.companion_files(path)

    disk = step(lambda: open_disk(path, fmt, read_only=True, containment=containment))
    opened.append(disk is not None)
    if disk is not None:
        try:
            read_side(disk, step)
        finally:
            step(disk.close)
    if writable:
        before = file_sizes(root)
        rng = random.Random(seed ^ 0x5EED)
        disk = step(lambda: open_disk(path, fmt, read_only=False, containment=containment))
        if disk is not None:
            try:
                size = disk.size
                for _ in range(3):
                    if size <= 0:
                        break
                    off = rng.randrange(min(size, 8 * MiB))
                    n = rng.choice([1, 511, 4096, 70000])
                    step(disk.write, off, bytes([rng.randrange(1, 256)]) * n)
                    got = step(disk.read, off, min(n, size - off))
                    if got is not None and len(got) != min(n, size - off):
                        raise Bug(f"read after write at {off} gave {len(got)} bytes")
                step(disk.flush)
                step(disk.check, RepairMode.ALL)
                if size > 0:
                    step(disk.write_zeroes, 0, min(size, 64 * KiB), True)
                    step(disk.discard, size // 2, min(size - size // 2, 64 * KiB))
                step(disk.flush)
            finally:
                step(disk.close)
        for name, (size, allocated) in file_sizes(root).items():
            old_size, old_allocated = before.get(name, (0, 0))
            grew = size - old_size > MAX_GROWTH and fmt in APPARENT_GROWTH_CHECKED
            if grew or allocated - old_allocated > MAX_ALLOCATED_GROWTH:
                raise Bug(f"{name} grew from {old_size} to {size} bytes ({old_allocated} to "
                          f"{allocated} allocated) after a few small writes")  # fmt: skip
    return errors


# A few writes of at most 70000 bytes, a zeroing and a discard may allocate a block or two of
# the biggest block size any format has (vhdx: 256 MiB) and its tables, but not more.
MAX_GROWTH = 1024 * MiB
MAX_ALLOCATED_GROWTH = 64 * MiB
# Formats whose files may not grow past MAX_GROWTH even sparsely.
APPARENT_GROWTH_CHECKED = {"qcow2", "vmdk", "vpc", "vhdx", "parallels"}


def file_sizes(root: str) -> dict[str, tuple[int, int]]:
    """Apparent and allocated size of every file under ``root``."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_blocks * 512)
    return out


def read_side(disk, step) -> None:
    size = disk.size
    if size < 0:
        raise Bug(f"negative virtual size {size}")
    if size <= READ_ALL_LIMIT:
        offsets = list(range(0, size, PIECE))
    else:
        offsets = list(range(0, READ_ALL_LIMIT // 2, PIECE))
        offsets += [size * i // SAMPLE_READS for i in range(1, SAMPLE_READS)]
        offsets.append(max(0, size - PIECE))
    for off in offsets:
        n = min(PIECE, size - off)
        got = step(disk.read, off, n)
        if got is not None and len(got) != n:
            raise Bug(f"read at {off} of {n} bytes gave {len(got)}")
    # Odd-offset reads straddling pieces.
    if size > 3:
        for off in (1, size // 3, size - 3):
            got = step(disk.read, off, min(PIECE + 5, size - off))
            if got is not None and len(got) != min(PIECE + 5, size - off):
                raise Bug(f"read at {off} short: {len(got)}")
    off = 0
    for _ in range(MAX_EXTENTS):
        if off >= size:
            break
        ext = step(disk.block_status, off, size - off)
        if ext is None:
            off += PIECE  # skip the bad range, as a reader would
            continue
        if ext.offset != off or not 0 < ext.length <= size - off:
            raise Bug(f"block status at {off} gave {ext}")
        off += ext.length
    infos = step(disk.info)
    if infos is not None:
        for info in infos:
            json.dumps(info.to_qemu_json())
    step(disk.check)


def run_one(job: dict) -> dict:
    base = Base.load(Path(job["base"]))
    seed = job["seed"]
    scratch = Path(job["scratch"]) / f"m{seed}"
    shutil.rmtree(scratch, ignore_errors=True)
    patches = [(n, o, bytes.fromhex(h)) for n, o, h in job.get("patches", [])]
    name, what = make_mutant(base, seed, scratch, patches)
    start = time.monotonic()
    result = {"seed": seed, "base": base.directory.name, "file": name, "mutation": what}
    opened: list[bool] = []
    try:
        errors = exercise(
            str(scratch / base.image), base.fmt, str(scratch), seed,
            job.get("writable", base.fmt in WRITABLE_FORMATS), opened,
        )  # fmt: skip
        result["errors"] = errors[:3]
        result["opened"] = bool(opened and opened[0])
        result["ok"] = True
    except MemoryError:
        result["ok"] = False
        result["failure"] = "MemoryError (address-space limit)\n" + traceback.format_exc()
    except BaseException as e:  # anything not an ImgfsError is the bug we are looking for
        result["ok"] = False
        result["failure"] = f"{type(e).__name__}: {e}\n" + traceback.format_exc()
    result["elapsed"] = time.monotonic() - start
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def worker_main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps({"start": job["seed"]}), flush=True)
        print(json.dumps(run_one(job)), flush=True)


# -- the parent side --------------------------------------------------------------------------


@dataclass
class Outcome:
    results: list[dict]
    failures: list[str]


def run_mutants(
    bases: list[Base],
    seeds: range | list[int],
    scratch: Path,
    patches: list[list[Patch]] | None = None,
) -> Outcome:
    """Run every seed against every base (seed i goes to base i % len(bases)) in one worker
    process; returns all results and a list of failure descriptions naming the seed.
    ``patches[i]``, when given, is the mutation of job i instead of its seed's."""
    jobs = [
        {"base": str(bases[i % len(bases)].directory), "seed": seed, "scratch": str(scratch)}
        for i, seed in enumerate(seeds)
    ]
    for job, job_patches in zip(jobs, patches or [], strict=False):
        job["patches"] = [(n, o, b.hex()) for n, o, b in job_patches]
    results: list[dict] = []
    failures: list[str] = []
    pending = list(jobs)
    while pending:
        done, fail, stuck = _run_worker(pending)
        results += done
        failures += fail
        finished = {r["seed"] for r in done}
        if stuck is None and not done:
            break
        # A worker that died or hung stops at ``stuck``: skip that job and go on.
        pending = [j for j in pending if j["seed"] not in finished and j["seed"] != stuck]
    for r in results:
        if not r["ok"]:
            failures.append(
                f"seed {r['seed']} ({r['base']}, {r['file']}: {r['mutation']}): {r['failure']}"
            )
        elif r["elapsed"] > MUTANT_DEADLINE:
            failures.append(
                f"seed {r['seed']} ({r['base']}, {r['file']}: {r['mutation']}): took "
                f"{r['elapsed']:.1f} s (deadline {MUTANT_DEADLINE} s)"
            )
    return Outcome(results, failures)


def _run_worker(jobs: list[dict]) -> tuple[list[dict], list[str], int | None]:
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.formats.hostile"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=repo,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def feed() -> None:
        assert proc.stdin is not None
        try:
            for job in jobs:
                proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.close()
        except BrokenPipeError:
            pass

    def base_of(seed: int | None) -> str:
        return next((Path(j["base"]).name for j in jobs if j["seed"] == seed), "?")

    threading.Thread(target=pump, daemon=True).start()
    threading.Thread(target=feed, daemon=True).start()
    results: list[dict] = []
    failures: list[str] = []
    current: int | None = None
    stuck: int | None = None
    while True:
        try:
            line = lines.get(timeout=HANG_TIMEOUT)
        except queue.Empty:
            proc.kill()
            proc.wait()
            failures.append(
                f"worker hung on seed {current} ({base_of(current)}) for {HANG_TIMEOUT} s"
            )
            stuck = current
            break
        if line is None:
            rc = proc.wait()
            if current is not None:
                err = proc.stderr.read() if proc.stderr else ""
                failures.append(
                    f"worker died (exit {rc}) on seed {current} ({base_of(current)}): {err[-2000:]}"
                )
                stuck = current
            break
        msg = json.loads(line)
        if "start" in msg:
            current = msg["start"]
        else:
            results.append(msg)
            current = None
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
    return results, failures, stuck


def scratch_dir(parent: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="mutants-", dir=parent))


if __name__ == "__main__":
    worker_main()
