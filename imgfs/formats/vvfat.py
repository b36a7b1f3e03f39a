"""vvfat: a host directory exported as a read-only FAT32 disk, built on the fly.

The disk holds an MBR with one partition (type 0x0c, FAT32 LBA) at 1 MiB. The file system's
boot sector, FSInfo, both FATs and every directory cluster are synthesised from a tree scanned
once when the disk opens; data clusters map to the host files' bytes, read lazily.

Snapshot semantics (as QEMU's vvfat): the tree -- names, sizes, timestamps, cluster layout -- is
fixed at open. A file whose bytes change in place shows the new bytes; one that grows is cut at
its scanned size; one that shrinks or vanishes reads zeros. Reopen the disk (close every handle
of the exported file) to see a changed tree.

Layout: every file and directory is one contiguous run of clusters, directories first, so a FAT
sector or a cluster's owner is found by a binary search over the runs; nothing per cluster is
stored. At least 65,525 clusters exist whatever the content (fewer would make the volume FAT16
by the specification's count), the rest free. Symbolic links, sockets and devices are left out
(a link could point outside the exported directory), as are names FAT cannot hold; each is logged.
Names become VFAT long names (UTF-16) with a unique 8.3 short name beside them.
"""

from __future__ import annotations

import bisect
import collections
import errno
import logging
import os
import stat
import struct
import sys
import threading
import time
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Self

from imgfs.block.driver import BlockDriver, ImageInfo, OpenOptions, ProbeInput
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import HostIOError, ReadOnly, Unsupported

log = logging.getLogger(__name__)

SECTOR = 512
PARTITION_START = 2048  # sectors: 1 MiB, the usual alignment
RESERVED_SECTORS = 32
NUM_FATS = 2
ROOT_CLUSTER = 2
FSINFO_SECTOR = 1
BACKUP_BOOT_SECTOR = 6
MIN_CLUSTERS = 65525 + 16  # below 65,525 clusters the specification says FAT16
MAX_CLUSTERS = 0x0FFFFFF5 - 2  # cluster numbers 0x0FFFFFF7 and up are reserved
MAX_FILE_SIZE = 0xFFFFFFFF  # DIR_FileSize is 32 bits
EOC = 0x0FFFFFFF
DIR_ENTRY = 32
MAX_DIR_ENTRIES = 65536  # FAT limits a directory to 65,536 entries (2 MiB)
MAX_NAME_UNITS = 255
LFN_CHARS = 13
ATTR_READ_ONLY, ATTR_DIRECTORY, ATTR_ARCHIVE, ATTR_LFN = 0x01, 0x10, 0x20, 0x0F
PARTITION_TYPE_FAT32_LBA = 0x0C
MAX_OPEN_FILES = 64
# Files and directories in one exported tree: bounds the memory the scan takes (~200 B each).
MAX_NODES = 1_000_000

BOOT = struct.Struct("<3s8sHBHBHHBHHHIIIHHIHH12sBBBI11s8s")
assert BOOT.size == 90
DIRENT = struct.Struct("<11sBBBHHHHHHHI")
assert DIRENT.size == DIR_ENTRY
LFN = struct.Struct("<B10sBBB12sH4s")
assert LFN.size == DIR_ENTRY
MBR_PARTITION = struct.Struct("<B3sB3sII")
assert MBR_PARTITION.size == 16

SHORT_NAME_CHARS = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789$%'-_@~`!(){}^#&")
FORBIDDEN_LONG = set('"*/:<>?\\|')


def cluster_size_for(total_bytes: int) -> int:
    """Bytes per cluster as Microsoft's FAT32 table picks them for the volume size."""
    for limit, size in ((8 << 30, 4096), (16 << 30, 8192), (32 << 30, 16384)):
        if total_bytes <= limit:
            return size
    return 32768


@dataclass(eq=False)
class Node:
    name: str  # the long name ("" for the root)
    host_path: str
    is_dir: bool
    size: int  # bytes (files); directories: their entries' bytes, set by the layout
    mtime: float
    children: list[Node] = field(default_factory=list)
    parent: Node | None = None
    short: bytes = b""  # 11 bytes, space padded
    needs_lfn: bool = False
    first_cluster: int = 0  # 0 for an empty file
    clusters: int = 0
    entries: bytes = b""  # a directory's cluster contents (padded to whole clusters)


class VvfatLayoutError(Unsupported):
    pass


def _valid_long_name(name: str) -> bool:
    if not name or name in (".", "..") or name.endswith((" ", ".")):
        return False
    if any(ch in FORBIDDEN_LONG or ord(ch) < 0x20 for ch in name):
        return False
    try:
        units = len(name.encode("utf-16-le")) // 2
    except UnicodeEncodeError:  # surrogate-escaped bytes: not valid UTF-8 on the host
        return False
    return units <= MAX_NAME_UNITS


def scan_tree(root: str) -> Node:
    """The directory tree under ``root``, sorted by name, regular files and directories only."""
    st = os.stat(root)
    top = Node("", root, True, 0, st.st_mtime)
    pending = [top]
    nodes = 0
    while pending:
        node = pending.pop()
        try:
            with os.scandir(node.host_path) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise HostIOError(f"{node.host_path}: cannot list: {e.strerror}", e.errno) from None
        for item in items:
            path = item.path
            if not _valid_long_name(item.name):
                log.warning("%s: left out of the vvfat disk: FAT cannot hold this name", path)
                continue
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished while we looked
            if stat.S_ISDIR(st.st_mode):
                child = Node(item.name, path, True, 0, st.st_mtime, parent=node)
                pending.append(child)
            elif stat.S_ISREG(st.st_mode):
                if st.st_size > MAX_FILE_SIZE:
                    raise VvfatLayoutError(
                        f"{path}: {st.st_size} bytes; FAT32 cannot hold a file of 4 GiB or more"
                    )
                child = Node(item.name, path, False, st.st_size, st.st_mtime, parent=node)
            else:
                log.warning("%s: left out of the vvfat disk: not a regular file or directory", path)
                continue
            node.children.append(child)
            nodes += 1
            if nodes > MAX_NODES:
                raise VvfatLayoutError(
                    f"{root}: more than {MAX_NODES} files and directories; export a smaller tree"
                )
    return top


def _short_basis(name: str) -> tuple[bytes, bytes, bool]:
    """The 8.3 basis of a long name (uppercased, invalid characters replaced) and whether the
    long name is needed beside it."""
    base, dot, ext = name.rpartition(".")
    if not dot or not base:
        base, ext = name, ""

    def clean(text: str) -> tuple[bytes, bool]:
        out = bytearray()
        lossy = False
        for ch in text:
            if ch in " .":
                lossy = True
                continue
            b = ch.upper().encode("ascii", "replace")
            if len(b) != 1 or b[0] not in SHORT_NAME_CHARS:
                b = b"_"
                lossy = True
            out += b
        return bytes(out), lossy

    b, lossy_b = clean(base)
    e, lossy_e = clean(ext)
    exact = (
        not lossy_b
        and not lossy_e
        and 0 < len(b) <= 8
        and len(e) <= 3
        and name == name.upper()
        and name.count(".") <= 1
    )
    return b or b"_", e[:3], not exact


def assign_short_names(children: list[Node]) -> None:
    """Unique 8.3 names within one directory (``NAME~N.EXT`` where the long name does not fit)."""
    used: set[bytes] = set()
    exact_names = []
    for child in children:
        base, ext, needs_lfn = _short_basis(child.name)
        if not needs_lfn:
            short = base.ljust(8) + ext.ljust(3)
            if short not in used:
                used.add(short)
                child.short, child.needs_lfn = short, False
                continue
        exact_names.append((child, base, ext))
    counters: dict[bytes, int] = collections.defaultdict(int)
    for child, base, ext in exact_names:
        while True:
            counters[base[:6]] += 1
            n = counters[base[:6]]
            tail = b"~%d" % n
            short = (base[: 8 - len(tail)] + tail).ljust(8) + ext.ljust(3)
            if short not in used:
                break
        used.add(short)
        child.short, child.needs_lfn = short, True
    for child in children:
        if child.short[0] == 0xE5:  # a first byte of E5 marks a deleted entry; 05 stands for it
            child.short = b"\x05" + child.short[1:]


def lfn_checksum(short: bytes) -> int:
    total = 0
    for byte in short:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def lfn_count(name: str) -> int:
    """How many long-name entries ``name`` takes."""
    return -(-len(name.encode("utf-16-le")) // (2 * LFN_CHARS))


def lfn_entries(name: str, short: bytes) -> list[bytes]:
    """The long-name entries for ``name``, in on-disk order (last piece first)."""
    units = name.encode("utf-16-le")
    n_units = len(units) // 2
    pieces = -(-n_units // LFN_CHARS)
    padded = units + (b"\0\0" if n_units % LFN_CHARS else b"")
    padded = padded.ljust(pieces * LFN_CHARS * 2, b"\xff")
    checksum = lfn_checksum(short)
    out = []
    for i in range(pieces, 0, -1):
        chunk = padded[(i - 1) * 26 : i * 26]
        ordinal = i | (0x40 if i == pieces else 0)
        out.append(
            LFN.pack(ordinal, chunk[:10], ATTR_LFN, 0, checksum, chunk[10:22], 0, chunk[22:26])
        )
    return out


def fat_datetime(timestamp: float) -> tuple[int, int]:
    """(date, time) fields for a host timestamp (local time, as DOS keeps it), clamped to the
    years FAT can store."""
    t = time.localtime(max(0, timestamp))
    if t.tm_year < 1980:
        return (0 << 9) | (1 << 5) | 1, 0
    if t.tm_year > 2107:
        return (127 << 9) | (12 << 5) | 31, (23 << 11) | (59 << 5) | 29
    date = ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    clock = (t.tm_hour << 11) | (t.tm_min << 5) | (min(t.tm_sec, 59) // 2)
    return date, clock


def dir_entry(short: bytes, attr: int, cluster: int, size: int, mtime: float) -> bytes:
    date, clock = fat_datetime(mtime)
    return DIRENT.pack(
        short, attr, 0, 0, clock, date, date, cluster >> 16, clock, date, cluster & 0xFFFF, size
    )


@dataclass(frozen=True)
class Geometry:
    cluster_size: int
    clusters: int  # data clusters, numbered 2 .. clusters + 1
    fat_sectors: int
    used_clusters: int

    @property
    def sectors_per_cluster(self) -> int:
        return self.cluster_size // SECTOR

    @property
    def fat_offset(self) -> int:
        """Partition-relative byte offset of the first FAT."""
        return RESERVED_SECTORS * SECTOR

    @property
    def data_offset(self) -> int:
        return (RESERVED_SECTORS + NUM_FATS * self.fat_sectors) * SECTOR

    @property
    def partition_sectors(self) -> int:
        return (
            RESERVED_SECTORS
            + NUM_FATS * self.fat_sectors
            + self.clusters * (self.cluster_size // SECTOR)
        )


class Layout:
    """Where everything of the tree lies on the synthesised disk."""

    def __init__(self, root: Node, volume_id: int) -> None:
        self.root = root
        self.volume_id = volume_id
        dirs: list[Node] = []
        files: list[Node] = []
        queue = collections.deque([root])
        while queue:  # breadth first: each directory's entries before its subdirectories
            node = queue.popleft()
            dirs.append(node)
            assign_short_names(node.children)
            for child in node.children:
                (queue if child.is_dir else files).append(child)
        # Directory sizes first (they do not depend on cluster numbers), then the cluster size.
        dir_bytes = {}
        for node in dirs:
            count = 0 if node is root else 2
            for child in node.children:
                count += 1 + (lfn_count(child.name) if child.needs_lfn else 0)
            if count > MAX_DIR_ENTRIES:
                raise VvfatLayoutError(
                    f"{node.host_path}: {len(node.children)} names need {count} directory "
                    f"entries; a FAT directory holds at most {MAX_DIR_ENTRIES}"
                )
            dir_bytes[id(node)] = max(1, count) * DIR_ENTRY
        content = sum(dir_bytes.values()) + sum(f.size for f in files)
        cs = cluster_size_for(content)
        used = 0
        self.runs: list[tuple[int, int, Node]] = []  # (first cluster, count, node), sorted
        cluster = ROOT_CLUSTER
        for node in dirs:
            n = -(-dir_bytes[id(node)] // cs)
            node.first_cluster, node.clusters = cluster, n
            self.runs.append((cluster, n, node))
            cluster += n
        for node in files:
            n = -(-node.size // cs)
            if n:
                node.first_cluster, node.clusters = cluster, n
                self.runs.append((cluster, n, node))
                cluster += n
        used = cluster - ROOT_CLUSTER
        total = max(used + 1, MIN_CLUSTERS)
        if total > MAX_CLUSTERS:
            raise VvfatLayoutError(
                f"{root.host_path}: {content} bytes need {total} clusters of {cs} bytes; "
                f"FAT32 holds at most {MAX_CLUSTERS}"
            )
        fat_sectors = -(-(total + 2) * 4 // SECTOR)
        self.geometry = Geometry(cs, total, fat_sectors, used)
        self.run_starts = [r[0] for r in self.runs]
        for node in dirs:
            node.entries = self._directory_bytes(node, cs)
            node.size = len(node.entries)
        self.disk_size = (PARTITION_START + self.geometry.partition_sectors) * SECTOR

    def _directory_bytes(self, node: Node, cs: int) -> bytes:
        """A directory's clusters: ``.`` and ``..`` (not in the root), then for each child its
        long-name entries and its short entry; zeros (end of directory) to the cluster end."""
        out = bytearray()
        if node is not self.root:
            parent = node.parent
            parent_cluster = 0 if parent is None or parent is self.root else parent.first_cluster
            out += dir_entry(b".          ", ATTR_DIRECTORY, node.first_cluster, 0, node.mtime)
            out += dir_entry(b"..         ", ATTR_DIRECTORY, parent_cluster, 0, node.mtime)
        for child in node.children:
            if child.needs_lfn:
                for entry in lfn_entries(child.name, child.short):
                    out += entry
            if child.is_dir:
                out += dir_entry(child.short, ATTR_DIRECTORY, child.first_cluster, 0, child.mtime)
            else:
                attr = ATTR_ARCHIVE | ATTR_READ_ONLY
                out += dir_entry(child.short, attr, child.first_cluster, child.size, child.mtime)
        return bytes(out.ljust(node.clusters * cs, b"\0"))

    def owner(self, cluster: int) -> tuple[int, Node] | None:
        """The run holding ``cluster``: (its first cluster, node)."""
        i = bisect.bisect_right(self.run_starts, cluster) - 1
        if i < 0:
            return None
        first, count, node = self.runs[i]
        return (first, node) if cluster < first + count else None

    # -- the synthesised metadata ----------------------------------------------------------------

    def mbr(self) -> bytes:
        sector = bytearray(SECTOR)
        struct.pack_into("<I", sector, 440, self.volume_id)
        chs = b"\xfe\xff\xff"  # beyond CHS: LBA only
        sector[446:462] = MBR_PARTITION.pack(
            0, chs, PARTITION_TYPE_FAT32_LBA, chs, PARTITION_START, self.geometry.partition_sectors
        )
        sector[510:512] = b"\x55\xaa"
        return bytes(sector)

    def boot_sector(self) -> bytes:
        g = self.geometry
        sector = bytearray(SECTOR)
        sector[:90] = BOOT.pack(
            b"\xeb\x58\x90", b"MSWIN4.1", SECTOR, g.sectors_per_cluster, RESERVED_SECTORS,
            NUM_FATS, 0, 0, 0xF8, 0, 63, 255, PARTITION_START, g.partition_sectors,
            g.fat_sectors, 0, 0, ROOT_CLUSTER, FSINFO_SECTOR, BACKUP_BOOT_SECTOR, bytes(12),
            0x80, 0, 0x29, self.volume_id, b"NO NAME    ", b"FAT32   ",
        )  # fmt: skip
        sector[510:512] = b"\x55\xaa"
        return bytes(sector)

    def fsinfo(self) -> bytes:
        g = self.geometry
        sector = bytearray(SECTOR)
        free = g.clusters - g.used_clusters
        next_free = ROOT_CLUSTER + g.used_clusters if free else 0xFFFFFFFF
        struct.pack_into("<I", sector, 0, 0x41615252)
        struct.pack_into("<III", sector, 484, 0x61417272, free, next_free)
        struct.pack_into("<I", sector, 508, 0xAA550000)
        return bytes(sector)

    def fat_entries(self, first: int, count: int) -> bytes:
        """FAT entries ``first .. first + count - 1`` as little-endian 32-bit values."""
        out = array("I", bytes(4 * count))
        end = first + count
        if first <= 1:
            for index, value in ((0, 0x0FFFFFF8), (1, 0x0FFFFFFF)):
                if first <= index < end:
                    out[index - first] = value
        i = max(0, bisect.bisect_right(self.run_starts, first) - 1)
        while i < len(self.runs):
            run_first, n, _ = self.runs[i]
            if run_first >= end:
                break
            lo, hi = max(first, run_first), min(end, run_first + n)
            if lo < hi:
                out[lo - first : hi - first] = array("I", range(lo + 1, hi + 1))
                if hi == run_first + n:
                    out[hi - 1 - first] = EOC
            i += 1
        if out.itemsize != 4:
            raise AssertionError("array('I') is not 32-bit here")
        if sys.byteorder != "little":
            out.byteswap()
        return out.tobytes()


class _HostFiles:
    """A bounded set of open host files (the tree may hold more files than we may open)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()

    def read(self, path: str, offset: int, length: int) -> bytes:
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                except OSError:
                    fd = -1  # vanished or replaced by a link: reads zeros
            self._fds[path] = fd
            while len(self._fds) > MAX_OPEN_FILES:
                _, old = self._fds.popitem(last=False)
                if old >= 0:
                    os.close(old)
            if fd < 0:
                return bytes(length)
            # Read under the lock: the fd cannot be closed by an eviction meanwhile.
            try:
                data = os.pread(fd, length, offset)
            except OSError as e:
                raise HostIOError(f"{path}: read at {offset}: {e.strerror}", e.errno) from None
        return data if len(data) == length else data + bytes(length - len(data))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                if fd >= 0:
                    os.close(fd)
            self._fds.clear()


class DirectoryFile:
    """What the chain layer hands the vvfat driver in place of a HostFile: the directory."""

    writable = False
    direct = False
    no_flush = True
    is_block_device = False
    alignment = 1

    def __init__(self, path: str) -> None:
        self.path = path

    def size(self) -> int:
        return 0

    def allocated_size(self) -> int:
        return 0

    def pread(self, offset: int, length: int) -> bytes:
        raise HostIOError(f"{self.path}: is a directory", errno.EISDIR)

    def pwrite(self, offset: int, data: object) -> None:
        raise ReadOnly(f"{self.path}: vvfat disks are read-only")

    def data_extents(self, offset: int, length: int) -> tuple[bool, int]:
        return True, length

    def sync(self) -> None:
        return None

    def close(self) -> None:
        return None


class VvfatDriver(BlockDriver):
    """A directory as a FAT32 disk (read-only)."""

    format_name = "vvfat"
    opens_directories = True  # the chain layer opens a directory with this driver
    cheap_reads = False  # reads touch many host files and build metadata

    def __init__(self, file: HostFile, options: OpenOptions, layout: Layout) -> None:
        super().__init__(file, options)
        self.read_only = True
        self.layout = layout
        self._files = _HostFiles()
        g = layout.geometry
        self._part = PARTITION_START * SECTOR
        self._fat_bytes = g.fat_sectors * SECTOR
        self._fat_start = self._part + g.fat_offset
        self._data_start = self._part + g.data_offset
        self._mbr = layout.mbr()
        self._boot = layout.boot_sector()
        self._fsinfo = layout.fsinfo()

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        return 0  # never a file's content: a directory is opened by name

    @classmethod
    def directory_file(cls, path: str) -> DirectoryFile:
        return DirectoryFile(path)

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        root = os.path.abspath(file.path)
        if not os.path.isdir(root):
            raise Unsupported(f"{file.path}: vvfat exports a directory; this is not one")
        tree = scan_tree(root)
        volume_id = zlib.crc32(os.fsencode(root))
        return cls(file, options, Layout(tree, volume_id))

    @property
    def virtual_size(self) -> int:
        return self.layout.disk_size

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        out = bytearray(length)
        pos = 0
        while pos < length:
            piece = self._read_piece(offset + pos, length - pos)
            out[pos : pos + len(piece)] = piece
            pos += len(piece)
        return out

    def _read_piece(self, offset: int, length: int) -> bytes:
        """Bytes from ``offset`` up to the end of the region holding it (at most ``length``)."""
        if offset < self._part:
            n = min(length, self._part - offset)
            return self._mbr[offset : offset + n] if offset < SECTOR else bytes(n)
        if offset < self._fat_start:
            rel = offset - self._part
            sector, within = divmod(rel, SECTOR)
            n = min(length, SECTOR - within)
            source = {
                0: self._boot,
                FSINFO_SECTOR: self._fsinfo,
                BACKUP_BOOT_SECTOR: self._boot,
                BACKUP_BOOT_SECTOR + 1: self._fsinfo,
            }.get(sector)
            return source[within : within + n] if source else bytes(n)
        if offset < self._data_start:
            rel = (offset - self._fat_start) % self._fat_bytes  # both FATs are the same
            n = min(length, self._fat_bytes - rel)
            first, skip = divmod(rel, 4)
            count = -(-(skip + n) // 4)
            return self.layout.fat_entries(first, count)[skip : skip + n]
        cs = self.layout.geometry.cluster_size
        rel = offset - self._data_start
        cluster = ROOT_CLUSTER + rel // cs
        found = self.layout.owner(cluster)
        if found is None:  # a free cluster: up to the next run (or the end)
            i = bisect.bisect_right(self.layout.run_starts, cluster)
            stop = (
                self.layout.run_starts[i]
                if i < len(self.layout.run_starts)
                else ROOT_CLUSTER + self.layout.geometry.clusters
            )
            n = min(length, (stop - ROOT_CLUSTER) * cs - rel)
            return bytes(n)
        first, node = found
        within = rel - (first - ROOT_CLUSTER) * cs
        n = min(length, node.clusters * cs - within)
        if node.is_dir:
            return node.entries[within : within + n]
        data_n = max(0, min(n, node.size - within))
        data = self._files.read(node.host_path, within, data_n) if data_n else b""
        return data + bytes(n - data_n)

    def block_status(self, offset: int, length: int) -> Extent:
        """Free clusters read as zeros (so ``convert`` and SEEK_HOLE skip them); the rest is
        data, up to the end of the file or directory at ``offset``."""
        if offset < self._data_start:
            return Extent(offset, min(length, self._data_start - offset), Allocation.DATA)
        cs = self.layout.geometry.cluster_size
        rel = offset - self._data_start
        cluster = ROOT_CLUSTER + rel // cs
        found = self.layout.owner(cluster)
        if found is not None:
            first, node = found
            end = (first - ROOT_CLUSTER + node.clusters) * cs
            return Extent(offset, min(length, end - rel), Allocation.DATA)
        i = bisect.bisect_right(self.layout.run_starts, cluster)
        stop = (
            self.layout.run_starts[i]
            if i < len(self.layout.run_starts)
            else ROOT_CLUSTER + self.layout.geometry.clusters
        )
        return Extent(offset, min(length, (stop - ROOT_CLUSTER) * cs - rel), Allocation.ZERO)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise ReadOnly(f"{self.file.path}: vvfat disks are read-only")

    def info(self) -> ImageInfo:
        g = self.layout.geometry
        info = super().info()
        info.actual_size = 0
        info.cluster_size = g.cluster_size
        info.format_specific = {
            "clusters": g.clusters,
            "used-clusters": g.used_clusters,
            "partition-offset": PARTITION_START * SECTOR,
        }
        info.notes.append(
            "the directory was scanned once when the disk opened; reopen it to see changes"
        )
        return info

    def close(self) -> None:
        self._files.close()


register(VvfatDriver)
