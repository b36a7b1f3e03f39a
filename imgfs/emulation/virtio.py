"""virtio-blk device (virtio 1.2, section 5.2).

A request is the 16-byte header ``struct virtio_blk_req {le32 type; le32 reserved; le64
sector;}``, the data segments (driver→device for OUT, DISCARD and WRITE_ZEROES; device→driver
for IN and GET_ID) and a status byte written by the device. Sectors are always 512 bytes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from imgfs.emulation.common import (
    DISCARD,
    FLUSH,
    OTHER,
    READ,
    WRITE,
    WRITE_ZEROES,
    BadRequest,
    Completion,
    serial_for,
)
from imgfs.emulation.target import Target, TargetError

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

SECTOR = 512
ID_BYTES = 20
WRITE_ZEROES_FLAG_UNMAP = 0x1

# Feature bits (5.2.3)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_DISCARD = 13
F_WRITE_ZEROES = 14

SIZE_MAX = 1 << 20  # bytes per segment
SEG_MAX = 254
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 256
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 256
MAX_TRANSFER_BYTES = 32 << 20  # one IN/OUT request, like SCSI's maximum transfer length

HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")  # virtio_blk_discard_write_zeroes: sector, num_sectors, flags
CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIIIB3x III")
assert HEADER.size == 16 and SEGMENT.size == 16 and CONFIG.size == 72

_KINDS = {
    T_IN: READ,
    T_OUT: WRITE,
    T_FLUSH: FLUSH,
    T_GET_ID: OTHER,
    T_DISCARD: DISCARD,
    T_WRITE_ZEROES: WRITE_ZEROES,
}


class VirtioRequest(NamedTuple):
    type: int
    kind: str
    sector: int


def decode(header: bytes) -> VirtioRequest:
    if len(header) < HEADER.size:
        raise BadRequest(f"a virtio-blk request header is 16 bytes, got {len(header)}")
    rtype, _reserved, sector = HEADER.unpack_from(header)
    return VirtioRequest(rtype, _KINDS.get(rtype, OTHER), sector)


class VirtioBlk:
    bus = "virtio"

    def __init__(self, target: Target, block_size: int = 512, serial: str | None = None) -> None:
        if block_size not in (512, 4096):
            raise ValueError(f"block size {block_size}: must be 512 or 4096")
        self.target = target
        self.block_size = block_size
        self.capacity = target.size // SECTOR
        self.serial = (serial or serial_for(target.name)).encode("ascii", "replace")[:ID_BYTES]

    @property
    def features(self) -> int:
        bits = (
            F_SIZE_MAX,
            F_SEG_MAX,
            F_BLK_SIZE,
            F_FLUSH,
            F_TOPOLOGY,
            F_CONFIG_WCE,
            F_WRITE_ZEROES,
        )
        value = sum(1 << b for b in bits)
        if self.target.can_discard:
            value |= 1 << F_DISCARD
        if self.target.read_only:
            value |= 1 << F_RO
        return value

    def config(self) -> bytes:
        """The device configuration layout (struct virtio_blk_config, 72 bytes)."""
        per_physical = max(1, 4096 // self.block_size)
        discard = self.target.can_discard
        return CONFIG.pack(
            self.capacity,
            SIZE_MAX,
            SEG_MAX,
            0,
            0,
            0,  # geometry (not offered)
            self.block_size,
            per_physical.bit_length() - 1,  # physical_block_exp
            0,  # alignment_offset
            1,  # min_io_size (in blk_size units)
            0,  # opt_io_size
            0 if self.target.writethrough else 1,  # writeback
            0,
            1,  # num_queues
            MAX_DISCARD_SECTORS if discard else 0,
            MAX_DISCARD_SEG if discard else 0,
            (4096 // SECTOR) if discard else 0,  # discard_sector_alignment
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            1 if discard else 0,  # write_zeroes_may_unmap
            0,
            0,
            0,  # secure erase (not offered)
        )

    def set_writeback(self, writeback: bool) -> None:
        """The driver wrote the writeback field (VIRTIO_BLK_F_CONFIG_WCE)."""
        if not writeback and not self.target.writethrough:
            self.target.flush()
        self.target.writethrough = not writeback

    def submit(
        self,
        header: bytes,
        data_out: bytes | bytearray | memoryview | None = None,
        data_in_length: int | None = None,
    ) -> Completion:
        return self.execute(decode(header), data_out, data_in_length)

    def execute(
        self,
        req: VirtioRequest,
        data_out: bytes | bytearray | memoryview | None = None,
        data_in_length: int | None = None,
    ) -> Completion:
        kind = req.kind
        rtype = req.type
        target = self.target
        data: bytes | bytearray | memoryview = b""
        nbytes = 0
        try:
            if rtype == T_IN:
                if data_in_length is None:
                    raise BadRequest("a virtio-blk IN request needs its data-in sg lengths")
                length = data_in_length
                if length % SECTOR or length > MAX_TRANSFER_BYTES:
                    return _status(kind, S_IOERR)
                if (req.sector * SECTOR + length) > self.capacity * SECTOR:
                    return _status(kind, S_IOERR)
                data = target.read(req.sector * SECTOR, length) if length else b""
                nbytes = len(data)
            elif rtype == T_OUT:
                payload = data_out if data_out is not None else b""
                length = len(payload)
                if length % SECTOR or length > MAX_TRANSFER_BYTES or target.read_only:
                    return _status(kind, S_IOERR)
                if req.sector * SECTOR + length > self.capacity * SECTOR:
                    return _status(kind, S_IOERR)
                if length:
                    target.write(req.sector * SECTOR, payload)
                nbytes = length
            elif rtype == T_FLUSH:
                target.flush()
            elif rtype == T_GET_ID:
                data = self.serial.ljust(ID_BYTES, b"\0")
                if data_in_length is not None:
                    data = data[:data_in_length]
            elif rtype == T_DISCARD or rtype == T_WRITE_ZEROES:
                return self._ranges(req, data_out)
            else:
                return _status(kind, S_UNSUPP)
        except TargetError:
            return _status(kind, S_IOERR)
        return Completion(kind, True, {"virtio_status": S_OK}, data, nbytes)

    def _ranges(
        self, req: VirtioRequest, data_out: bytes | bytearray | memoryview | None
    ) -> Completion:
        kind = req.kind
        discard = req.type == T_DISCARD
        if discard and not self.target.can_discard:
            return _status(kind, S_UNSUPP)
        payload = data_out if data_out is not None else b""
        if len(payload) % SEGMENT.size or not payload:
            raise BadRequest(
                f"discard/write-zeroes data is a whole number of 16-byte segments, got "
                f"{len(payload)} bytes"
            )
        nseg = len(payload) // SEGMENT.size
        if nseg > (MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG):
            return _status(kind, S_UNSUPP)
        limit = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        ranges = []
        for sector, num, flags in SEGMENT.iter_unpack(payload):
            if flags & ~WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return _status(kind, S_UNSUPP)  # reserved flag bits, or unmap on a discard
            if num > limit:
                return _status(kind, S_UNSUPP)
            if sector + num > self.capacity:
                return _status(kind, S_IOERR)
            ranges.append((sector, num, bool(flags & WRITE_ZEROES_FLAG_UNMAP)))
        if self.target.read_only:
            return _status(kind, S_IOERR)
        total = 0
        try:
            for sector, num, unmap in ranges:
                if not num:
                    continue
                if discard:
                    self.target.discard(sector * SECTOR, num * SECTOR)
                else:
                    self.target.write_zeroes(sector * SECTOR, num * SECTOR, unmap)
                total += num * SECTOR
        except TargetError:
            return _status(kind, S_IOERR)
        return Completion(kind, True, {"virtio_status": S_OK}, b"", total)


def _status(kind: str, status: int) -> Completion:
    return Completion(kind, False, {"virtio_status": status}, b"", 0)


def build_header(rtype: int, sector: int = 0) -> bytes:
    return HEADER.pack(rtype, 0, sector)


def build_segments(ranges: list[tuple[int, int, int]]) -> bytes:
    """Discard / write-zeroes payload from (sector, num_sectors, flags) triples."""
    return b"".join(SEGMENT.pack(s, n, f) for s, n, f in ranges)
