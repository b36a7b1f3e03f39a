"""ATA device (ACS-4) taking commands as Serial ATA Register Host-to-Device FISes.

A Register H2D FIS (SATA 3.x, 10.5.5) is 20 bytes: FIS type 27h, C bit, COMMAND, FEATURE(7:0),
LBA(7:0), LBA(15:8), LBA(23:16), DEVICE, LBA(31:24), LBA(39:32), LBA(47:40), FEATURE(15:8),
COUNT(7:0), COUNT(15:8), ICC, CONTROL and 4 auxiliary bytes. The completion carries the STATUS
and ERROR registers as ACS-4 defines them: ERR (bit 0) of STATUS with ABRT, IDNF or UNC in
ERROR.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from imgfs.emulation.common import (
    DISCARD,
    FLUSH,
    OTHER,
    READ,
    VERIFY,
    WRITE,
    BadRequest,
    Completion,
    serial_for,
)
from imgfs.emulation.target import Target, TargetError

FIS_TYPE_REG_H2D = 0x27
FIS_LENGTH = 20

# STATUS register bits
STATUS_ERR = 0x01
STATUS_DRQ = 0x08
STATUS_DSC = 0x10  # obsolete "seek complete"; set by convention with DRDY
STATUS_DF = 0x20
STATUS_DRDY = 0x40
STATUS_BSY = 0x80
STATUS_OK = STATUS_DRDY | STATUS_DSC
STATUS_ERROR = STATUS_OK | STATUS_ERR

# ERROR register bits
ERROR_ABRT = 0x04
ERROR_IDNF = 0x10
ERROR_UNC = 0x40

# Commands (ACS-4 table B.3)
DATA_SET_MANAGEMENT = 0x06
READ_SECTORS = 0x20
READ_SECTORS_EXT = 0x24
READ_DMA_EXT = 0x25
WRITE_SECTORS = 0x30
WRITE_SECTORS_EXT = 0x34
WRITE_DMA_EXT = 0x35
READ_VERIFY_SECTORS = 0x40
READ_VERIFY_SECTORS_EXT = 0x42
READ_FPDMA_QUEUED = 0x60
WRITE_FPDMA_QUEUED = 0x61
READ_DMA = 0xC8
WRITE_DMA = 0xCA
FLUSH_CACHE = 0xE7
IDENTIFY_DEVICE = 0xEC
FLUSH_CACHE_EXT = 0xEA
SET_FEATURES = 0xEF

# SET FEATURES subcommands (FEATURE 7:0)
SF_ENABLE_WRITE_CACHE = 0x02
SF_SET_TRANSFER_MODE = 0x03
SF_DISABLE_READ_LOOK_AHEAD = 0x55
SF_DISABLE_WRITE_CACHE = 0x82
SF_ENABLE_READ_LOOK_AHEAD = 0xAA

#: Maximum 512-byte blocks of LBA range entries in one DATA SET MANAGEMENT (IDENTIFY word 105).
MAX_DSM_BLOCKS = 8
TRIM_RANGE_MAX = 0xFFFF  # sectors per LBA range entry (16-bit RANGE LENGTH)
LBA28_LIMIT = 1 << 28

MODEL = "IMGFS VIRTUAL DISK"
FIRMWARE = "0001"

_FIS = struct.Struct("<BBBBBBBBBBBBBBBB4x")

# command -> (kind, 48-bit, counts in FEATURE (NCQ))
_COMMANDS: dict[int, tuple[str, bool, bool]] = {
    READ_SECTORS: (READ, False, False),
    READ_DMA: (READ, False, False),
    READ_SECTORS_EXT: (READ, True, False),
    READ_DMA_EXT: (READ, True, False),
    READ_FPDMA_QUEUED: (READ, True, True),
    WRITE_SECTORS: (WRITE, False, False),
    WRITE_DMA: (WRITE, False, False),
    WRITE_SECTORS_EXT: (WRITE, True, False),
    WRITE_DMA_EXT: (WRITE, True, False),
    WRITE_FPDMA_QUEUED: (WRITE, True, True),
    READ_VERIFY_SECTORS: (VERIFY, False, False),
    READ_VERIFY_SECTORS_EXT: (VERIFY, True, False),
    FLUSH_CACHE: (FLUSH, False, False),
    FLUSH_CACHE_EXT: (FLUSH, True, False),
    DATA_SET_MANAGEMENT: (DISCARD, True, False),
    IDENTIFY_DEVICE: (OTHER, False, False),
    SET_FEATURES: (OTHER, False, False),
}


class AtaCommand(NamedTuple):
    command: int
    kind: str
    lba: int
    count: int  # sectors (or DSM blocks)
    features: int
    device: int


class AtaError(Exception):
    def __init__(self, error: int) -> None:
        super().__init__(f"ATA error 0x{error:02x}")
        self.error = error


def decode(fis: bytes) -> AtaCommand:
    """Decode a Register H2D FIS. Raises BadRequest for a FIS that is not one (short, wrong
    type, C bit clear) and AtaError(ABRT) for an unsupported command or a non-LBA address."""
    if len(fis) < FIS_LENGTH:
        raise BadRequest(f"a Register H2D FIS is {FIS_LENGTH} bytes, got {len(fis)}")
    (
        ftype,
        flags,
        command,
        feat0,
        l0,
        l1,
        l2,
        device,
        l3,
        l4,
        l5,
        feat1,
        c0,
        c1,
        _icc,
        _control,
    ) = _FIS.unpack_from(fis)
    if ftype != FIS_TYPE_REG_H2D:
        raise BadRequest(f"FIS type 0x{ftype:02x} is not a Register H2D FIS (0x27)")
    if not flags & 0x80:
        raise BadRequest("the FIS's C bit is clear: it updates the Device Control register")
    entry = _COMMANDS.get(command)
    if entry is None:
        raise AtaError(ERROR_ABRT)
    kind, ext, ncq = entry
    features = feat0 | (feat1 << 8)
    if ext:
        lba = l0 | (l1 << 8) | (l2 << 16) | (l3 << 24) | (l4 << 32) | (l5 << 40)
        if ncq:
            count = features or 0x10000
        else:
            count = (c0 | (c1 << 8)) or 0x10000
    else:
        lba = l0 | (l1 << 8) | (l2 << 16) | ((device & 0x0F) << 24)
        count = c0 or 0x100
        if kind in (READ, WRITE, VERIFY) and not device & 0x40:
            raise AtaError(ERROR_ABRT)  # CHS addressing is not supported
    if command == DATA_SET_MANAGEMENT:
        count = c0 | (c1 << 8)
    return AtaCommand(command, kind, lba, count, features, device)


def ata_string(text: str, length: int) -> bytes:
    """An ATA string field: ASCII padded with spaces, each pair of characters swapped so that
    the first character is in bits 15:8 of its (little-endian) word."""
    raw = text.encode("ascii", "replace")[:length].ljust(length)
    swapped = bytearray(length)
    swapped[0::2] = raw[1::2]
    swapped[1::2] = raw[0::2]
    return bytes(swapped)


class AtaDisk:
    """One ATA device over a target (logical sectors of 512 or 4096 bytes)."""

    bus = "ata"

    def __init__(self, target: Target, block_size: int = 512, serial: str | None = None) -> None:
        if block_size not in (512, 4096):
            raise ValueError(f"block size {block_size}: must be 512 or 4096")
        self.target = target
        self.block_size = block_size
        self.sectors = target.size // block_size
        self.serial = serial or serial_for(target.name)
        self.look_ahead = True

    def submit(
        self,
        fis: bytes,
        data_out: bytes | bytearray | memoryview | None = None,
        data_in_length: int | None = None,
    ) -> Completion:
        try:
            cmd = decode(fis)
        except AtaError as e:
            return _error(OTHER, e.error)
        return self.execute(cmd, data_out, data_in_length)

    def execute(
        self,
        cmd: AtaCommand,
        data_out: bytes | bytearray | memoryview | None = None,
        data_in_length: int | None = None,
    ) -> Completion:
        try:
            data, nbytes = self._run(cmd, data_out)
        except AtaError as e:
            return _error(cmd.kind, e.error)
        return Completion(cmd.kind, True, {"ata_status": STATUS_OK, "ata_error": 0}, data, nbytes)

    def _run(
        self, cmd: AtaCommand, data_out: bytes | bytearray | memoryview | None
    ) -> tuple[bytes | bytearray | memoryview, int]:
        kind = cmd.kind
        bs = self.block_size
        if kind == READ or kind == VERIFY:
            self._check_range(cmd)
            try:
                data = self.target.read(cmd.lba * bs, cmd.count * bs)
            except TargetError:
                raise AtaError(ERROR_UNC) from None
            return (data, len(data)) if kind == READ else (b"", 0)
        if kind == WRITE:
            self._check_range(cmd)
            data = _data_out(data_out, cmd.count * bs)
            if self.target.read_only:
                raise AtaError(ERROR_ABRT)
            # FUA: DEVICE bit 7 of the FPDMA QUEUED commands.
            fua = cmd.command == WRITE_FPDMA_QUEUED and bool(cmd.device & 0x80)
            try:
                self.target.write(cmd.lba * bs, data, fua)
            except TargetError:
                raise AtaError(ERROR_ABRT) from None
            return b"", len(data)
        if kind == FLUSH:
            try:
                self.target.flush()
            except TargetError:
                raise AtaError(ERROR_ABRT) from None
            return b"", 0
        if cmd.command == DATA_SET_MANAGEMENT:
            return self._dsm(cmd, data_out)
        if cmd.command == IDENTIFY_DEVICE:
            return self.identify(), 0
        if cmd.command == SET_FEATURES:
            self._set_features(cmd.features & 0xFF)
            return b"", 0
        raise AtaError(ERROR_ABRT)

    def _check_range(self, cmd: AtaCommand) -> None:
        limit = self.sectors if cmd.command in _EXT else min(self.sectors, LBA28_LIMIT - 1)
        if cmd.lba + cmd.count > limit:
            raise AtaError(ERROR_IDNF)

    def _dsm(
        self, cmd: AtaCommand, data_out: bytes | bytearray | memoryview | None
    ) -> tuple[bytes, int]:
        if not cmd.features & 0x01 or not self.target.can_discard:
            raise AtaError(ERROR_ABRT)  # only TRIM, and only when advertised
        if cmd.count == 0 or cmd.count > MAX_DSM_BLOCKS:
            raise AtaError(ERROR_ABRT)
        payload = _data_out(data_out, cmd.count * 512)
        ranges = []
        for (entry,) in struct.iter_unpack("<Q", payload):
            length = entry >> 48
            if length == 0:
                continue  # an entry with RANGE LENGTH 0 is ignored
            lba = entry & 0xFFFFFFFFFFFF
            if lba + length > self.sectors:
                raise AtaError(ERROR_IDNF)
            ranges.append((lba, length))
        if self.target.read_only:
            raise AtaError(ERROR_ABRT)
        bs = self.block_size
        total = 0
        try:
            for lba, length in ranges:
                self.target.discard(lba * bs, length * bs)
                total += length * bs
        except TargetError:
            raise AtaError(ERROR_ABRT) from None
        return b"", total

    def _set_features(self, sub: int) -> None:
        if sub == SF_ENABLE_WRITE_CACHE:
            self.target.writethrough = False
        elif sub == SF_DISABLE_WRITE_CACHE:
            if not self.target.writethrough:
                try:
                    self.target.flush()
                except TargetError:
                    raise AtaError(ERROR_ABRT) from None
            self.target.writethrough = True
        elif sub == SF_ENABLE_READ_LOOK_AHEAD:
            self.look_ahead = True
        elif sub == SF_DISABLE_READ_LOOK_AHEAD:
            self.look_ahead = False
        elif sub == SF_SET_TRANSFER_MODE:
            pass  # transfer modes mean nothing for an image
        else:
            raise AtaError(ERROR_ABRT)

    def identify(self) -> bytes:
        """IDENTIFY DEVICE data: 256 little-endian words (ACS-4 7.13.6)."""
        w = [0] * 256
        sectors = self.sectors
        discard = self.target.can_discard
        w[0] = 0x0040  # ATA device, fixed
        w[1], w[3], w[6] = 16383, 16, 63  # obsolete CHS values for a disk over 8 GB
        w[2] = 0xC837  # IDENTIFY DEVICE data complete, no spin-up needed
        w[47] = 0x8000  # READ/WRITE MULTIPLE not supported
        w[49] = 0x0300  # LBA supported, DMA supported
        w[50] = 0x4000
        w[53] = 0x0006  # words 64-70 and 88 valid
        lba28 = min(sectors, LBA28_LIMIT - 1)
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[63] = 0x0007  # multiword DMA 0-2 supported
        w[64] = 0x0003  # PIO 3 and 4
        w[65] = w[66] = w[67] = w[68] = 120
        if discard:
            # DRAT (deterministic read after TRIM) and RZAT (trimmed ranges read as zeros)
            w[69] = 0x4000 | 0x0020
        w[75] = 31  # queue depth 32
        w[76] = 0x0106  # NCQ, SATA Gen1 and Gen2
        w[80] = 0x0FF0  # ATA/ATAPI-4 .. ACS-4
        w[82] = 0x0060  # volatile write cache, read look-ahead
        w[83] = 0x7400  # shall be one, FLUSH CACHE EXT, FLUSH CACHE, 48-bit
        w[84] = 0x4000
        w[85] = (0x0020 if not self.target.writethrough else 0) | (0x0040 if self.look_ahead else 0)
        w[86] = 0xB400  # words 119-120 valid, FLUSH CACHE EXT, FLUSH CACHE, 48-bit enabled
        w[87] = 0x4000
        w[88] = 0x203F  # UDMA 0-5 supported, mode 5 selected
        w[100], w[101], w[102], w[103] = (
            sectors & 0xFFFF,
            (sectors >> 16) & 0xFFFF,
            (sectors >> 32) & 0xFFFF,
            (sectors >> 48) & 0xFFFF,
        )
        w[105] = MAX_DSM_BLOCKS if discard else 0
        per_physical = max(1, 4096 // self.block_size)
        w[106] = 0x4000 | (0x2000 if per_physical > 1 else 0) | (per_physical.bit_length() - 1)
        if self.block_size > 512:
            words = self.block_size // 2
            w[106] |= 0x1000  # logical sector longer than 256 words: see words 117-118
            w[117], w[118] = words & 0xFFFF, words >> 16
        w[119] = 0x4000
        w[120] = 0x4000
        w[169] = 0x0001 if discard else 0  # DATA SET MANAGEMENT / TRIM supported
        w[209] = 0x4000  # logical sector 0 is aligned with physical sector 0
        w[217] = 0x0001  # non-rotating medium
        data = bytearray(struct.pack("<256H", *w))
        data[20:40] = ata_string(self.serial, 20)  # words 10-19
        data[46:54] = ata_string(FIRMWARE, 8)  # words 23-26
        data[54:94] = ata_string(MODEL, 40)  # words 27-46
        data[510] = 0xA5  # integrity word: signature ...
        data[511] = (-sum(data[:511])) & 0xFF  # ... and checksum
        return bytes(data)


_EXT = {
    READ_SECTORS_EXT,
    READ_DMA_EXT,
    WRITE_SECTORS_EXT,
    WRITE_DMA_EXT,
    READ_FPDMA_QUEUED,
    WRITE_FPDMA_QUEUED,
    READ_VERIFY_SECTORS_EXT,
}


def _error(kind: str, error: int) -> Completion:
    return Completion(kind, False, {"ata_status": STATUS_ERROR, "ata_error": error}, b"", 0)


def _data_out(
    data_out: bytes | bytearray | memoryview | None, need: int
) -> bytes | bytearray | memoryview:
    have = 0 if data_out is None else len(data_out)
    if have != need:
        raise BadRequest(f"the command transfers {need} data-out bytes, the trace has {have}")
    return data_out if data_out is not None else b""


def build_fis(
    command: int, lba: int = 0, count: int = 0, features: int = 0, device: int = 0x40
) -> bytes:
    """A Register H2D FIS for a command (used by the importers and tests). For FPDMA QUEUED
    the sector count goes in FEATURE and COUNT carries the tag (0 here)."""
    if command in (READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED):
        features, count = count & 0xFFFF, 0
    if command in _EXT or command in (FLUSH_CACHE_EXT, DATA_SET_MANAGEMENT):
        lba_bytes = [(lba >> s) & 0xFF for s in (0, 8, 16, 24, 32, 40)]
        dev = device
    else:
        lba_bytes = [lba & 0xFF, (lba >> 8) & 0xFF, (lba >> 16) & 0xFF, 0, 0, 0]
        dev = (device & 0xF0) | ((lba >> 24) & 0x0F)
        count &= 0xFF
    return _FIS.pack(
        FIS_TYPE_REG_H2D,
        0x80,
        command,
        features & 0xFF,
        lba_bytes[0],
        lba_bytes[1],
        lba_bytes[2],
        dev,
        lba_bytes[3],
        lba_bytes[4],
        lba_bytes[5],
        (features >> 8) & 0xFF,
        count & 0xFF,
        (count >> 8) & 0xFF,
        0,
        0,
    )
