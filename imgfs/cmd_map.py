"""``imgfs map IMAGE``: which guest ranges are data, zeros or unallocated, and in which image of
the backing chain, printed as ``qemu-img map`` prints them (same JSON keys, same merging, same
human table).

The answers come from each layer's block status (``BlockDriver.block_status``); the walk down
the chain here is qemu's (a range past the end of a shorter backing image is an absent zero
range of the overlay), and :class:`LayerPolicy` holds what qemu 7.2's driver for each format
reports differently from imgfs's own finer answer (checked against qemu-img map in
tests/cli/test_map.py): no block status at all for vhdx, bochs, cloop and dmg (one data range);
host-file holes inside allocated data called "zero and data" where qemu asks the host file
(static vdi, fixed vpc, vmdk flat extents, qcow2 with metadata preallocation) and plain data
where it does not (parallels). imgfs translates its three states into qemu's flags:

* ``present``: some layer of the chain holds the range (data, or a known-zero range);
* ``zero``: the range reads as zeros and the layer knows it (a zero cluster, a hole in a raw
  file, or nothing allocated anywhere in the chain);
* ``data``: the layer stores bytes for the range;
* ``offset``: where the bytes are in that layer's host file, for formats where qemu reports it
  (the table :data:`OFFSET_FORMATS`), and only for uncompressed, unencrypted data.
"""

from __future__ import annotations

import argparse
import bisect
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from imgfs.block import chain
from imgfs.block.disk import Disk, open_disk
from imgfs.block.driver import BlockDriver
from imgfs.block.extent import Allocation
from imgfs.block.hostfile import HostFile
from imgfs.errors import ImgfsError, Unsupported

# One block-status call covers at most this much, so a walk of a huge disk keeps going in
# bounded steps (qemu-img map asks for at most 1 GiB at a time too; merging hides the seams).
STEP = 1 << 30

# Formats whose data ranges qemu reports with a host offset ("offset" in JSON, "Mapped to" in
# the human table). The others give data without one.
OFFSET_FORMATS = frozenset(
    {"raw", "qcow2", "qcow", "qed", "vmdk", "vpc", "vdi", "parallels"}
    # Formats qemu does not read (no oracle): the offsets imgfs knows, for a useful table.
    | {"cow", "asif"}
)
# Formats for which qemu has no block status at all: the whole disk is one data range.
NO_STATUS_FORMATS = frozenset({"vhdx", "bochs", "cloop", "dmg"})
# Formats qemu opens without backing support: their unallocated ranges are "present" zeros
# (the driver itself says zero) rather than absent ones.
NO_BACKING_FORMATS = frozenset({"raw", "vdi", "vpc", "bochs", "cloop", "dmg", "vhdx"})
# Formats whose block-table drivers report a hole inside an allocated block as ZERO with its
# host offset; qemu calls that range data (and asks the host file only when it recurses).
HOLE_AS_ZERO_FORMATS = frozenset({"vdi", "parallels"})


@dataclass(slots=True)
class LayerStatus:
    """One layer's answer for a range, in the terms qemu uses."""

    allocation: Allocation
    length: int
    host_offset: int | None = None
    #: The file ``host_offset`` is in, when not the layer's own (a vmdk extent file).
    host_file: HostFile | None = None
    #: qemu asks the host file which parts of this data range are holes and calls those zero.
    recurse: bool = False


class LayerPolicy:
    """What qemu's driver for one layer reports, decided once per layer."""

    def __init__(self, layer: BlockDriver) -> None:
        self.layer = layer
        fmt = layer.format_name
        self.format = fmt
        self.recurse = False
        if fmt == "vdi":
            self.recurse = getattr(layer, "image_type", None) == VDI_STATIC
        elif fmt == "vpc":
            self.recurse = layer.info().format_specific.get("subformat") == "fixed"
        elif fmt == "qcow2":
            self.recurse = _qcow2_metadata_preallocated(layer)
        # Encrypted data has no plain copy in the host file: qemu gives no offset for it.
        self.offsets = fmt in OFFSET_FORMATS and not layer.info().encrypted

    def status(self, offset: int, length: int) -> LayerStatus:
        layer = self.layer
        if self.format in NO_STATUS_FORMATS:
            return LayerStatus(Allocation.DATA, length)
        if self.format == "vmdk":
            return self._vmdk_status(offset, length)
        ext = layer.block_status(offset, length)
        if ext.allocation is Allocation.ZERO and self.format in HOLE_AS_ZERO_FORMATS:
            if ext.host_offset is not None:
                return LayerStatus(Allocation.DATA, ext.length, ext.host_offset, None, self.recurse)
        if ext.allocation is Allocation.ZERO and self.format == "raw":
            return LayerStatus(Allocation.ZERO, ext.length, offset)
        recurse = self.recurse and ext.allocation is Allocation.DATA
        return LayerStatus(ext.allocation, ext.length, ext.host_offset, None, recurse)

    def _vmdk_status(self, offset: int, length: int) -> LayerStatus:
        from imgfs.formats.vmdk.extents import FlatExtent, State

        layer: Any = self.layer
        i = bisect.bisect_right(layer.starts, offset) - 1
        extent, rel = layer.extents[i], offset - layer.starts[i]
        n = min(length, extent.length - rel)
        if isinstance(extent, FlatExtent):
            # qemu calls a flat extent data throughout and asks the file for its holes.
            return LayerStatus(Allocation.DATA, n, extent.base + rel, extent.file, True)
        ext = layer.block_status(offset, n)
        if ext.allocation is Allocation.DATA and extent.file is not None:
            m = extent.map(rel, ext.length)
            if m.state is State.DATA and m.host_offset is not None:
                return LayerStatus(Allocation.DATA, m.length, m.host_offset, extent.file)
        return LayerStatus(ext.allocation, ext.length, ext.host_offset)


VDI_STATIC = 2


def _qcow2_metadata_preallocated(layer: Any) -> bool:
    """qemu's guess that a qcow2 image was made with preallocation=metadata: clearly more
    clusters are in use (by refcount) than the host file has allocated. Then it asks the host
    file for holes inside data clusters."""
    cluster_size = layer.cs
    real_clusters = layer.file.allocated_size() // cluster_size
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-layer.file.size() // cluster_size)
    if end_cluster < threshold:
        return False  # not even every cluster of the file in use would reach it
    in_use = 0
    for cluster in range(end_cluster):
        if in_use > threshold:
            break
        if layer.refcount(cluster):
            in_use += 1
    return in_use >= threshold


@dataclass(slots=True)
class MapEntry:
    """One line of ``qemu-img map``: a run of guest bytes with one set of flags."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None

    def mergeable(self, nxt: MapEntry) -> bool:
        """``nxt`` continues this entry: same flags and layer, and the host offsets (if any)
        run on without a gap."""
        if (self.depth, self.present, self.zero, self.data, self.filename) != (
            nxt.depth, nxt.present, nxt.zero, nxt.data, nxt.filename
        ):  # fmt: skip
            return False
        if (self.offset is None) != (nxt.offset is None):
            return False
        return self.offset is None or self.offset + self.length == nxt.offset

    def to_json(self) -> str:
        """The entry exactly as qemu-img writes it (its own spacing, key order)."""
        text = (
            f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth}, '
            f'"present": {_js(self.present)}, "zero": {_js(self.zero)}, "data": {_js(self.data)}'
        )
        if self.offset is not None:
            text += f', "offset": {self.offset}'
        return text + "}"

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "start": self.start, "length": self.length, "depth": self.depth,
            "present": self.present, "zero": self.zero, "data": self.data,
        }  # fmt: skip
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def _js(flag: bool) -> str:
    return "true" if flag else "false"


def layer_names(top: BlockDriver, given: str) -> list[str]:
    """Each layer's file name as qemu shows it: the top as the user gave it, each backing image
    as its stored name joined to the overlay's name (not made absolute)."""
    names = [given]
    for node in chain.layers(top):
        spec = node.backing_spec
        if spec is None or node.backing is None:
            break
        if os.path.isabs(spec.filename):
            names.append(spec.filename)
        else:
            names.append(os.path.join(os.path.dirname(names[-1]), spec.filename))
    return names


def map_entries(
    disk: Disk, given_name: str, start: int = 0, max_length: int | None = None
) -> Iterator[MapEntry]:
    """The merged entries of ``[start, start + max_length)`` of the disk (clamped to its end),
    first to last. An empty range gives one empty entry with every flag false, as qemu's."""
    layers = list(chain.layers(disk.top))
    policies = [LayerPolicy(layer) for layer in layers]
    names = layer_names(disk.top, given_name)
    size = disk.size if max_length is None else min(disk.size, start + max_length)
    offset = start
    if offset >= size:
        yield MapEntry(offset, 0, 0, False, False, False)
        return
    pending: MapEntry | None = None
    while offset < size:
        for entry in _entries_at(policies, names, offset, min(STEP, size - offset)):
            offset += entry.length
            if pending is not None and pending.mergeable(entry):
                pending.length += entry.length
                continue
            if pending is not None:
                yield pending
            pending = entry
    if pending is not None:
        yield pending


def _entries_at(
    policies: list[LayerPolicy], names: list[str], offset: int, length: int
) -> list[MapEntry]:
    """The entries for a run starting at ``offset``: the first layer down the chain that has
    it answers (qemu's walk: a range past the end of a shorter backing image is an absent zero
    range of the overlay)."""
    for depth, policy in enumerate(policies):
        st = policy.status(offset, length)
        length = st.length
        if st.allocation is not Allocation.UNALLOCATED:
            break
        below = policies[depth + 1].layer if depth + 1 < len(policies) else None
        if below is None:
            present = policy.format in NO_BACKING_FORMATS
            return [MapEntry(offset, length, depth, present, True, False, st.host_offset,
                             _name(names, depth, st))]  # fmt: skip
        if offset >= below.virtual_size:
            return [MapEntry(offset, length, depth, False, True, False, st.host_offset,
                             _name(names, depth, st))]  # fmt: skip
        length = min(length, below.virtual_size - offset)
    else:  # pragma: no cover - the loop returns or breaks
        raise AssertionError("unreachable")
    name = _name(names, depth, st)
    if st.allocation is Allocation.ZERO:
        return [MapEntry(offset, length, depth, True, True, False, st.host_offset, name)]
    host = st.host_offset if policy.offsets else None
    if host is None:
        return [MapEntry(offset, length, depth, True, False, True)]
    if not st.recurse:
        return [MapEntry(offset, length, depth, True, False, True, host, name)]
    # Split by the host file's holes: a hole is data that reads as zeros.
    file = st.host_file or policy.layer.file
    out: list[MapEntry] = []
    pos = 0
    while pos < length:
        if host + pos >= file.size():
            is_data, run = False, length - pos
        else:
            is_data, run = file.data_extents(host + pos, length - pos)
        out.append(MapEntry(offset + pos, run, depth, True, not is_data, True, host + pos, name))
        pos += run
    return out


def _name(names: list[str], depth: int, st: LayerStatus) -> str:
    """The file name qemu shows for a layer's host range: the layer's, or its extent file's
    (joined to the layer's name as qemu joins it)."""
    if st.host_file is not None:
        return os.path.join(os.path.dirname(names[depth]), os.path.basename(st.host_file.path))
    return names[depth]


# -- the command ------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("map", help="show where an image's data is (like qemu-img map)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-f", "--format", help="image format (default: probe)")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("--start-offset", type=_size, default=0, metavar="OFFSET",
                   help="map from this guest offset (default 0)")  # fmt: skip
    p.add_argument("--max-length", type=_size, default=None, metavar="LEN",
                   help="map at most this many bytes (default: to the end)")  # fmt: skip
    p.set_defaults(func=run)


def _size(text: str) -> int:
    from imgfs.create import parse_size

    try:
        return parse_size(text)
    except ImgfsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    disk = open_disk(args.image, args.format, read_only=True)
    try:
        entries = map_entries(disk, args.image, args.start_offset, args.max_length)
        if args.output == "json":
            _print_json(entries)
        else:
            _print_human(entries)
    finally:
        disk.close()
    return 0


def _print_json(entries: Iterator[MapEntry]) -> None:
    out = sys.stdout
    out.write("[")
    for n, entry in enumerate(entries):
        if n:
            out.write(",\n")
        out.write(entry.to_json())
    out.write("]\n")


def _print_human(entries: Iterator[MapEntry]) -> None:
    out = sys.stdout
    out.write("Offset          Length          Mapped to       File\n")
    for entry in entries:
        if not entry.data:
            continue
        if entry.offset is None:
            raise Unsupported(
                "file contains external, encrypted or compressed clusters; use --output=json"
            )
        if not entry.zero:  # data that reads as zeros (a hole under it) is not listed
            out.write(f"{_hex(entry.start)}{_hex(entry.length)}{_hex(entry.offset)}"
                      f"{entry.filename}\n")  # fmt: skip


def _hex(n: int) -> str:
    """C's ``%#-16x``: 0x-prefixed except for zero, left-justified in 16 columns."""
    return (f"{n:#x}" if n else "0").ljust(16)
