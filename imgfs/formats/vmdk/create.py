"""Creating vmdk images with qemu-img's ``-o`` options, in the layouts qemu-img and VMware
write: a sparse extent is header, embedded descriptor (20 sectors), redundant GD and its GTs,
GD and its GTs, padded to a whole grain; every GT is preallocated."""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Mapping

from imgfs.block.chain import resolve_relative
from imgfs.errors import CorruptImage, InvalidRequest, Unsupported
from imgfs.formats.vmdk import descriptor as vmdk_descriptor
from imgfs.formats.vmdk.extents import (
    COMPRESS_DEFLATE,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_REDUNDANT_GT,
    FLAG_VALID_NEWLINE,
    FLAG_ZEROED_GRAIN,
    KDMV_HEADER,
    KDMV_MAGIC,
    SECTOR,
)
from imgfs.units import bool_option, choice_option

CREATE_OPTIONS: dict[str, str] = {
    "subformat": "monolithicSparse (default), monolithicFlat, twoGbMaxExtentSparse, "
    "twoGbMaxExtentFlat or streamOptimized",
    "adapter_type": "ide (default), lsilogic, buslogic or legacyESX",
    "hwversion": "virtual hardware version (default 4)",
    "toolsversion": "VMware guest tools version (default 2147483647)",
    "zeroed_grain": "on/off: zeroed-grain table entries, so zero writes allocate nothing",
    "compat6": "on/off: VMDK version 6 (hwversion 6)",
    "backing_file": "parent image (monolithicSparse or twoGbMaxExtentSparse children only)",
    "backing_fmt": "must be vmdk",
    "size": "virtual size (the size argument wins)",
}
SUBFORMATS = (
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
)
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX")
GRAIN_SECTORS = 128  # 64 KiB grains
GTES_PER_GT = 512
DESCRIPTOR_SECTORS = 20
SPLIT_SECTORS = 4194304  # twoGbMaxExtent* files hold 2 GiB each
MAX_CREATE_SIZE = 1 << 46  # 64 TiB


def read_descriptor_bytes(path: str) -> bytes:
    """The descriptor of a vmdk image (embedded or a file of its own)."""
    with open(path, "rb") as f:
        head = f.read(512)
        if head[:4] == b"KDMV":
            fields = KDMV_HEADER.unpack(head)
            if not fields[5] or fields[6] * SECTOR > vmdk_descriptor.MAX_DESCRIPTOR_SIZE:
                raise CorruptImage(f"{path}: no usable descriptor")
            f.seek(fields[5] * SECTOR)
            return f.read(fields[6] * SECTOR)
        return head + f.read(vmdk_descriptor.MAX_DESCRIPTOR_SIZE)


def sparse_extent_bytes(
    capacity: int, *, descriptor: bytes | None, zeroed_grain: bool, stream: bool
) -> tuple[bytes, int]:
    """Header, descriptor area and tables of an empty sparse extent, and its total size in
    bytes (the tables' tail is zeros, left to a truncate)."""
    span = GRAIN_SECTORS * GTES_PER_GT
    gd_entries = -(-capacity // span)
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    gt_sectors = GTES_PER_GT * 4 // SECTOR
    rgd = 1 + DESCRIPTOR_SECTORS
    rgt_start = rgd + gd_sectors
    gd = rgt_start + gd_entries * gt_sectors
    gt_start = gd + gd_sectors
    overhead = -(-(gt_start + gd_entries * gt_sectors) // GRAIN_SECTORS) * GRAIN_SECTORS
    flags = FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GT
    version = 1
    if zeroed_grain:
        flags |= FLAG_ZEROED_GRAIN
        version = 2
    if stream:
        flags |= FLAG_COMPRESSED | FLAG_MARKERS
        version = 3
    header = KDMV_HEADER.pack(
        KDMV_MAGIC,
        version,
        flags,
        capacity,
        GRAIN_SECTORS,
        1,
        DESCRIPTOR_SECTORS,
        GTES_PER_GT,
        rgd,
        gd,
        overhead,
        0,
        b"\n \r\n",
        COMPRESS_DEFLATE if stream else 0,
    )
    out = bytearray(gt_start * SECTOR)
    out[0:SECTOR] = header
    if descriptor is not None:
        if len(descriptor) > DESCRIPTOR_SECTORS * SECTOR:
            raise InvalidRequest("vmdk descriptor too long for its 20 sectors")
        out[SECTOR : SECTOR + len(descriptor)] = descriptor
    for directory, tables in ((rgd, rgt_start), (gd, gt_start)):
        entries = struct.pack(
            f"<{gd_entries}I", *(tables + i * gt_sectors for i in range(gd_entries))
        )
        out[directory * SECTOR : directory * SECTOR + len(entries)] = entries
    return bytes(out), overhead * SECTOR


def _write_file(path: str, data: bytes, size: int) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)


def _geometry(capacity: int, adapter: str) -> tuple[int, int, int]:
    heads = 16 if adapter == "ide" else 255
    sectors = 63
    cylinders = min(capacity // (heads * sectors), 16383)
    return cylinders, heads, sectors


def create(path: str, size: int, options: Mapping[str, str]) -> None:
    unknown = set(options) - set(CREATE_OPTIONS)
    if unknown:
        raise InvalidRequest(f"unknown vmdk option(s): {', '.join(sorted(unknown))}")
    subformat = choice_option(options, "subformat", SUBFORMATS, "monolithicSparse")
    adapter = choice_option(options, "adapter_type", ADAPTERS, "ide")
    compat6 = bool_option(options, "compat6")
    zeroed_grain = bool_option(options, "zeroed_grain")
    hwversion = options.get("hwversion")
    if hwversion is not None and compat6:
        raise InvalidRequest("vmdk: compat6 and hwversion cannot both be given")
    hwversion = hwversion or ("6" if compat6 else "4")
    if not hwversion.isdigit():
        raise InvalidRequest(f"vmdk hwversion {hwversion!r}: expected a number")
    toolsversion = options.get("toolsversion", "2147483647")
    if not toolsversion.isdigit():
        raise InvalidRequest(f"vmdk toolsversion {toolsversion!r}: expected a number")
    if size <= 0 or size > MAX_CREATE_SIZE:
        # qemu-img cannot open an empty vmdk (it makes one, then refuses it), so neither do we.
        raise InvalidRequest(f"vmdk size {size}: must be 1 to {MAX_CREATE_SIZE} bytes")
    backing_fmt = options.get("backing_fmt")
    if backing_fmt not in (None, "vmdk"):
        raise InvalidRequest(f"vmdk backing_fmt {backing_fmt!r}: a vmdk parent must be vmdk")
    capacity = -(-size // SECTOR)

    parent_cid = 0xFFFFFFFF
    backing = options.get("backing_file")
    if backing:
        if "Flat" in subformat or subformat == "streamOptimized":
            raise Unsupported(f"vmdk: a {subformat} image cannot have a backing file")
        parent = resolve_relative(backing, path)
        try:
            parent_desc = vmdk_descriptor.parse(read_descriptor_bytes(parent), parent)
        except OSError as e:
            raise InvalidRequest(f"vmdk backing_file {backing!r}: {e.strerror}") from None
        parent_cid = parent_desc.cid if parent_desc.cid is not None else 0xFFFFFFFF

    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    stem = base[:-5] if base.lower().endswith(".vmdk") else base
    cylinders, heads, sectors = _geometry(capacity, adapter)
    ddb = {
        "virtualHWVersion": hwversion,
        "geometry.cylinders": str(cylinders),
        "geometry.heads": str(heads),
        "geometry.sectors": str(sectors),
        "adapterType": adapter,
        "toolsVersion": toolsversion,
    }

    def render(extent_lines: list[str]) -> bytes:
        cid = secrets.randbits(32)
        while cid == 0xFFFFFFFF:
            cid = secrets.randbits(32)
        return vmdk_descriptor.render(
            cid=cid,
            parent_cid=parent_cid,
            create_type=subformat,
            extent_lines=extent_lines,
            ddb=ddb,
            parent_hint=backing or None,
        ).encode()

    if subformat in ("monolithicSparse", "streamOptimized"):
        text = render([f'RW {capacity} SPARSE "{base}"'])
        data, total = sparse_extent_bytes(
            capacity,
            descriptor=text,
            zeroed_grain=zeroed_grain,
            stream=subformat == "streamOptimized",
        )
        _write_file(path, data, total)
        return

    if subformat == "monolithicFlat":
        pieces = [capacity]
    else:
        pieces = [min(SPLIT_SECTORS, capacity - s) for s in range(0, capacity, SPLIT_SECTORS)]
    lines = []
    for n, sectors_here in enumerate(pieces, 1):
        if subformat == "monolithicFlat":
            name = f"{stem}-flat.vmdk"
        elif subformat == "twoGbMaxExtentFlat":
            name = f"{stem}-f{n:03d}.vmdk"
        else:
            name = f"{stem}-s{n:03d}.vmdk"
        extent_path = os.path.join(directory, name)
        if subformat.endswith("Sparse"):
            data, total = sparse_extent_bytes(
                sectors_here, descriptor=None, zeroed_grain=zeroed_grain, stream=False
            )
            _write_file(extent_path, data, total)
            lines.append(f'RW {sectors_here} SPARSE "{name}"')
        else:
            _write_file(extent_path, b"", sectors_here * SECTOR)
            lines.append(f'RW {sectors_here} FLAT "{name}" 0')
    with open(path, "wb") as f:
        f.write(render(lines))
