"""virtio-blk conformance from virtio 1.2 section 5.2."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from imgfs.emulation.common import BadRequest
from imgfs.emulation.virtio import VirtioBlk
from tests.emulation.helpers import MiB, file_target

SIZE = 64 * MiB


@pytest.fixture
def dev(tmp_path: Path) -> VirtioBlk:
    return VirtioBlk(file_target(tmp_path, SIZE), serial="VIRTIO-SERIAL")


def header(rtype: int, sector: int = 0) -> bytes:
    # struct virtio_blk_req { le32 type; le32 reserved; le64 sector; }
    return struct.pack("<IIQ", rtype, 0, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    # struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; }
    return struct.pack("<QII", sector, num, flags)


def test_out_then_in(dev: VirtioBlk) -> None:
    data = os.urandom(8192)
    done = dev.submit(header(1, 40), data)
    assert done.ok and done.status == {"virtio_status": 0} and done.kind == "write"
    done = dev.submit(header(0, 40), None, 8192)
    assert done.ok and bytes(done.data) == data


def test_in_past_capacity_is_ioerr(dev: VirtioBlk) -> None:
    assert dev.submit(header(0, SIZE // 512 - 1), None, 1024).status == {"virtio_status": 1}
    assert dev.submit(header(1, SIZE // 512), bytes(512)).status == {"virtio_status": 1}


def test_unaligned_data_is_ioerr(dev: VirtioBlk) -> None:
    assert dev.submit(header(0, 0), None, 100).status == {"virtio_status": 1}


def test_flush_and_get_id(dev: VirtioBlk) -> None:
    assert dev.submit(header(4)).ok
    done = dev.submit(header(8), None, 20)
    assert done.ok and done.data == b"VIRTIO-SERIAL".ljust(20, b"\0")


def test_unsupported_types(dev: VirtioBlk) -> None:
    for rtype in (10, 14, 99):  # GET_LIFETIME, SECURE_ERASE (not offered), unknown
        assert dev.submit(header(rtype), None, 0).status == {"virtio_status": 2}


def test_discard_and_write_zeroes(dev: VirtioBlk) -> None:
    dev.submit(header(1, 0), b"\x11" * 16384)
    done = dev.submit(header(11), seg(0, 8))
    assert done.ok and done.kind == "discard" and done.nbytes == 4096
    done = dev.submit(header(13), seg(16, 4, 1) + seg(24, 2, 0))
    assert done.ok and done.kind == "write_zeroes" and done.nbytes == 3072
    got = dev.target.read(0, 16384)
    assert got == bytes(4096) + b"\x11" * 4096 + bytes(2048) + b"\x11" * 2048 + bytes(1024) + (
        b"\x11" * 3072
    )


def test_discard_with_unmap_flag_is_unsupp(dev: VirtioBlk) -> None:
    assert dev.submit(header(11), seg(0, 8, 1)).status == {"virtio_status": 2}
    assert dev.submit(header(13), seg(0, 8, 2)).status == {"virtio_status": 2}  # reserved bit


def test_range_past_capacity_is_ioerr(dev: VirtioBlk) -> None:
    assert dev.submit(header(13), seg(SIZE // 512 - 1, 2)).status == {"virtio_status": 1}


def test_over_limits_is_unsupp(dev: VirtioBlk) -> None:
    assert dev.submit(header(11), seg(0, (1 << 22) + 1)).status == {"virtio_status": 2}
    assert dev.submit(header(11), seg(0, 1) * 257).status == {"virtio_status": 2}


def test_bad_segment_payload(dev: VirtioBlk) -> None:
    with pytest.raises(BadRequest, match="16-byte segments"):
        dev.submit(header(11), bytes(10))
    with pytest.raises(BadRequest, match="16 bytes, got 8"):
        dev.submit(bytes(8))


def test_read_only(tmp_path: Path) -> None:
    dev = VirtioBlk(file_target(tmp_path, SIZE, read_only=True))
    assert dev.submit(header(1, 0), bytes(512)).status == {"virtio_status": 1}
    assert dev.features & (1 << 5)  # VIRTIO_BLK_F_RO
    assert not dev.features & (1 << 13)  # no DISCARD


def test_config_space(dev: VirtioBlk) -> None:
    cfg = dev.config()
    assert len(cfg) == 72
    assert struct.unpack_from("<Q", cfg, 0)[0] == SIZE // 512  # capacity
    assert struct.unpack_from("<I", cfg, 8)[0] == 1 << 20  # size_max
    assert struct.unpack_from("<I", cfg, 12)[0] == 254  # seg_max
    assert struct.unpack_from("<I", cfg, 20)[0] == 512  # blk_size
    assert cfg[24] == 3  # physical_block_exp: 4 KiB physical blocks
    assert cfg[32] == 1  # writeback
    assert struct.unpack_from("<H", cfg, 34)[0] == 1  # num_queues
    assert struct.unpack_from("<III", cfg, 36) == (1 << 22, 256, 8)  # discard limits
    assert struct.unpack_from("<II", cfg, 48) == (1 << 22, 256)  # write zeroes limits
    assert cfg[56] == 1  # write_zeroes_may_unmap
    feats = dev.features
    for bit in (1, 2, 6, 9, 10, 11, 13, 14):
        assert feats & (1 << bit)


def test_writeback_toggle(dev: VirtioBlk) -> None:
    dev.set_writeback(False)
    assert dev.target.writethrough and dev.config()[32] == 0
    dev.set_writeback(True)
    assert not dev.target.writethrough and dev.config()[32] == 1
