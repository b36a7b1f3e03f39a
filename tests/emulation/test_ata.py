"""ATA conformance from ACS-4 (IDENTIFY DEVICE words, status/error) and SATA (Register H2D
FIS layout). Expected values come from the standards' tables."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.emulation import ata
from imgfs.emulation.ata import AtaDisk, build_fis, decode
from imgfs.emulation.common import BadRequest
from imgfs.emulation.target import DiskTarget
from tests.emulation.helpers import MiB, file_target

SIZE = 64 * MiB
SECTORS = SIZE // 512


@pytest.fixture
def dev(tmp_path: Path) -> AtaDisk:
    return AtaDisk(file_target(tmp_path, SIZE), serial="SN-1234567")


def fis(
    command: int,
    lba: int = 0,
    count: int = 0,
    features: int = 0,
    device: int = 0x40,
    ext: bool = True,
) -> bytes:
    """Register H2D FIS built by hand from SATA 3.x figure 'Register - Host to Device FIS'."""
    b = bytearray(20)
    b[0] = 0x27
    b[1] = 0x80  # C: command register update
    b[2] = command
    b[3] = features & 0xFF
    b[4], b[5], b[6] = lba & 0xFF, (lba >> 8) & 0xFF, (lba >> 16) & 0xFF
    b[7] = device if ext else (device & 0xF0) | ((lba >> 24) & 0x0F)
    if ext:
        b[8], b[9], b[10] = (lba >> 24) & 0xFF, (lba >> 32) & 0xFF, (lba >> 40) & 0xFF
    b[11] = (features >> 8) & 0xFF
    b[12], b[13] = count & 0xFF, (count >> 8) & 0xFF
    return bytes(b)


def words(data: bytes) -> list[int]:
    return list(struct.unpack("<256H", data))


def ata_text(w: list[int], first: int, last: int) -> str:
    # ACS-4 3.4.9: the first character of each pair is in bits 15:8 of the word
    return "".join(chr(x >> 8) + chr(x & 0xFF) for x in w[first : last + 1])


def ok(done) -> None:
    assert done.ok and done.status == {"ata_status": 0x50, "ata_error": 0}


def error(done, err: int) -> None:
    assert not done.ok
    assert done.status["ata_status"] & 0x01  # ERR
    assert done.status["ata_status"] & 0x40  # DRDY
    assert done.status["ata_error"] == err


def test_build_fis_matches_hand_layout() -> None:
    assert build_fis(0x25, 0x0123456789AB, 0x1234) == fis(0x25, 0x0123456789AB, 0x1234)
    assert build_fis(0xC8, 0x0ABCDEF, 16) == fis(0xC8, 0x0ABCDEF, 16, ext=False)
    # FPDMA QUEUED: the sector count is in FEATURE
    assert build_fis(0x60, 8, 256) == fis(0x60, 8, 0, features=256)


def test_identify_device(dev: AtaDisk) -> None:
    done = dev.submit(fis(0xEC))
    ok(done)
    data = bytes(done.data)
    assert len(data) == 512
    w = words(data)
    assert w[0] & 0x8000 == 0  # ATA device
    assert ata_text(w, 10, 19) == "SN-1234567".ljust(20)
    assert ata_text(w, 23, 26) == "0001".ljust(8)
    assert ata_text(w, 27, 46) == "IMGFS VIRTUAL DISK".ljust(40)
    assert data[54:56] == b"MI"  # byte-swapped: "IM" stored as 'M','I'
    assert w[49] & 0x0200  # LBA supported
    assert w[49] & 0x0100  # DMA supported
    assert w[60] | (w[61] << 16) == SECTORS  # 28-bit capacity
    assert w[100] | (w[101] << 16) | (w[102] << 32) | (w[103] << 48) == SECTORS
    assert w[83] & 0x0400 and w[86] & 0x0400  # 48-bit supported and enabled
    assert w[83] & 0x2000 and w[86] & 0x2000  # FLUSH CACHE EXT
    assert w[82] & 0x0020 and w[85] & 0x0020  # volatile write cache supported and enabled
    assert w[83] & 0xC000 == 0x4000 and w[84] & 0xC000 == 0x4000 and w[87] & 0xC000 == 0x4000
    assert w[169] & 0x0001  # DATA SET MANAGEMENT TRIM supported
    assert w[69] & 0x4000  # deterministic data in trimmed LBA ranges
    assert w[69] & 0x0020  # trimmed LBA ranges read as zeros
    assert w[105] == 8  # 512-byte blocks of range entries per DSM command
    assert w[76] & 0x0100 and w[75] & 0x1F == 31  # NCQ, queue depth 32
    # word 106: valid (bit 14), several logical per physical (bit 13), 2^3 = 8 per physical
    assert w[106] == 0x6003
    assert w[106] & 0x1000 == 0 and w[117] == 0 and w[118] == 0  # 512-byte logical sectors
    assert w[209] == 0x4000  # LBA 0 aligned
    assert w[217] == 1  # non-rotating
    # integrity word: signature A5h, checksum makes the sum of all 512 bytes 0 mod 256
    assert data[510] == 0xA5 and sum(data) % 256 == 0


def test_identify_28bit_capacity_caps(tmp_path: Path) -> None:
    dev = AtaDisk(file_target(tmp_path, 200 << 30))
    w = words(bytes(dev.submit(fis(0xEC)).data))
    assert w[60] | (w[61] << 16) == 0x0FFFFFFF
    assert w[100] | (w[101] << 16) | (w[102] << 32) == (200 << 30) // 512


def test_identify_4k_logical_sectors(tmp_path: Path) -> None:
    dev = AtaDisk(file_target(tmp_path, SIZE), block_size=4096)
    w = words(bytes(dev.submit(fis(0xEC)).data))
    assert w[106] & 0x1000  # logical sector longer than 256 words
    assert w[106] & 0x2000 == 0 and w[106] & 0x000F == 0  # one logical per physical
    assert w[117] | (w[118] << 16) == 2048  # in words
    assert w[100] | (w[101] << 16) == SIZE // 4096


def test_identify_read_only_target_has_no_trim(tmp_path: Path) -> None:
    dev = AtaDisk(file_target(tmp_path, SIZE, read_only=True))
    w = words(bytes(dev.submit(fis(0xEC)).data))
    assert w[169] == 0 and w[69] & 0x4020 == 0 and w[105] == 0


@pytest.mark.parametrize(
    "write_cmd,read_cmd,ext",
    [(0x30, 0x20, False), (0x34, 0x24, True), (0xCA, 0xC8, False), (0x35, 0x25, True)],
)
def test_write_then_read(dev: AtaDisk, write_cmd: int, read_cmd: int, ext: bool) -> None:
    data = os.urandom(3 * 512)
    ok(dev.submit(fis(write_cmd, 1000, 3, ext=ext), data))
    done = dev.submit(fis(read_cmd, 1000, 3, ext=ext))
    ok(done)
    assert bytes(done.data) == data


def test_fpdma_queued(dev: AtaDisk) -> None:
    data = os.urandom(8 * 512)
    # count in FEATURE, tag 5 in COUNT bits 7:3, FUA in DEVICE bit 7
    ok(dev.submit(fis(0x61, 2048, 5 << 3, features=8, device=0xC0), data))
    done = dev.submit(fis(0x60, 2048, 7 << 3, features=8))
    ok(done)
    assert bytes(done.data) == data


def test_count_zero_means_256_or_65536() -> None:
    assert decode(fis(0x20, 0, 0, ext=False)).count == 256
    assert decode(fis(0x25, 0, 0)).count == 65536
    assert decode(fis(0x60, 0, 0, features=0)).count == 65536


def test_address_past_the_end_is_idnf(dev: AtaDisk) -> None:
    error(dev.submit(fis(0x25, SECTORS - 1, 2)), 0x10)
    error(dev.submit(fis(0x35, SECTORS, 1), bytes(512)), 0x10)
    ok(dev.submit(fis(0x25, SECTORS - 1, 1)))


def test_unknown_command_aborts(dev: AtaDisk) -> None:
    error(dev.submit(fis(0xE0)), 0x04)  # STANDBY IMMEDIATE: not implemented
    error(dev.submit(fis(0xA1)), 0x04)  # IDENTIFY PACKET DEVICE: not a packet device


def test_chs_addressing_aborts(dev: AtaDisk) -> None:
    error(dev.submit(fis(0x20, 0, 1, device=0x00, ext=False)), 0x04)


def test_bad_fis_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="20 bytes, got 12"):
        decode(fis(0x25)[:12])
    with pytest.raises(BadRequest, match="FIS type 0x34"):
        decode(b"\x34" + fis(0x25)[1:])


def test_flush_cache(dev: AtaDisk) -> None:
    ok(dev.submit(fis(0xE7, ext=False)))
    ok(dev.submit(fis(0xEA)))


def test_read_verify(dev: AtaDisk) -> None:
    done = dev.submit(fis(0x42, 0, 16))
    ok(done)
    assert done.data == b""
    error(dev.submit(fis(0x40, SECTORS, 1, ext=False)), 0x10)


def trim_payload(ranges: list[tuple[int, int]], blocks: int = 1) -> bytes:
    # ACS-4 7.5.3.2: LBA range entry = LBA (47:0) | RANGE LENGTH (63:48)
    return b"".join(struct.pack("<Q", lba | (n << 48)) for lba, n in ranges).ljust(
        512 * blocks, b"\0"
    )


def test_trim(dev: AtaDisk) -> None:
    dev.submit(fis(0x35, 500, 16), b"\x5a" * 8192)
    done = dev.submit(fis(0x06, 0, 1, features=1), trim_payload([(500, 4), (510, 2)]))
    ok(done)
    assert done.kind == "discard" and done.nbytes == 6 * 512
    got = dev.target.read(500 * 512, 8192)
    assert got == bytes(2048) + b"\x5a" * 3072 + bytes(1024) + b"\x5a" * 2048


def test_trim_limits(dev: AtaDisk) -> None:
    error(dev.submit(fis(0x06, 0, 9, features=1), bytes(9 * 512)), 0x04)  # > word 105
    error(dev.submit(fis(0x06, 0, 1, features=0), bytes(512)), 0x04)  # TRIM bit clear
    error(dev.submit(fis(0x06, 0, 1, features=1), trim_payload([(SECTORS - 1, 2)])), 0x10)


def test_set_features_write_cache(dev: AtaDisk) -> None:
    ok(dev.submit(fis(0xEF, features=0x82)))
    assert dev.target.writethrough
    assert words(bytes(dev.submit(fis(0xEC)).data))[85] & 0x0020 == 0
    ok(dev.submit(fis(0xEF, features=0x02)))
    assert not dev.target.writethrough
    assert words(bytes(dev.submit(fis(0xEC)).data))[85] & 0x0020
    error(dev.submit(fis(0xEF, features=0x99)), 0x04)


def test_read_error_is_unc(tmp_path: Path) -> None:
    import tests.toyformat as toy

    path = tmp_path / "bad.toy"
    toy.make_toy(path, 1 * MiB, data=bytes(512) + toy.BUG_SECTOR)
    disk = open_disk(str(path), "toy")
    try:
        dev = AtaDisk(DiskTarget(disk))
        error(dev.submit(fis(0x25, 0, 2)), 0x40)
    finally:
        disk.close()


def test_write_to_read_only_aborts(tmp_path: Path) -> None:
    dev = AtaDisk(file_target(tmp_path, SIZE, read_only=True))
    error(dev.submit(fis(0x35, 0, 1), bytes(512)), 0x04)


def test_ata_string_swaps_pairs() -> None:
    assert ata.ata_string("ABCD", 6) == b"BADC  "
