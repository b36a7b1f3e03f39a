"""SCSI direct-access block device (SBC-4 commands, SPC-5 common commands).

Decoding (``decode``) turns a CDB into a ``ScsiCommand`` tuple and raises :class:`CheckCondition`
for what the device would reject from the CDB alone; ``execute`` runs a decoded command against
a :class:`~imgfs.emulation.target.Target`. Errors are CHECK CONDITION with fixed-format sense
data (SPC-5 4.4.3): response code 0x70, additional sense length 10, and for ILLEGAL REQUEST /
INVALID FIELD the sense-key-specific field pointer.
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
    WRITE_ZEROES,
    BadRequest,
    Completion,
    serial_for,
)
from imgfs.emulation.target import Target, TargetError

# Status codes (SAM-5)
GOOD = 0x00
CHECK_CONDITION = 0x02

# Sense keys (SPC-5 table 52)
NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
ILLEGAL_REQUEST = 0x5
DATA_PROTECT = 0x7
MISCOMPARE = 0xE

# (ASC, ASCQ) pairs used here (SPC-5 annex F)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_OPCODE = (0x20, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
WRITE_ERROR = (0x0C, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
NOT_READY_INIT_REQUIRED = (0x04, 0x02)

# Operation codes
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
WRITE_AND_VERIFY_10 = 0x2E
VERIFY_10 = 0x2F
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SELECT_10 = 0x55
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
WRITE_AND_VERIFY_16 = 0x8E
VERIFY_16 = 0x8F
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
READ_CAPACITY_16_SA = 0x10
REPORT_LUNS = 0xA0
READ_12 = 0xA8
WRITE_12 = 0xAA
WRITE_AND_VERIFY_12 = 0xAE
VERIFY_12 = 0xAF

# Limits this device reports in the Block Limits VPD page (in logical blocks).
MAX_TRANSFER_BLOCKS = 65536
MAX_UNMAP_BLOCKS = 1 << 22
MAX_UNMAP_DESCRIPTORS = 256
MAX_WRITE_SAME_BLOCKS = 1 << 22
OPTIMAL_UNMAP_GRANULARITY = 8  # blocks of 512 = 4 KiB

VENDOR = b"IMGFS   "
PRODUCT_REVISION = b"0001"
# Version descriptors (SPC-5 table 184): SAM-5, SPC-5, SBC-4, each "no version claimed".
VERSION_DESCRIPTORS = (0x00A0, 0x05C0, 0x0600)

_CDB_LENGTH_BY_GROUP = (6, 10, 10, 0, 16, 12, 0, 0)

_RW10 = struct.Struct(">BBIBH")  # opcode, flags, LBA, group, count
_RW12 = struct.Struct(">BBIIB")  # opcode, flags, LBA, count, group
_RW16 = struct.Struct(">BBQIB")  # opcode, flags, LBA, count, group
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class CheckCondition(Exception):
    """A command ends in CHECK CONDITION with this sense data."""

    def __init__(
        self,
        key: int,
        asc_ascq: tuple[int, int],
        field: int | None = None,
        bit: int | None = None,
        in_cdb: bool = True,
    ) -> None:
        super().__init__(f"sense {key:x}/{asc_ascq[0]:02x}/{asc_ascq[1]:02x}")
        self.key = key
        self.asc, self.ascq = asc_ascq
        self.field = field
        self.bit = bit
        self.in_cdb = in_cdb

    def sense(self) -> bytes:
        return fixed_sense(self.key, self.asc, self.ascq, self.field, self.bit, self.in_cdb)


def fixed_sense(
    key: int,
    asc: int,
    ascq: int,
    field: int | None = None,
    bit: int | None = None,
    in_cdb: bool = True,
) -> bytes:
    """Fixed-format sense data, 18 bytes (SPC-5 4.4.3). With ``field`` the sense-key-specific
    bytes carry SKSV=1, C/D (1: the error is in the CDB, 0: in the parameter list), BPV and the
    bit pointer when ``bit`` is given, and the field pointer (the byte number)."""
    sense = bytearray(18)
    sense[0] = 0x70  # current error, fixed format; VALID=0 (INFORMATION not used)
    sense[2] = key & 0x0F
    sense[7] = 10  # additional sense length: bytes 8..17
    sense[12] = asc
    sense[13] = ascq
    if field is not None:
        sksv = 0x80 | (0x40 if in_cdb else 0)
        if bit is not None:
            sksv |= 0x08 | (bit & 0x07)
        sense[15] = sksv
        sense[16] = (field >> 8) & 0xFF
        sense[17] = field & 0xFF
    return bytes(sense)


class ScsiCommand(NamedTuple):
    opcode: int
    kind: str
    lba: int
    count: int  # logical blocks (or the allocation / parameter list length for non-media)
    flags: int  # CDB byte 1
    cdb: bytes


def _cdb_length(opcode: int) -> int:
    return _CDB_LENGTH_BY_GROUP[opcode >> 5]


_RW_OPS = {
    READ_10: READ,
    WRITE_10: WRITE,
    READ_12: READ,
    WRITE_12: WRITE,
    READ_16: READ,
    WRITE_16: WRITE,
    WRITE_AND_VERIFY_10: WRITE,
    WRITE_AND_VERIFY_12: WRITE,
    WRITE_AND_VERIFY_16: WRITE,
    VERIFY_10: VERIFY,
    VERIFY_12: VERIFY,
    VERIFY_16: VERIFY,
    SYNCHRONIZE_CACHE_10: FLUSH,
    SYNCHRONIZE_CACHE_16: FLUSH,
    WRITE_SAME_10: WRITE_ZEROES,
    WRITE_SAME_16: WRITE_ZEROES,
}
_OTHER_OPS = {
    TEST_UNIT_READY,
    REQUEST_SENSE,
    INQUIRY,
    MODE_SELECT_6,
    MODE_SENSE_6,
    START_STOP_UNIT,
    READ_CAPACITY_10,
    MODE_SELECT_10,
    MODE_SENSE_10,
    SERVICE_ACTION_IN_16,
    REPORT_LUNS,
}
_PROTECT_OPS = {
    READ_10,
    WRITE_10,
    READ_12,
    WRITE_12,
    READ_16,
    WRITE_16,
    WRITE_AND_VERIFY_10,
    WRITE_AND_VERIFY_12,
    WRITE_AND_VERIFY_16,
    VERIFY_10,
    VERIFY_12,
    VERIFY_16,
    WRITE_SAME_10,
    WRITE_SAME_16,
}


_KNOWN_OPS = frozenset(_RW_OPS) | _OTHER_OPS | {READ_6, WRITE_6, UNMAP}


def decode(cdb: bytes) -> ScsiCommand:
    """Decode a CDB. Raises BadRequest when the CDB is shorter than its opcode's length and
    CheckCondition for an unsupported opcode or a reserved/unsupported value in a CDB field."""
    if not cdb:
        raise BadRequest("empty CDB")
    opcode = cdb[0]
    need = _cdb_length(opcode)
    if need == 0 or opcode not in _KNOWN_OPS:
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_OPCODE)
    if len(cdb) < need:
        raise BadRequest(f"CDB for opcode 0x{opcode:02x} needs {need} bytes, got {len(cdb)}")
    flags = cdb[1]
    if need == 10:
        _, _, lba, _, count = _RW10.unpack_from(cdb)
    elif need == 16:
        _, _, lba, count, _ = _RW16.unpack_from(cdb)
    elif need == 12:
        _, _, lba, count, _ = _RW12.unpack_from(cdb)
    elif opcode == READ_6 or opcode == WRITE_6:
        lba = ((flags & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        count = cdb[4] or 256
        return ScsiCommand(opcode, READ if opcode == READ_6 else WRITE, lba, count, 0, cdb)
    else:
        lba = 0
        count = cdb[4]  # allocation / parameter list length of 6-byte commands
    kind = _RW_OPS.get(opcode)
    if kind is None:
        return ScsiCommand(opcode, DISCARD if opcode == UNMAP else OTHER, 0, 0, flags, cdb)
    if opcode in _PROTECT_OPS and flags & 0xE0:
        # RDPROTECT/WRPROTECT/VRPROTECT: this device has no protection information.
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 1, 7)
    if opcode == SYNCHRONIZE_CACHE_10:
        count = _U16.unpack_from(cdb, 7)[0]
    return ScsiCommand(opcode, kind, lba, count, flags, cdb)


def _count_field(opcode: int) -> int:
    """The byte number of the TRANSFER LENGTH / NUMBER OF LOGICAL BLOCKS field."""
    need = _cdb_length(opcode)
    return {6: 4, 10: 7, 12: 6, 16: 10}[need]


class ScsiDisk:
    """One logical unit (LUN 0) over a target."""

    bus = "scsi"

    def __init__(self, target: Target, block_size: int = 512, serial: str | None = None) -> None:
        if block_size not in (512, 4096):
            raise ValueError(f"block size {block_size}: must be 512 or 4096")
        self.target = target
        self.block_size = block_size
        self.blocks = target.size // block_size
        self.serial = (serial or serial_for(target.name)).encode("ascii", "replace")[:20]
        self.stopped = False

    # -- entry points ---------------------------------------------------------------------------

    def submit(
        self,
        cdb: bytes,
        data_out: bytes | bytearray | memoryview | None = None,
        data_in_length: int | None = None,
    ) -> Completion:
        """Decode and execute one command."""
        try:
            cmd = decode(cdb)
        except CheckCondition as e:
            return self._check(OTHER, e)
        return self.execute(cmd, data_out, data_in_length)

    def execute(
        self,
        cmd: ScsiCommand,
        data_out: bytes | bytearray | memoryview | None = None,
        data_in_length: int | None = None,
    ) -> Completion:
        try:
            data, nbytes = self._run(cmd, data_out)
        except CheckCondition as e:
            return self._check(cmd.kind, e)
        if data_in_length is not None and len(data) > data_in_length:
            data = data[:data_in_length]
        return Completion(cmd.kind, True, {"status": GOOD}, data, nbytes)

    @staticmethod
    def _check(kind: str, e: CheckCondition) -> Completion:
        sense = e.sense()
        status = {
            "status": CHECK_CONDITION,
            "sense_key": e.key,
            "asc": e.asc,
            "ascq": e.ascq,
            "sense": sense.hex(),
        }
        return Completion(kind, False, status, b"", 0)

    # -- dispatch -------------------------------------------------------------------------------

    def _run(
        self, cmd: ScsiCommand, data_out: bytes | bytearray | memoryview | None
    ) -> tuple[bytes | bytearray | memoryview, int]:
        op = cmd.opcode
        if self.stopped and op not in (INQUIRY, REQUEST_SENSE, REPORT_LUNS, START_STOP_UNIT):
            raise CheckCondition(NOT_READY, NOT_READY_INIT_REQUIRED)
        kind = cmd.kind
        if kind == READ:
            return self._read(cmd)
        if kind == WRITE:
            return self._write(cmd, data_out)
        if kind == VERIFY:
            return self._verify(cmd, data_out)
        if kind == FLUSH:
            self._check_range(cmd.lba, cmd.count)
            self._flush()
            return b"", 0
        if kind == WRITE_ZEROES:
            return self._write_same(cmd, data_out)
        if op == UNMAP:
            return self._unmap(cmd, data_out)
        if op == TEST_UNIT_READY:
            return b"", 0
        if op == INQUIRY:
            return self._inquiry(cmd.cdb), 0
        if op == REQUEST_SENSE:
            if cmd.cdb[1] & 0x01:  # DESC: descriptor-format sense data is not supported
                raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 1, 0)
            alloc = cmd.cdb[4]
            if self.stopped:
                return fixed_sense(NOT_READY, *NOT_READY_INIT_REQUIRED)[:alloc], 0
            return fixed_sense(NO_SENSE, 0, 0)[:alloc], 0
        if op == READ_CAPACITY_10:
            return self._read_capacity_10(cmd.cdb), 0
        if op == SERVICE_ACTION_IN_16:
            return self._service_action_in(cmd.cdb), 0
        if op in (MODE_SENSE_6, MODE_SENSE_10):
            return self._mode_sense(cmd.cdb), 0
        if op in (MODE_SELECT_6, MODE_SELECT_10):
            self._mode_select(cmd.cdb, data_out)
            return b"", 0
        if op == REPORT_LUNS:
            return self._report_luns(cmd.cdb), 0
        if op == START_STOP_UNIT:
            self._start_stop(cmd.cdb)
            return b"", 0
        raise CheckCondition(ILLEGAL_REQUEST, INVALID_OPCODE)

    # -- media access ---------------------------------------------------------------------------

    def _check_range(self, lba: int, count: int) -> None:
        if lba + count > self.blocks:
            raise CheckCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)

    def _check_transfer(self, cmd: ScsiCommand) -> None:
        if cmd.count > MAX_TRANSFER_BLOCKS:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, _count_field(cmd.opcode))
        self._check_range(cmd.lba, cmd.count)

    def _read(self, cmd: ScsiCommand) -> tuple[bytes | bytearray | memoryview, int]:
        self._check_transfer(cmd)
        if cmd.count == 0:
            return b"", 0
        bs = self.block_size
        try:
            data = self.target.read(cmd.lba * bs, cmd.count * bs)
        except TargetError:
            raise CheckCondition(MEDIUM_ERROR, UNRECOVERED_READ_ERROR) from None
        return data, len(data)

    def _data_out(
        self, data_out: bytes | bytearray | memoryview | None, need: int
    ) -> bytes | bytearray | memoryview:
        have = 0 if data_out is None else len(data_out)
        if have != need:
            raise BadRequest(f"the command transfers {need} data-out bytes, the trace has {have}")
        assert data_out is not None or need == 0
        return data_out if data_out is not None else b""

    def _writable(self) -> None:
        if self.target.read_only:
            raise CheckCondition(DATA_PROTECT, WRITE_PROTECTED)

    def _write(
        self, cmd: ScsiCommand, data_out: bytes | bytearray | memoryview | None
    ) -> tuple[bytes, int]:
        verify = cmd.opcode in (WRITE_AND_VERIFY_10, WRITE_AND_VERIFY_12, WRITE_AND_VERIFY_16)
        if verify and cmd.flags & 0x04:  # BYTCHK 10b/11b: not supported for WRITE AND VERIFY
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 1, 2)
        self._check_transfer(cmd)
        bs = self.block_size
        data = self._data_out(data_out, cmd.count * bs)
        if cmd.count == 0:
            return b"", 0
        self._writable()
        fua = bool(cmd.flags & 0x08) and cmd.opcode not in (READ_6, WRITE_6)
        try:
            self.target.write(cmd.lba * bs, data, fua)
        except TargetError:
            raise CheckCondition(MEDIUM_ERROR, WRITE_ERROR) from None
        if cmd.opcode in (WRITE_AND_VERIFY_10, WRITE_AND_VERIFY_12, WRITE_AND_VERIFY_16):
            self._compare(cmd.lba, data)
        return b"", len(data)

    def _compare(self, lba: int, expected: bytes | bytearray | memoryview) -> None:
        try:
            got = self.target.read(lba * self.block_size, len(expected))
        except TargetError:
            raise CheckCondition(MEDIUM_ERROR, UNRECOVERED_READ_ERROR) from None
        if got != expected:
            raise CheckCondition(MISCOMPARE, MISCOMPARE_DURING_VERIFY)

    def _verify(
        self, cmd: ScsiCommand, data_out: bytes | bytearray | memoryview | None
    ) -> tuple[bytes, int]:
        bytchk = (cmd.flags >> 1) & 0x03
        if bytchk == 0x02:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 1, 2)
        self._check_transfer(cmd)
        bs = self.block_size
        if bytchk == 0:
            if cmd.count:
                try:
                    self.target.read(cmd.lba * bs, cmd.count * bs)
                except TargetError:
                    raise CheckCondition(MEDIUM_ERROR, UNRECOVERED_READ_ERROR) from None
            return b"", 0
        if bytchk == 0x01:
            expected = self._data_out(data_out, cmd.count * bs)
        else:  # 11b: one block of data-out compared with every block of the range
            expected = bytes(self._data_out(data_out, bs)) * cmd.count
        if cmd.count:
            self._compare(cmd.lba, expected)
        return b"", 0

    def _flush(self) -> None:
        try:
            self.target.flush()
        except TargetError:
            raise CheckCondition(MEDIUM_ERROR, WRITE_ERROR) from None

    def _write_same(
        self, cmd: ScsiCommand, data_out: bytes | bytearray | memoryview | None
    ) -> tuple[bytes, int]:
        flags = cmd.flags
        unmap = bool(flags & 0x08)
        ndob = cmd.opcode == WRITE_SAME_16 and bool(flags & 0x01)
        if flags & 0x06:  # LBDATA / PBDATA (obsolete in SBC-4)
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 1, 2)
        if unmap and not self.target.can_discard:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 1, 3)
        if cmd.count == 0 or cmd.count > MAX_WRITE_SAME_BLOCKS:
            # WSNZ=1 in the Block Limits page: a zero length is not "to the end of the medium".
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, _count_field(cmd.opcode))
        self._check_range(cmd.lba, cmd.count)
        bs = self.block_size
        block = b"" if ndob else self._data_out(data_out, bs)
        self._writable()
        offset, length = cmd.lba * bs, cmd.count * bs
        try:
            if ndob or not any(block):
                self.target.write_zeroes(offset, length, unmap)
            else:
                # A non-zero pattern: write it in chunks of up to 1 MiB.
                per = max(1, (1 << 20) // bs)
                chunk = bytes(block) * per
                lba, left = cmd.lba, cmd.count
                while left:
                    n = min(per, left)
                    self.target.write(lba * bs, chunk[: n * bs])
                    lba += n
                    left -= n
        except TargetError:
            raise CheckCondition(MEDIUM_ERROR, WRITE_ERROR) from None
        return b"", length

    def _unmap(
        self, cmd: ScsiCommand, data_out: bytes | bytearray | memoryview | None
    ) -> tuple[bytes, int]:
        if not self.target.can_discard:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_OPCODE)
        cdb = cmd.cdb
        if cdb[1] & 0x01:  # ANCHOR: this device has no anchored state
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 1, 0)
        plen = _U16.unpack_from(cdb, 7)[0]
        params = self._data_out(data_out, plen)
        if plen == 0:
            return b"", 0
        if plen < 8:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        desc_len = _U16.unpack_from(params, 2)[0]
        ndesc = min(desc_len, plen - 8) // 16
        if ndesc > MAX_UNMAP_DESCRIPTORS:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, 2, None, False)
        ranges = []
        for i in range(ndesc):
            lba, count = struct.unpack_from(">QI", params, 8 + 16 * i)
            if count > MAX_UNMAP_BLOCKS:
                raise CheckCondition(
                    ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, 16 + 16 * i, None, False
                )
            self._check_range(lba, count)
            if count:
                ranges.append((lba, count))
        self._writable()
        bs = self.block_size
        total = 0
        try:
            for lba, count in ranges:
                self.target.discard(lba * bs, count * bs)
                total += count * bs
        except TargetError:
            raise CheckCondition(MEDIUM_ERROR, WRITE_ERROR) from None
        return b"", total

    # -- SPC commands ---------------------------------------------------------------------------

    def _inquiry(self, cdb: bytes) -> bytes:
        evpd = cdb[1] & 0x01
        if cdb[1] & 0x02:  # CMDDT (obsolete)
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 1, 1)
        page = cdb[2]
        alloc = _U16.unpack_from(cdb, 3)[0]
        if not evpd:
            if page:
                raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 2)
            return self.standard_inquiry()[:alloc]
        builder = self._vpd_pages().get(page)
        if builder is None:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 2)
        return builder()[:alloc]

    def standard_inquiry(self) -> bytes:
        data = bytearray(74)
        data[0] = 0x00  # peripheral qualifier 000b, device type 00h (direct access block)
        data[1] = 0x00  # RMB=0: not removable
        data[2] = 0x07  # VERSION: SPC-5
        data[3] = 0x12  # HISUP=1, RESPONSE DATA FORMAT=2
        data[4] = len(data) - 5  # ADDITIONAL LENGTH
        data[5] = 0x00
        data[6] = 0x00
        data[7] = 0x02  # CMDQUE=1
        data[8:16] = VENDOR
        data[16:32] = b"imgfs disk".ljust(16)
        data[32:36] = PRODUCT_REVISION
        for i, desc in enumerate(VERSION_DESCRIPTORS):
            _U16.pack_into(data, 58 + 2 * i, desc)
        return bytes(data)

    def _vpd_pages(self) -> dict[int, object]:
        return {
            0x00: self.vpd_supported_pages,
            0x80: self.vpd_unit_serial,
            0x83: self.vpd_device_identification,
            0xB0: self.vpd_block_limits,
            0xB1: self.vpd_block_device_characteristics,
            0xB2: self.vpd_logical_block_provisioning,
        }

    @staticmethod
    def _vpd(page: int, payload: bytes) -> bytes:
        return bytes((0x00, page)) + _U16.pack(len(payload)) + payload

    def vpd_supported_pages(self) -> bytes:
        return self._vpd(0x00, bytes(sorted(self._vpd_pages())))

    def vpd_unit_serial(self) -> bytes:
        return self._vpd(0x80, self.serial)

    def vpd_device_identification(self) -> bytes:
        # One designation descriptor: T10 vendor ID based (type 1), ASCII (code set 2),
        # associated with the logical unit; the vendor-specific part is the serial number.
        ident = VENDOR + self.serial
        desc = bytes((0x02, 0x01, 0x00, len(ident))) + ident
        return self._vpd(0x83, desc)

    def vpd_block_limits(self) -> bytes:
        page = bytearray(60)
        page[0] = 0x01  # WSNZ: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is not supported
        phys = max(1, 4096 // self.block_size)
        _U16.pack_into(page, 2, phys)  # OPTIMAL TRANSFER LENGTH GRANULARITY
        _U32.pack_into(page, 4, MAX_TRANSFER_BLOCKS)  # MAXIMUM TRANSFER LENGTH
        _U32.pack_into(page, 8, MAX_TRANSFER_BLOCKS)  # OPTIMAL TRANSFER LENGTH
        if self.target.can_discard:
            _U32.pack_into(page, 16, MAX_UNMAP_BLOCKS)  # MAXIMUM UNMAP LBA COUNT
            _U32.pack_into(page, 20, MAX_UNMAP_DESCRIPTORS)  # MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
            _U32.pack_into(page, 24, phys)  # OPTIMAL UNMAP GRANULARITY
            _U32.pack_into(page, 28, 0x80000000)  # UGAVALID=1, alignment 0
        struct.pack_into(">Q", page, 32, MAX_WRITE_SAME_BLOCKS)  # MAXIMUM WRITE SAME LENGTH
        return self._vpd(0xB0, bytes(page))

    def vpd_block_device_characteristics(self) -> bytes:
        page = bytearray(60)
        _U16.pack_into(page, 0, 0x0001)  # MEDIUM ROTATION RATE: non-rotating medium
        return self._vpd(0xB1, bytes(page))

    def vpd_logical_block_provisioning(self) -> bytes:
        page = bytearray(4)
        if self.target.can_discard:
            # LBPU, LBPWS, LBPWS10; LBPRZ=001b (unmapped blocks read as zeros)
            page[1] = 0x80 | 0x40 | 0x20 | (0x01 << 2)
            page[2] = 0x02  # PROVISIONING TYPE: thin provisioned
        return self._vpd(0xB2, bytes(page))

    def _read_capacity_10(self, cdb: bytes) -> bytes:
        if len(cdb) >= 9 and not cdb[8] & 0x01 and _U32.unpack_from(cdb, 2)[0] != 0:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 2)
        last = self.blocks - 1
        return struct.pack(">II", min(last, 0xFFFFFFFF), self.block_size)

    def _service_action_in(self, cdb: bytes) -> bytes:
        if cdb[1] & 0x1F != READ_CAPACITY_16_SA:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 1, 4)
        alloc = _U32.unpack_from(cdb, 10)[0]
        return self.read_capacity_16()[:alloc]

    def read_capacity_16(self) -> bytes:
        data = bytearray(32)
        struct.pack_into(">QI", data, 0, self.blocks - 1, self.block_size)
        exponent = max(0, (4096 // self.block_size).bit_length() - 1)
        data[13] = exponent  # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT
        if self.target.can_discard:
            data[14] = 0x80 | 0x40  # LBPME, LBPRZ
        return bytes(data)

    def _report_luns(self, cdb: bytes) -> bytes:
        alloc = _U32.unpack_from(cdb, 6)[0]
        if alloc < 16:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 6)
        if cdb[2] not in (0x00, 0x01, 0x02):
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 2)
        return (_U32.pack(8) + bytes(4) + bytes(8))[:alloc]  # one LUN: 0

    def _start_stop(self, cdb: bytes) -> None:
        power = cdb[4] >> 4
        if power != 0:
            return  # power condition changes: nothing to do for an image
        if cdb[4] & 0x02:  # LOEJ: nothing to eject
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 4, 1)
        start = bool(cdb[4] & 0x01)
        if not start and not cdb[4] & 0x04:  # stopping without NO_FLUSH: flush first
            self._flush()
        self.stopped = not start

    # -- mode pages -----------------------------------------------------------------------------

    @property
    def wce(self) -> bool:
        return not self.target.writethrough

    def _caching_page(self, pc: int) -> bytes:
        page = bytearray(20)
        page[0] = 0x08
        page[1] = 0x12
        if pc == 1:  # changeable values: only WCE
            page[2] = 0x04
        elif pc == 0:
            page[2] = 0x04 if self.wce else 0x00
        else:  # default: write cache on
            page[2] = 0x04
        return bytes(page)

    def _control_page(self, pc: int) -> bytes:
        page = bytearray(12)
        page[0] = 0x0A
        page[1] = 0x0A
        if pc != 1:
            page[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
        return bytes(page)

    def _mode_sense(self, cdb: bytes) -> bytes:
        ten = cdb[0] == MODE_SENSE_10
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pc = cdb[2] >> 6
        page = cdb[2] & 0x3F
        subpage = cdb[3]
        alloc = _U16.unpack_from(cdb, 7)[0] if ten else cdb[4]
        if pc == 3:
            raise CheckCondition(ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED)
        if page == 0x08:
            pages = self._caching_page(pc)
        elif page == 0x0A:
            pages = self._control_page(pc)
        elif page == 0x3F:
            pages = self._caching_page(pc) + self._control_page(pc)
        else:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 2, 5)
        if subpage not in (0x00, 0xFF) or (subpage == 0xFF and page != 0x3F):
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 3)
        device_specific = 0x10 | (0x80 if self.target.read_only else 0)  # DPOFUA, WP
        if dbd:
            desc = b""
        elif llbaa:
            desc = struct.pack(">QII", self.blocks, 0, self.block_size)
        else:
            desc = struct.pack(">II", min(self.blocks, 0xFFFFFFFF), self.block_size & 0xFFFFFF)
        body = desc + pages
        if ten:
            header = struct.pack(
                ">HBBBBH",
                len(body) + 6,
                0,
                device_specific,
                1 if llbaa and desc else 0,
                0,
                len(desc),
            )
        else:
            header = bytes((len(body) + 3, 0, device_specific, len(desc)))
        return (header + body)[:alloc]

    def _mode_select(self, cdb: bytes, data_out: bytes | bytearray | memoryview | None) -> None:
        ten = cdb[0] == MODE_SELECT_10
        if cdb[1] & 0x01:  # SP: saving is not supported
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, 1, 0)
        plen = _U16.unpack_from(cdb, 7)[0] if ten else cdb[4]
        params = bytes(self._data_out(data_out, plen))
        if plen == 0:
            return
        hlen = 8 if ten else 4
        if plen < hlen:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        bdlen = _U16.unpack_from(params, 6)[0] if ten else params[3]
        pos = hlen
        if bdlen:
            if bdlen not in (8, 16) or pos + bdlen > plen:
                raise CheckCondition(
                    ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, 6 if ten else 3, None, False
                )
            block_len = _U32.unpack_from(params, pos + bdlen - 4)[0] & (
                0xFFFFFFFF if bdlen == 16 else 0xFFFFFF
            )
            if block_len != self.block_size:
                raise CheckCondition(
                    ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, pos + bdlen - 3, None, False
                )
            pos += bdlen
        new_wce = None
        while pos < plen:
            if pos + 2 > plen:
                raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
            code = params[pos] & 0x3F
            length = params[pos + 1]
            if params[pos] & 0x40 or code not in (0x08, 0x0A):  # subpage format / unknown page
                raise CheckCondition(
                    ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, pos, 5, False
                )
            current = self._caching_page(0) if code == 0x08 else self._control_page(0)
            if length != len(current) - 2 or pos + 2 + length > plen:
                raise CheckCondition(
                    ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, pos + 1, None, False
                )
            page = params[pos : pos + 2 + length]
            changeable = self._caching_page(1) if code == 0x08 else bytes(len(current))
            for i in range(2, len(page)):
                if (page[i] ^ current[i]) & ~changeable[i] & 0xFF:
                    raise CheckCondition(
                        ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, pos + i, None, False
                    )
            if code == 0x08:
                new_wce = bool(page[2] & 0x04)
            pos += 2 + length
        if new_wce is not None:
            if not new_wce and not self.target.writethrough:
                self._flush()  # writes cached until now become durable before writethrough
            self.target.writethrough = not new_wce
