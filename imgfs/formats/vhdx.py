"""vhdx: Microsoft VHDX images (MS-VHDX 1.0), fixed, dynamic and differencing.

Layout: a 1 MiB header section (file type identifier, two headers at 64 and 128 KiB chosen by
sequence number, two region tables at 192 and 256 KiB), then regions the region table places:
the log, the block allocation table (BAT) and the metadata region (file parameters, virtual
disk size, sector sizes, page 83 identifier, parent locator). Every structure is little-endian
and protected by CRC-32C.

The BAT holds one 64-bit entry per payload block (state in bits 0-2, file offset in MiB in bits
20-63) and, after every ``chunk_ratio`` payload entries, one entry for the sector bitmap block
of that chunk (differencing images: one bit per logical sector, set when this image holds it).

The log: an image whose header names a log GUID has metadata updates that may not have reached
their place. A writable open replays the log into the file and clears the GUID; a read-only open
replays it into an in-memory view of the file (bounded by the log's size) and leaves the file
alone.

Writes allocate a block at the (1 MiB aligned) end of the file in the order MS-VHDX requires
without the log: the file grows, the data is written, a sync, and only then the BAT entry that
points at it (a sector bitmap's bits likewise follow a sync after the sectors they claim). The
first write of an open also gives both headers new file/data write GUIDs and sequence numbers
(one header at a time, with a sync between).
"""

from __future__ import annotations

import array
import os
import struct
import sys
import threading
import uuid
from collections.abc import Mapping
from typing import Self

import google_crc32c

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

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

FILE_SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB

# signature, checksum, sequence_number, file_write_guid, data_write_guid, log_guid,
# log_version, version, log_length, log_offset
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
# signature, checksum, entry_count, reserved
REGION_HEADER = struct.Struct("<4sIII")
# guid, file_offset, length, required
REGION_ENTRY = struct.Struct("<16sQII")
# signature, reserved, entry_count, reserved
METADATA_HEADER = struct.Struct("<8sHH20s")
# item_id, offset, length, flags, reserved
METADATA_ENTRY = struct.Struct("<16sIIII")
# signature, checksum, entry_length, tail, sequence_number, descriptor_count, reserved,
# log_guid, flushed_file_offset, last_file_offset
LOG_HEADER = struct.Struct("<4sIIIQII16sQQ")
# data: signature, trailing_bytes, leading_bytes, file_offset, sequence_number
# zero: signature, reserved, zero_length, file_offset, sequence_number
LOG_DESCRIPTOR = struct.Struct("<4s4s8sQQ")
# signature, sequence_high, data, sequence_low
LOG_DATA = struct.Struct("<4sI4084sI")
assert HEADER.size == 80 and REGION_ENTRY.size == 32 and METADATA_ENTRY.size == 32
assert LOG_HEADER.size == 64 and LOG_DESCRIPTOR.size == 32 and LOG_DATA.size == 4096


def guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
PARENT_LOCATOR_TYPE = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
ZERO_GUID = bytes(16)

# Payload block states (BAT bits 0-2).
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_UNMAPPED_V095 = 5  # the value of UNMAPPED in drafts of the spec, still met
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
SB_NOT_PRESENT = 0
SB_PRESENT = 6
STATE_NAMES = {0: "NOT_PRESENT", 1: "UNDEFINED", 2: "ZERO", 3: "UNMAPPED", 6: "FULLY_PRESENT",
               7: "PARTIALLY_PRESENT"}  # fmt: skip

FILE_PARAM_LEAVE_BLOCKS_ALLOCATED = 1
FILE_PARAM_HAS_PARENT = 2
META_IS_USER = 1
META_IS_VIRTUAL_DISK = 2
META_IS_REQUIRED = 4

SECTOR_BITMAP_BLOCK = 1 * MiB
MAX_VIRTUAL_SIZE = 64 * TiB
MAX_TABLE_ENTRIES = 2047
# The BAT is held in memory: 128 MiB covers 16 TiB at 1 MiB blocks, 64 TiB at 4 MiB. A region
# in a sparse file may claim any size up to 64 TiB / 1 MiB * 8 = 512 MiB.
MAX_BAT_BYTES = 128 * MiB
MAX_LOG_SIZE = 64 * MiB  # dirty logs larger than this are refused rather than read into memory
MAX_METADATA_ITEM = 1 * MiB
# How far a log entry may grow the file (it records the file's new end).
MAX_LOG_GROWTH = 1 << 40
# Blocks a crash may leave past the end of the file; BAT entries further out are corrupt.
PAST_EOF_BLOCKS = 64


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return google_crc32c.value(bytes(data))


def checksum_ok(buf: bytes, checksum_at: int = 4) -> bool:
    stored = int.from_bytes(buf[checksum_at : checksum_at + 4], "little")
    zeroed = buf[:checksum_at] + bytes(4) + buf[checksum_at + 4 :]
    return crc32c(zeroed) == stored


def with_crc(buf: bytes | bytearray, checksum_at: int = 4) -> bytes:
    b = bytearray(buf)
    b[checksum_at : checksum_at + 4] = bytes(4)
    b[checksum_at : checksum_at + 4] = crc32c(b).to_bytes(4, "little")
    return bytes(b)


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


class VhdxDriver(BlockDriver):
    format_name = "vhdx"
    supports_write = True

    create_options = {
        "subformat": "dynamic (default) or fixed",
        "block_size": "payload block size, 1M..256M, power of two (default: by disk size)",
        "block_state_zero": "on (default): unwritten blocks of a dynamic image are ZERO blocks",
        "log_size": "log size, a multiple of 1M (default 1M)",
        "logical_sector_size": "512 (default) or 4096",
        "backing_file": "parent image: makes a differencing image",
        "backing_fmt": "format of the parent (must be vhdx)",
    }

    def __init__(self, file: HostFile, options: OpenOptions) -> None:
        super().__init__(file, options)
        self._lock = threading.Lock()
        self._notes: list[str] = []
        # Pages of the file replayed from the log in memory (read-only opens of a dirty log).
        self._overlay: dict[int, bytes] = {}
        self._overlay_zero: list[tuple[int, int]] = []
        self._overlay_end = 0
        self._header: list = []
        self._header_slot = 0
        self._bat_offset = 0
        self._bat = bytearray()
        self._size = 0
        self._block_size = 0
        self._logical_sector = 512
        self._physical_sector = 512
        self._has_parent = False
        self._leave_allocated = False
        self._chunk_ratio = 0
        self._page83 = b""
        self._parent_candidates: list[str] = []
        self._parent_linkage = ""
        self._parent_linkage2 = ""
        self._backing_name: str | None = None
        self._file_end = 0
        self._write_started = False

    # -- discovery ------------------------------------------------------------------------------

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        return 100 if probe.head[:8] == FILE_SIGNATURE else 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        self = cls(file, options)
        self._load()
        return self

    # -- the file as replayed ------------------------------------------------------------------

    def _pread(self, offset: int, length: int) -> bytes | memoryview:
        if not self._overlay and not self._overlay_zero:
            return self.file.pread(offset, length)
        buf = bytearray(self.file.pread(offset, length))
        for zo, zl in self._overlay_zero:
            lo, hi = max(zo, offset), min(zo + zl, offset + length)
            if lo < hi:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
        page = offset // 4096 * 4096
        while page < offset + length:
            data = self._overlay.get(page)
            if data is not None:
                lo, hi = max(page, offset), min(page + 4096, offset + length)
                buf[lo - offset : hi - offset] = data[lo - page : hi - page]
            page += 4096
        return bytes(buf)

    # -- open -----------------------------------------------------------------------------------

    def _load(self) -> None:
        path = self.file.path
        file_size = self.file.size()
        if file_size < 1 * MiB:
            raise CorruptImage(f"{path}: {file_size} bytes is too small for a VHDX image")
        if bytes(self.file.pread(0, 8)) != FILE_SIGNATURE:
            raise CorruptImage(f"{path}: no 'vhdxfile' signature")
        self._read_headers()
        h = self._header
        log_guid, log_length, log_offset = h[5], h[8], h[9]
        if log_guid != ZERO_GUID:
            self._replay_log(log_guid, log_offset, log_length, file_size)
        self._read_regions()
        self._file_end = self._end_of_blocks(max(self.file.size(), self._overlay_end))

    def _end_of_blocks(self, file_size: int) -> int:
        """Where new blocks go: past the file and every block the BAT places (a crash can leave
        a BAT entry pointing past the end of the file; that block reads as zeros)."""
        end = align_up(file_size, MiB)
        limit = end + PAST_EOF_BLOCKS * self._block_size
        entries = array.array("Q", self._bat)  # one copy (frombytes), not two
        if sys.byteorder == "big":
            entries.byteswap()
        # Fast path: the highest entry (offsets are the high bits) is inside the limit.
        if not entries or ((max(entries) >> 20) << 20) + self._block_size <= end:
            return end
        ratio = self._chunk_ratio
        for index, (raw,) in enumerate(struct.iter_unpack("<Q", self._bat)):
            if raw & 7 not in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
                continue  # SB_PRESENT is 6, the same value as FULLY_PRESENT
            is_bitmap = index % (ratio + 1) == ratio
            block_end = ((raw >> 20) << 20) + (
                SECTOR_BITMAP_BLOCK if is_bitmap else self._block_size
            )
            if block_end > limit:
                raise CorruptImage(
                    f"{self.file.path}: BAT entry {index} points at {(raw >> 20) << 20}, outside "
                    "the file"
                )
            end = max(end, block_end)
        if end > align_up(file_size, MiB):
            self._notes.append(
                "some blocks lie past the end of the file (an allocation cut short by a crash?): "
                "they read as zeros"
            )
        return end

    def _read_headers(self) -> None:
        path = self.file.path
        best: tuple | None = None
        bad = []
        for slot, offset in enumerate(HEADER_OFFSETS):
            raw = bytes(self.file.pread(offset, HEADER_SIZE))
            fields = HEADER.unpack_from(raw)
            if fields[0] != b"head" or not checksum_ok(raw):
                bad.append(slot + 1)
                continue
            if fields[7] != 1:
                raise Unsupported(f"{path}: VHDX header version {fields[7]} (only 1 is known)")
            if best is None or fields[2] > best[1][2]:
                best = (slot, fields)
        if best is None:
            raise CorruptImage(f"{path}: neither VHDX header has a valid signature and CRC-32C")
        if bad:
            self._notes.append(f"VHDX header {bad[0]} is invalid; used the other one")
        self._header_slot, fields = best
        self._header = list(fields)
        if fields[6] != 0:
            raise Unsupported(f"{path}: VHDX log version {fields[6]} (only 0 is known)")

    def _read_regions(self) -> None:
        path = self.file.path
        file_size = max(self.file.size(), self._overlay_end)
        table = None
        for offset in REGION_TABLE_OFFSETS:
            raw = bytes(self._pread(offset, REGION_TABLE_SIZE))
            sig, _ck, count, _r = REGION_HEADER.unpack_from(raw)
            if sig == b"regi" and checksum_ok(raw) and count <= MAX_TABLE_ENTRIES:
                table = (raw, count)
                break
            self._notes.append(f"VHDX region table at {offset} is invalid")
        if table is None:
            raise CorruptImage(f"{path}: neither VHDX region table is valid")
        raw, count = table
        regions: dict[bytes, tuple[int, int]] = {}
        for i in range(count):
            gid, offset, length, required = REGION_ENTRY.unpack_from(raw, 16 + 32 * i)
            if gid not in (BAT_GUID, METADATA_GUID):
                if required & 1:
                    raise Unsupported(f"{path}: unknown required region {uuid.UUID(bytes_le=gid)}")
                continue
            if offset % MiB or length % MiB or offset < MiB or offset + length > file_size:
                raise CorruptImage(
                    f"{path}: region {uuid.UUID(bytes_le=gid)} at {offset} length {length} is "
                    "not 1 MiB aligned inside the file"
                )
            regions[gid] = (offset, length)
        if BAT_GUID not in regions or METADATA_GUID not in regions:
            raise CorruptImage(f"{path}: the region table lacks the BAT or the metadata region")
        self._read_metadata(*regions[METADATA_GUID])
        bat_offset, bat_length = regions[BAT_GUID]
        payload_blocks = -(-self._size // self._block_size)
        ratio = self._chunk_ratio
        if self._has_parent:
            entries = -(-payload_blocks // ratio) * (ratio + 1)
        else:
            entries = payload_blocks + (payload_blocks - 1) // ratio if payload_blocks else 0
        if entries * 8 > bat_length:
            raise CorruptImage(
                f"{path}: BAT region of {bat_length} bytes is too small for {entries} entries"
            )
        if entries * 8 > MAX_BAT_BYTES:
            raise Unsupported(
                f"{path}: a BAT of {entries} entries ({entries * 8} bytes) is over imgfs's "
                f"{MAX_BAT_BYTES}-byte limit"
            )
        self._bat_offset = bat_offset
        self._bat = bytearray(self._pread(bat_offset, entries * 8))

    def _read_metadata(self, offset: int, length: int) -> None:
        path = self.file.path
        raw = bytes(self._pread(offset, min(length, 64 * KiB)))
        sig, _r, count, _r2 = METADATA_HEADER.unpack_from(raw)
        if sig != b"metadata" or count > MAX_TABLE_ENTRIES:
            raise CorruptImage(f"{path}: bad metadata table (signature {sig!r}, {count} entries)")
        items: dict[bytes, bytes] = {}
        for i in range(count):
            item, item_offset, item_length, flags, _ = METADATA_ENTRY.unpack_from(raw, 32 + 32 * i)
            known = item in (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83_DATA,
                             LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR)  # fmt: skip
            if not known:
                if flags & META_IS_REQUIRED:
                    raise Unsupported(
                        f"{path}: unknown required metadata item {uuid.UUID(bytes_le=item)}"
                    )
                continue
            if item_length > MAX_METADATA_ITEM or item_offset + item_length > length:
                raise CorruptImage(
                    f"{path}: metadata item {uuid.UUID(bytes_le=item)} at {item_offset} length "
                    f"{item_length} is outside the metadata region"
                )
            items[item] = bytes(self._pread(offset + item_offset, item_length))
        for item, size in ((FILE_PARAMETERS, 8), (VIRTUAL_DISK_SIZE, 8), (LOGICAL_SECTOR_SIZE, 4),
                           (PHYSICAL_SECTOR_SIZE, 4)):  # fmt: skip
            if item not in items or len(items[item]) < size:
                raise CorruptImage(f"{path}: metadata item {uuid.UUID(bytes_le=item)} is missing")
        block_size, flags = struct.unpack_from("<II", items[FILE_PARAMETERS])
        (size,) = struct.unpack_from("<Q", items[VIRTUAL_DISK_SIZE])
        (logical,) = struct.unpack_from("<I", items[LOGICAL_SECTOR_SIZE])
        (physical,) = struct.unpack_from("<I", items[PHYSICAL_SECTOR_SIZE])
        if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
            raise CorruptImage(f"{path}: block size {block_size} is not a power of 2 in 1M..256M")
        if logical not in (512, 4096) or physical not in (512, 4096):
            raise CorruptImage(f"{path}: sector sizes {logical}/{physical} are not 512 or 4096")
        if size == 0 or size > MAX_VIRTUAL_SIZE or size % logical:
            raise CorruptImage(f"{path}: virtual disk size {size} is out of range")
        self._block_size, self._size = block_size, size
        self._logical_sector, self._physical_sector = logical, physical
        self._leave_allocated = bool(flags & FILE_PARAM_LEAVE_BLOCKS_ALLOCATED)
        self._has_parent = bool(flags & FILE_PARAM_HAS_PARENT)
        self._chunk_ratio = (1 << 23) * logical // block_size
        self._page83 = items.get(PAGE83_DATA, b"")
        if self._has_parent:
            if PARENT_LOCATOR not in items:
                raise CorruptImage(f"{path}: differencing image without a parent locator")
            self._parse_parent_locator(items[PARENT_LOCATOR])

    def _parse_parent_locator(self, raw: bytes) -> None:
        path = self.file.path
        if len(raw) < 20 or raw[:16] != PARENT_LOCATOR_TYPE:
            raise Unsupported(f"{path}: unknown parent locator type")
        (count,) = struct.unpack_from("<H", raw, 18)
        entries: dict[str, str] = {}
        for i in range(count):
            if 20 + 12 * (i + 1) > len(raw):
                raise CorruptImage(f"{path}: parent locator entry {i} is outside the item")
            ko, vo, kl, vl = struct.unpack_from("<IIHH", raw, 20 + 12 * i)
            if ko + kl > len(raw) or vo + vl > len(raw):
                raise CorruptImage(f"{path}: parent locator entry {i} is outside the item")
            try:
                key = raw[ko : ko + kl].decode("utf-16-le")
                entries[key] = raw[vo : vo + vl].decode("utf-16-le")
            except UnicodeDecodeError:
                raise CorruptImage(f"{path}: parent locator entry {i} is not UTF-16") from None
        self._parent_linkage = entries.get("parent_linkage", "")
        self._parent_linkage2 = entries.get("parent_linkage2", "")
        names = []
        if "relative_path" in entries:
            rel = entries["relative_path"].replace("\\", "/")
            while rel.startswith("./"):
                rel = rel[2:]
            names.append(rel)
        for key in ("absolute_win32_path", "volume_path"):
            if key in entries:
                names.append(entries[key].replace("\\", "/").rsplit("/", 1)[-1])
        self._parent_candidates = [n for n in dict.fromkeys(names) if n]
        if not self._parent_candidates:
            raise CorruptImage(f"{path}: the parent locator names no parent")
        here = os.path.dirname(os.path.abspath(path))
        self._backing_name = next(
            (n for n in self._parent_candidates if os.path.exists(os.path.join(here, n))),
            self._parent_candidates[0],
        )

    # -- the log --------------------------------------------------------------------------------

    def _replay_log(self, log_guid: bytes, log_offset: int, log_length: int, size: int) -> None:
        path = self.file.path
        if log_length == 0 or log_length % MiB or log_offset % MiB or log_offset < MiB:
            raise CorruptImage(f"{path}: log at {log_offset} length {log_length} is misaligned")
        if log_offset + log_length > size:
            raise CorruptImage(f"{path}: log at {log_offset} length {log_length} is past the end")
        if log_length > MAX_LOG_SIZE:
            raise Unsupported(
                f"{path}: the log needs replaying and is {log_length} bytes, more than the "
                f"{MAX_LOG_SIZE} imgfs reads into memory"
            )
        log = bytes(self.file.pread(log_offset, log_length))
        entries: dict[int, tuple] = {}
        for off in range(0, log_length, 4096):
            if log[off : off + 4] != b"loge":
                continue
            h = LOG_HEADER.unpack_from(log, off)
            length = h[2]
            if length < 4096 or length % 4096 or off + length > log_length or h[7] != log_guid:
                continue
            if not checksum_ok(log[off : off + length]):
                continue
            entries[off] = h
        sequence = self._active_sequence(entries, log_length)
        if not sequence:
            # No valid entry: nothing to replay; the GUID alone is harmless.
            self._notes.append("log GUID set but the log has no valid entries: nothing replayed")
            self._clear_log_guid_if_writable()
            return
        pages: dict[int, bytes] = {}
        zeros: list[tuple[int, int]] = []
        last_file_offset = 0
        for off in sequence:
            h = entries[off]
            seq, count = h[4], h[5]
            if h[9] > size + MAX_LOG_GROWTH:
                raise CorruptImage(f"{path}: log entry at {off} grows the file to {h[9]} bytes")
            last_file_offset = max(last_file_offset, h[9])
            # Every change must land inside the file as the entry leaves it.
            limit = max(size, h[9])
            desc_area = align_up(64 + 32 * count, 4096)
            if desc_area > h[2]:
                raise CorruptImage(f"{path}: log entry at {off} has {count} descriptors, too many")
            data_at = off + desc_area
            for i in range(count):
                sig, a, b, file_offset, dseq = LOG_DESCRIPTOR.unpack_from(log, off + 64 + 32 * i)
                if dseq != seq:
                    raise CorruptImage(f"{path}: log descriptor sequence {dseq} != entry {seq}")
                if sig == b"zero":
                    zero_length = int.from_bytes(b, "little")
                    if (
                        file_offset % 4096
                        or zero_length % 4096
                        or file_offset + zero_length > limit
                    ):
                        raise CorruptImage(
                            f"{path}: log zero descriptor at {file_offset} length {zero_length} "
                            "is misaligned or past the end of the file"
                        )
                    for p in [p for p in pages if file_offset <= p < file_offset + zero_length]:
                        del pages[p]
                    zeros.append((file_offset, zero_length))
                elif sig == b"desc":
                    if data_at + 4096 > off + h[2] or file_offset % 4096 or file_offset >= limit:
                        raise CorruptImage(f"{path}: log data descriptor {i} is out of place")
                    dsig, high, payload, low = LOG_DATA.unpack_from(log, data_at)
                    if dsig != b"data" or (high << 32 | low) != seq:
                        raise CorruptImage(f"{path}: log data sector at {data_at} is invalid")
                    pages[file_offset] = b + payload + a
                    data_at += 4096
                else:
                    raise CorruptImage(f"{path}: unknown log descriptor {sig!r}")
        if self.read_only:
            self._overlay = pages
            self._overlay_zero = zeros
            self._overlay_end = max(size, last_file_offset)
            self._notes.append(
                f"the log holds {len(sequence)} unreplayed entries: replayed in memory for this "
                "read-only open (the file is unchanged)"
            )
            return
        # Zeros first, then pages, in log order is what matters; pages already drop zeroed ones
        # that came later, and zero ranges written before a page are overwritten by it.
        for zo, zl in zeros:
            self.file.zero_range(zo, zl) or self.file.pwrite(zo, bytes(zl))
        for page, data in sorted(pages.items()):
            self.file.pwrite(page, data)
        if self.file.size() < last_file_offset:
            self.file.truncate(last_file_offset)
        self.file.sync()
        self._notes.append(f"replayed {len(sequence)} log entries into the file")
        self._clear_log_guid_if_writable()

    def _active_sequence(self, entries: dict[int, tuple], log_length: int) -> list[int]:
        """Offsets of the entries of the newest complete sequence, tail first."""
        for head in sorted(entries, key=lambda o: entries[o][4], reverse=True):
            head_seq = entries[head][4]
            off = entries[head][3]  # the tail
            chain: list[int] = []
            expected = None
            while len(chain) <= len(entries):
                h = entries.get(off)
                if h is None or (expected is not None and h[4] != expected):
                    break
                chain.append(off)
                if off == head and h[4] == head_seq:
                    return chain
                expected = h[4] + 1
                off = (off + h[2]) % log_length
        return []

    def _clear_log_guid_if_writable(self) -> None:
        if self.read_only:
            return
        self._header[5] = ZERO_GUID
        self._write_headers()

    def _write_headers(self) -> None:
        """Both headers with the next sequence numbers, the older slot first, synced."""
        h = self._header
        for slot in (1 - self._header_slot, self._header_slot):
            h[2] += 1
            raw = HEADER.pack(*h).ljust(HEADER_SIZE, b"\0")
            self.file.pwrite(HEADER_OFFSETS[slot], with_crc(raw))
            self.file.sync()

    # -- the parent -----------------------------------------------------------------------------

    def attach_backing(self, backing: BlockDriver) -> None:
        if isinstance(backing, VhdxDriver) and self._parent_linkage:
            theirs = "{" + str(uuid.UUID(bytes_le=bytes(backing._header[4]))) + "}"
            wanted = {g.lower() for g in (self._parent_linkage, self._parent_linkage2) if g}
            if theirs.lower() not in wanted:
                raise CorruptImage(
                    f"{self.file.path}: parent {backing.file.path} has data write GUID {theirs}, "
                    f"not the {self._parent_linkage} this image was made from (the parent "
                    "changed since)"
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
        return BackingSpec(self._backing_name, "vhdx")

    # -- BAT ------------------------------------------------------------------------------------

    def _payload_index(self, block: int) -> int:
        return block + block // self._chunk_ratio

    def _bitmap_index(self, chunk: int) -> int:
        return chunk * (self._chunk_ratio + 1) + self._chunk_ratio

    def _entry(self, index: int) -> tuple[int, int]:
        (raw,) = struct.unpack_from("<Q", self._bat, index * 8)
        state = raw & 7
        offset = (raw >> 20) << 20
        if state == 4 or (state == PAYLOAD_PARTIALLY_PRESENT and not self._has_parent):
            # 4 is no state; partly present blocks need a parent. qemu fails these reads too.
            raise CorruptImage(f"{self.file.path}: BAT entry {index} has invalid state {state}")
        if state in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT) and (
            offset < MiB or offset >= self._file_end
        ):
            raise CorruptImage(
                f"{self.file.path}: BAT entry {index} points at {offset}, outside the file"
            )
        return state, offset

    def _set_entry(self, index: int, state: int, offset: int) -> None:
        if offset:
            # Barrier: the grown file and the data are durable before a BAT entry points at
            # them (the host may write back in any order; a BAT entry past the end of the file
            # makes the whole image unopenable for qemu, and one naming unwritten space reads
            # zeros instead of the data or the parent's).
            self.file.sync()
        raw = (offset >> 20) << 20 | state
        self.file.pwrite(self._bat_offset + index * 8, raw.to_bytes(8, "little"))
        # In memory only once written: after a host error the BAT keeps the old entry, so a
        # retried write allocates again instead of going to space no on-disk entry names.
        struct.pack_into("<Q", self._bat, index * 8, raw)

    # -- reads ----------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        pieces: list[bytes | bytearray | memoryview] = []
        end = offset + length
        bs = self._block_size
        while offset < end:
            block, within = divmod(offset, bs)
            n = min(bs - within, end - offset)
            state, host = self._entry(self._payload_index(block))
            if state == PAYLOAD_FULLY_PRESENT:
                pieces.append(self._pread(host + within, n))
            elif state == PAYLOAD_PARTIALLY_PRESENT and self._has_parent:
                pieces.extend(self._read_partial(block, host, offset, within, n))
            elif state == PAYLOAD_ZERO or not self._has_parent:
                pieces.append(bytes(n))
            else:
                pieces.append(self.read_backing(offset, n))
            offset += n
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _sector_bits(self, offset: int, length: int) -> tuple[bytes, int]:
        """The sector bitmap bytes covering a guest range inside one block, and the sector
        number of bit 0 of the first byte."""
        ls = self._logical_sector
        chunk_bytes = self._chunk_ratio * self._block_size
        chunk, in_chunk = divmod(offset, chunk_bytes)
        state, host = self._entry(self._bitmap_index(chunk))
        first = in_chunk // ls
        last = (in_chunk + length - 1) // ls
        if state != SB_PRESENT:
            return bytes(last // 8 - first // 8 + 1), first // 8 * 8
        if host < MiB:
            raise CorruptImage(f"{self.file.path}: sector bitmap of chunk {chunk} at {host}")
        return bytes(self._pread(host + first // 8, last // 8 - first // 8 + 1)), first // 8 * 8

    def _read_partial(
        self, block: int, host: int, offset: int, within: int, n: int
    ) -> list[bytes | bytearray | memoryview]:
        ls = self._logical_sector
        bits, base = self._sector_bits(offset, n)
        chunk_bytes = self._chunk_ratio * self._block_size
        sector0 = offset % chunk_bytes // ls  # sector number (in the chunk) of ``offset``

        def present(sector: int) -> bool:
            i = sector - base
            return bool(bits[i // 8] >> (i % 8) & 1)

        pieces: list[bytes | bytearray | memoryview] = []
        pos = 0
        while pos < n:
            sector = sector0 + (within % ls + pos) // ls
            here = present(sector)
            run = min(n, (sector - sector0 + 1) * ls - within % ls)
            while run < n and present(sector0 + (within % ls + run) // ls) == here:
                run = min(n, run + ls)
            if here:
                pieces.append(self._pread(host + within + pos, run - pos))
            else:
                pieces.append(self.read_backing(offset + pos, run - pos))
            pos = run
        return pieces

    def block_status(self, offset: int, length: int) -> Extent:
        bs = self._block_size
        block, within = divmod(offset, bs)
        n = min(bs - within, length)
        state, host = self._entry(self._payload_index(block))
        if state == PAYLOAD_FULLY_PRESENT:
            return Extent(offset, n, Allocation.DATA, host_offset=host + within)
        if state == PAYLOAD_PARTIALLY_PRESENT and self._has_parent:
            bits, base = self._sector_bits(offset, n)
            ls = self._logical_sector
            sector0 = offset % (self._chunk_ratio * bs) // ls
            i = sector0 - base
            here = bool(bits[i // 8] >> (i % 8) & 1)
            run = ls - offset % ls
            while run < n:
                j = sector0 + (offset % ls + run) // ls - base
                if bool(bits[j // 8] >> (j % 8) & 1) != here:
                    break
                run += ls
            run = min(run, n)
            if here:
                return Extent(offset, run, Allocation.DATA, host_offset=host + within)
            return Extent(offset, run, Allocation.UNALLOCATED)
        if state == PAYLOAD_ZERO or not self._has_parent:
            return Extent(offset, n, Allocation.ZERO)
        return Extent(offset, n, Allocation.UNALLOCATED)

    # -- writes ---------------------------------------------------------------------------------

    def _begin_write(self) -> None:
        self.check_writable()
        if not self._write_started:
            self._header[3] = uuid.uuid4().bytes_le  # file write GUID
            self._header[4] = uuid.uuid4().bytes_le  # data write GUID
            self._write_headers()
            self._write_started = True

    def _allocate(self, length: int) -> int:
        """Space at the end of the file; zeros until written."""
        where = self._file_end
        self._file_end = where + align_up(length, MiB)
        self.file.truncate(self._file_end)
        return where

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        bs = self._block_size
        pos = 0
        with self._lock:
            self._begin_write()
            while pos < len(view):
                block, within = divmod(offset + pos, bs)
                n = min(bs - within, len(view) - pos)
                piece = view[pos : pos + n]
                index = self._payload_index(block)
                state, host = self._entry(index)
                if state == PAYLOAD_FULLY_PRESENT:
                    self.file.pwrite(host + within, piece)
                elif not self._has_parent or state == PAYLOAD_ZERO:
                    # The block reads as zeros: a fresh zero block with the data in it.
                    host = self._allocate(bs)
                    self.file.pwrite(host + within, piece)
                    self._set_entry(index, PAYLOAD_FULLY_PRESENT, host)
                else:
                    self._write_partial(block, index, state, host, offset + pos, within, piece)
                pos += n

    def _write_partial(
        self, block: int, index: int, state: int, host: int, offset: int, within: int,
        piece: memoryview,
    ) -> None:  # fmt: skip
        ls = self._logical_sector
        n = len(piece)
        lo = within // ls * ls
        hi = align_up(within + n, ls)
        buf: bytes | bytearray | memoryview = piece
        if lo < within or within + n < hi:
            # Sectors only partly written keep the rest of their current bytes.
            out = bytearray(self.read(offset - (within - lo), hi - lo))
            out[within - lo : within - lo + n] = piece
            buf = out
        fresh = state != PAYLOAD_PARTIALLY_PRESENT
        chunk_bytes = self._chunk_ratio * self._block_size
        chunk = offset // chunk_bytes
        sb_index = self._bitmap_index(chunk)
        sb_state, sb_host = self._entry(sb_index)
        if sb_state != SB_PRESENT:
            sb_host = self._allocate(SECTOR_BITMAP_BLOCK)
            self._set_entry(sb_index, SB_PRESENT, sb_host)
        if fresh:
            host = self._allocate(self._block_size)
            # Bits a former block here may have left must not claim the new block's sectors.
            per_block = self._block_size // ls // 8
            where = sb_host + (block % self._chunk_ratio) * per_block
            if any(self.file.pread(where, per_block)):
                self.file.pwrite(where, bytes(per_block))
        self.file.pwrite(host + lo, buf)
        self.file.sync()  # barrier: the sectors are durable before the bits that claim them
        # Set the bits of the written sectors, then (for a new block) the BAT entry.
        first = (block * self._block_size + lo) % chunk_bytes // ls
        last = (block * self._block_size + hi - 1) % chunk_bytes // ls
        bits = bytearray(self.file.pread(sb_host + first // 8, last // 8 - first // 8 + 1))
        for s in range(first, last + 1):
            i = s - first // 8 * 8
            bits[i // 8] |= 1 << (i % 8)
        self.file.pwrite(sb_host + first // 8, bits)
        if fresh:
            self._set_entry(index, PAYLOAD_PARTIALLY_PRESENT, host)

    def discard(self, offset: int, length: int) -> None:
        """Dynamic images without a parent: whole blocks become ZERO blocks (BAT entry first,
        then the hole punched), 4 KiB-aligned parts of other blocks are punched (they read as
        zeros). Fixed images (LeaveBlocksAllocated) and differencing images keep their data."""
        self.check_writable()
        if self._has_parent or self._leave_allocated:
            return
        end = offset + length
        bs = self._block_size
        with self._lock:
            self._begin_write()
            while offset < end:
                block, within = divmod(offset, bs)
                n = min(bs - within, end - offset)
                index = self._payload_index(block)
                state, host = self._entry(index)
                if state == PAYLOAD_FULLY_PRESENT:
                    if n == bs:
                        self._set_entry(index, PAYLOAD_ZERO, 0)
                        self.file.punch_hole(host, bs)
                    else:
                        lo, hi = align_up(within, 4096), (within + n) // 4096 * 4096
                        if lo < hi:
                            self.file.punch_hole(host + lo, hi - lo)
                offset += n

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Blocks that already read as zeros are left alone; others get zeros written."""
        self.check_writable()
        end = offset + length
        bs = self._block_size
        while offset < end:
            block, within = divmod(offset, bs)
            n = min(bs - within, end - offset)
            state, _host = self._entry(self._payload_index(block))
            reads_zero = state == PAYLOAD_ZERO or (
                not self._has_parent and state not in (PAYLOAD_FULLY_PRESENT,)
            )
            if reads_zero:
                pass
            elif (
                may_unmap
                and n == bs
                and state == PAYLOAD_FULLY_PRESENT
                and not self._has_parent
                and not self._leave_allocated
            ):
                self.discard(offset, n)  # a ZERO block
            else:
                super().write_zeroes(offset, n, may_unmap)
            offset += n

    def flush(self) -> None:
        self.file.sync()

    # -- management -----------------------------------------------------------------------------

    def check(self, repair: RepairMode) -> CheckResult:
        """BAT entries with a bad state, outside the file, or sharing space. The log was
        already replayed by a writable open (qemu-img check -r all does the same)."""
        result = CheckResult()
        file_size = max(self.file.size(), self._overlay_end)
        ratio = self._chunk_ratio
        spans: list[tuple[int, int, int]] = []
        for index, (raw,) in enumerate(struct.iter_unpack("<Q", self._bat)):
            state, offset = raw & 7, (raw >> 20) << 20
            is_bitmap = index % (ratio + 1) == ratio
            if (
                state == 4
                or (state == PAYLOAD_PARTIALLY_PRESENT and not self._has_parent)
                or (is_bitmap and state not in (SB_NOT_PRESENT, SB_PRESENT))
            ):
                result.corruptions += 1
                result.messages.append(f"BAT entry {index} has invalid state {state}")
                continue
            if state not in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
                continue
            length = SECTOR_BITMAP_BLOCK if is_bitmap else self._block_size
            if offset < MiB or offset + length > align_up(file_size, MiB):
                result.corruptions += 1
                result.messages.append(f"BAT entry {index} at {offset} lies outside the file")
                continue
            spans.append((offset, offset + length, index))
        spans.sort()
        for (_s0, e0, i0), (s1, _e1, i1) in zip(spans, spans[1:], strict=False):
            if s1 < e0:
                result.corruptions += 1
                result.messages.append(f"BAT entries {i0} and {i1} share space at {s1}")
        result.total_clusters = -(-self._size // self._block_size)
        result.allocated_clusters = sum(1 for s0, e0, i in spans if i % (ratio + 1) != ratio)
        result.image_end_offset = self.file.size()
        return result

    def info(self) -> ImageInfo:
        info = super().info()
        info.cluster_size = self._block_size
        info.format_specific = {
            "logical-sector-size": self._logical_sector,
            "physical-sector-size": self._physical_sector,
            "block-size": self._block_size,
            "leave-blocks-allocated": self._leave_allocated,
        }
        if len(self._page83) == 16:
            info.format_specific["page83"] = str(uuid.UUID(bytes_le=self._page83))
        if self._parent_linkage:
            info.format_specific["parent-linkage"] = self._parent_linkage
        info.notes = list(self._notes)
        return info

    # -- create ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        for key in options:
            if key not in cls.create_options:
                raise InvalidRequest(f"vhdx: unknown create option {key!r}")
        subformat = choice_option(options, "subformat", ("dynamic", "fixed"), "dynamic")
        logical = size_option(options, "logical_sector_size", 512)
        if logical not in (512, 4096):
            raise InvalidRequest(f"vhdx: logical_sector_size must be 512 or 4096: {logical}")
        if size <= 0 or size > MAX_VIRTUAL_SIZE:
            raise InvalidRequest(f"vhdx: size {size} is outside 1..64 TiB")
        size = align_up(size, logical)
        block_size = size_option(options, "block_size", 0)
        if block_size == 0:
            # qemu-img's choice, so both make the same image for the same size.
            block_size = (
                64 * MiB if size > 32 * TiB
                else 32 * MiB if size > 100 * GiB
                else 16 * MiB if size > GiB
                else 8 * MiB
            )  # fmt: skip
        if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
            raise InvalidRequest(f"vhdx: block_size {block_size} is not a power of 2 in 1M..256M")
        log_size = size_option(options, "log_size", MiB)
        if log_size < MiB or log_size % MiB or log_size > MAX_LOG_SIZE:
            raise InvalidRequest(f"vhdx: log_size {log_size} is not a multiple of 1M in range")
        zero_state = bool_option(options, "block_state_zero", True)
        backing = options.get("backing_file")
        if options.get("backing_fmt", "vhdx") != "vhdx":
            raise InvalidRequest(f"vhdx: a parent must be vhdx, not {options['backing_fmt']!r}")
        if backing is not None and subformat == "fixed":
            raise InvalidRequest("vhdx: a fixed image cannot have a parent")
        parent_linkage = None
        if backing is not None:
            parent_linkage, parent_size, parent_sector = _parent_facts(path, backing)
            if "logical_sector_size" not in options:
                logical = parent_sector
            if parent_size != align_up(size, logical) or parent_sector != logical:
                raise InvalidRequest(
                    f"vhdx: a differencing image has its parent's size and sector size "
                    f"({parent_size}, {parent_sector}), not ({size}, {logical})"
                )
        fixed = subformat == "fixed"

        chunk_ratio = (1 << 23) * logical // block_size
        payload_blocks = -(-size // block_size)
        if backing is not None:
            entries = -(-payload_blocks // chunk_ratio) * (chunk_ratio + 1)
        else:
            entries = payload_blocks + (payload_blocks - 1) // chunk_ratio
        log_offset = 1 * MiB
        if entries * 8 > MAX_BAT_BYTES:
            raise InvalidRequest(
                f"vhdx: {size} bytes in blocks of {block_size} need a BAT of {entries * 8} "
                f"bytes, over imgfs's {MAX_BAT_BYTES}-byte limit: use bigger blocks"
            )
        bat_offset = log_offset + log_size
        bat_length = align_up(entries * 8, MiB)
        metadata_offset = bat_offset + bat_length
        metadata_length = 1 * MiB
        data_start = metadata_offset + metadata_length

        bat = bytearray(entries * 8)
        if fixed:
            for block in range(payload_blocks):
                index = block + block // chunk_ratio
                raw = (data_start + block * block_size) | PAYLOAD_FULLY_PRESENT
                struct.pack_into("<Q", bat, index * 8, raw)
        elif zero_state and backing is None:
            for block in range(payload_blocks):
                struct.pack_into("<Q", bat, (block + block // chunk_ratio) * 8, PAYLOAD_ZERO)

        items: list[tuple[bytes, bytes, int]] = [
            (FILE_PARAMETERS, struct.pack("<II", block_size,
             (FILE_PARAM_LEAVE_BLOCKS_ALLOCATED if fixed else 0)
             | (FILE_PARAM_HAS_PARENT if backing is not None else 0)), META_IS_REQUIRED),
            (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), META_IS_VIRTUAL_DISK | META_IS_REQUIRED),
            (PAGE83_DATA, uuid.uuid4().bytes_le, META_IS_VIRTUAL_DISK | META_IS_REQUIRED),
            (LOGICAL_SECTOR_SIZE, struct.pack("<I", logical),
             META_IS_VIRTUAL_DISK | META_IS_REQUIRED),
            (PHYSICAL_SECTOR_SIZE, struct.pack("<I", 4096 if logical == 4096 else 512),
             META_IS_VIRTUAL_DISK | META_IS_REQUIRED),
        ]  # fmt: skip
        if backing is not None:
            assert parent_linkage is not None
            rel = os.path.relpath(
                os.path.abspath(os.path.join(os.path.dirname(path), backing)),
                os.path.dirname(os.path.abspath(path)),
            )
            absolute = os.path.abspath(os.path.join(os.path.dirname(path), backing))
            # Paths in Win32 form (backslashes); readers such as libvhdi take the file name
            # from absolute_win32_path and look for it beside the child.
            items.append((PARENT_LOCATOR, _parent_locator({
                "parent_linkage": parent_linkage,
                "relative_path": ".\\" + rel.replace("/", "\\"),
                "absolute_win32_path": absolute.replace("/", "\\"),
            }), META_IS_REQUIRED))  # fmt: skip
        metadata = bytearray(metadata_length)
        METADATA_HEADER.pack_into(metadata, 0, b"metadata", 0, len(items), bytes(20))
        at = 64 * KiB
        for i, (item, value, flags) in enumerate(items):
            METADATA_ENTRY.pack_into(metadata, 32 + 32 * i, item, at, len(value), flags, 0)
            metadata[at : at + len(value)] = value
            at += align_up(len(value), 8)

        regions = bytearray(REGION_TABLE_SIZE)
        REGION_HEADER.pack_into(regions, 0, b"regi", 0, 2, 0)
        REGION_ENTRY.pack_into(regions, 16, BAT_GUID, bat_offset, bat_length, 1)
        REGION_ENTRY.pack_into(regions, 48, METADATA_GUID, metadata_offset, metadata_length, 1)
        regions_raw = with_crc(regions)

        file_write, data_write = uuid.uuid4().bytes_le, uuid.uuid4().bytes_le
        headers = [
            with_crc(
                HEADER.pack(b"head", 0, seq, file_write, data_write, ZERO_GUID, 0, 1, log_size,
                            log_offset).ljust(HEADER_SIZE, b"\0")
            )
            for seq in (1, 2)
        ]  # fmt: skip
        creator = "imgfs".encode("utf-16-le")
        with open(path, "wb") as f:
            f.truncate(data_start + (payload_blocks * block_size if fixed else 0))
            f.write(FILE_SIGNATURE + creator)
            for offset, blob in (
                (HEADER_OFFSETS[0], headers[0]),
                (HEADER_OFFSETS[1], headers[1]),
                (REGION_TABLE_OFFSETS[0], regions_raw),
                (REGION_TABLE_OFFSETS[1], regions_raw),
                (bat_offset, bytes(bat)),
                (metadata_offset, bytes(metadata)),
            ):
                f.seek(offset)
                f.write(blob)


def _parent_locator(entries: dict[str, str]) -> bytes:
    keys = bytearray()
    table = bytearray(PARENT_LOCATOR_TYPE + struct.pack("<HH", 0, len(entries)))
    base = len(table) + 12 * len(entries)
    for key, value in entries.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        ko = base + len(keys)
        keys += k
        vo = base + len(keys)
        keys += v
        table += struct.pack("<IIHH", ko, vo, len(k), len(v))
    return bytes(table + keys)


def _parent_facts(path: str, backing: str) -> tuple[str, int, int]:
    """The parent's data write GUID (as a parent_linkage string), size and sector size."""
    from imgfs.block.chain import open_host_file, resolve_relative
    from imgfs.block.hostfile import CacheMode

    parent_path = resolve_relative(backing, path)
    file = open_host_file(parent_path, writable=False, cache=CacheMode.WRITEBACK)
    try:
        parent = VhdxDriver.open(file, OpenOptions(read_only=True, cache=CacheMode.WRITEBACK))
        linkage = "{" + str(uuid.UUID(bytes_le=parent._header[4])) + "}"
        return linkage, parent.virtual_size, parent._logical_sector
    finally:
        file.close()


register(VhdxDriver)
