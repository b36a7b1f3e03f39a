"""The trace format (man/imgfs-trace.5): JSON Lines, one request per line.

A request::

    {"seq": 7, "t": 0.0123, "bus": "scsi", "disk": "disk.qcow2",
     "cmd": "2a000000080000000800", "data": {"pattern": "prng", "seed": 7},
     "sg": [4096], "expect": {"status": 0}}

An optional first line ``{"imgfs_trace": 1, ...}`` is a header (``block_size``, ``disk``,
``source``). Lines that are empty or start with ``#`` are skipped.
"""

from __future__ import annotations

import json
import random
from typing import Any, NamedTuple

from imgfs.emulation.common import BadRequest

BUSES = ("scsi", "ata", "virtio")
PATTERNS = ("zero", "prng", "fill")
#: A request's data-out or data-in cannot be bigger than this (a trace is untrusted input).
MAX_REQUEST_BYTES = 256 << 20
TRACE_VERSION = 1


class TraceRequest(NamedTuple):
    line: int
    seq: int
    t: float | None
    bus: str
    cmd: bytes
    data: bytes | None
    data_in_length: int | None
    expect: dict[str, Any] | None
    disk: str | None


class TraceHeader(NamedTuple):
    block_size: int
    disk: str | None
    fields: dict[str, Any]


def pattern_bytes(name: str, seed: int, length: int) -> bytes:
    """The deterministic data-out patterns: ``zero``; ``fill`` (every byte is ``seed & 0xff``);
    ``prng`` (Python's Mersenne Twister seeded with ``seed``: ``random.Random(seed).randbytes``)."""
    if name == "zero":
        return bytes(length)
    if name == "fill":
        return bytes((seed & 0xFF,)) * length
    if name == "prng":
        return random.Random(seed).randbytes(length)
    raise BadRequest(f"unknown data pattern {name!r} (known: {', '.join(PATTERNS)})")


def parse_header(obj: dict[str, Any]) -> TraceHeader:
    version = obj.get("imgfs_trace")
    if version != TRACE_VERSION:
        raise BadRequest(f"trace version {version!r} is not supported (this reads version 1)")
    block_size = obj.get("block_size", 512)
    if block_size not in (512, 4096):
        raise BadRequest(f"block_size {block_size!r}: must be 512 or 4096")
    disk = obj.get("disk")
    return TraceHeader(block_size, disk if isinstance(disk, str) else None, obj)


def parse_request(obj: Any, line: int, default_seq: int) -> TraceRequest:
    """One request object from a trace line; BadRequest names the bad field and value."""
    if not isinstance(obj, dict):
        raise BadRequest(f"a request is a JSON object, got {type(obj).__name__}")
    bus = obj.get("bus")
    if bus not in BUSES:
        raise BadRequest(f"bus {bus!r}: must be one of {', '.join(BUSES)}")
    cmd_hex = obj.get("cmd")
    if not isinstance(cmd_hex, str):
        raise BadRequest(f"cmd {cmd_hex!r}: must be a hex string")
    try:
        cmd = bytes.fromhex(cmd_hex)
    except ValueError:
        raise BadRequest(f"cmd {_quote(cmd_hex)}: not hex") from None
    sg = obj.get("sg")
    sg_total = None
    if sg is not None:
        if not isinstance(sg, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n for n in sg
        ):
            raise BadRequest(f"sg {_quote(sg)}: must be a list of segment lengths")
        sg_total = sum(sg)
        if sg_total > MAX_REQUEST_BYTES:
            raise BadRequest(f"sg total {sg_total} is over the {MAX_REQUEST_BYTES}-byte limit")
    data = _data(obj.get("data"), sg_total)
    seq = obj.get("seq", default_seq)
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise BadRequest(f"seq {seq!r}: must be an integer")
    t = obj.get("t")
    if t is not None and (not isinstance(t, int | float) or isinstance(t, bool) or t < 0):
        raise BadRequest(f"t {t!r}: must be a number of seconds >= 0")
    expect = obj.get("expect")
    if expect is not None and not isinstance(expect, dict):
        raise BadRequest(f"expect {_quote(expect)}: must be an object")
    disk = obj.get("disk")
    # Data-in length: the sg list of a request without data-out.
    data_in_length = sg_total if data is None else None
    return TraceRequest(
        line,
        seq,
        t,
        bus,
        cmd,
        data,
        data_in_length,
        expect,
        disk if isinstance(disk, str) else None,
    )


def _data(spec: Any, sg_total: int | None) -> bytes | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        if len(spec) > 2 * MAX_REQUEST_BYTES:
            raise BadRequest(f"data of {len(spec) // 2} bytes is over the limit")
        try:
            data = bytes.fromhex(spec)
        except ValueError:
            raise BadRequest(f"data {_quote(spec)}: not hex") from None
        if sg_total is not None and sg_total != len(data):
            raise BadRequest(f"data has {len(data)} bytes but the sg list adds up to {sg_total}")
        return data
    if isinstance(spec, dict):
        name = spec.get("pattern")
        seed = spec.get("seed", 0)
        length = spec.get("length", sg_total)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise BadRequest(f"pattern seed {seed!r}: must be an integer")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise BadRequest('a data pattern needs a length ("length" or the sg list)')
        if length > MAX_REQUEST_BYTES:
            raise BadRequest(f"data length {length} is over the {MAX_REQUEST_BYTES}-byte limit")
        if sg_total is not None and sg_total != length:
            raise BadRequest(f"data length {length} but the sg list adds up to {sg_total}")
        return pattern_bytes(str(name), seed, length)
    raise BadRequest(f'data {_quote(spec)}: must be hex or {{"pattern": ..., "seed": ...}}')


def _quote(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def request_line(
    bus: str,
    cmd: bytes,
    *,
    seq: int | None = None,
    t: float | None = None,
    data: bytes | dict[str, Any] | None = None,
    sg: list[int] | None = None,
    disk: str | None = None,
    expect: dict[str, Any] | None = None,
    note: str | None = None,
) -> str:
    """One request as a trace line (without the newline)."""
    obj: dict[str, Any] = {}
    if seq is not None:
        obj["seq"] = seq
    if t is not None:
        obj["t"] = round(t, 6)
    obj["bus"] = bus
    if disk is not None:
        obj["disk"] = disk
    obj["cmd"] = cmd.hex()
    if data is not None:
        obj["data"] = data.hex() if isinstance(data, bytes | bytearray) else data
    if sg is not None:
        obj["sg"] = sg
    if expect is not None:
        obj["expect"] = expect
    if note is not None:
        obj["note"] = note
    return json.dumps(obj, separators=(",", ":"))


def header_line(block_size: int = 512, disk: str | None = None, source: str | None = None) -> str:
    obj: dict[str, Any] = {"imgfs_trace": TRACE_VERSION, "block_size": block_size}
    if disk:
        obj["disk"] = disk
    if source:
        obj["source"] = source
    return json.dumps(obj, separators=(",", ":"))
