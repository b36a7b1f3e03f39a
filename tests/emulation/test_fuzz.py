"""Hostile commands: any bytes as a CDB, FIS or virtio request give a device status or a
BadRequest, never another exception."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfs.emulation.ata import AtaDisk
from imgfs.emulation.common import BadRequest
from imgfs.emulation.replay import Replayer
from imgfs.emulation.scsi import ScsiDisk
from imgfs.emulation.target import FileTarget
from imgfs.emulation.virtio import VirtioBlk
from tests.emulation.helpers import MiB, raw_file


@pytest.fixture(scope="module")
def target() -> Iterator[FileTarget]:
    with tempfile.TemporaryDirectory() as tmp:
        t = FileTarget(str(raw_file(Path(tmp) / "fuzz.raw", 1 * MiB)))
        yield t
        t.close()


@pytest.fixture(scope="module")
def devices(target: FileTarget) -> dict[str, ScsiDisk | AtaDisk | VirtioBlk]:
    return {"scsi": ScsiDisk(target), "ata": AtaDisk(target), "virtio": VirtioBlk(target)}


opcodes = st.sampled_from(
    [
        0x00,
        0x03,
        0x08,
        0x0A,
        0x12,
        0x15,
        0x1A,
        0x1B,
        0x25,
        0x28,
        0x2A,
        0x2E,
        0x2F,
        0x35,
        0x41,
        0x42,
        0x55,
        0x5A,
        0x88,
        0x8A,
        0x8E,
        0x8F,
        0x91,
        0x93,
        0x9E,
        0xA0,
        0xA8,
        0xAA,
        0xAE,
        0xAF,
    ]
)


@st.composite
def scsi_cdbs(draw):
    body = draw(st.binary(min_size=0, max_size=16))
    return bytes([draw(opcodes)]) + body


@st.composite
def fises(draw):
    cmd = draw(
        st.sampled_from(
            [
                0x06,
                0x20,
                0x24,
                0x25,
                0x30,
                0x34,
                0x35,
                0x40,
                0x42,
                0x60,
                0x61,
                0xC8,
                0xCA,
                0xE7,
                0xEA,
                0xEC,
                0xEF,
                0x00,
                0xFF,
            ]
        )
    )
    rest = draw(st.binary(min_size=17, max_size=17))
    return bytes([0x27, 0x80, cmd]) + rest


def run(devices, bus: str, cmd: bytes, data: bytes | None, length: int | None) -> None:
    try:
        done = devices[bus].submit(cmd, data, length)
    except BadRequest:
        return
    assert isinstance(done.ok, bool)
    assert isinstance(done.status, dict)


_HC = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


@settings(max_examples=400, deadline=None, suppress_health_check=_HC)
@given(
    cdb=scsi_cdbs(),
    data=st.one_of(st.none(), st.binary(max_size=2048)),
    length=st.one_of(st.none(), st.integers(0, 4096)),
)
def test_scsi_any_cdb(devices, cdb: bytes, data: bytes | None, length: int | None) -> None:
    run(devices, "scsi", cdb, data, length)


@settings(max_examples=300, deadline=None, suppress_health_check=_HC)
@given(
    fis=st.one_of(fises(), st.binary(max_size=24)),
    data=st.one_of(st.none(), st.binary(max_size=2048)),
)
def test_ata_any_fis(devices, fis: bytes, data: bytes | None) -> None:
    run(devices, "ata", fis, data, None)


@settings(max_examples=300, deadline=None, suppress_health_check=_HC)
@given(
    rtype=st.sampled_from([0, 1, 4, 8, 10, 11, 13, 14, 99]),
    sector=st.integers(0, (1 << 64) - 1) | st.integers(0, 4096),
    data=st.one_of(st.none(), st.binary(max_size=1024)),
    length=st.one_of(st.none(), st.integers(0, 8192)),
)
def test_virtio_any_request(
    devices, rtype: int, sector: int, data: bytes | None, length: int | None
) -> None:
    header = rtype.to_bytes(4, "little") + bytes(4) + (sector % (1 << 64)).to_bytes(8, "little")
    run(devices, "virtio", header, data, length)


@settings(max_examples=200, deadline=None, suppress_health_check=_HC)
@given(lines=st.lists(st.text(max_size=120), max_size=5))
def test_replay_any_text(target: FileTarget, lines: list[str]) -> None:
    summary = Replayer(target, verify=True, queue_depth=2).run(lines)
    assert summary.requests <= len(lines)
