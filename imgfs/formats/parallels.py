"""Parallels expandable images (QEMU's docs/interop/parallels.txt).

Layout (little-endian): a 64-byte header, the BAT right after it (one u32 per cluster), and the
data area from ``data_off`` sectors to the end of the file. Two magics:

* "WithoutFreeSpace" (the original layout): BAT entries are host offsets in *sectors*; only the
  low 32 bits of ``nb_sectors`` count; ``data_off`` 0 means "just after the BAT";
* "WithouFreSpacExt" (the large-disk layout qemu-img creates): BAT entries are host offsets in
  *clusters*; ``data_off`` is non-zero and cluster aligned.

A zero entry is an unallocated cluster (zeros, or the parent snapshot's data in a Parallels
Desktop bundle). New clusters are appended at the end of the data area; the data is written
and synced before the BAT sector that points at it (see :mod:`imgfs.formats._blocktable`).

While the image is open for writing, ``in_use`` holds 0x746F6E59; a clean close puts back the
value found at open (0 for qemu's images). An image found with the in-use marker was not
closed cleanly and is opened read-only, as qemu refuses to write it before a repair
(``check`` with RepairMode.ALL, or ``qemu-img check -r all``, clears it). Images with
a format extension (dirty bitmaps, ``ext_off``) are opened read-only too: writes would make the
stored bitmaps lie.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Mapping
from typing import Self

from imgfs.block.driver import CheckResult, ImageInfo, OpenOptions, ProbeInput, RepairMode
from imgfs.block.extent import Allocation
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage, ImgfsError, InvalidRequest, NoSpace, Unsupported
from imgfs.formats._blocktable import SECTOR, BlockTableDriver, load_table
from imgfs.units import choice_option, size_option

MAGIC_V1 = b"WithoutFreeSpace"  # BAT in sectors
MAGIC_V2 = b"WithouFreSpacExt"  # BAT in clusters
VERSION = 2
INUSE_MAGIC = 0x746F6E59

# magic, version, heads, cylinders, tracks (cluster sectors), bat_entries, nb_sectors, in_use,
# data_off (sectors), flags, ext_off (sectors)
_HEADER = struct.Struct("<16sIIIIIQIIIQ")
assert _HEADER.size == 64
F_TRACKS, F_BAT, F_SECTORS, F_INUSE, F_DATA_OFF, F_EXT_OFF = 4, 5, 6, 7, 8, 10

DEFAULT_CLUSTER_SIZE = 1024 * 1024
MAX_CLUSTER_SIZE = 256 * 1024 * 1024


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class ParallelsDriver(BlockTableDriver):
    format_name = "parallels"

    create_options = {
        "cluster_size": "cluster size in bytes (multiple of 512; default 1M)",
        "preallocation": "off/falloc/full: off leaves every cluster unallocated; falloc/full "
        "allocate all clusters (reserved, or written with zeros)",
    }

    def __init__(self, file: HostFile, options: OpenOptions) -> None:
        super().__init__(file, options)
        self._fields: list = []
        self.ext = False
        self.size_bytes = 0
        self.data_start = 0
        self.data_end = 0
        self._unit = SECTOR  # bytes per BAT unit
        self._inuse_at_open = 0
        self._marked_in_use = False
        self.notes: list[str] = []

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        head = probe.head
        if len(head) >= 20 and head[:16] in (MAGIC_V1, MAGIC_V2):
            if struct.unpack_from("<I", head, 16)[0] == VERSION:
                return 100
        return 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        self = cls(file, options)
        self._parse()
        if not self.read_only:
            self._mark_in_use()
        return self

    def _parse(self) -> None:
        path = self.file.path
        file_size = self.file.size()
        if file_size < _HEADER.size:
            raise CorruptImage(f"{path}: {file_size}-byte file is shorter than a Parallels header")
        f = list(_HEADER.unpack(bytes(self.file.pread(0, _HEADER.size))))
        magic, version = f[0], f[1]
        if magic not in (MAGIC_V1, MAGIC_V2):
            raise CorruptImage(f"{path}: bad Parallels magic {magic!r}")
        if version != VERSION:
            raise Unsupported(f"{path}: Parallels version {version} (only 2)")
        self.ext = magic == MAGIC_V2
        tracks = f[F_TRACKS]
        cluster = tracks * SECTOR
        if tracks == 0 or cluster > MAX_CLUSTER_SIZE:
            raise CorruptImage(f"{path}: bad Parallels cluster size {tracks} sectors")
        nb_sectors = f[F_SECTORS] if self.ext else f[F_SECTORS] & 0xFFFFFFFF
        bat_entries = f[F_BAT]
        bat_end = _HEADER.size + 4 * bat_entries
        data_off = f[F_DATA_OFF] * SECTOR
        if data_off == 0:
            data_off = _round_up(bat_end, SECTOR)
        elif data_off < bat_end:
            raise CorruptImage(
                f"{path}: Parallels data offset {f[F_DATA_OFF]} sectors overlaps the BAT "
                f"({bat_entries} entries)"
            )
        if nb_sectors > (1 << 63) // SECTOR:
            raise CorruptImage(f"{path}: Parallels disk size {nb_sectors} sectors")
        self._fields = f
        self.block_size = cluster
        self.size_bytes = nb_sectors * SECTOR
        self.data_start = data_off
        self._unit = cluster if self.ext else SECTOR
        self.table_offset = _HEADER.size
        self.table = load_table(self.file, _HEADER.size, bat_entries, "Parallels BAT")
        highest = max(self.table, default=0)
        self.data_end = max(data_off, highest * self._unit + cluster if highest else 0)
        if f[F_EXT_OFF]:
            self.data_end = max(self.data_end, f[F_EXT_OFF] * SECTOR + cluster)
        file_size = self.file.size()
        if (highest and highest * self._unit >= file_size) or data_off > file_size:
            # New clusters go after the highest one (or at the data offset): writing would grow
            # the file to wherever a damaged field points (terabytes, sparse). Reads see zeros
            # there, as qemu's do.
            self.notes.append(
                f"the data area or a BAT entry lies past the end of the file ({file_size} "
                "bytes): read-only"
            )
            self.read_only = True
        self._inuse_at_open = f[F_INUSE]
        if f[F_INUSE] == INUSE_MAGIC:
            self.notes.append("the image was not closed cleanly (in-use flag set): read-only")
            self.read_only = True
        if len(self.table) * cluster < self.size_bytes:
            self.notes.append(
                f"the BAT ({bat_entries} clusters) covers less than the disk size: read-only"
            )
            self.read_only = True
        if f[F_EXT_OFF]:
            self.notes.append("format extension (dirty bitmaps) present: read-only")
            self.read_only = True

    def _mark_in_use(self) -> None:
        previous = self._fields[F_INUSE]
        self._fields[F_INUSE] = INUSE_MAGIC
        try:
            self.file.pwrite(0, _HEADER.pack(*self._fields))
            self.file.sync()
        except ImgfsError:
            # The open fails: put the flag back (best effort) so that a host error during the
            # open does not leave the image looking unclean (read-only until check -r all).
            self._fields[F_INUSE] = previous
            with contextlib.suppress(ImgfsError):
                self.file.pwrite(0, _HEADER.pack(*self._fields))
            raise
        self._marked_in_use = True

    # -- mapping --------------------------------------------------------------------------------

    def entry_state(self, entry: int) -> tuple[Allocation, int | None]:
        if entry == 0:
            return Allocation.UNALLOCATED, None
        host = entry * self._unit
        if host < self.data_start:
            raise CorruptImage(
                f"{self.file.path}: Parallels BAT entry {entry} points before the data area"
            )
        return Allocation.DATA, host

    def allocate_block(self, block: int) -> tuple[int, int]:
        if block >= len(self.table):
            raise Unsupported(
                f"{self.file.path}: cluster {block} is past the BAT ({len(self.table)} entries)"
            )
        host = _round_up(self.data_end, self._unit)
        entry = host // self._unit
        if entry > 0xFFFFFFFF:
            raise NoSpace(f"{self.file.path}: Parallels BAT cannot address offset {host}")
        end = host + self.block_size
        if self.file.size() < end:
            self.file.truncate(end)  # sparse: reads as zeros until written
        self.data_end = end
        return host, entry

    def write_header(self) -> None:
        self.file.pwrite(0, _HEADER.pack(*self._fields))

    # -- geometry and management ----------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self.size_bytes

    def info(self) -> ImageInfo:
        info = super().info()
        info.cluster_size = self.block_size
        info.dirty_flag = self._inuse_at_open == INUSE_MAGIC
        info.format_specific = {"layout": "ext" if self.ext else "v1"}
        info.notes = list(self.notes)
        return info

    def check(self, repair: RepairMode) -> CheckResult:
        result = CheckResult(total_clusters=len(self.table))
        file_size = self.file.size()
        seen: dict[int, int] = {}
        high = self.data_start
        for block, entry in enumerate(self.table):
            if not entry:
                continue
            host = entry * self._unit
            if host < self.data_start or host + self.block_size > file_size:
                result.corruptions += 1
                result.messages.append(f"cluster {block}: offset {host} outside the data area")
                continue
            if host in seen:
                result.corruptions += 1
                result.messages.append(f"cluster {block}: offset {host} also used by {seen[host]}")
            seen[host] = block
            high = max(high, host + self.block_size)
        if self._inuse_at_open == INUSE_MAGIC:
            if repair is RepairMode.ALL and self.file.writable:
                # The BAT only ever points at written data (see the flush order), so clearing
                # the flag is the whole repair; the image opens writable from the next open.
                self._fields[F_INUSE] = 0
                self.file.pwrite(0, _HEADER.pack(*self._fields))
                self.file.sync()
                self._inuse_at_open = 0
                result.corruptions_fixed += 1
                result.messages.append("cleared the in-use flag")
            else:
                result.corruptions += 1
                result.messages.append("image was not closed correctly")
        if file_size > high:
            if repair is not RepairMode.NONE and self.file.writable and not result.corruptions:
                # Space past the highest mapped cluster: a block appended before a crash whose
                # BAT entry never reached the disk. Truncating reclaims it (as qemu's repair).
                self.file.truncate(high)
                self.file.sync()
                result.leaks_fixed += 1
            else:
                result.leaks += 1
        result.allocated_clusters = len(seen)
        result.image_end_offset = high
        return result

    def close(self) -> None:
        try:
            if self._marked_in_use:
                self._fields[F_INUSE] = self._inuse_at_open
                self.file.pwrite(0, _HEADER.pack(*self._fields))
                self.file.sync()
                self._marked_in_use = False
        finally:
            super().close()

    # -- creation -------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        for key in options:
            if key not in cls.create_options:
                raise InvalidRequest(f"parallels: unknown option {key!r}")
        cluster = _round_up(size_option(options, "cluster_size", DEFAULT_CLUSTER_SIZE), SECTOR)
        if not 0 < cluster <= MAX_CLUSTER_SIZE:
            raise InvalidRequest(f"parallels: bad cluster_size {options['cluster_size']!r}")
        prealloc = choice_option(options, "preallocation", ("off", "falloc", "full"), "off")
        if size < 0:
            raise InvalidRequest(f"parallels: bad size {size}")
        sectors = -(-size // SECTOR)
        clusters = -(-sectors * SECTOR // cluster)
        if clusters > 0xFFFFFFFF:
            raise InvalidRequest(f"parallels: size {size} needs too many clusters")
        tracks = cluster // SECTOR
        data_off = _round_up(_HEADER.size + 4 * clusters, cluster)
        heads, sectors_per_track = 16, 32
        cylinders = sectors // (heads * sectors_per_track)  # as qemu-img computes it
        bat = bytearray(4 * clusters)
        end = data_off
        if prealloc != "off" and clusters:
            struct.pack_into(
                f"<{clusters}I", bat, 0, *range(data_off // cluster, data_off // cluster + clusters)
            )
            end = data_off + clusters * cluster
        header = _HEADER.pack(
            MAGIC_V2, VERSION, heads, cylinders, tracks, clusters, sectors, 0,
            data_off // SECTOR, 0, 0,
        )  # fmt: skip
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            # An all-zero BAT is left as a hole (the truncate below reads as zeros).
            os.pwrite(fd, header + bytes(bat) if prealloc != "off" else header, 0)
            os.ftruncate(fd, end)
            if end > data_off:
                if prealloc == "falloc":
                    os.posix_fallocate(fd, data_off, end - data_off)
                else:
                    zeros = bytes(cluster)
                    for off in range(data_off, end, cluster):
                        os.pwrite(fd, zeros, off)
            os.fsync(fd)
        finally:
            os.close(fd)


register(ParallelsDriver)
