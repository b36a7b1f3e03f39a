"""SCSI conformance, written from SPC-5 and SBC-4: every expected byte below comes from the
standards' tables, not from the implementation."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.emulation import scsi
from imgfs.emulation.common import BadRequest
from imgfs.emulation.scsi import ScsiDisk, decode
from imgfs.emulation.target import DiskTarget
from tests.emulation.helpers import MiB, file_target
from tests.mountutil import REPO, subprocess_env

SIZE = 64 * MiB
BLOCKS = SIZE // 512


@pytest.fixture
def dev(tmp_path: Path) -> ScsiDisk:
    return ScsiDisk(file_target(tmp_path, SIZE), serial="SERIAL0001")


def sense_bytes(key: int, asc: int, ascq: int, sks: bytes = b"\0\0\0") -> bytes:
    # SPC-5 4.4.3 table 59: 70h, 0, key, INFORMATION(4), ADDITIONAL SENSE LENGTH 0Ah,
    # COMMAND-SPECIFIC(4), ASC, ASCQ, FRU 0, SENSE KEY SPECIFIC(3)
    return bytes([0x70, 0, key, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, asc, ascq, 0]) + sks


def cdb10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def cdb16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def check(done, key: int, asc: int, ascq: int, sks: bytes = b"\0\0\0") -> None:
    assert not done.ok
    assert done.status["status"] == 0x02  # CHECK CONDITION
    assert bytes.fromhex(done.status["sense"]) == sense_bytes(key, asc, ascq, sks)
    assert (done.status["sense_key"], done.status["asc"], done.status["ascq"]) == (key, asc, ascq)


def test_test_unit_ready(dev: ScsiDisk) -> None:
    done = dev.submit(bytes(6))
    assert done.ok and done.status == {"status": 0} and done.data == b""


def test_unknown_opcode_is_invalid_command_operation_code(dev: ScsiDisk) -> None:
    check(dev.submit(bytes([0xC0]) + bytes(15)), 0x05, 0x20, 0x00)  # vendor specific
    check(dev.submit(bytes([0x02]) + bytes(5)), 0x05, 0x20, 0x00)  # not a direct-access cmd


def test_standard_inquiry(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x12, 0, 0, 0, 96, 0])).data
    assert data[0] == 0x00  # connected, direct access block device
    assert data[1] & 0x80 == 0  # not removable
    assert data[2] == 0x07  # SPC-5
    assert data[3] & 0x0F == 2 and data[3] & 0x10  # response data format 2, HISUP
    assert data[4] == len(data) - 5
    assert data[7] & 0x02  # CMDQUE
    assert data[8:16] == b"IMGFS   "
    assert data[16:32] == b"imgfs disk      "
    assert data[32:36] == b"0001"
    descriptors = struct.unpack(">3H", data[58:64])
    assert descriptors == (0x00A0, 0x05C0, 0x0600)  # SAM-5, SPC-5, SBC-4


def test_inquiry_respects_allocation_length(dev: ScsiDisk) -> None:
    assert len(dev.submit(bytes([0x12, 0, 0, 0, 5, 0])).data) == 5
    assert dev.submit(bytes([0x12, 0, 0, 0, 0, 0])).data == b""


def test_inquiry_page_code_without_evpd_points_at_byte_2(dev: ScsiDisk) -> None:
    # SKSV=1, C/D=1, BPV=0; field pointer 2
    check(dev.submit(bytes([0x12, 0, 0x80, 0, 255, 0])), 0x05, 0x24, 0x00, b"\xc0\x00\x02")


def test_inquiry_cmddt_points_at_byte_1_bit_1(dev: ScsiDisk) -> None:
    check(dev.submit(bytes([0x12, 0x02, 0, 0, 255, 0])), 0x05, 0x24, 0x00, b"\xc9\x00\x01")


def test_vpd_unsupported_page(dev: ScsiDisk) -> None:
    check(dev.submit(bytes([0x12, 1, 0x86, 0, 255, 0])), 0x05, 0x24, 0x00, b"\xc0\x00\x02")


def test_vpd_supported_pages(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x12, 1, 0x00, 0, 255, 0])).data
    assert data == bytes([0, 0x00, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])


def test_vpd_unit_serial_number(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x12, 1, 0x80, 0, 255, 0])).data
    assert data == bytes([0, 0x80, 0, 10]) + b"SERIAL0001"


def test_vpd_device_identification(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x12, 1, 0x83, 0, 255, 0])).data
    assert data[:2] == b"\x00\x83"
    assert struct.unpack(">H", data[2:4])[0] == len(data) - 4
    # code set 2 (ASCII), association 0 (LU), designator type 1 (T10 vendor ID)
    assert data[4] & 0x0F == 2 and data[5] & 0x30 == 0 and data[5] & 0x0F == 1
    assert data[7] == len(data) - 8
    assert data[8:] == b"IMGFS   SERIAL0001"


def test_vpd_block_limits(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x12, 1, 0xB0, 0, 255, 0])).data
    assert data[:4] == bytes([0, 0xB0, 0, 0x3C])
    assert len(data) == 64
    assert data[4] & 0x01  # WSNZ
    assert struct.unpack(">I", data[8:12])[0] == 65536  # MAXIMUM TRANSFER LENGTH
    assert struct.unpack(">I", data[20:24])[0] == 1 << 22  # MAXIMUM UNMAP LBA COUNT
    assert struct.unpack(">I", data[24:28])[0] == 256  # MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
    assert struct.unpack(">I", data[28:32])[0] == 8  # OPTIMAL UNMAP GRANULARITY
    assert struct.unpack(">I", data[32:36])[0] == 0x80000000  # UGAVALID, alignment 0
    assert struct.unpack(">Q", data[36:44])[0] == 1 << 22  # MAXIMUM WRITE SAME LENGTH


def test_vpd_block_device_characteristics(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x12, 1, 0xB1, 0, 255, 0])).data
    assert data[:4] == bytes([0, 0xB1, 0, 0x3C])
    assert data[4:6] == b"\x00\x01"  # non-rotating


def test_vpd_logical_block_provisioning(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x12, 1, 0xB2, 0, 255, 0])).data
    # LBPU | LBPWS | LBPWS10, LBPRZ=001b; provisioning type 2 (thin)
    assert data == bytes([0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0])


def test_vpd_lbp_without_discard(tmp_path: Path) -> None:
    dev = ScsiDisk(file_target(tmp_path, SIZE, read_only=True))
    assert dev.submit(bytes([0x12, 1, 0xB2, 0, 255, 0])).data == bytes([0, 0xB2, 0, 4, 0, 0, 0, 0])


def test_read_capacity_10(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x25]) + bytes(9)).data
    assert data == struct.pack(">II", BLOCKS - 1, 512)


def test_read_capacity_10_lba_without_pmi(dev: ScsiDisk) -> None:
    check(dev.submit(bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0])), 0x05, 0x24, 0x00, b"\xc0\x00\x02")


def test_read_capacity_10_over_2tib(tmp_path: Path) -> None:
    dev = ScsiDisk(file_target(tmp_path, 3 << 40))
    assert dev.submit(bytes([0x25]) + bytes(9)).data == struct.pack(">II", 0xFFFFFFFF, 512)
    data = dev.submit(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)).data
    assert struct.unpack(">Q", data[:8])[0] == (3 << 40) // 512 - 1


def test_read_capacity_16(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)).data
    expected = bytearray(32)
    struct.pack_into(">QI", expected, 0, BLOCKS - 1, 512)
    expected[13] = 3  # 8 logical blocks per 4 KiB physical block
    expected[14] = 0xC0  # LBPME, LBPRZ: the target can discard and reads zeros after
    assert data == bytes(expected)


def test_read_capacity_16_no_lbpme_when_target_cannot_discard(tmp_path: Path) -> None:
    dev = ScsiDisk(file_target(tmp_path, SIZE, read_only=True))
    data = dev.submit(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)).data
    assert data[14] == 0


def test_read_capacity_16_bad_service_action(dev: ScsiDisk) -> None:
    # SERVICE ACTION is bits 4..0 of byte 1: BPV with bit pointer 4
    check(dev.submit(bytes([0x9E, 0x11]) + bytes(14)), 0x05, 0x24, 0x00, b"\xcc\x00\x01")


@pytest.mark.parametrize("width", [6, 10, 12, 16])
def test_write_then_read(dev: ScsiDisk, width: int) -> None:
    payload = os.urandom(4 * 512)
    if width == 6:
        w = bytes([0x0A, 0, 0x01, 0x00, 4, 0])
        r = bytes([0x08, 0, 0x01, 0x00, 4, 0])
    elif width == 10:
        w, r = cdb10(0x2A, 256, 4), cdb10(0x28, 256, 4)
    elif width == 12:
        w = struct.pack(">BBIIBB", 0xAA, 0, 256, 4, 0, 0)
        r = struct.pack(">BBIIBB", 0xA8, 0, 256, 4, 0, 0)
    else:
        w, r = cdb16(0x8A, 256, 4), cdb16(0x88, 256, 4)
    assert dev.submit(w, payload).ok
    done = dev.submit(r)
    assert done.ok and bytes(done.data) == payload and done.kind == "read"
    assert dev.target.read(256 * 512, len(payload)) == payload


def test_read_6_transfer_length_zero_means_256(dev: ScsiDisk) -> None:
    assert len(dev.submit(bytes([0x08, 0, 0, 0, 0, 0])).data) == 256 * 512


def test_read_10_transfer_length_zero_transfers_nothing(dev: ScsiDisk) -> None:
    done = dev.submit(cdb10(0x28, 0, 0))
    assert done.ok and done.data == b""


def test_lba_out_of_range(dev: ScsiDisk) -> None:
    check(dev.submit(cdb10(0x28, BLOCKS - 1, 2)), 0x05, 0x21, 0x00)
    check(dev.submit(cdb16(0x8A, BLOCKS, 1), bytes(512)), 0x05, 0x21, 0x00)
    assert dev.submit(cdb10(0x28, BLOCKS - 1, 1)).ok


def test_transfer_length_over_maximum_points_at_length_field(dev: ScsiDisk) -> None:
    check(dev.submit(cdb16(0x88, 0, 65537)), 0x05, 0x24, 0x00, b"\xc0\x00\x0a")
    check(
        dev.submit(struct.pack(">BBIIBB", 0xA8, 0, 0, 65537, 0, 0)),
        0x05,
        0x24,
        0x00,
        b"\xc0\x00\x06",
    )


def test_rdprotect_is_invalid_without_protection_information(dev: ScsiDisk) -> None:
    check(dev.submit(cdb10(0x28, 0, 1, flags=0x20)), 0x05, 0x24, 0x00, b"\xcf\x00\x01")


def test_truncated_cdb_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="needs 10 bytes, got 6"):
        decode(bytes([0x28, 0, 0, 0, 0, 0]))


def test_fua_write_reaches_target(dev: ScsiDisk) -> None:
    assert dev.submit(cdb10(0x2A, 8, 1, flags=0x08), b"\x55" * 512).ok
    assert dev.target.read(8 * 512, 512) == b"\x55" * 512


def test_synchronize_cache(dev: ScsiDisk) -> None:
    assert dev.submit(bytes([0x35]) + bytes(9)).ok
    assert dev.submit(bytes([0x91]) + bytes(15)).ok
    check(dev.submit(cdb10(0x35, BLOCKS, 1)), 0x05, 0x21, 0x00)


def test_verify_bytchk(dev: ScsiDisk) -> None:
    data = os.urandom(1024)
    dev.submit(cdb10(0x2A, 10, 2), data)
    assert dev.submit(cdb10(0x2F, 10, 2)).ok  # medium verification
    assert dev.submit(cdb10(0x2F, 10, 2, flags=0x02), data).ok  # byte-by-byte compare
    check(dev.submit(cdb10(0x2F, 10, 2, flags=0x02), bytes(1024)), 0x0E, 0x1D, 0x00)
    check(dev.submit(cdb10(0x2F, 10, 2, flags=0x04)), 0x05, 0x24, 0x00, b"\xca\x00\x01")
    dev.submit(cdb10(0x2A, 20, 3), b"\x07" * 1536)
    assert dev.submit(cdb10(0x2F, 20, 3, flags=0x06), b"\x07" * 512).ok  # one block vs each


def test_write_and_verify(dev: ScsiDisk) -> None:
    data = os.urandom(512)
    assert dev.submit(cdb10(0x2E, 30, 1), data).ok
    assert dev.target.read(30 * 512, 512) == data


def test_write_same_unmap_and_zero(dev: ScsiDisk) -> None:
    dev.submit(cdb10(0x2A, 100, 8), b"\xff" * 4096)
    assert dev.submit(cdb16(0x93, 100, 4, flags=0x08), bytes(512)).ok  # UNMAP bit
    assert dev.target.read(100 * 512, 4096) == bytes(2048) + b"\xff" * 2048
    assert dev.submit(cdb10(0x41, 104, 4), bytes(512)).ok  # zeros without UNMAP
    assert dev.target.read(104 * 512, 2048) == bytes(2048)


def test_write_same_pattern(dev: ScsiDisk) -> None:
    block = bytes(range(256)) * 2
    assert dev.submit(cdb10(0x41, 200, 5), block).ok
    assert dev.target.read(200 * 512, 5 * 512) == block * 5


def test_write_same_ndob(dev: ScsiDisk) -> None:
    dev.submit(cdb10(0x2A, 300, 1), b"\x01" * 512)
    assert dev.submit(cdb16(0x93, 300, 1, flags=0x01)).ok
    assert dev.target.read(300 * 512, 512) == bytes(512)


def test_write_same_zero_length_with_wsnz(dev: ScsiDisk) -> None:
    check(dev.submit(cdb10(0x41, 0, 0), bytes(512)), 0x05, 0x24, 0x00, b"\xc0\x00\x07")


def unmap_params(ranges: list[tuple[int, int]]) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs


def unmap_cdb(length: int) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, 0, 0, length, 0)


def test_unmap(dev: ScsiDisk) -> None:
    dev.submit(cdb10(0x2A, 400, 16), b"\xab" * 8192)
    params = unmap_params([(400, 8), (412, 2)])
    done = dev.submit(unmap_cdb(len(params)), params)
    assert done.ok and done.kind == "discard" and done.nbytes == 10 * 512
    got = dev.target.read(400 * 512, 8192)
    assert got == bytes(4096) + b"\xab" * 2048 + bytes(1024) + b"\xab" * 1024


def test_unmap_out_of_range_and_short_list(dev: ScsiDisk) -> None:
    params = unmap_params([(BLOCKS - 1, 2)])
    check(dev.submit(unmap_cdb(len(params)), params), 0x05, 0x21, 0x00)
    check(dev.submit(unmap_cdb(4), bytes(4)), 0x05, 0x1A, 0x00)
    assert dev.submit(unmap_cdb(0)).ok


def test_unmap_too_many_descriptors_points_into_parameter_list(dev: ScsiDisk) -> None:
    params = unmap_params([(0, 1)] * 257)
    # SKSV=1, C/D=0 (parameter list), field pointer 2 (BLOCK DESCRIPTOR DATA LENGTH)
    check(dev.submit(unmap_cdb(len(params)), params), 0x05, 0x26, 0x00, b"\x80\x00\x02")


def test_mode_sense_6_caching_page(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x1A, 0, 0x08, 0, 255, 0])).data
    # header: MODE DATA LENGTH, MEDIUM TYPE, DEVICE-SPECIFIC (DPOFUA), BLOCK DESCRIPTOR LENGTH
    assert data[:4] == bytes([3 + 8 + 20, 0, 0x10, 8])
    assert data[4:12] == struct.pack(">II", BLOCKS, 512)
    page = data[12:]
    assert page[:2] == b"\x08\x12" and len(page) == 20
    assert page[2] & 0x04  # WCE: writeback cache
    assert page[2] & 0x01 == 0  # RCD=0


def test_mode_sense_10_long_lba_and_dbd(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x5A, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0])).data
    assert struct.unpack(">H", data[:2])[0] == len(data) - 2
    assert data[4] & 0x01 and struct.unpack(">H", data[6:8])[0] == 16  # LONGLBA
    assert data[8:24] == struct.pack(">QII", BLOCKS, 0, 512)
    data = dev.submit(bytes([0x5A, 0x08, 0x3F, 0, 0, 0, 0, 0, 255, 0])).data  # DBD, all pages
    assert struct.unpack(">H", data[6:8])[0] == 0
    assert data[8:10] == b"\x08\x12" and data[28:30] == b"\x0a\x0a"


def test_mode_sense_changeable_and_saved(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0x1A, 0x08, 0x48, 0, 255, 0])).data  # PC=1 changeable, DBD
    assert data[4:6] == b"\x08\x12" and data[6] == 0x04  # only WCE can change
    check(dev.submit(bytes([0x1A, 0, 0xC8, 0, 255, 0])), 0x05, 0x39, 0x00)


def test_mode_sense_unsupported_page(dev: ScsiDisk) -> None:
    check(dev.submit(bytes([0x1A, 0, 0x19, 0, 255, 0])), 0x05, 0x24, 0x00, b"\xcd\x00\x02")


def caching_select(wce: bool) -> bytes:
    page = bytearray(20)
    page[0], page[1] = 0x08, 0x12
    page[2] = 0x04 if wce else 0
    return bytes(4) + bytes(page)  # header without block descriptors


def test_mode_select_clears_wce_and_makes_writes_writethrough(dev: ScsiDisk) -> None:
    params = caching_select(False)
    assert dev.submit(bytes([0x15, 0x10, 0, 0, len(params), 0]), params).ok
    assert dev.target.writethrough
    data = dev.submit(bytes([0x1A, 0x08, 0x08, 0, 255, 0])).data
    assert data[6] & 0x04 == 0
    params = caching_select(True)
    assert dev.submit(bytes([0x15, 0x10, 0, 0, len(params), 0]), params).ok
    assert not dev.target.writethrough


def test_mode_select_unchangeable_bit_points_into_parameter_list(dev: ScsiDisk) -> None:
    params = bytearray(caching_select(True))
    params[4 + 2] |= 0x01  # RCD is not changeable
    # C/D=0, field pointer 6 (byte 2 of the page after the 4-byte header)
    check(
        dev.submit(bytes([0x15, 0x10, 0, 0, len(params), 0]), bytes(params)),
        0x05,
        0x26,
        0x00,
        b"\x80\x00\x06",
    )


def test_mode_select_save_pages_is_invalid(dev: ScsiDisk) -> None:
    params = caching_select(True)
    check(
        dev.submit(bytes([0x15, 0x11, 0, 0, len(params), 0]), params),
        0x05,
        0x24,
        0x00,
        b"\xc8\x00\x01",
    )


def test_mode_select_10(dev: ScsiDisk) -> None:
    page = caching_select(False)[4:]
    params = bytes(8) + page
    assert dev.submit(bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, len(params), 0]), params).ok
    assert dev.target.writethrough


def test_report_luns(dev: ScsiDisk) -> None:
    data = dev.submit(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0])).data
    assert data == struct.pack(">I", 8) + bytes(4) + bytes(8)
    check(
        dev.submit(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0])),
        0x05,
        0x24,
        0x00,
        b"\xc0\x00\x06",
    )


def test_start_stop_unit(dev: ScsiDisk) -> None:
    assert dev.submit(bytes([0x1B, 0, 0, 0, 0x00, 0])).ok  # stop
    check(dev.submit(bytes(6)), 0x02, 0x04, 0x02)  # TEST UNIT READY: not ready
    check(dev.submit(cdb10(0x28, 0, 1)), 0x02, 0x04, 0x02)
    sense = dev.submit(bytes([0x03, 0, 0, 0, 18, 0])).data  # REQUEST SENSE reports it
    assert sense == sense_bytes(0x02, 0x04, 0x02)
    assert dev.submit(bytes([0x1B, 0, 0, 0, 0x01, 0])).ok  # start
    assert dev.submit(bytes(6)).ok


def test_request_sense_no_sense(dev: ScsiDisk) -> None:
    assert dev.submit(bytes([0x03, 0, 0, 0, 252, 0])).data == sense_bytes(0, 0, 0)


def test_write_protected(tmp_path: Path) -> None:
    dev = ScsiDisk(file_target(tmp_path, SIZE, read_only=True))
    check(dev.submit(cdb10(0x2A, 0, 1), bytes(512)), 0x07, 0x27, 0x00)
    data = dev.submit(bytes([0x1A, 0x08, 0x08, 0, 255, 0])).data
    assert data[2] & 0x80  # WP


def test_data_out_length_must_match(dev: ScsiDisk) -> None:
    with pytest.raises(BadRequest, match="transfers 1024 data-out bytes, the trace has 512"):
        dev.submit(cdb10(0x2A, 0, 2), bytes(512))


def test_host_read_error_is_unrecovered_read_error(tmp_path: Path) -> None:
    # The toy test format raises on a sector holding BUG_SECTOR: a failing driver.
    import tests.toyformat as toy

    path = tmp_path / "bad.toy"
    toy.make_toy(path, 1 * MiB, data=bytes(512) + toy.BUG_SECTOR)
    disk = open_disk(str(path), "toy")
    try:
        dev = ScsiDisk(DiskTarget(disk))
        assert dev.submit(cdb10(0x28, 0, 1)).ok
        check(dev.submit(cdb10(0x28, 0, 2)), 0x03, 0x11, 0x00)
    finally:
        disk.close()


def test_host_write_error_is_write_error(tmp_path: Path) -> None:
    # A file-size limit makes the host's pwrite fail (EFBIG): a real write error.
    path = tmp_path / "small.raw"
    path.write_bytes(b"")
    os.truncate(path, 4 * MiB)
    code = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
from imgfs.emulation.scsi import ScsiDisk
from imgfs.emulation.target import FileTarget
dev = ScsiDisk(FileTarget({str(path)!r}))
import struct
ok = dev.submit(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), bytes(512))
bad = dev.submit(struct.pack(">BBIBHB", 0x2A, 0, 4096, 0, 1, 0), bytes(512))
print(ok.status["status"], bad.status["sense"])
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        check=True,
    ).stdout.split()
    assert out[0] == "0"
    assert bytes.fromhex(out[1]) == sense_bytes(0x03, 0x0C, 0x00)


def test_4k_logical_blocks(tmp_path: Path) -> None:
    dev = ScsiDisk(file_target(tmp_path, SIZE), block_size=4096)
    data = dev.submit(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)).data
    assert struct.unpack(">QI", data[:12]) == (SIZE // 4096 - 1, 4096) and data[13] == 0
    payload = os.urandom(4096)
    assert dev.submit(cdb10(0x2A, 3, 1), payload).ok
    assert dev.target.read(3 * 4096, 4096) == payload


def test_decode_fields() -> None:
    cmd = decode(cdb16(0x8A, 0x123456789A, 77, flags=0x08))
    assert (cmd.opcode, cmd.kind, cmd.lba, cmd.count, cmd.flags) == (
        0x8A,
        "write",
        0x123456789A,
        77,
        0x08,
    )
    assert decode(bytes([0x08, 0x1F, 0xFF, 0xFF, 0, 0])).lba == 0x1FFFFF
    assert scsi.decode(bytes([0x35]) + bytes(9)).kind == "flush"


def test_request_sense_descriptor_format_is_not_supported(dev: ScsiDisk) -> None:
    check(dev.submit(bytes([0x03, 0x01, 0, 0, 252, 0])), 0x05, 0x24, 0x00, b"\xc8\x00\x01")


def test_write_and_verify_bytchk_11b_is_invalid(dev: ScsiDisk) -> None:
    check(dev.submit(cdb10(0x2E, 0, 1, flags=0x06), bytes(512)), 0x05, 0x24, 0x00, b"\xca\x00\x01")
