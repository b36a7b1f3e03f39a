"""vpc: Microsoft Virtual Hard Disk (VHD) images, fixed, dynamic and differencing.

Layout (Microsoft "Virtual Hard Disk Image Format Specification" 1.0):

* every image ends with a 512-byte footer ("conectix"); a fixed image is the disk followed by
  the footer;
* a dynamic or differencing image also keeps a copy of the footer at offset 0, a 1024-byte
  dynamic header ("cxsparse") where the footer's data_offset points, and a block allocation
  table (BAT) of big-endian sector numbers, 0xFFFFFFFF for an unallocated block;
* each allocated block is a sector bitmap (one bit per 512-byte sector, padded to whole
  sectors) followed by the block's data. A differencing image reads a sector from its parent
  when the sector's bit is clear. Like QEMU, a dynamic image ignores the bitmap on reads.

Crash-safe block allocation: (1) the footer is written at the new end of the file, past the new
block, so the file always ends with a footer; (2) the block's bitmap is written where the old
footer was; (3) the data; (4) only then the BAT entry that points at the block. A crash before
(4) leaves a leaked block and an intact image.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Self

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
from imgfs.units import bool_option, choice_option, size_option

SECTOR = 512

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"

# cookie, features, version, data_offset, timestamp, creator_app, creator_version, creator_os,
# original_size, current_size, cylinders, heads, sectors_per_track, disk_type, checksum, uuid,
# saved_state, reserved
FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
assert FOOTER.size == 512
FOOTER_CHECKSUM_AT = 64

# cookie, data_offset, table_offset, header_version, max_table_entries, block_size, checksum,
# parent_uuid, parent_timestamp, reserved, parent_unicode_name, parent_locators, reserved
DYN_HEADER = struct.Struct(">8sQQIIII16sI4s512s192s256s")
assert DYN_HEADER.size == 1024
HEADER_CHECKSUM_AT = 36

# platform_code, platform_data_space, platform_data_length, reserved, platform_data_offset
LOCATOR = struct.Struct(">4sIIIQ")
assert LOCATOR.size == 24

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4

BAT_UNALLOCATED = 0xFFFFFFFF
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

# Cylinders x heads x sectors/track at the format's largest geometry (about 127 GiB).
MAX_CHS_SECTORS = 65535 * 16 * 255
# Creators whose images mean the footer's current_size, not the CHS geometry (QEMU 7.2's table:
# Hyper-V, QEMU with force_size, Disk2vhd, XenConverter, XenServer).
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

# Sanity limits for hostile images.
MIN_BLOCK_SIZE = SECTOR
MAX_BLOCK_SIZE = 256 * 1024 * 1024
MAX_VIRTUAL_SIZE = 1 << 50
# What qemu-img creates at most (2040 GiB).
MAX_CREATE_SIZE = 0xFF000000 * 512
MAX_LOCATOR_BYTES = 64 * 1024
# The BAT is held in memory: 4 M entries cover 8 TiB in 2 MiB blocks (a VHD holds 2 TiB). A
# table in a sparse file may otherwise claim billions of entries.
MAX_BAT_ENTRIES = 1 << 22
BITMAP_CACHE_BLOCKS = 1024
COW_UNIT = 4096
# Blocks a crash may leave past the end of the file (the BAT entry reached the disk, the file's
# new size did not); they read as zeros. Entries further out are corrupt.
PAST_EOF_BLOCKS = 64

DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
# Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
VHD_EPOCH = 946684800


def vhd_checksum(data: bytes | bytearray, checksum_at: int) -> int:
    """One's complement of the byte sum, with the checksum field itself counted as zero."""
    total = sum(data) - sum(data[checksum_at : checksum_at + 4])
    return ~total & 0xFFFFFFFF


def with_checksum(data: bytes | bytearray, checksum_at: int) -> bytes:
    buf = bytearray(data)
    buf[checksum_at : checksum_at + 4] = bytes(4)
    buf[checksum_at : checksum_at + 4] = vhd_checksum(buf, checksum_at).to_bytes(4, "big")
    return bytes(buf)


def stored_checksum(data: bytes | bytearray, checksum_at: int) -> int:
    return int.from_bytes(data[checksum_at : checksum_at + 4], "big")


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a sector count, as the VHD spec computes it."""
    total_sectors = min(total_sectors, MAX_CHS_SECTORS)
    if total_sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_times_heads = total_sectors // spt
    else:
        spt = 17
        cyl_times_heads = total_sectors // spt
        heads = max(4, (cyl_times_heads + 1023) // 1024)
        if cyl_times_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_times_heads = total_sectors // spt
        if cyl_times_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_times_heads = total_sectors // spt
    return cyl_times_heads // heads, heads, spt


class VpcDriver(BlockDriver):
    format_name = "vpc"
    runtime_options = {
        "force_size_calc": "chs or current_size: how the disk size is taken (default: as qemu)"
    }
    supports_write = True

    create_options = {
        "subformat": "dynamic (default) or fixed",
        "force_size": "on: the disk size is exactly the size asked for, not rounded to CHS",
        "block_size": "dynamic/differencing block size (default 2M; a power of two)",
        "backing_file": "parent image: makes a differencing image",
        "backing_fmt": "format of the parent (must be vpc)",
    }

    def __init__(self, file: HostFile, options: OpenOptions) -> None:
        super().__init__(file, options)
        self._lock = threading.Lock()
        self._notes: list[str] = []
        self._footer = b""
        self._disk_type = DISK_FIXED
        self._data_end = 0
        self._size = 0
        self._creator_app = b""
        self._block_size = 0
        self._bitmap_size = 0
        self._bat: list[int] = []
        self._table_offset = 0
        self._free_offset = 0
        self._parent_candidates: list[str] = []
        self._backing_name: str | None = None
        self._parent_uuid = bytes(16)
        self._bitmaps: OrderedDict[int, bytearray] = OrderedDict()

    # -- discovery ------------------------------------------------------------------------------

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        if probe.head[:8] == FOOTER_COOKIE:
            return 100
        if len(probe.tail) >= FOOTER.size and probe.tail[-FOOTER.size :][:8] == FOOTER_COOKIE:
            return 100
        return 0

    # -- open -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        self = cls(file, options)
        self._load()
        return self

    def _load(self) -> None:
        path = self.file.path
        file_size = self.file.size()
        if file_size < FOOTER.size:
            raise CorruptImage(f"{path}: {file_size} bytes is too small for a VHD footer")
        head = bytes(self.file.pread(0, FOOTER.size))
        tail = bytes(self.file.pread(file_size - FOOTER.size, FOOTER.size))
        footer = self._pick_footer(head, tail)
        (
            _cookie, _features, _version, data_offset, _ts, creator_app, _cver, _cos,
            _orig, current_size, cylinders, heads, spt, disk_type, _cks, _uuid, _saved, _r,
        ) = FOOTER.unpack(footer)  # fmt: skip
        self._footer = footer
        self._creator_app = creator_app
        if disk_type not in (DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING):
            raise Unsupported(f"{path}: VHD disk type {disk_type} is not fixed/dynamic/diff")
        self._disk_type = disk_type
        chs_sectors = cylinders * heads * spt
        force = self.options.driver_options.get("force_size_calc", "")
        if force not in ("", "chs", "current_size"):
            raise InvalidRequest(f"{path}: force_size_calc must be chs or current_size: {force!r}")
        use_chs = creator_app not in CURRENT_SIZE_CREATORS or force == "chs"
        if not use_chs or chs_sectors == MAX_CHS_SECTORS or force == "current_size":
            size = current_size // SECTOR * SECTOR
        else:
            size = chs_sectors * SECTOR
        if size > MAX_VIRTUAL_SIZE:
            raise CorruptImage(f"{path}: disk size {size} is beyond {MAX_VIRTUAL_SIZE}")
        self._size = size
        if disk_type == DISK_FIXED:
            self._data_end = file_size - FOOTER.size
            if file_size - FOOTER.size < size:
                self._notes.append(
                    f"fixed image holds {file_size - FOOTER.size} data bytes, less than its "
                    f"size {size}: the rest reads as zeros (qemu shows the footer there)"
                )
            return
        self._load_dynamic(data_offset, file_size)

    def _pick_footer(self, head: bytes, tail: bytes) -> bytes:
        path = self.file.path
        candidates = [(where, buf) for where, buf in (("start", head), ("end", tail))]
        found = [(w, b) for w, b in candidates if b[:8] == FOOTER_COOKIE]
        if not found:
            raise CorruptImage(f"{path}: no 'conectix' VHD footer at the start or the end")
        for where, buf in found:
            if vhd_checksum(buf, FOOTER_CHECKSUM_AT) != stored_checksum(buf, FOOTER_CHECKSUM_AT):
                continue
            if where == "end" and FOOTER.unpack(buf)[13] != DISK_FIXED:
                state = "bad" if head[:8] == FOOTER_COOKIE else "missing"
                self._notes.append(f"footer copy at the start is {state}: used the one at the end")
            elif where == "start" and tail[:8] == FOOTER_COOKIE and tail != buf:
                self._notes.append("footer at the end differs from the copy at the start")
            elif where == "start" and tail[:8] != FOOTER_COOKIE:
                self._notes.append("no footer at the end of the file: used the copy at the start")
            return buf
        where, buf = found[0]
        stored = stored_checksum(buf, FOOTER_CHECKSUM_AT)
        raise CorruptImage(
            f"{path}: VHD footer checksum 0x{stored:08x} at the {where} does not match the "
            f"computed 0x{vhd_checksum(buf, FOOTER_CHECKSUM_AT):08x}"
        )

    def _load_dynamic(self, data_offset: int, file_size: int) -> None:
        path = self.file.path
        if data_offset % SECTOR or data_offset + DYN_HEADER.size > file_size:
            raise CorruptImage(f"{path}: dynamic header offset {data_offset} is outside the file")
        raw = bytes(self.file.pread(data_offset, DYN_HEADER.size))
        (
            cookie, _data_offset, table_offset, _hver, max_entries, block_size, _cks,
            parent_uuid, _pts, _r1, parent_name, locators, _r2,
        ) = DYN_HEADER.unpack(raw)  # fmt: skip
        if cookie != HEADER_COOKIE:
            raise CorruptImage(f"{path}: dynamic header cookie {cookie!r} is not 'cxsparse'")
        stored = stored_checksum(raw, HEADER_CHECKSUM_AT)
        computed = vhd_checksum(raw, HEADER_CHECKSUM_AT)
        if stored != computed:
            # QEMU ignores this checksum; so do we, but say so.
            self._notes.append(
                f"dynamic header checksum 0x{stored:08x} does not match the computed "
                f"0x{computed:08x} (ignored, as qemu does)"
            )
        if (
            block_size < MIN_BLOCK_SIZE
            or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)
        ):
            raise CorruptImage(f"{path}: block size {block_size} is not a power of two in range")
        if table_offset % SECTOR or table_offset >= file_size:
            raise CorruptImage(f"{path}: BAT offset {table_offset} is outside the file")
        needed = -(-self._size // block_size)
        if max_entries * 4 > file_size - table_offset or max_entries > needed + (1 << 20):
            raise CorruptImage(
                f"{path}: Max Table Entries {max_entries} is too large for the file and the "
                f"disk size ({needed} blocks)"
            )
        if max_entries > MAX_BAT_ENTRIES:
            raise Unsupported(
                f"{path}: Max Table Entries {max_entries} is over imgfs's limit of "
                f"{MAX_BAT_ENTRIES}"
            )
        self._block_size = block_size
        bitmap_bytes = -(-(block_size // SECTOR) // 8)
        self._bitmap_size = -(-bitmap_bytes // SECTOR) * SECTOR
        self._table_offset = table_offset
        table = bytes(self.file.pread(table_offset, max_entries * 4))
        self._bat = list(struct.unpack(f">{max_entries}I", table))
        end = table_offset + -(-max_entries * 4 // SECTOR) * SECTOR
        # Blocks live after the BAT (and after the header, wherever the BAT is).
        table_end = max(end, data_offset + DYN_HEADER.size)
        span = self._bitmap_size + block_size
        past_eof = 0
        for index, entry in enumerate(self._bat):
            if entry == BAT_UNALLOCATED:
                continue
            start = entry * SECTOR
            if start < table_end or start + span > file_size + PAST_EOF_BLOCKS * span:
                raise CorruptImage(f"{path}: BAT entry {index} points at {start}, outside the file")
            if start + span > file_size and past_eof == 0:
                past_eof += 1
                self._notes.append(
                    f"block {index} lies past the end of the file (an allocation cut short by "
                    "a crash?): it reads as zeros"
                )
            end = max(end, start + span)
        # New blocks go where the footer is (or past the last block, if that is later).
        self._free_offset = max(end, (file_size - FOOTER.size) // SECTOR * SECTOR)
        if self._disk_type == DISK_DIFFERENCING:
            self._parent_candidates = self._parent_names(parent_name, locators, file_size)
            self._backing_name = self._choose_parent()
            if self._backing_name is None:
                raise CorruptImage(f"{path}: differencing image names no parent")
            self._parent_uuid = parent_uuid

    def _parent_names(self, unicode_name: bytes, locators: bytes, file_size: int) -> list[str]:
        """Parent names from the locators, relative ones first, then the header's name."""
        relative: list[str] = []
        absolute: list[str] = []
        for i in range(8):
            code, _space, length, _r, offset = LOCATOR.unpack_from(locators, i * LOCATOR.size)
            if code == bytes(4) or length == 0:
                continue
            if length > MAX_LOCATOR_BYTES or offset + length > file_size:
                self._notes.append(f"parent locator {code!r} points outside the file: ignored")
                continue
            data = bytes(self.file.pread(offset, length))
            try:
                if code == b"W2ru":
                    relative.append(data.decode("utf-16-le").rstrip("\0"))
                elif code == b"W2ku":
                    absolute.append(data.decode("utf-16-le").rstrip("\0"))
                elif code == b"MacX":  # a file:// URL in UTF-8
                    absolute.append(data.decode("utf-8").rstrip("\0"))
            except UnicodeDecodeError:
                self._notes.append(f"parent locator {code!r} is not valid text: ignored")
        try:
            name = unicode_name.decode("utf-16-be").split("\0", 1)[0]
        except UnicodeDecodeError:
            name = ""
        names = [_local_name(n) for n in relative]
        # Absolute names from another machine: look for the file next to the child.
        names += [_basename(n) for n in absolute]
        if name:
            names.append(_basename(name))
        return [n for n in dict.fromkeys(names) if n]

    def _choose_parent(self) -> str | None:
        here = os.path.dirname(os.path.abspath(self.file.path))
        for name in self._parent_candidates:
            if os.path.exists(os.path.join(here, name)):
                return name
        return self._parent_candidates[0] if self._parent_candidates else None

    # -- the parent -----------------------------------------------------------------------------

    def attach_backing(self, backing: BlockDriver) -> None:
        if isinstance(backing, VpcDriver) and self._parent_uuid != bytes(16):
            theirs = FOOTER.unpack(backing._footer)[15]
            if theirs != self._parent_uuid:
                self._notes.append(
                    f"parent {backing.file.path} has UUID {uuid.UUID(bytes=theirs)}, not the "
                    f"{uuid.UUID(bytes=self._parent_uuid)} this image names (read anyway)"
                )
        super().attach_backing(backing)

    # -- geometry -------------------------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def backing_spec(self) -> BackingSpec | None:
        if self._backing_name is None:
            return None
        return BackingSpec(self._backing_name, "vpc")

    # -- reads ----------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self._disk_type == DISK_FIXED:
            if offset + length <= self._data_end:
                return self.file.pread(offset, length)
            # Past the data area (a disk bigger than the file holds): zeros, not the footer.
            inside = max(0, self._data_end - offset)
            return bytes(self.file.pread(offset, inside)) + bytes(length - inside)
        pieces: list[bytes | bytearray | memoryview] = []
        end = offset + length
        bs = self._block_size
        while offset < end:
            index, within = divmod(offset, bs)
            n = min(bs - within, end - offset)
            entry = self._bat[index] if index < len(self._bat) else BAT_UNALLOCATED
            if entry == BAT_UNALLOCATED:
                pieces.append(self.read_backing(offset, n))
            elif self._disk_type == DISK_DIFFERENCING:
                bitmap = self._bitmap(index, entry)
                pieces.extend(self._read_differencing(bitmap, entry, offset, within, n))
            else:
                pieces.append(self.file.pread(entry * SECTOR + self._bitmap_size + within, n))
            offset += n
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def _read_differencing(
        self, bitmap: bytearray, entry: int, offset: int, within: int, n: int
    ) -> list[bytes | bytearray | memoryview]:
        data_start = entry * SECTOR + self._bitmap_size
        pieces: list[bytes | bytearray | memoryview] = []
        pos, stop = within, within + n
        while pos < stop:
            present = _bit(bitmap, pos // SECTOR)
            run_end = min(stop, (pos // SECTOR + 1) * SECTOR)
            while run_end < stop and _bit(bitmap, run_end // SECTOR) == present:
                run_end = min(stop, run_end + SECTOR)
            if present:
                pieces.append(self.file.pread(data_start + pos, run_end - pos))
            else:
                pieces.append(self.read_backing(offset + pos - within, run_end - pos))
            pos = run_end
        return pieces

    def _bitmap(self, index: int, entry: int) -> bytearray:
        with self._lock:
            return self._bitmap_locked(index, entry)

    def _bitmap_locked(self, index: int, entry: int) -> bytearray:
        # A host read under the lock: a failed read caches nothing, so reads stay exception-safe.
        cached = self._bitmaps.get(index)
        if cached is not None:
            self._bitmaps.move_to_end(index)
            return cached
        bitmap = bytearray(self.file.pread(entry * SECTOR, self._bitmap_size))
        self._remember_bitmap(index, bitmap)
        return bitmap

    def _remember_bitmap(self, index: int, bitmap: bytearray) -> None:
        self._bitmaps[index] = bitmap
        if len(self._bitmaps) > BITMAP_CACHE_BLOCKS:
            self._bitmaps.popitem(last=False)

    def block_status(self, offset: int, length: int) -> Extent:
        if self._disk_type == DISK_FIXED:
            return Extent(offset, length, Allocation.DATA, host_offset=offset)
        bs = self._block_size
        index, within = divmod(offset, bs)
        entry = self._bat[index] if index < len(self._bat) else BAT_UNALLOCATED
        n = min(bs - within, length)
        if entry == BAT_UNALLOCATED:
            # Extend over following unallocated blocks.
            while n < length:
                index += 1
                if index < len(self._bat) and self._bat[index] != BAT_UNALLOCATED:
                    break
                n = min(length, n + bs)
            return Extent(offset, n, Allocation.UNALLOCATED)
        data_start = entry * SECTOR + self._bitmap_size
        if self._disk_type == DISK_DIFFERENCING:
            bitmap = self._bitmap(index, entry)
            present = _bit(bitmap, within // SECTOR)
            run_end = min(within + n, (within // SECTOR + 1) * SECTOR)
            while run_end < within + n and _bit(bitmap, run_end // SECTOR) == present:
                run_end = min(within + n, run_end + SECTOR)
            if not present:
                return Extent(offset, run_end - within, Allocation.UNALLOCATED)
            n = run_end - within
        return Extent(offset, n, Allocation.DATA, host_offset=data_start + within)

    # -- writes ---------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_writable()
        if self._disk_type == DISK_FIXED:
            if offset + len(data) > self._data_end:
                # The disk is bigger than the data area (the size rule chose the footer's
                # size): writing there would overwrite the footer.
                raise Unsupported(
                    f"{self.file.path}: write at {offset} reaches past the fixed image's data "
                    f"area ({self._data_end} bytes)"
                )
            self.file.pwrite(offset, data)
            return
        view = memoryview(data).cast("B")
        end = offset + len(view)
        bs = self._block_size
        pos = 0
        while offset + pos < end:
            index, within = divmod(offset + pos, bs)
            n = min(bs - within, end - offset - pos)
            if index >= len(self._bat):
                raise CorruptImage(
                    f"{self.file.path}: block {index} is beyond the BAT ({len(self._bat)} entries)"
                )
            piece = view[pos : pos + n]
            if self._disk_type == DISK_DIFFERENCING:
                self._write_differencing(index, within, piece)
            else:
                with self._lock:
                    entry = self._bat[index]
                    if entry == BAT_UNALLOCATED:
                        new = self._allocate(b"\xff" * self._bitmap_size)
                        self.file.pwrite(new + self._bitmap_size + within, piece)
                        self._set_bat(index, new)
                        pos += n
                        continue
                self.file.pwrite(entry * SECTOR + self._bitmap_size + within, piece)
            pos += n

    def _write_differencing(self, index: int, within: int, piece: memoryview) -> None:
        # Copy-on-write in 4 KiB units (one bitmap byte): partly written units take the rest of
        # their bytes from the current content, so every set bit covers real data. Readers
        # that look at the bitmap a byte at a time (libvhdi) then agree with us.
        n = len(piece)
        unit = min(COW_UNIT, self._block_size)
        lo = within // unit * unit
        hi = min(-(-(within + n) // unit) * unit, self._block_size)
        with self._lock:
            entry = self._bat[index]
            fresh = entry == BAT_UNALLOCATED
            bitmap = bytearray(self._bitmap_size) if fresh else self._bitmap_locked(index, entry)
            buf: bytes | bytearray | memoryview = piece
            if lo < within or within + n < hi:
                out = bytearray(hi - lo)
                if lo < within:
                    out[: within - lo] = self._current(index, entry, bitmap, lo, within - lo)
                if within + n < hi:
                    out[within + n - lo :] = self._current(
                        index, entry, bitmap, within + n, hi - within - n
                    )
                out[within - lo : within - lo + n] = piece
                buf = out
            if fresh:
                entry = self._allocate(bytes(bitmap)) // SECTOR
            self.file.pwrite(entry * SECTOR + self._bitmap_size + lo, buf)
            first, last = lo // SECTOR, (hi - 1) // SECTOR
            changed = False
            for sector in range(first, last + 1):
                if not _bit(bitmap, sector):
                    bitmap[sector // 8] |= 0x80 >> (sector % 8)
                    changed = True
            if changed:
                b_lo = first // 8 // SECTOR * SECTOR
                b_hi = -(-(last // 8 + 1) // SECTOR) * SECTOR
                self.file.pwrite(entry * SECTOR + b_lo, bytes(bitmap[b_lo:b_hi]))
            if fresh:
                self._remember_bitmap(index, bitmap)
                self._set_bat(index, entry * SECTOR)

    def _current(
        self, index: int, entry: int, bitmap: bytearray, within: int, length: int
    ) -> bytes:
        """The guest bytes of a range inside one block before a write changes them."""
        guest = index * self._block_size + within
        if entry == BAT_UNALLOCATED:
            return bytes(self.read_backing(guest, length))
        return b"".join(
            bytes(p) for p in self._read_differencing(bitmap, entry, guest, within, length)
        )

    def _allocate(self, bitmap: bytes) -> int:
        """A new block at the end of the file, in the crash-safe order; returns its byte
        offset. The caller writes the data, then the BAT entry. Holds ``self._lock``."""
        block = self._free_offset
        if block // SECTOR >= BAT_UNALLOCATED:
            raise Unsupported(
                f"{self.file.path}: a new block at byte {block} is past what a BAT entry holds"
            )
        new_end = block + self._bitmap_size + self._block_size
        self.file.pwrite(new_end, self._footer)  # the file always ends with a footer
        self.file.pwrite(block, bitmap)  # overwrites the old footer
        self._free_offset = new_end
        return block

    def _set_bat(self, index: int, block_offset: int) -> None:
        entry = block_offset // SECTOR
        self.file.pwrite(self._table_offset + 4 * index, entry.to_bytes(4, "big"))
        self._bat[index] = entry

    def discard(self, offset: int, length: int) -> None:
        """Dynamic images only: whole blocks are unallocated (BAT entry first, then the hole
        punched), 4 KiB-aligned parts of other blocks punched (they read as zeros). Fixed and
        differencing images keep their data."""
        self.check_writable()
        if self._disk_type != DISK_DYNAMIC:
            return
        end = offset + length
        bs = self._block_size
        while offset < end:
            index, within = divmod(offset, bs)
            n = min(bs - within, end - offset)
            with self._lock:
                entry = self._bat[index] if index < len(self._bat) else BAT_UNALLOCATED
                if entry == BAT_UNALLOCATED:
                    pass
                elif n == bs:
                    self._set_bat(index, BAT_UNALLOCATED * SECTOR)
                    self.file.punch_hole(entry * SECTOR, self._bitmap_size + bs)
                else:
                    lo, hi = align_up(within, 4096), (within + n) // 4096 * 4096
                    if lo < hi:
                        self.file.punch_hole(entry * SECTOR + self._bitmap_size + lo, hi - lo)
            offset += n

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Unallocated blocks of a dynamic image already read as zeros: only allocated blocks
        (and every block of a fixed or differencing image) get zeros written."""
        self.check_writable()
        if self._disk_type != DISK_DYNAMIC:
            super().write_zeroes(offset, length, may_unmap)
            return
        end = offset + length
        bs = self._block_size
        while offset < end:
            index, within = divmod(offset, bs)
            n = min(bs - within, end - offset)
            if index < len(self._bat) and self._bat[index] != BAT_UNALLOCATED:
                if may_unmap and n == bs:
                    self.discard(offset, n)  # an unallocated block reads as zeros
                else:
                    super().write_zeroes(offset, n, may_unmap)
            offset += n

    # -- management -----------------------------------------------------------------------------

    def check(self, repair: RepairMode) -> CheckResult:
        """Blocks outside the file or sharing space (qemu has no vpc check)."""
        result = CheckResult()
        if self._disk_type == DISK_FIXED:
            return result
        file_size = self.file.size()
        span = self._bitmap_size + self._block_size
        blocks = sorted(
            (entry * SECTOR, index)
            for index, entry in enumerate(self._bat)
            if entry != BAT_UNALLOCATED
        )
        for start, index in blocks:
            if start + span > file_size:
                result.corruptions += 1
                result.messages.append(f"block {index} at {start} runs past the end of the file")
        for (s0, i0), (s1, i1) in zip(blocks, blocks[1:], strict=False):
            if s1 < s0 + span:
                result.corruptions += 1
                result.messages.append(f"blocks {i0} and {i1} share space at {s1}")
        result.total_clusters = len(self._bat)
        result.allocated_clusters = len(blocks)
        result.image_end_offset = file_size
        return result

    def info(self) -> ImageInfo:
        info = super().info()
        if self._disk_type != DISK_FIXED:
            info.cluster_size = self._block_size
        info.format_specific = {
            "subformat": {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic"}.get(
                self._disk_type, "differencing"
            ),
            "creator-app": self._creator_app.decode("latin-1"),
        }
        info.notes = list(self._notes)
        return info

    # -- create ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        known = set(cls.create_options)
        for key in options:
            if key not in known:
                raise InvalidRequest(f"vpc: unknown create option {key!r}")
        subformat = choice_option(options, "subformat", ("dynamic", "fixed"), "dynamic")
        force_size = bool_option(options, "force_size")
        block_size = size_option(options, "block_size", DEFAULT_BLOCK_SIZE)
        if (
            block_size < MIN_BLOCK_SIZE
            or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)
        ):
            raise InvalidRequest(f"vpc: block_size {block_size} is not a power of two in range")
        backing = options.get("backing_file")
        if options.get("backing_fmt", "vpc") != "vpc":
            raise InvalidRequest(f"vpc: a parent must be vpc, not {options['backing_fmt']!r}")
        if size < 0 or size > MAX_CREATE_SIZE:
            raise InvalidRequest(f"vpc: size {size} is beyond the format's {MAX_CREATE_SIZE}")
        if backing is not None and subformat == "fixed":
            raise InvalidRequest("vpc: a fixed image cannot have a parent")

        parent_fields = None
        if backing is not None:
            parent_fields = _parent_fields(path, backing)
        if parent_fields is not None and parent_fields[0] == size:
            # Same size rule as the parent (a child normally is the parent's size).
            _psize, creator, current, geometry, p_uuid, p_mtime = parent_fields
            current_size = current
        else:
            current_size, geometry, creator = _size_and_geometry(size, force_size)
        disk_type = {"fixed": DISK_FIXED, "dynamic": DISK_DYNAMIC}[subformat]
        if backing is not None:
            disk_type = DISK_DIFFERENCING
        timestamp = (int(time.time()) - VHD_EPOCH) & 0xFFFFFFFF
        data_offset = NO_DATA_OFFSET if disk_type == DISK_FIXED else SECTOR
        footer = with_checksum(
            FOOTER.pack(
                FOOTER_COOKIE, 2, 0x00010000, data_offset, timestamp, creator, 0x00050003,
                b"Wi2k", current_size, current_size, *geometry, disk_type, 0,
                uuid.uuid4().bytes, 0, bytes(427),
            ),
            FOOTER_CHECKSUM_AT,
        )  # fmt: skip
        if disk_type != DISK_FIXED and -(-current_size // block_size) > MAX_BAT_ENTRIES:
            raise InvalidRequest(
                f"vpc: {current_size} bytes in blocks of {block_size} need more than "
                f"{MAX_BAT_ENTRIES} BAT entries: use bigger blocks"
            )
        with open(path, "wb") as f:
            if disk_type == DISK_FIXED:
                f.truncate(current_size)
                f.seek(current_size)
                f.write(footer)
                return
            entries = -(-current_size // block_size)
            table_offset = SECTOR + DYN_HEADER.size
            table_bytes = -(-entries * 4 // SECTOR) * SECTOR
            end = table_offset + table_bytes
            parent_uuid = bytes(16)
            parent_ts = 0
            parent_name = bytes(512)
            locators = bytearray(192)
            locator_data: list[tuple[int, bytes]] = []
            if backing is not None:
                assert parent_fields is not None
                parent_uuid, parent_ts = parent_fields[4], parent_fields[5]
                base = os.path.basename(backing)
                parent_name = base.encode("utf-16-be")[:510].ljust(512, b"\0")
                rel = _relative_parent(path, backing)
                absolute = os.path.abspath(os.path.join(os.path.dirname(path), backing))
                win_rel, win_abs = ".\\" + rel.replace("/", "\\"), absolute.replace("/", "\\")
                for i, (code, text) in enumerate(((b"W2ru", win_rel), (b"W2ku", win_abs))):
                    blob = text.encode("utf-16-le")
                    space = -(-len(blob) // SECTOR) * SECTOR
                    LOCATOR.pack_into(locators, i * LOCATOR.size, code, space, len(blob), 0, end)
                    locator_data.append((end, blob))
                    end += space
            header = with_checksum(
                DYN_HEADER.pack(
                    HEADER_COOKIE, NO_DATA_OFFSET, table_offset, 0x00010000, entries,
                    block_size, 0, parent_uuid, parent_ts, bytes(4), parent_name,
                    bytes(locators), bytes(256),
                ),
                HEADER_CHECKSUM_AT,
            )  # fmt: skip
            f.write(footer)
            f.write(header)
            f.write(b"\xff" * (entries * 4) + bytes(table_bytes - entries * 4))
            for where, blob in locator_data:
                f.seek(where)
                f.write(blob)
            f.seek(end)
            f.write(footer)


def _size_and_geometry(size: int, force_size: bool) -> tuple[int, tuple[int, int, int], bytes]:
    """(current_size, CHS, creator) for a new image, as qemu-img 7.2 makes them: without
    force_size the size grows to the next whole CHS geometry (creator "qemu"); with it the size
    is kept and the geometry set to the maximum so readers use current_size (creator "qem2")."""
    total = -(-size // SECTOR)
    max_geometry = (65535, 16, 255)
    if force_size:
        return total * SECTOR, max_geometry, b"qem2"
    geometry = (0, 0, 0)
    i = 0
    while geometry[0] * geometry[1] * geometry[2] < total:
        geometry = chs_geometry(total + i)
        i += 1
        if geometry[0] * geometry[1] * geometry[2] == MAX_CHS_SECTORS:
            break
    product = geometry[0] * geometry[1] * geometry[2]
    if product == MAX_CHS_SECTORS:
        return total * SECTOR, geometry, b"qemu"
    return product * SECTOR, geometry, b"qemu"


def _parent_fields(
    path: str, backing: str
) -> tuple[int, bytes, int, tuple[int, int, int], bytes, int]:
    """(virtual size, creator, current_size, geometry, uuid, mtime) of a vpc parent."""
    from imgfs.block.chain import open_host_file, resolve_relative
    from imgfs.block.hostfile import CacheMode

    parent_path = resolve_relative(backing, path)
    file = open_host_file(parent_path, writable=False, cache=CacheMode.WRITEBACK)
    try:
        parent = VpcDriver.open(file, OpenOptions(read_only=True, cache=CacheMode.WRITEBACK))
        f = FOOTER.unpack(parent._footer)
        mtime = (int(os.stat(parent_path).st_mtime) - VHD_EPOCH) & 0xFFFFFFFF
        return parent.virtual_size, f[5], f[9], (f[10], f[11], f[12]), f[15], mtime
    finally:
        file.close()


def _relative_parent(path: str, backing: str) -> str:
    if os.path.isabs(backing):
        return os.path.relpath(backing, os.path.dirname(os.path.abspath(path)))
    return backing


def _local_name(name: str) -> str:
    """A Windows relative name (".\\dir\\parent.vhd") or a Mac URL as a local relative path."""
    if name.startswith("file://"):
        name = name[len("file://") :]
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _basename(name: str) -> str:
    if name.startswith("file://"):
        name = name[len("file://") :]
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _bit(bitmap: bytearray, sector: int) -> bool:
    return bool(bitmap[sector // 8] & (0x80 >> (sector % 8)))


register(VpcDriver)
