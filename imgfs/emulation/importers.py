"""Importers: QEMU trace-event logs, blkparse text output and fio iologs to imgfs-trace(5).

The sources carry an operation, an offset and a length, not the command bytes, so each request
is rebuilt as its bus encodes it: a CDB, a Register H2D FIS or a virtio-blk header (plus the
segment structs of discard and write-zeroes). Write data is not in any of these sources: writes
get a deterministic ``prng`` pattern seeded with their sequence number, so a replay with
``--verify`` checks that what was written reads back. Every function returns the trace lines
and notes for the user (what could not be carried over).
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from imgfs.emulation import ata, scsi, virtio
from imgfs.emulation.trace import header_line, request_line
from imgfs.errors import UsageError

SECTOR = 512

# -- rebuilding commands ---------------------------------------------------------------------


def scsi_rw(opcode10: int, lba: int, blocks: int, fua: bool = False) -> bytes:
    """READ/WRITE(10) when LBA and length fit, else (16)."""
    flags = 0x08 if fua else 0
    if lba <= 0xFFFFFFFF and blocks <= 0xFFFF:
        return struct.pack(">BBIBHB", opcode10, flags, lba, 0, blocks, 0)
    op16 = {scsi.READ_10: scsi.READ_16, scsi.WRITE_10: scsi.WRITE_16}[opcode10]
    return struct.pack(">BBQIBB", op16, flags, lba, blocks, 0, 0)


def scsi_unmap(ranges: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    """UNMAP CDB and parameter list for (lba, blocks) ranges."""
    params = struct.pack(">HH4x", 6 + 16 * len(ranges), 16 * len(ranges)) + b"".join(
        struct.pack(">QI4x", lba, n) for lba, n in ranges
    )
    return struct.pack(">BB4xBHB", scsi.UNMAP, 0, 0, len(params), 0), params


def scsi_write_same16(lba: int, blocks: int, unmap: bool) -> bytes:
    return struct.pack(">BBQIBB", scsi.WRITE_SAME_16, 0x08 if unmap else 0, lba, blocks, 0, 0)


def scsi_sync_cache() -> bytes:
    return bytes((scsi.SYNCHRONIZE_CACHE_10,)) + bytes(9)


def ata_rw(write: bool, lba: int, sectors: int, ncq: bool = False) -> bytes:
    if ncq:
        cmd = ata.WRITE_FPDMA_QUEUED if write else ata.READ_FPDMA_QUEUED
    else:
        cmd = ata.WRITE_DMA_EXT if write else ata.READ_DMA_EXT
    return ata.build_fis(cmd, lba, sectors)


def ata_trim(ranges: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    """DATA SET MANAGEMENT (TRIM) FIS and range entries (split at 65535 sectors, padded to a
    512-byte block)."""
    entries = []
    for lba, n in ranges:
        while n > 0:
            step = min(n, ata.TRIM_RANGE_MAX)
            entries.append(lba | (step << 48))
            lba += step
            n -= step
    blocks = max(1, -(-len(entries) // 64))
    payload = b"".join(struct.pack("<Q", e) for e in entries).ljust(blocks * 512, b"\0")
    return ata.build_fis(ata.DATA_SET_MANAGEMENT, 0, blocks, features=1), payload


class Builder:
    """Emits requests for one bus from (op, offset, length) records."""

    def __init__(self, bus: str, disk: str | None) -> None:
        self.bus = bus
        self.disk = disk
        self.lines: list[str] = []
        self.seq = 0
        self.counts: Counter[str] = Counter()

    def _emit(
        self,
        cmd: bytes,
        t: float | None,
        data: Any = None,
        sg: list[int] | None = None,
        expect: dict[str, Any] | None = None,
        note: str | None = None,
    ) -> None:
        self.lines.append(
            request_line(
                self.bus,
                cmd,
                seq=self.seq,
                t=t,
                data=data,
                sg=sg,
                disk=self.disk,
                expect=expect,
                note=note,
            )
        )
        self.seq += 1

    def read(
        self,
        t: float | None,
        offset: int,
        length: int,
        expect: dict[str, Any] | None = None,
        ncq: bool = False,
    ) -> None:
        self.counts["read"] += 1
        lba, n = offset // SECTOR, length // SECTOR
        if self.bus == "virtio":
            self._emit(virtio.build_header(virtio.T_IN, lba), t, sg=[length], expect=expect)
        elif self.bus == "scsi":
            self._emit(scsi_rw(scsi.READ_10, lba, n), t, sg=[length], expect=expect)
        else:
            self._emit(ata_rw(False, lba, n, ncq), t, sg=[length], expect=expect)

    def write(
        self,
        t: float | None,
        offset: int,
        length: int,
        fua: bool = False,
        expect: dict[str, Any] | None = None,
        ncq: bool = False,
    ) -> None:
        self.counts["write"] += 1
        lba, n = offset // SECTOR, length // SECTOR
        data = {"pattern": "prng", "seed": self.seq}
        if self.bus == "virtio":
            cmd = virtio.build_header(virtio.T_OUT, lba)
        elif self.bus == "scsi":
            cmd = scsi_rw(scsi.WRITE_10, lba, n, fua)
        else:
            cmd = ata_rw(True, lba, n, ncq)
        self._emit(cmd, t, data=data, sg=[length], expect=expect)

    def flush(self, t: float | None, expect: dict[str, Any] | None = None) -> None:
        self.counts["flush"] += 1
        if self.bus == "virtio":
            self._emit(virtio.build_header(virtio.T_FLUSH), t, expect=expect)
        elif self.bus == "scsi":
            self._emit(scsi_sync_cache(), t, expect=expect)
        else:
            self._emit(ata.build_fis(ata.FLUSH_CACHE_EXT), t, expect=expect)

    def discard(
        self,
        t: float | None,
        ranges: list[tuple[int, int]],
        expect: dict[str, Any] | None = None,
        note: str | None = None,
    ) -> None:
        """``ranges`` in bytes; empty when the source does not carry them."""
        self.counts["discard"] += 1
        sectors = [(off // SECTOR, length // SECTOR) for off, length in ranges]
        if self.bus == "virtio":
            segs = virtio.build_segments([(s, n, 0) for s, n in sectors] or [(0, 0, 0)])
            self._emit(
                virtio.build_header(virtio.T_DISCARD), t, data=segs, expect=expect, note=note
            )
        elif self.bus == "scsi":
            cdb, params = scsi_unmap(sectors)
            self._emit(cdb, t, data=params, expect=expect, note=note)
        else:
            fis, payload = ata_trim(sectors)
            self._emit(fis, t, data=payload, expect=expect, note=note)

    def write_zeroes(
        self,
        t: float | None,
        offset: int,
        length: int,
        unmap: bool,
        expect: dict[str, Any] | None = None,
    ) -> None:
        self.counts["write_zeroes"] += 1
        lba, n = offset // SECTOR, length // SECTOR
        if self.bus == "virtio":
            segs = virtio.build_segments([(lba, n, virtio.WRITE_ZEROES_FLAG_UNMAP if unmap else 0)])
            self._emit(virtio.build_header(virtio.T_WRITE_ZEROES), t, data=segs, expect=expect)
        elif self.bus == "scsi":
            self._emit(scsi_write_same16(lba, n, unmap), t, data=bytes(SECTOR), expect=expect)
        else:
            # ATA has no write-zeroes: zeros written as an ordinary write
            self.counts["write_zeroes"] -= 1
            self.counts["write"] += 1
            self._emit(
                ata_rw(True, lba, n), t, data={"pattern": "zero"}, sg=[length], expect=expect
            )

    def raw(
        self,
        cmd: bytes,
        t: float | None,
        data: Any = None,
        sg: list[int] | None = None,
        expect: dict[str, Any] | None = None,
        note: str | None = None,
    ) -> None:
        self.counts["other"] += 1
        self._emit(cmd, t, data=data, sg=sg, expect=expect, note=note)

    def result(self, source: str) -> list[str]:
        return [header_line(512, self.disk, source), *self.lines]


# -- QEMU trace-event logs -------------------------------------------------------------------

_QEMU_LINE = re.compile(r"^(?:\d+@(?P<t>\d+\.\d+):)?(?P<event>\w+) (?P<rest>.*)$")
_KV = re.compile(r"(\w+)[ =](-?0x[0-9a-fA-F]+|-?\d+)")


def _fields(rest: str) -> dict[str, int]:
    return {k: int(v, 0) for k, v in _KV.findall(rest)}


@dataclass
class _Pending:
    t: float | None
    kind: str = ""
    offset: int = 0
    length: int = 0
    unmap: bool = False
    status: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    submitted: float | None = None  # host time, for joining with an strace log
    completed: float | None = None


def from_qemu(
    text: str, disk: str | None = None, strace: str | None = None
) -> tuple[list[str], list[str]]:
    """A QEMU ``-trace`` log (the ``log`` backend, as ../shared/vmkit records it) for virtio-blk,
    virtio-scsi/lsi + scsi-hd, IDE or AHCI. The bus is recognised from the events.

    ``strace``: an strace log of the same qemu run (``strace -ttt -e trace=fallocate``, as
    ``boot.sh --strace`` records it). QEMU does not trace discard ranges; the
    ``fallocate(PUNCH_HOLE)`` calls qemu made while a discard was in flight give them."""
    punches = _strace_punches(strace) if strace is not None else None
    events = set(re.findall(r"^(?:\d+@[\d.]+:)?(\w+) ", text, re.M))
    if events & {"virtio_blk_handle_read", "virtio_blk_handle_write", "virtio_blk_req_complete"}:
        return _qemu_virtio(text, disk, punches)
    if "scsi_req_parsed" in events:
        return _qemu_scsi(text, disk, punches)
    if events & {"ide_exec_cmd", "process_ncq_command"}:
        return _qemu_ata(text, disk, punches)
    raise UsageError("no virtio-blk, SCSI, IDE or AHCI request events in this log")


_PUNCH = re.compile(
    r"^(?:\d+\s+)?(?P<t>\d+\.\d+) fallocate\([^,]*, (?P<mode>[A-Z_|]+), (?P<off>\d+), "
    r"(?P<len>\d+)\) = 0"
)
JOIN_SLACK = 0.002  # seconds: strace and the trace log take their times at different points


def _strace_punches(text: str) -> list[tuple[float, int, int]]:
    found = []
    for line in text.splitlines():
        m = _PUNCH.match(line.strip())
        if m and "PUNCH_HOLE" in m.group("mode"):
            found.append((float(m.group("t")), int(m.group("off")), int(m.group("len"))))
    return found


def _join_discards(
    discards: list[_Pending], punches: list[tuple[float, int, int]] | None
) -> list[list[tuple[int, int]]] | None:
    """For each discard, the byte ranges qemu punched while it was in flight (a punch in the
    windows of two discards goes to the later one)."""
    if punches is None:
        return None
    ranges: list[list[tuple[int, int]]] = [[] for _ in discards]
    for t, off, length in punches:
        best = None
        for i, p in enumerate(discards):
            start = (p.submitted or 0.0) - JOIN_SLACK
            end = (p.completed if p.completed is not None else float("inf")) + JOIN_SLACK
            if start <= t <= end:
                best = i
        if best is not None:
            ranges[best].append((off, length))
    return ranges


def _iter_qemu(text: str):  # noqa: ANN202
    for line in text.splitlines():
        m = _QEMU_LINE.match(line)
        if m:
            t = m.group("t")
            yield (float(t) if t else None), m.group("event"), m.group("rest")


def _rel(t: float | None, t0: list[float]) -> float | None:
    if t is None:
        return None
    if not t0:
        t0.append(t)
    return t - t0[0]


def _qemu_virtio(
    text: str, disk: str | None, punches: list[tuple[float, int, int]] | None = None
) -> tuple[list[str], list[str]]:
    order: list[_Pending] = []
    by_id: dict[int, _Pending] = {}
    t0: list[float] = []
    last_unclassified: _Pending | None = None
    for t, event, rest in _iter_qemu(text):
        f = _fields(rest)
        if event == "virtqueue_pop":
            p = _Pending(
                _rel(t, t0),
                extra={"in": f.get("in_num", 0), "out": f.get("out_num", 0)},
                submitted=t,
            )
            by_id[f["elem"]] = p
            order.append(p)
            last_unclassified = p
        elif event in ("virtio_blk_handle_read", "virtio_blk_handle_write"):
            p = by_id.get(f["req"])
            if p is not None:
                p.kind = "read" if event.endswith("read") else "write"
                p.offset, p.length = f["sector"] * SECTOR, f["nsectors"] * SECTOR
        elif event == "blk_co_pwritev" and f.get("flags", 0) & 0x2:
            p = last_unclassified
            if p is not None and not p.kind and p.extra["out"] == 2 and p.extra["in"] == 1:
                p.kind = "write_zeroes"
                p.offset, p.length = f["offset"], f["bytes"]
                p.unmap = bool(f["flags"] & 0x4)
        elif event == "virtio_blk_req_complete":
            p = by_id.pop(f["req"], None)
            if p is not None:
                p.status = f["status"]
                p.completed = t
    for p in order:
        if not p.kind:
            shape = (p.extra["out"], p.extra["in"])
            p.kind = {(1, 1): "flush", (1, 2): "get_id", (2, 1): "discard"}.get(shape, "")
    discards = [p for p in order if p.kind == "discard"]
    joined = dict(zip(map(id, discards), _join_discards(discards, punches) or [], strict=False))
    b = Builder("virtio", disk)
    notes: list[str] = []
    skipped = Counter()
    for p in order:
        expect = {"virtio_status": p.status} if p.status is not None else None
        kind = p.kind
        if kind == "read":
            b.read(p.t, p.offset, p.length, expect)
        elif kind == "write":
            b.write(p.t, p.offset, p.length, expect=expect)
        elif kind == "flush":
            b.flush(p.t, expect)
        elif kind == "write_zeroes":
            b.write_zeroes(p.t, p.offset, p.length, p.unmap, expect)
        elif kind == "discard":
            ranges = joined.get(id(p))
            if ranges:
                b.discard(p.t, ranges, expect, note="ranges from the strace log")
            else:
                b.discard(p.t, [], expect, note="range not in the qemu trace")
                skipped["discard"] += 1
        elif kind == "get_id":
            b.raw(virtio.build_header(virtio.T_GET_ID), p.t, sg=[virtio.ID_BYTES], expect=expect)
        else:
            skipped["unknown"] += 1
    if skipped["discard"]:
        notes.append(
            f"{skipped['discard']} discards have no range in a QEMU 7.2 trace; they are "
            "kept as discards of 0 sectors"
        )
    if skipped["unknown"]:
        notes.append(f"{skipped['unknown']} requests of an unknown shape were left out")
    notes.append(_count_note(b))
    return b.result("qemu virtio-blk"), notes


def _count_note(b: Builder) -> str:
    return "imported " + ", ".join(f"{k} {n}" for k, n in sorted(b.counts.items()) if n)


def _scsi_other_cdb(opcode: int, length: int, direction: int) -> tuple[bytes, Any, str | None]:
    """A CDB for a command qemu traced by opcode and transfer length only."""
    size = scsi._CDB_LENGTH_BY_GROUP[opcode >> 5] or 16
    cdb = bytearray(size)
    cdb[0] = opcode
    note = None
    if opcode == scsi.INQUIRY:
        struct.pack_into(">H", cdb, 3, length)
    elif opcode in (scsi.REQUEST_SENSE, scsi.MODE_SENSE_6):
        cdb[4] = min(length, 255)
        if opcode == scsi.MODE_SENSE_6:
            cdb[2] = 0x3F
            note = "page not in the qemu trace: all pages"
    elif opcode == scsi.MODE_SENSE_10:
        cdb[2] = 0x3F
        struct.pack_into(">H", cdb, 7, length)
        note = "page not in the qemu trace: all pages"
    elif opcode == scsi.SERVICE_ACTION_IN_16:
        cdb[1] = scsi.READ_CAPACITY_16_SA
        struct.pack_into(">I", cdb, 10, length)
    elif opcode == scsi.REPORT_LUNS:
        struct.pack_into(">I", cdb, 6, length)
    elif opcode == scsi.START_STOP_UNIT:
        cdb[4] = 0x01
        note = "start/stop bits not in the qemu trace: START"
    elif opcode in (scsi.MODE_SELECT_6,):
        cdb[4] = min(length, 255)
    elif opcode in (scsi.MODE_SELECT_10,):
        struct.pack_into(">H", cdb, 7, length)
    data = bytes(length) if direction == 2 and length else None
    return bytes(cdb), data, note


_SCSI_MEDIA = {
    scsi.READ_6,
    scsi.READ_10,
    scsi.READ_12,
    scsi.READ_16,
    scsi.WRITE_6,
    scsi.WRITE_10,
    scsi.WRITE_12,
    scsi.WRITE_16,
    scsi.SYNCHRONIZE_CACHE_10,
    scsi.SYNCHRONIZE_CACHE_16,
    scsi.UNMAP,
    scsi.WRITE_SAME_10,
    scsi.WRITE_SAME_16,
}
_SCSI_READS = {scsi.READ_6, scsi.READ_10, scsi.READ_12, scsi.READ_16}
_SCSI_WRITES = {scsi.WRITE_6, scsi.WRITE_10, scsi.WRITE_12, scsi.WRITE_16}


def _qemu_scsi(
    text: str, disk: str | None, punches: list[tuple[float, int, int]] | None = None
) -> tuple[list[str], list[str]]:
    order: list[_Pending] = []
    by_tag: dict[int, _Pending] = {}
    t0: list[float] = []
    last_write_same: _Pending | None = None
    for t, event, rest in _iter_qemu(text):
        f = _fields(rest)
        if event == "scsi_req_parsed":
            p = _Pending(_rel(t, t0), extra={"op": f["command"], "dir": f["dir"]}, submitted=t)
            p.length = f["length"]
            tag = f["tag"] & 0xFFFFFFFF
            by_tag[tag] = p
            order.append(p)
        elif event == "scsi_req_parsed_lba":
            p = by_tag.get(f["tag"] & 0xFFFFFFFF)
            if p is not None:
                p.offset = f["lba"] * SECTOR
        elif event == "scsi_disk_emulate_command_WRITE_SAME":
            last_write_same = order[-1] if order else None
        elif event == "blk_co_pwritev" and f.get("flags", 0) & 0x2:
            if last_write_same is not None and "range" not in last_write_same.extra:
                last_write_same.extra["range"] = (f["offset"], f["bytes"])
                last_write_same.unmap = bool(f["flags"] & 0x4)
                last_write_same = None
        elif event == "virtio_scsi_cmd_resp":
            m = re.search(r"tag=(0x[0-9a-fA-F]+).*status=(0x[0-9a-fA-F]+)", rest)
            if m:
                p = by_tag.pop(int(m.group(1), 16) & 0xFFFFFFFF, None)
                if p is not None:
                    p.status = int(m.group(2), 16)
                    p.completed = t
        elif event == "scsi_req_dequeue":
            p = by_tag.get(f["tag"] & 0xFFFFFFFF)
            if p is not None and p.completed is None:
                p.completed = t
    discards = [p for p in order if p.extra["op"] == scsi.UNMAP]
    joined = dict(zip(map(id, discards), _join_discards(discards, punches) or [], strict=False))
    b = Builder("scsi", disk)
    notes: list[str] = []
    no_range = 0
    for p in order:
        op = p.extra["op"]
        # Expected statuses only for media commands: for the others qemu's trace lacks the CDB
        # fields (page codes, EVPD) that decide the answer.
        expect = {"status": p.status} if p.status is not None and op in _SCSI_MEDIA else None
        if op in _SCSI_READS:
            b.read(p.t, p.offset, p.length, expect)
        elif op in _SCSI_WRITES:
            b.write(p.t, p.offset, p.length, expect=expect)
        elif op in (scsi.SYNCHRONIZE_CACHE_10, scsi.SYNCHRONIZE_CACHE_16):
            b.flush(p.t, expect)
        elif op == scsi.UNMAP:
            ranges = joined.get(id(p))
            if ranges:
                b.discard(p.t, ranges, expect, note="ranges from the strace log")
            else:
                b.discard(p.t, [], expect, note="ranges not in the qemu trace")
                no_range += 1
        elif op in (scsi.WRITE_SAME_10, scsi.WRITE_SAME_16):
            rng = p.extra.get("range")
            if rng is None:
                rng = (p.offset, 0)
            if rng[1] == 0:
                notes.append(
                    f"a WRITE SAME at byte {p.offset} has no length in the trace; left out"
                )
                continue
            b.write_zeroes(p.t, rng[0], rng[1], p.unmap, expect)
        else:
            cdb, data, note = _scsi_other_cdb(op, p.length, p.extra["dir"])
            sg = [p.length] if p.extra["dir"] == 1 else None
            b.raw(cdb, p.t, data=data, sg=sg, note=note)
    if no_range:
        notes.append(
            f"{no_range} UNMAPs have no ranges in a QEMU 7.2 trace; they are kept with "
            "no block descriptors"
        )
    notes.append(_count_note(b))
    return b.result("qemu scsi"), notes


_NCQ = re.compile(r"NCQ op (0x[0-9a-fA-F]+) on sectors \[(\d+),(\d+)\]")
_IDE_CMD = re.compile(r"state (0x[0-9a-fA-F]+); cmd (0x[0-9a-fA-F]+)")
_DMA_CB = re.compile(r"IDEState (0x[0-9a-fA-F]+) sector_num=?\s*(\d+) n=?\s*(\d+)")


def _qemu_ata(
    text: str, disk: str | None, punches: list[tuple[float, int, int]] | None = None
) -> tuple[list[str], list[str]]:
    order: list[_Pending] = []
    current: dict[str, _Pending] = {}  # IDEState -> its last command
    drives: set[str] = set()
    t0: list[float] = []
    for t, event, rest in _iter_qemu(text):
        if event == "ide_exec_cmd":
            m = _IDE_CMD.search(rest)
            if m:
                p = _Pending(
                    _rel(t, t0),
                    extra={"cmd": int(m.group(2), 16), "state": m.group(1)},
                    submitted=t,
                )
                if order and order[-1].completed is None:
                    order[-1].completed = t  # one non-NCQ command at a time per channel
                current[m.group(1)] = p
                order.append(p)
        elif event == "ide_dma_cb":
            m = _DMA_CB.search(rest.replace(":", " "))
            if m is None:
                nums = re.findall(r"(0x[0-9a-fA-F]+|\d+)", rest)
                if len(nums) < 3:
                    continue
                state, sector, n = nums[0], int(nums[1], 0), int(nums[2], 0)
            else:
                state, sector, n = m.group(1), int(m.group(2)), int(m.group(3))
            drives.add(state)
            p = current.get(state)
            if p is not None and "n" not in p.extra:
                p.extra["n"] = n
                p.offset = sector * SECTOR
        elif event in ("ide_sector_read", "ide_sector_write"):
            f = _fields(rest)
            for p in reversed(order):
                if "n" not in p.extra:
                    p.extra["n"] = f.get("nsectors", 1)
                    p.offset = f.get("sector", 0) * SECTOR
                break
        elif event == "process_ncq_command":
            m = _NCQ.search(rest)
            if m:
                first, last = int(m.group(2)), int(m.group(3))
                p = _Pending(
                    _rel(t, t0),
                    extra={
                        "cmd": int(m.group(1), 16),
                        "ncq": True,
                        "n": last - first + 1,
                        "state": "ncq",
                    },
                )
                p.offset = first * SECTOR
                order.append(p)
    discards = [p for p in order if p.extra["cmd"] == ata.DATA_SET_MANAGEMENT]
    joined = dict(zip(map(id, discards), _join_discards(discards, punches) or [], strict=False))
    b = Builder("ata", disk)
    notes: list[str] = []
    other_drive = 0
    for p in order:
        cmd = p.extra["cmd"]
        state = p.extra["state"]
        if drives and state != "ncq" and state not in drives and cmd != ata.IDENTIFY_DEVICE:
            other_drive += 1
            continue
        n = p.extra.get("n")
        ncq = p.extra.get("ncq", False)
        kind = ata._COMMANDS.get(cmd, ("", False, False))[0]
        if cmd == ata.DATA_SET_MANAGEMENT:
            ranges = joined.get(id(p))
            if ranges:
                b.discard(p.t, ranges, note="ranges from the strace log")
                continue
            fis = ata.build_fis(ata.DATA_SET_MANAGEMENT, 0, n or 1, features=1)
            b.counts["discard"] += 1
            b._emit(fis, p.t, data=bytes((n or 1) * 512), note="ranges not in the qemu trace")
        elif kind in ("read", "write") and n is not None:
            length = n * SECTOR
            if kind == "read":
                b.read(p.t, p.offset, length, ncq=ncq)
            else:
                b.write(p.t, p.offset, length, ncq=ncq)
        elif kind == "flush":
            b.flush(p.t)
        elif cmd == ata.IDENTIFY_DEVICE:
            b.raw(ata.build_fis(cmd), p.t, sg=[512])
        elif cmd == ata.SET_FEATURES:
            b.raw(
                ata.build_fis(cmd, features=ata.SF_SET_TRANSFER_MODE),
                p.t,
                note="subcommand not in the qemu trace: SET TRANSFER MODE",
            )
        elif kind in ("read", "write"):
            notes.append(f"an ATA command 0x{cmd:02x} without a transfer in the trace; left out")
        else:
            b.raw(ata.build_fis(cmd), p.t)
    if other_drive:
        notes.append(f"{other_drive} commands to the other drive on the channel were left out")
    notes.append(_count_note(b))
    return b.result("qemu ata"), notes


# -- blkparse --------------------------------------------------------------------------------

_BLKPARSE = re.compile(
    r"^\s*(?P<maj>\d+),(?P<min>\d+)\s+(?P<cpu>\d+)\s+(?P<seq>\d+)\s+(?P<t>\d+\.\d+)\s+"
    r"(?P<pid>\d+)\s+(?P<action>[A-Z]+)\s+(?P<rwbs>[A-Z]+)\s*(?P<rest>.*)$"
)
_SECTORS = re.compile(r"^(\d+) \+ (\d+)")


def from_blkparse(
    text: str, bus: str = "virtio", disk: str | None = None
) -> tuple[list[str], list[str]]:
    """blkparse's default text output. Requests are taken at their D (issued to the driver)
    events, or at Q (queued) when the output has no D events. RWBS: a leading F is a
    pre-flush, then R/W/D/N, a later F is FUA."""
    records = []
    for line in text.splitlines():
        m = _BLKPARSE.match(line)
        if m:
            records.append(m)
    actions = {m.group("action") for m in records}
    use = "D" if "D" in actions else "Q"
    b = Builder(bus, disk)
    t0: list[float] = []
    for m in records:
        if m.group("action") != use:
            continue
        t = _rel(float(m.group("t")), t0)
        rwbs = m.group("rwbs")
        preflush = rwbs.startswith("F") and (len(rwbs) == 1 or rwbs[1] in "RWDN")
        body = rwbs[1:] if preflush else rwbs
        op = body[:1]
        fua = "F" in body[1:]
        rng = _SECTORS.match(m.group("rest"))
        if preflush:
            b.flush(t)
        if rng is None or op == "N" or not op:
            continue
        offset, length = int(rng.group(1)) * SECTOR, int(rng.group(2)) * SECTOR
        if length == 0:
            continue
        if op == "R":
            b.read(t, offset, length)
        elif op == "W":
            b.write(t, offset, length, fua=fua)
            if fua and bus != "scsi":
                b.flush(t)  # virtio-blk and our ATA writes have no FUA: flush after
        elif op == "D":
            b.discard(t, [(offset, length)])
    return b.result("blkparse"), [_count_note(b)]


# -- fio iolog -------------------------------------------------------------------------------


def from_fio(
    text: str, bus: str = "virtio", disk: str | None = None
) -> tuple[list[str], list[str]]:
    """fio iolog version 2 or 3 (``--write_iolog``). Version 3 timestamps are microseconds
    since the start of the job (as fio 3.33 writes them). Offsets and lengths must be
    multiples of 512."""
    lines = text.splitlines()
    if not lines:
        raise UsageError("empty fio iolog")
    head = lines[0].strip()
    if head == "fio version 2 iolog":
        version = 2
    elif head == "fio version 3 iolog":
        version = 3
    else:
        raise UsageError(f"not a fio iolog v2/v3: first line {head[:60]!r}")
    b = Builder(bus, disk)
    notes: list[str] = []
    files: set[str] = set()
    unaligned = 0
    for number, line in enumerate(lines[1:], 2):
        parts = line.split()
        if not parts:
            continue
        t = None
        if version == 3:
            try:
                t = int(parts[0]) / 1e6
            except ValueError:
                raise UsageError(f"fio iolog line {number}: bad timestamp {parts[0]!r}") from None
            parts = parts[1:]
        if len(parts) < 2:
            raise UsageError(f"fio iolog line {number}: {line.strip()[:60]!r}")
        name, action = parts[0], parts[1]
        files.add(name)
        if action in ("add", "open", "close"):
            continue
        if action == "wait":
            continue
        if action in ("sync", "datasync"):
            b.flush(t)
            continue
        if len(parts) < 4:
            raise UsageError(f"fio iolog line {number}: {action} needs an offset and a length")
        try:
            offset, length = int(parts[2]), int(parts[3])
        except ValueError:
            raise UsageError(f"fio iolog line {number}: bad offset/length {parts[2:4]}") from None
        if offset % SECTOR or length % SECTOR:
            unaligned += 1
            continue
        if action == "read":
            b.read(t, offset, length)
        elif action == "write":
            b.write(t, offset, length)
        elif action == "trim":
            b.discard(t, [(offset, length)])
        else:
            raise UsageError(f"fio iolog line {number}: unknown action {action!r}")
    if len(files) > 1:
        notes.append(f"{len(files)} files in the iolog are all replayed against one disk")
    if unaligned:
        notes.append(f"{unaligned} requests not aligned to 512 bytes were left out")
    notes.append(_count_note(b))
    return b.result("fio"), notes
