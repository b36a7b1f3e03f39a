"""Parallels Desktop ``.hdd`` bundles: a directory holding ``DiskDescriptor.xml`` and the
``.hds`` files it names (QEMU's docs/interop/prl-xml.txt). The image file of this driver is
the descriptor; the bundle is one disk.

* ``<Disk_Parameters><Disk_size>`` is the disk size in sectors;
* each ``<Storage>`` covers sectors ``[Start, End)`` of the disk (several storages make a
  "split" disk, concatenated in order) and lists one ``<Image>`` per snapshot: a GUID, a
  ``Type`` ("Plain": a raw file; "Compressed": a Parallels expandable image) and a ``File``;
* ``<Snapshots>`` holds ``<Shot>`` GUID/ParentGUID pairs. The top (current) snapshot is
  ``<TopGUID>`` when present, else the predefined {5fbaabe3-6958-40ff-92a7-860e329aab41},
  else the one leaf of the tree. Reads of a cluster the top image lacks go to its parent
  snapshot's image of the same storage, down to the root; only the top images are written.
"""

from __future__ import annotations

import bisect
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self

from imgfs.block.chain import chain_block_status
from imgfs.block.driver import BlockDriver, ImageInfo, OpenOptions, ProbeInput
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, ImgfsError, Unsupported
from imgfs.formats.parallels import ParallelsDriver
from imgfs.formats.raw import RawDriver

SECTOR = 512
ROOT_TAG = "Parallels_disk_image"
DEFAULT_TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
NULL_GUID = "{00000000-0000-0000-0000-000000000000}"
MAX_DESCRIPTOR_SIZE = 1024 * 1024
MAX_STORAGES = 4096
MAX_SNAPSHOT_DEPTH = 64


@dataclass(frozen=True, slots=True)
class StorageSpec:
    start: int  # bytes
    end: int  # bytes
    images: dict[str, tuple[str, str]]  # GUID -> (type, file)


@dataclass(frozen=True, slots=True)
class Descriptor:
    disk_size: int  # bytes
    storages: list[StorageSpec]
    chain: list[str]  # snapshot GUIDs, top first


def _text(parent: ET.Element, tag: str, path: str) -> str:
    node = parent.find(tag)
    if node is None or node.text is None:
        raise CorruptImage(f"{path}: DiskDescriptor.xml lacks <{tag}>")
    return node.text.strip()


def _int(parent: ET.Element, tag: str, path: str) -> int:
    value = _text(parent, tag, path)
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise CorruptImage(f"{path}: bad <{tag}> {value!r} in DiskDescriptor.xml")
    return int(value)


def parse_descriptor(data: bytes, path: str) -> Descriptor:
    if len(data) > MAX_DESCRIPTOR_SIZE:
        raise CorruptImage(f"{path}: DiskDescriptor.xml of {len(data)} bytes is too large")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise CorruptImage(f"{path}: DiskDescriptor.xml with a DTD or entities is refused")
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, LookupError, ValueError) as e:
        # LookupError: an XML declaration naming an encoding Python does not know.
        raise CorruptImage(f"{path}: DiskDescriptor.xml is not valid XML ({e})") from None
    if root.tag != ROOT_TAG:
        raise CorruptImage(f"{path}: XML root is <{root.tag}>, not <{ROOT_TAG}>")
    params = root.find("Disk_Parameters")
    if params is None:
        raise CorruptImage(f"{path}: DiskDescriptor.xml lacks <Disk_Parameters>")
    disk_sectors = _int(params, "Disk_size", path)
    padding = params.find("Padding")
    if padding is not None and (padding.text or "0").strip() not in ("", "0"):
        raise Unsupported(f"{path}: Parallels disk with Padding {padding.text!r}")
    engine = params.find("Encryption/Engine")
    if engine is not None and (engine.text or "").strip() not in ("", NULL_GUID):
        raise Unsupported(f"{path}: encrypted Parallels disk (engine {engine.text!r})")
    storages: list[StorageSpec] = []
    for node in root.findall("StorageData/Storage"):
        if len(storages) >= MAX_STORAGES:
            raise CorruptImage(f"{path}: more than {MAX_STORAGES} storages")
        images: dict[str, tuple[str, str]] = {}
        for image in node.findall("Image"):
            guid = _text(image, "GUID", path).lower()
            kind = _text(image, "Type", path)
            if kind not in ("Plain", "Compressed"):
                raise Unsupported(f"{path}: Parallels image type {kind!r}")
            images[guid] = (kind, _text(image, "File", path))
        storages.append(
            StorageSpec(
                _int(node, "Start", path) * SECTOR, _int(node, "End", path) * SECTOR, images
            )
        )
    if not storages:
        raise CorruptImage(f"{path}: DiskDescriptor.xml has no <Storage>")
    expected = 0
    for s in storages:
        if s.start != expected or s.end <= s.start:
            raise CorruptImage(
                f"{path}: storage {s.start // SECTOR}-{s.end // SECTOR} does not follow "
                f"sector {expected // SECTOR}"
            )
        expected = s.end
    if expected != disk_sectors * SECTOR:
        raise CorruptImage(
            f"{path}: storages end at sector {expected // SECTOR}, disk size is {disk_sectors}"
        )
    return Descriptor(disk_sectors * SECTOR, storages, _snapshot_chain(root, storages, path))


def _snapshot_chain(root: ET.Element, storages: list[StorageSpec], path: str) -> list[str]:
    parents: dict[str, str] = {}
    for shot in root.findall("Snapshots/Shot"):
        parents[_text(shot, "GUID", path).lower()] = _text(shot, "ParentGUID", path).lower()
    top_node = root.find("Snapshots/TopGUID")
    if top_node is not None and top_node.text and top_node.text.strip():
        top = top_node.text.strip().lower()
    elif DEFAULT_TOP_GUID in parents or not parents:
        top = DEFAULT_TOP_GUID
    else:
        leaves = set(parents) - set(parents.values())
        if len(leaves) != 1:
            raise CorruptImage(f"{path}: cannot tell the top snapshot among {sorted(leaves)}")
        top = leaves.pop()
    chain = [top]
    while True:
        parent = parents.get(chain[-1], NULL_GUID)
        if parent == NULL_GUID:
            break
        if parent in chain or len(chain) >= MAX_SNAPSHOT_DEPTH:
            raise CorruptImage(f"{path}: snapshot chain loops or is too deep at {parent}")
        chain.append(parent)
    for s in storages:
        for guid in chain:
            if guid not in s.images:
                raise CorruptImage(
                    f"{path}: storage at sector {s.start // SECTOR} has no image for "
                    f"snapshot {guid}"
                )
    return chain


class ParallelsHddDriver(BlockDriver):
    format_name = "parallels-hdd"
    supports_write = True

    def __init__(self, file: HostFile, options: OpenOptions, desc: Descriptor) -> None:
        super().__init__(file, options)
        self.desc = desc
        self._starts = [s.start for s in desc.storages]
        self.tops: list[BlockDriver] = []  # one per storage; backing = parent snapshot's image
        self._all: list[BlockDriver] = []

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        head = probe.head[:4096].lstrip()
        if head.startswith(b"<?xml") or head.startswith(b"<" + ROOT_TAG.encode()):
            if b"<" + ROOT_TAG.encode() in head:
                return 100
        return 0

    @classmethod
    def _read_descriptor(cls, path: str) -> Descriptor:
        with open(path, "rb") as f:
            data = f.read(MAX_DESCRIPTOR_SIZE + 1)
        return parse_descriptor(data, path)

    @classmethod
    def companion_files(cls, path: str) -> list[str]:
        try:
            desc = cls._read_descriptor(path)
        except (ImgfsError, OSError):
            return []
        return [file for s in desc.storages for (_, file) in s.images.values()]

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        size = file.size()
        if size > MAX_DESCRIPTOR_SIZE:
            raise CorruptImage(f"{file.path}: DiskDescriptor.xml of {size} bytes is too large")
        desc = parse_descriptor(bytes(file.pread(0, size)), file.path)
        if options.open_file is None:
            raise Unsupported(f"{file.path}: cannot open the bundle's .hds files")
        self = cls(file, options, desc)
        try:
            self._open_parts()
        except BaseException:
            self._close_parts()
            raise
        return self

    def _open_parts(self) -> None:
        assert self.options.open_file is not None
        for storage in self.desc.storages:
            below: BlockDriver | None = None
            # Open root first so each overlay can name its parent as backing.
            for depth, guid in reversed(list(enumerate(self.desc.chain))):
                kind, name = storage.images[guid]
                writable = depth == 0 and not self.read_only
                host = self.options.open_file(name, writable)
                opts = OpenOptions(read_only=not host.writable, cache=self.options.cache)
                try:
                    part: BlockDriver = (
                        RawDriver.open(host, opts)
                        if kind == "Plain"
                        else ParallelsDriver.open(host, opts)
                    )
                except BaseException:
                    host.close()
                    raise
                self._all.append(part)
                if below is not None:
                    part.attach_backing(below)
                if kind == "Compressed" and part.virtual_size < storage.end - storage.start:
                    raise CorruptImage(
                        f"{self.file.path}: {name} holds {part.virtual_size} bytes, its storage "
                        f"needs {storage.end - storage.start}"
                    )
                below = part
            assert below is not None
            self.tops.append(below)
            if below.read_only:
                self.read_only = True

    def _close_parts(self) -> None:
        first: BaseException | None = None
        for part in reversed(self._all):
            try:
                part.close()
            except BaseException as e:
                first = first or e
        self._all.clear()
        if first is not None:
            raise first

    # -- geometry and data ----------------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self.desc.disk_size

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[BlockDriver, int, int]]:
        end = offset + length
        i = bisect.bisect_right(self._starts, offset) - 1
        while offset < end:
            storage = self.desc.storages[i]
            n = min(end, storage.end) - offset
            yield self.tops[i], offset - storage.start, n
            offset += n
            i += 1

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        parts = [top.read(off, n) for top, off, n in self._pieces(offset, length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_writable()
        view = memoryview(data).cast("B")
        done = 0
        for top, off, n in self._pieces(offset, len(view)):
            top.write(off, view[done : done + n])
            done += n

    def discard(self, offset: int, length: int) -> None:
        self.check_writable()
        for top, off, n in self._pieces(offset, length):
            if top.backing is None:  # discarding an overlay would expose the parent's data
                top.discard(off, n)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.check_writable()
        for top, off, n in self._pieces(offset, length):
            top.write_zeroes(off, n, may_unmap)

    def block_status(self, offset: int, length: int) -> Extent:
        top, off, n = next(self._pieces(offset, length))
        ext = chain_block_status(top, off, n)
        allocation = Allocation.ZERO if ext.allocation is Allocation.UNALLOCATED else ext.allocation
        return Extent(offset, ext.length, allocation)

    def flush(self) -> None:
        for top in self.tops:
            top.flush()

    def info(self) -> ImageInfo:
        info = super().info()
        info.actual_size += sum(part.file.allocated_size() for part in self._all)
        info.format_specific = {
            "storages": len(self.desc.storages),
            "snapshots": len(self.desc.chain),
            "top-snapshot": self.desc.chain[0],
        }
        return info

    def close(self) -> None:
        try:
            self._close_parts()
        finally:
            self.file.close()


register(ParallelsHddDriver)
