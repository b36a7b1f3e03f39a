"""VDI: VirtualBox's native disk image, version 1.1, dynamic ("normal") and static ("fixed").

Layout (little-endian), as VirtualBox documents it and qemu-img writes it:

* 0x000: a 64-byte text pre-header ("<<< Oracle VM VirtualBox Disk Image >>>\\n"), informative;
* 0x040: signature 0xBEDA107F and version (0x00010001 for 1.1);
* 0x048: the 1.1 header (``_HEADER``; 384 bytes, 400 with the LCHS geometry VirtualBox adds);
* ``offset_blocks``: the block map, one u32 per guest block: the index of the block's data in
  the data area, 0xFFFFFFFF unallocated, 0xFFFFFFFE a zero (discarded) block;
* ``offset_data``: the data area, block index ``i`` at ``offset_data + i * (extra + size)``,
  its ``extra`` bytes first.

Data blocks are dense: a new block gets index ``blocks_allocated`` (as VirtualBox and qemu
allocate), and the header's ``blocks_allocated`` counts the mapped entries (qemu-img check
compares the two). Crash-safe order (see :mod:`imgfs.formats._blocktable`): the data block is
written past the end of the data area and synced; then the header with the new
``blocks_allocated`` is written and synced; then the block-map sectors, and a last sync. A crash
at any point leaves every map entry naming written data, and never lets a later allocation
(which takes index ``blocks_allocated``) reuse an index the map names; at worst the header
counts a block the map does not name yet (``qemu-img check -r all`` recounts).

Discard and write-zeroes of whole allocated blocks punch the host data (the block stays mapped,
so the dense indices and ``blocks_allocated`` stay consistent); unallocated and zero blocks
already read as zeros.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Mapping
from typing import Self

from imgfs.block.driver import CheckResult, ImageInfo, OpenOptions, ProbeInput, RepairMode
from imgfs.block.extent import Allocation
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, InvalidRequest, NoSpace, Unsupported
from imgfs.formats._blocktable import SECTOR, BlockTableDriver, load_table
from imgfs.units import bool_option, choice_option

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
PRE_HEADER_TEXT = b"<<< Oracle VM VirtualBox Disk Image >>>\n"

_SIG_VERSION = struct.Struct("<II")  # at 0x40
_HEADER = struct.Struct(
    "<III256sIIIIIIIQIIII16s16s16s16s"
)  # at 0x48: header size, image type, flags, description, offset_blocks, offset_data,
#   legacy cylinders/heads/sectors/sector size, unused, disk size, block size, block extra,
#   blocks in image, blocks allocated, uuid create/modify/linkage/parent-modify
assert _HEADER.size == 384
_LCHS = struct.Struct("<IIII")  # VirtualBox's LCHS geometry after the 1.1 header (400 total)
HEADER_OFFSET = 0x48
HEADER_SIZE_1_1 = _HEADER.size + _LCHS.size

TYPE_NORMAL = 1  # dynamic
TYPE_FIXED = 2  # static
TYPE_NAMES = {1: "dynamic", 2: "static", 3: "undo", 4: "differencing"}

UNALLOCATED = 0xFFFFFFFF
ZERO_BLOCK = 0xFFFFFFFE

DEFAULT_BLOCK_SIZE = 1024 * 1024
MAX_BLOCK_SIZE = 256 * 1024 * 1024
# qemu's limit on the number of blocks (the map entries must stay below the two markers).
MAX_BLOCKS = 0x3FFFFFFF


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class VdiDriver(BlockTableDriver):
    format_name = "vdi"
    header_before_table = True

    create_options = {
        "static": "on/off: preallocate every block (a fixed image); default off",
        "preallocation": "off/falloc/full: how the data area of a static image is reserved",
    }

    def __init__(self, file: HostFile, options: OpenOptions) -> None:
        super().__init__(file, options)
        self._fields: list = []
        self._lchs = b""
        self.image_type = TYPE_NORMAL
        self.disk_size = 0
        self.block_extra = 0
        self.offset_data = 0
        self.blocks_in_image = 0
        self.blocks_allocated = 0
        self._next_index: int | None = None

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        if len(probe.head) >= 0x48:
            signature, _ = _SIG_VERSION.unpack_from(probe.head, 0x40)
            if signature == SIGNATURE:
                return 100
        return 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        self = cls(file, options)
        self._parse()
        return self

    def _parse(self) -> None:
        path = self.file.path
        size = self.file.size()
        if size < HEADER_OFFSET + _HEADER.size:
            raise CorruptImage(f"{path}: VDI file of {size} bytes is shorter than its header")
        head = bytes(self.file.pread(0, HEADER_OFFSET + HEADER_SIZE_1_1))
        signature, version = _SIG_VERSION.unpack_from(head, 0x40)
        if signature != SIGNATURE:
            raise CorruptImage(f"{path}: bad VDI signature {signature:#x}")
        if version != VERSION_1_1:
            raise Unsupported(
                f"{path}: VDI version {version >> 16}.{version & 0xFFFF} (only 1.1 is supported)"
            )
        f = list(_HEADER.unpack_from(head, HEADER_OFFSET))
        self._fields = f
        (header_size, image_type, _flags, _desc, off_blocks, off_data, _c, _h, _s, sector_size,
         _unused, disk_size, block_size, block_extra, blocks, allocated) = f[:16]  # fmt: skip
        if header_size < _HEADER.size or HEADER_OFFSET + header_size > off_blocks:
            raise CorruptImage(f"{path}: bad VDI header size {header_size}")
        if header_size >= HEADER_SIZE_1_1:
            self._lchs = head[HEADER_OFFSET + _HEADER.size : HEADER_OFFSET + HEADER_SIZE_1_1]
        if image_type not in (TYPE_NORMAL, TYPE_FIXED):
            raise Unsupported(
                f"{path}: VDI image type {image_type} "
                f"({TYPE_NAMES.get(image_type, 'unknown')}) is not supported"
            )
        if sector_size not in (0, SECTOR):
            raise Unsupported(f"{path}: VDI sector size {sector_size} (only 512)")
        if block_size < SECTOR or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise CorruptImage(f"{path}: bad VDI block size {block_size}")
        if block_extra % SECTOR or block_extra > MAX_BLOCK_SIZE:
            raise CorruptImage(f"{path}: bad VDI block extra size {block_extra}")
        if blocks > MAX_BLOCKS:
            raise CorruptImage(f"{path}: VDI claims {blocks} blocks (limit {MAX_BLOCKS})")
        if blocks * block_size < disk_size:
            raise CorruptImage(
                f"{path}: VDI disk size {disk_size} exceeds its {blocks} blocks of {block_size}"
            )
        if allocated > blocks:
            raise CorruptImage(f"{path}: VDI blocks allocated {allocated} > blocks {blocks}")
        if off_blocks % SECTOR or off_data % SECTOR:
            raise CorruptImage(
                f"{path}: VDI offsets not sector aligned (map {off_blocks}, data {off_data})"
            )
        if off_blocks + 4 * blocks > off_data:
            raise CorruptImage(
                f"{path}: VDI block map ({blocks} entries at {off_blocks}) overlaps the data "
                f"area at {off_data}"
            )
        self.image_type = image_type
        self.disk_size = disk_size
        self.block_size = block_size
        self.block_extra = block_extra
        self.offset_data = off_data
        self.blocks_in_image = blocks
        self.blocks_allocated = allocated
        self.table_offset = off_blocks
        self.table = load_table(self.file, off_blocks, blocks, "VDI block map")

    # -- mapping --------------------------------------------------------------------------------

    def entry_state(self, entry: int) -> tuple[Allocation, int | None]:
        if entry == UNALLOCATED:
            return Allocation.UNALLOCATED, None
        if entry == ZERO_BLOCK:
            return Allocation.ZERO, None
        if entry >= self.blocks_in_image:
            raise CorruptImage(
                f"{self.file.path}: VDI block map entry {entry} >= blocks in image "
                f"{self.blocks_in_image}"
            )
        return Allocation.DATA, self._data_offset(entry)

    def _data_offset(self, index: int) -> int:
        return self.offset_data + index * (self.block_extra + self.block_size) + self.block_extra

    def allocate_block(self, block: int) -> tuple[int, int]:
        if self._next_index is None:
            # Dense indices: the next one is blocks_allocated, unless a crash left a map entry
            # written past it (never reuse an index some entry still names).
            highest = max((e for e in self.table if e < self.blocks_in_image), default=-1)
            self._next_index = max(self.blocks_allocated, highest + 1)
        index = self._next_index
        if index >= self.blocks_in_image:
            raise NoSpace(f"{self.file.path}: VDI has no free block index left")
        host = self._data_offset(index)
        end = host + self.block_size
        if self.file.size() < end:
            self.file.truncate(end)  # sparse: the new block reads as zeros until written
        self._next_index = index + 1
        self.blocks_allocated += 1
        self.mark_header_dirty()
        return host, index

    def write_header(self) -> None:
        f = list(self._fields)
        f[15] = self.blocks_allocated
        f[17] = uuid.uuid4().bytes  # uuid_modify: the image changed
        self._fields = f
        self.file.pwrite(HEADER_OFFSET, _HEADER.pack(*f))

    # -- geometry and management ------------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self.disk_size

    def info(self) -> ImageInfo:
        info = super().info()
        info.cluster_size = self.block_size
        info.format_specific = {
            "image-type": TYPE_NAMES[self.image_type],
            "blocks-in-image": self.blocks_in_image,
            "blocks-allocated": self.blocks_allocated,
        }
        return info

    def check(self, repair: RepairMode) -> CheckResult:
        result = CheckResult(total_clusters=self.blocks_in_image)
        seen: dict[int, int] = {}
        for block, entry in enumerate(self.table):
            if entry in (UNALLOCATED, ZERO_BLOCK):
                continue
            if entry >= self.blocks_in_image:
                result.corruptions += 1
                result.messages.append(f"block {block}: map entry {entry} out of range")
            elif entry in seen:
                result.corruptions += 1
                result.messages.append(f"block {block}: data index {entry} also used by "
                                       f"block {seen[entry]}")  # fmt: skip
            else:
                seen[entry] = block
        if len(seen) != self.blocks_allocated:
            message = (
                f"allocated blocks mismatch: header says {self.blocks_allocated}, map has "
                f"{len(seen)}"
            )
            if repair is RepairMode.ALL and not self.read_only:
                # As qemu-img check -r all does: the header takes the map's count. Our own
                # allocator still never reuses an index the map names (see allocate_block).
                with self.lock:
                    self.blocks_allocated = len(seen)
                    self.write_header()
                    self.file.sync()
                result.corruptions_fixed += 1
                result.messages.append(message + " (fixed)")
            else:
                result.corruptions += 1
                result.messages.append(message)
        result.allocated_clusters = len(seen)
        return result

    # -- creation ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        for key in options:
            if key not in cls.create_options:
                raise InvalidRequest(f"vdi: unknown option {key!r}")
        static = bool_option(options, "static")
        prealloc_choices = ("off", "metadata", "falloc", "full")
        prealloc = choice_option(options, "preallocation", prealloc_choices, "off")
        if size < 0:
            raise InvalidRequest(f"vdi: bad size {size}")
        bs = DEFAULT_BLOCK_SIZE
        size = _round_up(size, SECTOR)
        blocks = _round_up(size, bs) // bs
        if blocks > MAX_BLOCKS:
            raise InvalidRequest(f"vdi: size {size} is too large")
        off_blocks = 0x200
        # Data blocks aligned to the block size, as VirtualBox lays them out.
        off_data = _round_up(off_blocks + 4 * blocks, bs)
        if static:
            table = struct.pack(f"<{blocks}I", *range(blocks))
        else:
            table = struct.pack("<I", UNALLOCATED) * blocks
        header = _HEADER.pack(
            HEADER_SIZE_1_1,
            TYPE_FIXED if static else TYPE_NORMAL,
            0,
            b"",
            off_blocks,
            off_data,
            0,
            0,
            0,
            SECTOR,
            0,
            size,
            bs,
            0,
            blocks,
            blocks if static else 0,
            uuid.uuid4().bytes,
            uuid.uuid4().bytes,
            bytes(16),
            bytes(16),
        )
        head = bytearray(off_blocks)
        head[: len(PRE_HEADER_TEXT)] = PRE_HEADER_TEXT
        head[0x40:0x48] = _SIG_VERSION.pack(SIGNATURE, VERSION_1_1)
        head[HEADER_OFFSET : HEADER_OFFSET + _HEADER.size] = header
        end = off_data + (blocks * bs if static else 0)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(fd, bytes(head) + table, 0)
            os.ftruncate(fd, end)
            if static and prealloc in ("falloc", "full") and blocks:
                if prealloc == "falloc":
                    os.posix_fallocate(fd, off_data, blocks * bs)
                else:
                    zeros = bytes(bs)
                    for i in range(blocks):
                        os.pwrite(fd, zeros, off_data + i * bs)
            os.fsync(fd)
        finally:
            os.close(fd)


register(VdiDriver)
