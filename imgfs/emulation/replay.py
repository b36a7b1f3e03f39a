"""Replaying a trace against a target: decode, execute, check, measure.

With queue depth N, N worker threads take requests from the trace in order, so at most N are
in flight, as a host adapter with N command slots would have them. Results are written in
completion order (each carries its ``seq``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from imgfs.emulation import ata, scsi, virtio
from imgfs.emulation.common import (
    DISCARD,
    FLUSH,
    READ,
    VERIFY,
    WRITE,
    WRITE_ZEROES,
    BadRequest,
    Completion,
)
from imgfs.emulation.target import Target
from imgfs.emulation.trace import TraceRequest, parse_header, parse_request
from imgfs.emulation.verify import VerifyTarget

# SCSI commands that change how later requests behave: run them alone.
_SCSI_BARRIERS = {scsi.MODE_SELECT_6, scsi.MODE_SELECT_10, scsi.START_STOP_UNIT}

Device = scsi.ScsiDisk | ata.AtaDisk | virtio.VirtioBlk
Command = scsi.ScsiCommand | ata.AtaCommand | virtio.VirtioRequest


class TraceLineError(Exception):
    """A trace line that is not a request (broken JSON, a bad field)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


# What a worker takes next: the request, its ordering ticket, its byte span, its decoded command.
_Next = tuple[TraceRequest | TraceLineError | None, int, tuple[int, int] | None, Command | None]


def read_trace(lines: Iterable[str]) -> Iterator[TraceRequest | TraceLineError | int]:
    """Requests from trace lines. A header yields its block size (an int) first; a bad line
    yields a TraceLineError in its place."""
    seq = 0
    for number, text in enumerate(lines, 1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield TraceLineError(number, f"line {number}: broken JSON: {e.msg} at column {e.colno}")
            seq += 1
            continue
        try:
            if isinstance(obj, dict) and "imgfs_trace" in obj:
                yield parse_header(obj).block_size
                continue
            request = parse_request(obj, number, seq)
        except BadRequest as e:
            yield TraceLineError(number, f"line {number}: {e}")
            seq += 1
            continue
        seq = request.seq + 1
        yield request


@dataclass
class Summary:
    requests: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    device_errors: int = 0
    trace_errors: int = 0
    verify_mismatches: int = 0
    expect_mismatches: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    seconds: float = 0.0
    latencies_us: array[float] = field(default_factory=lambda: array("d"))
    first_problems: list[str] = field(default_factory=list)
    blocks_checked: int = 0

    def percentile(self, p: float) -> float:
        if not self.latencies_us:
            return 0.0
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def ok(self) -> bool:
        return not (self.trace_errors or self.verify_mismatches or self.expect_mismatches)

    def text(self) -> str:
        iops = self.requests / self.seconds if self.seconds > 0 else 0.0
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind.items()))
        lines = [
            f"requests: {self.requests} ({kinds or 'none'})",
            f"errors: device {self.device_errors}, trace {self.trace_errors}, "
            f"verify {self.verify_mismatches} ({self.blocks_checked} blocks checked), "
            f"expect {self.expect_mismatches}",
            f"bytes: read {self.bytes_read}, written {self.bytes_written}, "
            f"discarded/zeroed {self.bytes_zeroed}",
            f"time: {self.seconds:.3f} s, {iops:.0f} IOPS",
            f"latency us: p50 {self.percentile(50):.0f}, p99 {self.percentile(99):.0f}, "
            f"max {max(self.latencies_us, default=0):.0f}",
        ]
        lines += [f"problem: {p}" for p in self.first_problems]
        return "\n".join(lines)


class Replayer:
    def __init__(
        self,
        target: Target,
        *,
        block_size: int = 512,
        queue_depth: int = 1,
        timing: str = "asap",
        verify: bool = False,
        verify_initial_zero: bool = False,
        results: IO[str] | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> None:
        self.verifier = VerifyTarget(target, verify_initial_zero) if verify else None
        self.target: Target = self.verifier or target
        self.block_size = block_size
        self.queue_depth = max(1, queue_depth)
        self.timing = timing
        self.results = results
        self.progress = progress
        self.total = total
        self.summary = Summary()
        self._devices: dict[str, Device] = {}
        self._lock = threading.Lock()
        self._start = 0.0
        self._t0: float | None = None
        self._last_progress = 0.0
        # Ordering at queue depth > 1: requests whose blocks overlap run in trace order.
        self._order = threading.Condition()
        self._spans: dict[int, tuple[int, int]] = {}
        self._ticket = 0
        self._waiting = 0

    def device(self, bus: str) -> Device:
        dev = self._devices.get(bus)
        if dev is None:
            cls = {"scsi": scsi.ScsiDisk, "ata": ata.AtaDisk, "virtio": virtio.VirtioBlk}[bus]
            dev = self._devices[bus] = cls(self.target, self.block_size)
        return dev

    def run(self, lines: Iterable[str]) -> Summary:
        items = read_trace(lines)
        self._start = time.perf_counter()
        if self.queue_depth == 1:
            self._worker(items)
        else:
            workers = [
                threading.Thread(target=self._worker, args=(items,), daemon=True)
                for _ in range(self.queue_depth)
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        self.summary.seconds = time.perf_counter() - self._start
        if self.verifier is not None:
            self.summary.blocks_checked = self.verifier.blocks_checked
        if self.progress:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        return self.summary

    def _next(self, items: Iterator[TraceRequest | TraceLineError | int]) -> _Next:
        with self._lock:
            for item in items:
                if isinstance(item, int):  # header: block size
                    if self._devices:
                        return (
                            TraceLineError(0, "a trace header after the first request"),
                            0,
                            None,
                            None,
                        )
                    self.block_size = item
                    continue
                if self.queue_depth == 1 or isinstance(item, TraceLineError):
                    return item, 0, None, None
                span, cmd = self._span(item)
                self._ticket += 1
                if span is not None:
                    with self._order:
                        self._spans[self._ticket] = span
                return item, self._ticket, span, cmd
            return None, 0, None, None

    def _span(self, req: TraceRequest) -> tuple[tuple[int, int] | None, Command | None]:
        """The byte range a request may touch (whole disk when it cannot be told from the
        command alone, as for UNMAP/TRIM/discard lists), or None for no data access; and the
        decoded command, so that it is decoded once (None if it does not decode: the device
        reports that when the request runs). A flush counts as the whole disk: the guest sent
        it for the writes before it, so it waits for them (and later requests wait for it)."""
        everything = (0, 1 << 63)
        try:
            if req.bus == "virtio":
                v = virtio.decode(req.cmd)
                if v.type == virtio.T_IN:
                    return (v.sector * 512, v.sector * 512 + (req.data_in_length or 0)), v
                if v.type == virtio.T_OUT:
                    return (v.sector * 512, v.sector * 512 + len(req.data or b"")), v
                barriers = (virtio.T_DISCARD, virtio.T_WRITE_ZEROES, virtio.T_FLUSH)
                return (everything if v.type in barriers else None), v
            bs = self.block_size
            if req.bus == "scsi":
                c = scsi.decode(req.cmd)
                if c.kind in (READ, WRITE, VERIFY, WRITE_ZEROES):
                    return (c.lba * bs, (c.lba + c.count) * bs), c
                barrier = c.kind in (DISCARD, FLUSH) or c.opcode in _SCSI_BARRIERS
                return (everything if barrier else None), c
            a = ata.decode(req.cmd)
            if a.kind in (READ, WRITE, VERIFY):
                return (a.lba * bs, (a.lba + a.count) * bs), a
            barrier = a.kind in (DISCARD, FLUSH) or a.command == ata.SET_FEATURES
            return (everything if barrier else None), a
        except Exception:
            return None, None

    def _wait_turn(self, ticket: int, span: tuple[int, int]) -> None:
        lo, hi = span
        with self._order:
            while any(t < ticket and a < hi and lo < b for t, (a, b) in self._spans.items()):
                self._waiting += 1
                try:
                    self._order.wait()
                finally:
                    self._waiting -= 1

    def _done_turn(self, ticket: int) -> None:
        with self._order:
            self._spans.pop(ticket, None)
            # Waking every worker on every completion costs more than the I/O when nobody waits
            # (random writes rarely overlap).
            if self._waiting:
                self._order.notify_all()

    def _worker(self, items: Iterator[TraceRequest | TraceLineError | int]) -> None:
        while True:
            item, ticket, span, cmd = self._next(items)
            if item is None:
                return
            if isinstance(item, TraceLineError):
                self._record({"line": item.line, "error": str(item)}, None, 0.0, None)
                continue
            if self.timing == "recorded" and item.t is not None:
                self._wait_until(item.t)
            if span is None:
                self._execute(item, cmd)
                continue
            self._wait_turn(ticket, span)
            try:
                self._execute(item, cmd)
            finally:
                self._done_turn(ticket)

    def _wait_until(self, t: float) -> None:
        with self._lock:
            if self._t0 is None:
                self._t0 = t
                self._start_wall = time.perf_counter()
            due = self._start_wall + (t - self._t0)
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def _execute(self, req: TraceRequest, cmd: Command | None = None) -> None:
        record: dict[str, Any] = {"seq": req.seq, "line": req.line, "bus": req.bus}
        begin = time.perf_counter()
        try:
            dev = self.device(req.bus)
            done: Completion | None
            if cmd is None:
                done = dev.submit(req.cmd, req.data, req.data_in_length)
            else:
                done = dev.execute(cmd, req.data, req.data_in_length)  # type: ignore[arg-type]
        except BadRequest as e:
            done = None
            record["error"] = f"line {req.line}: {e}"
        except Exception as e:  # a bug here must not stop the replay or kill a worker
            done = None
            record["error"] = f"line {req.line}: internal error: {type(e).__name__}: {e}"
        latency = (time.perf_counter() - begin) * 1e6
        mismatches = self.verifier.take_mismatches() if self.verifier is not None else []
        if mismatches:
            record["verify"] = mismatches
        self._record(record, done, latency, req.expect)

    def _record(
        self,
        record: dict[str, Any],
        done: Completion | None,
        latency: float,
        expect: dict[str, Any] | None,
    ) -> None:
        s = self.summary
        # The full record (digest of the data read included) only when someone reads it.
        if done is not None and (self.results is not None or expect):
            record["kind"] = done.kind
            record.update(done.status)
            if done.data:
                record["digest"] = hashlib.sha256(done.data).hexdigest()
            record["bytes"] = done.nbytes
            record["latency_us"] = round(latency, 1)
            if expect:
                wrong = [k for k, v in expect.items() if record.get(k) != v]
                if wrong:
                    record["expect_mismatch"] = {k: expect[k] for k in wrong}
        with self._lock:
            s.requests += 1
            if done is None:
                s.trace_errors += 1
                self._problem(record.get("error", "trace error"))
            else:
                s.by_kind[done.kind] += 1
                s.latencies_us.append(latency)
                if not done.ok:
                    s.device_errors += 1
                if done.kind == READ:
                    s.bytes_read += done.nbytes
                elif done.kind == WRITE:
                    s.bytes_written += done.nbytes
                elif done.kind in (DISCARD, WRITE_ZEROES):
                    s.bytes_zeroed += done.nbytes
                if "expect_mismatch" in record:
                    s.expect_mismatches += 1
                    self._problem(f"seq {record['seq']}: expected {record['expect_mismatch']}")
            if "verify" in record:
                s.verify_mismatches += 1
                self._problem(f"seq {record['seq']}: verify: {record['verify'][0]}")
            if self.results is not None:
                self.results.write(json.dumps(record, separators=(",", ":")) + "\n")
            if self.progress:
                self._show_progress()

    def _problem(self, text: str) -> None:
        if len(self.summary.first_problems) < 5:
            self.summary.first_problems.append(text)

    def _show_progress(self) -> None:
        now = time.perf_counter()
        if now - self._last_progress < 0.25:
            return
        self._last_progress = now
        done = self.summary.requests
        rate = done / max(now - self._start, 1e-9)
        if self.total:
            pct = 100 * done / self.total
            bar = "#" * int(pct / 5)
            text = f"[{bar:<20}] {done}/{self.total} ({pct:.0f}%) {rate:.0f} req/s"
        else:
            text = f"{done} requests {rate:.0f} req/s"
        sys.stderr.write("\r" + text + "\033[K")
        sys.stderr.flush()
