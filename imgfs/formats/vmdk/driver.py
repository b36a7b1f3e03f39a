"""vmdk: VMware virtual disks. A text descriptor (embedded in a sparse file or a file of its own)
lists extents; the disk is their concatenation. Read: monolithicSparse/Flat, twoGbMaxExtent*,
vmfs, vmfsSparse, streamOptimized, seSparse, parent chains. Write: hosted sparse and flat
extents (streamOptimized, seSparse and VMFS sparse open read-only)."""

from __future__ import annotations

import bisect
import os
import secrets
import struct
import threading
from collections.abc import Iterator
from collections.abc import Mapping as MappingType
from typing import Self

from imgfs.block.chain import resolve_relative
from imgfs.block.driver import (
    BackingSpec,
    BlockDriver,
    CheckResult,
    ImageInfo,
    OpenOptions,
    ProbeInput,
    RepairMode,
)
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, InvalidRequest, Unsupported
from imgfs.formats.vmdk import create as vmdk_create
from imgfs.formats.vmdk import descriptor as vmdk_descriptor
from imgfs.formats.vmdk.extents import (
    COWD_HEADER,
    COWD_MAGIC,
    KDMV_MAGIC,
    SECTOR,
    FlatExtent,
    SeSparseExtent,
    SparseExtent,
    State,
    VmdkExtent,
    ZeroExtent,
    open_sparse,
    read_kdmv_header,
)

FLAT_KINDS = ("FLAT", "VMFS", "VMFSRAW", "VMFSRDM")
NO_PARENT_CID = 0xFFFFFFFF
# The biggest disk we accept from a descriptor: 2^56 bytes (64 PiB), far past VMware's 62 TiB.
MAX_VIRTUAL_SIZE = 1 << 56


class VmdkDriver(BlockDriver):
    format_name = "vmdk"
    supports_write = True
    create_options = vmdk_create.CREATE_OPTIONS

    def __init__(self, file: HostFile, options: OpenOptions) -> None:
        super().__init__(file, options)
        self.descriptor: vmdk_descriptor.Descriptor | None = None
        # (byte offset, byte size) of a descriptor embedded in a sparse file; None when the
        # descriptor is the whole image file.
        self.embedded_descriptor: tuple[int, int] | None = None
        self.extents: list[VmdkExtent] = []
        self.starts: list[int] = []
        self.size = 0
        self.files: dict[str, HostFile] = {}
        self.notes: list[str] = []
        self.cid_updated = False
        self.cid_lock = threading.Lock()

    # -- discovery ------------------------------------------------------------------------------

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        if probe.head[:4] in (b"KDMV", b"COWD"):
            return 100
        if vmdk_descriptor.looks_like_descriptor(probe.head):
            return 100
        return 0

    @classmethod
    def companion_files(cls, path: str) -> list[str]:
        try:
            with open(path, "rb") as f:
                head = f.read(512)
                if head[:4] in (b"KDMV", b"COWD"):
                    return []  # a sparse file with an embedded descriptor is its own extent
                raw = head + f.read(vmdk_descriptor.MAX_DESCRIPTOR_SIZE)
                if not vmdk_descriptor.looks_like_descriptor(raw):
                    return []
            me = os.path.realpath(path)
            return [
                name
                for name in vmdk_descriptor.extent_names(raw)
                if os.path.realpath(resolve_relative(name, path)) != me
            ]
        except Exception:
            return []

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        self = cls(file, options)
        try:
            self._open()
        except BaseException:
            self._close_extent_files()
            raise
        return self

    def _open(self) -> None:
        path = self.file.path
        head = bytes(self.file.pread(0, 512))
        (magic,) = struct.unpack_from("<I", head)
        if magic == KDMV_MAGIC:
            fields = read_kdmv_header(self.file, head)
            desc_offset, desc_size = fields[5], fields[6]
            blank = desc_offset and not bytes(self.file.pread(desc_offset * SECTOR, 64)).strip(
                b"\0"
            )
            if desc_offset == 0 or blank:
                raise Unsupported(
                    f"{path}: a sparse extent without a descriptor; open the descriptor file "
                    "that names it"
                )
            if desc_size * SECTOR > vmdk_descriptor.MAX_DESCRIPTOR_SIZE:
                raise CorruptImage(f"{path}: descriptor size {desc_size} sectors is too big")
            raw = bytes(self.file.pread(desc_offset * SECTOR, desc_size * SECTOR))
            self.embedded_descriptor = (desc_offset * SECTOR, desc_size * SECTOR)
        elif magic == COWD_MAGIC:
            # A bare VMFS sparse file: one extent covering its own capacity.
            sectors = COWD_HEADER.unpack_from(head)[3]
            self._add_extent(open_sparse(self.file, sectors * SECTOR, False))
            self.read_only = True
            self.notes.append("VMFS sparse (COWD) extents are opened read-only")
            return
        else:
            size = self.file.size()
            if size > vmdk_descriptor.MAX_DESCRIPTOR_SIZE:
                raise CorruptImage(f"{path}: {size} bytes is too big for a vmdk descriptor")
            raw = bytes(self.file.pread(0, size))
            if not vmdk_descriptor.looks_like_descriptor(raw):
                raise CorruptImage(f"{path}: neither a sparse extent nor a vmdk descriptor")
        desc = vmdk_descriptor.parse(raw, path)
        self.descriptor = desc
        if self.embedded_descriptor is not None:
            # A sparse file with its descriptor inside is one extent, itself, whatever name
            # the descriptor's extent line gives (tools rename such files freely).
            capacity = fields[3]
            self._add_extent(open_sparse(self.file, capacity * SECTOR, not self.read_only))
        else:
            if not desc.extents:
                raise CorruptImage(f"{path}: descriptor lists no extents")
            for line in desc.extents:
                self._add_extent(self._open_extent(line))
            # Metadata caches are bounded per disk, not per extent.
            for extent in self.extents:
                if isinstance(extent, SparseExtent):
                    extent.share_caches(len(self.extents))
        if self.size > MAX_VIRTUAL_SIZE:
            raise CorruptImage(f"{path}: disk size {self.size} bytes is beyond any vmdk")
        if not self.read_only:
            blocked = [e for e in self.extents if not e.writable and not isinstance(e, ZeroExtent)]
            if blocked:
                self.read_only = True
                reason = getattr(blocked[0], "read_only_reason", None)
                self.notes.append(
                    f"opened read-only: imgfs does not write this {blocked[0].kind} extent"
                    + (f" because {reason}" if reason else "")
                )
        if not self.read_only and self._stream_extents():
            self.notes.append(
                "streamOptimized: writes append whole deflated grains; rewritten grains leave "
                "their old copy behind (convert to reclaim the space)"
            )
        if any(isinstance(e, SparseExtent) and e.compressed for e in self.extents):
            self.cheap_reads = False  # type: ignore[misc]

    def _add_extent(self, extent: VmdkExtent) -> None:
        if extent.length == 0:
            return  # holds no guest bytes; skipping it keeps every lookup moving forward
        self.starts.append(self.size)
        self.extents.append(extent)
        self.size += extent.length

    def _open_extent(self, line: vmdk_descriptor.ExtentLine) -> VmdkExtent:
        path = self.file.path
        length = line.sectors * SECTOR
        if line.kind == "ZERO":
            return ZeroExtent(None, length, False)
        if line.access == "NOACCESS":
            raise Unsupported(f"{path}: extent {line.filename!r} is NOACCESS")
        # The lengths' sum is capped later; a flat extent's offset is not part of it and reaches
        # pread.
        if line.offset * SECTOR > MAX_VIRTUAL_SIZE:
            raise CorruptImage(
                f"{path}: extent {line.filename!r} starts at sector {line.offset}, past any file"
            )
        want_write = not self.read_only and line.access == "RW"
        assert line.filename is not None
        file = self._extent_file(line.filename, want_write)
        writable = want_write and file.writable
        if line.kind in FLAT_KINDS and file is self.file:
            # Its data would be the descriptor's text, and writes would overwrite it.
            raise CorruptImage(f"{path}: flat extent {line.filename!r} is the descriptor itself")
        if line.kind in FLAT_KINDS:
            start = line.offset * SECTOR
            if writable and start > file.size() and not file.is_block_device:
                # Writes would grow the file to wherever the descriptor says (terabytes).
                flat = FlatExtent(file, length, start, False)
                flat.read_only_reason = (
                    f"extent {line.filename!r} starts at byte {start}, past the end of its "
                    f"file ({file.size()} bytes)"
                )
                return flat
            return FlatExtent(file, length, start, writable)
        if line.kind in ("SPARSE", "VMFSSPARSE"):
            return open_sparse(file, length, writable)
        if line.kind == "SESPARSE":
            return SeSparseExtent(file, length)
        raise Unsupported(f"{path}: extent type {line.kind}")

    def _extent_file(self, name: str, want_write: bool) -> HostFile:
        real = os.path.realpath(resolve_relative(name, self.file.path))
        if real == os.path.realpath(self.file.path):
            return self.file
        if real in self.files:
            return self.files[real]
        if self.options.open_file is None:
            raise Unsupported(f"{self.file.path}: cannot open extent files here")
        if not os.path.exists(real):
            raise CorruptImage(f"{self.file.path}: extent file {name!r} not found")
        file = self.options.open_file(name, want_write)
        self.files[real] = file
        return file

    # -- geometry -------------------------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self.size

    @property
    def backing_spec(self) -> BackingSpec | None:
        if self.descriptor is None:
            return None
        hint = self.descriptor.parent_hint
        return BackingSpec(hint, "vmdk") if hint else None

    @property
    def cid(self) -> int | None:
        return self.descriptor.cid if self.descriptor else None

    # -- data -----------------------------------------------------------------------------------

    def _locate(self, offset: int) -> tuple[VmdkExtent, int]:
        i = bisect.bisect_right(self.starts, offset) - 1
        return self.extents[i], i

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        pieces: list[bytes | bytearray | memoryview] = []
        pos, end = offset, offset + length
        while pos < end:
            extent, i = self._locate(pos)
            rel = pos - self.starts[i]
            m = extent.map_for_read(rel, min(end - pos, extent.length - rel))
            if m.state is State.DATA:
                assert extent.file is not None and m.host_offset is not None
                pieces.append(extent.file.pread(m.host_offset, m.length))
            elif m.state is State.ZERO:
                pieces.append(bytes(m.length))
            elif m.state is State.UNALLOCATED:
                pieces.append(self.read_backing(pos, m.length))
            else:
                pieces.append(extent.read_compressed(rel, m.length))
            pos += m.length
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def _before_write(self) -> None:
        self.check_writable()
        if not self.cid_updated:
            with self.cid_lock:
                if not self.cid_updated:
                    self._update_cid()

    def _update_cid(self) -> None:
        """VMware gives the disk a new content ID at its first write after opening, so a child
        made from the old state sees its parent changed."""
        desc = self.descriptor
        if desc is None:
            self.cid_updated = True
            return
        old = desc.cid
        new = old
        while new == old or new == NO_PARENT_CID:
            new = secrets.randbits(32)
        self._write_descriptor(desc.with_cid(new))
        desc.keys["CID"] = f"{new:08x}"
        self.cid_updated = True

    def _write_descriptor(self, new_text: str) -> None:
        """Replace the descriptor text, in its embedded area or as the whole image file."""
        desc = self.descriptor
        assert desc is not None
        text = new_text.encode()
        old_length = len(desc.text.encode())
        if self.embedded_descriptor is not None:
            offset, size = self.embedded_descriptor
            if len(text) > size:
                raise Unsupported(f"{self.file.path}: the new descriptor does not fit its space")
            self.file.pwrite(offset, text.ljust(min(size, max(len(text), old_length)), b"\0"))
        else:
            self.file.pwrite(0, text)
            if len(text) < old_length:
                self.file.truncate(len(text))
        desc.text = new_text

    def _each_extent(self, offset: int, length: int) -> Iterator[tuple[VmdkExtent, int, int, int]]:
        pos, end = offset, offset + length
        while pos < end:
            extent, i = self._locate(pos)
            base = self.starts[i]
            n = min(end - pos, extent.length - (pos - base))
            yield extent, base, pos, n
            pos += n

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._before_write()
        view = memoryview(data).cast("B")
        for extent, base, pos, n in self._each_extent(offset, len(view)):
            extent.write(
                pos - base,
                view[pos - offset : pos - offset + n],
                lambda rel, size, base=base: self.read_backing(base + rel, size),
            )

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._before_write()
        for extent, base, pos, n in self._each_extent(offset, length):
            extent.zero(
                pos - base,
                n,
                lambda rel, size, base=base: self.read_backing(base + rel, size),
                may_unmap,
            )

    def _stream_extents(self) -> list[SparseExtent]:
        return [e for e in self.extents if isinstance(e, SparseExtent) and e.compressed]

    def compressed_write_unit(self) -> int:
        stream = self._stream_extents()
        if not stream:
            raise Unsupported(
                f"{self.file.path}: only streamOptimized vmdk images hold compressed grains"
            )
        return stream[0].grain_size

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.compressed_write_unit()  # refuses images without compressed grains
        self.write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        self._before_write()
        # Flat extents punch holes; sparse grains stay (VMDK has no free-grain bookkeeping).
        for extent, base, pos, n in self._each_extent(offset, length):
            extent.discard(pos - base, n)

    def flush(self) -> None:
        if self.read_only:
            return
        for file in self._all_files():
            file.sync()

    def _all_files(self) -> list[HostFile]:
        return [self.file, *self.files.values()]

    def block_status(self, offset: int, length: int) -> Extent:
        extent, i = self._locate(offset)
        rel = offset - self.starts[i]
        m = extent.map(rel, min(length, extent.length - rel))
        if m.state is State.ZERO:
            return Extent(offset, m.length, Allocation.ZERO)
        if m.state is State.UNALLOCATED:
            return Extent(offset, m.length, Allocation.UNALLOCATED)
        host = m.host_offset if extent.file is self.file else None
        return Extent(offset, m.length, Allocation.DATA, host_offset=host)

    # -- management -----------------------------------------------------------------------------

    def info(self) -> ImageInfo:
        info = super().info()
        info.actual_size = sum(f.allocated_size() for f in self._all_files())
        sparse = [e for e in self.extents if isinstance(e, SparseExtent | SeSparseExtent)]
        if sparse:
            info.cluster_size = sparse[0].grain_size
        desc = self.descriptor
        specific: dict[str, object] = {}
        if desc is not None:
            if desc.cid is not None:
                specific["cid"] = desc.cid
            if desc.parent_cid is not None:
                specific["parent-cid"] = desc.parent_cid
            specific["create-type"] = desc.create_type
        specific["extents"] = [e.info() for e in self.extents]
        if self.embedded_descriptor is not None:
            specific["extents"][0]["format"] = ""  # no extent line: qemu-img shows it empty
        info.format_specific = specific
        notes = list(self.notes)
        backing = self.backing
        if desc is not None and isinstance(backing, VmdkDriver):
            if desc.parent_cid is not None and backing.cid is not None:
                if desc.parent_cid != backing.cid:
                    notes.append(
                        f"parentCID {desc.parent_cid:08x} does not match the parent's CID "
                        f"{backing.cid:08x}: the parent changed after this disk was made"
                    )
        info.notes = notes
        return info

    def resize(self, new_size: int) -> None:
        """Grow a monolithicSparse or monolithicFlat disk (qemu-img cannot resize vmdk at all).
        Sparse: the header's capacity grows; when the grain directory must grow, new
        directories and tables are written at the end of the file before the one-sector
        header update that switches to them."""
        self.check_writable()
        desc = self.descriptor
        if desc is None or len(self.extents) != 1 or self.backing is not None:
            raise Unsupported(f"{self.file.path}: only single-extent vmdk disks can be resized")
        if new_size < self.size:
            raise Unsupported(f"{self.file.path}: vmdk disks cannot shrink ({new_size} bytes)")
        if new_size % SECTOR:
            raise InvalidRequest(f"{self.file.path}: size {new_size} is not whole sectors")
        if new_size > vmdk_create.MAX_CREATE_SIZE:
            raise InvalidRequest(f"{self.file.path}: size {new_size} is too big")
        extent = self.extents[0]
        sectors = new_size // SECTOR
        old_size = self.size
        if isinstance(extent, SparseExtent) and extent.kind == "SPARSE" and extent.writable:
            if self.embedded_descriptor is None:
                raise Unsupported(f"{self.file.path}: only monolithicSparse grows in place")
            self._before_write()
            extent.grow(sectors)
        elif isinstance(extent, FlatExtent) and extent.base == 0:
            assert extent.file is not None
            if extent.file.is_block_device:
                raise Unsupported(f"{self.file.path}: the flat extent is a block device")
            self._before_write()
            old_file_size = extent.file.size()
            extent.file.truncate(max(old_file_size, new_size))
            extent.length = new_size
            if old_file_size > old_size:  # bytes past the old end must not show through
                stale = min(old_file_size, new_size) - old_size
                extent.zero(old_size, stale, self.read_backing, may_unmap=True)
            self._write_descriptor(desc.with_extent_sectors(0, sectors))
        else:
            raise Unsupported(f"{self.file.path}: cannot resize a {extent.kind} extent")
        if self.embedded_descriptor is not None:
            self._write_descriptor(desc.with_extent_sectors(0, sectors))
        self.size = extent.length
        if isinstance(extent, SparseExtent) and old_size % extent.grain_size:
            # The old last grain may hold bytes past the old end; the new range reads zeros.
            tail = min(new_size, -(-old_size // extent.grain_size) * extent.grain_size)
            if tail > old_size and extent.map(old_size, 1).state is State.DATA:
                self.write_zeroes(old_size, tail - old_size, may_unmap=False)

    def check(self, repair: RepairMode) -> CheckResult:
        result = CheckResult()
        allocated = 0
        for extent in self.extents:
            corrupt, used = extent.check(result.messages)
            result.corruptions += corrupt
            allocated += used
        result.allocated_clusters = allocated
        return result

    def _close_extent_files(self) -> None:
        for file in self.files.values():
            file.close()
        self.files.clear()

    def close(self) -> None:
        try:
            self._close_extent_files()
        finally:
            self.file.close()

    @classmethod
    def create(cls, path: str, size: int, options: MappingType[str, str]) -> None:
        vmdk_create.create(path, size, options)


register(VmdkDriver)
