"""Host I/O recording and fault injection, for crash-state and host-fault testing.

A :class:`RecordingHostFile` is a :class:`HostFile` that logs every completed modification of
the host file (``pwrite`` with its data, ``punch_hole``, ``zero_range``, ``truncate``) and every
``sync`` into a shared :class:`Recorder`, and can fail a chosen operation with a host error
(:class:`Fault`). It is plugged in where the chain layer opens host files
(:data:`imgfs.block.chain.host_file_factory`), so it sees the image file and every companion file
(VMDK extents, data files) a driver opens; backing files are opened read-only and log nothing.

In-process::

    recorder = Recorder()
    with recording.installed(recorder):
        disk = open_disk(path, fmt)
        ...
    recorder.ops  # list of HostOp, in completion order

For a mounted run, set ``IMGFS_RECORD_IO=/path/to/log`` in the environment of ``imgfs mount``:
each operation is appended to that file as it completes (pickled :class:`HostOp` records; read
them back with :func:`load_log`). ``IMGFS_FAIL_IO=KIND:N:ERRNO`` (KIND one of write, sync, any;
ERRNO a name such as ENOSPC or EIO) fails the Nth such operation once.

This is a test facility: it costs a copy of every written buffer, and is never active unless
installed or selected by the environment.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import os
import pickle
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from imgfs.block.hostfile import CacheMode, HostFile
from imgfs.errors import HostIOError

ENV_RECORD = "IMGFS_RECORD_IO"
ENV_FAIL = "IMGFS_FAIL_IO"

# Kinds of logged operation. "mark" is a caller's annotation (a guest write or flush boundary).
WRITE, PUNCH, ZERO, TRUNCATE, SYNC, MARK = "write", "punch", "zero", "truncate", "sync", "mark"
MODIFYING = (WRITE, PUNCH, ZERO, TRUNCATE)


@dataclass(slots=True)
class HostOp:
    kind: str
    path: str = ""
    offset: int = 0
    length: int = 0
    data: bytes = b""
    label: object = None  # MARK only: what the caller recorded


@dataclass
class Fault:
    """Fail the ``nth`` (0-based) host operation of ``kinds`` with ``error`` (an errno), once
    (or every time from then on with ``sticky``). ``fired`` says whether it has happened."""

    nth: int
    kinds: tuple[str, ...] = (WRITE, SYNC)
    error: int = errno_module.EIO
    sticky: bool = False
    seen: int = 0
    fired: bool = False
    fired_at: HostOp | None = None

    def check(self, kind: str, path: str, offset: int = 0) -> None:
        if kind not in self.kinds and not ("any" in self.kinds and kind in (*MODIFYING, SYNC)):
            return
        if self.fired and not self.sticky:
            return
        index = self.seen
        self.seen += 1
        if index == self.nth or (self.sticky and self.fired):
            self.fired = True
            self.fired_at = self.fired_at or HostOp(kind, path, offset)
            raise HostIOError(
                f"{path}: injected {kind} fault at {offset}: {os.strerror(self.error)}",
                self.error,
            )


@dataclass
class Recorder:
    """The shared log of host operations (thread safe). ``sink`` also appends each record to a
    file, flushed per record, so the log survives the process being killed."""

    ops: list[HostOp] = field(default_factory=list)
    fault: Fault | None = None
    sink: BinaryIO | None = None
    keep_in_memory: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, op: HostOp) -> None:
        with self.lock:
            if self.keep_in_memory:
                self.ops.append(op)
            if self.sink is not None:
                pickle.dump(op, self.sink)
                self.sink.flush()

    def mark(self, label: object) -> None:
        """Annotate the log (e.g. "guest write 12 done") at this point of the host I/O."""
        self.add(HostOp(MARK, label=label))

    def before(self, kind: str, path: str, offset: int = 0) -> None:
        if self.fault is not None:
            with self.lock:
                self.fault.check(kind, path, offset)


class RecordingHostFile(HostFile):
    """A HostFile whose modifications and syncs are logged (after they complete) and may be
    failed by the recorder's fault (before they happen)."""

    def __init__(self, path: str, recorder: Recorder, **kwargs: bool) -> None:
        super().__init__(path, **kwargs)
        self.recorder = recorder
        # O_DIRECT read-modify-write truncates the file from inside pwrite: that truncate is part
        # of the write, logged as the write itself.
        self._inside = threading.local()

    def _nested(self) -> bool:
        return getattr(self._inside, "depth", 0) > 0

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._nested() or not self.writable:
            super().pwrite(offset, data)
            return
        self.recorder.before(WRITE, self.path, offset)
        copy = bytes(memoryview(data).cast("B"))
        self._inside.depth = 1
        try:
            super().pwrite(offset, copy)
        finally:
            self._inside.depth = 0
        self.recorder.add(HostOp(WRITE, self.path, offset, len(copy), copy))

    def punch_hole(self, offset: int, length: int) -> bool:
        self.recorder.before(PUNCH, self.path, offset)
        done = super().punch_hole(offset, length)
        if done:
            self.recorder.add(HostOp(PUNCH, self.path, offset, length))
        return done

    def zero_range(self, offset: int, length: int) -> bool:
        self.recorder.before(ZERO, self.path, offset)
        done = super().zero_range(offset, length)
        if done:
            self.recorder.add(HostOp(ZERO, self.path, offset, length))
        return done

    def truncate(self, size: int) -> None:
        if self._nested():
            super().truncate(size)
            return
        self.recorder.before(TRUNCATE, self.path, size)
        super().truncate(size)
        self.recorder.add(HostOp(TRUNCATE, self.path, size))

    def sync(self) -> None:
        if self.no_flush or not self.writable:
            return
        self.recorder.before(SYNC, self.path)
        super().sync()
        self.recorder.add(HostOp(SYNC, self.path))


HostFileFactory = Callable[..., HostFile]  # (path, *, writable, cache, lock, force_share)


def factory(recorder: Recorder) -> HostFileFactory:
    def open_host_file(
        path: str, *, writable: bool, cache: CacheMode, lock: bool = True, force_share: bool = False
    ) -> HostFile:
        return RecordingHostFile(
            path,
            recorder,
            writable=writable,
            direct=cache.direct,
            no_flush=cache.no_flush,
            lock=lock,
            force_share=force_share,
        )

    return open_host_file


@contextlib.contextmanager
def installed(recorder: Recorder) -> Iterator[Recorder]:
    """Open every host file through ``recorder`` while the block runs (this process only)."""
    from imgfs.block import chain

    previous = chain.host_file_factory
    chain.host_file_factory = factory(recorder)
    try:
        yield recorder
    finally:
        chain.host_file_factory = previous


def parse_fault(spec: str) -> Fault:
    """``KIND:N:ERRNO`` as in IMGFS_FAIL_IO, e.g. ``write:3:ENOSPC``."""
    try:
        kind, nth, name = spec.split(":")
        kinds = ("any",) if kind == "any" else (kind,)
        error = getattr(errno_module, name.upper())
        return Fault(int(nth), kinds, error)
    except (ValueError, AttributeError):
        raise ValueError(f"{ENV_FAIL}={spec!r}: expected KIND:N:ERRNO, e.g. write:3:EIO") from None


def from_environment() -> HostFileFactory | None:
    """The hook selected by IMGFS_RECORD_IO / IMGFS_FAIL_IO, or None when neither is set."""
    log_path = os.environ.get(ENV_RECORD)
    fail = os.environ.get(ENV_FAIL)
    if not log_path and not fail:
        return None
    sink = open(log_path, "ab") if log_path else None
    recorder = Recorder(fault=parse_fault(fail) if fail else None, sink=sink, keep_in_memory=False)
    return factory(recorder)


def load_log(path: str) -> list[HostOp]:
    """The records an IMGFS_RECORD_IO log holds (a torn last record, from a kill, is dropped)."""
    ops: list[HostOp] = []
    with open(path, "rb") as f:
        while True:
            try:
                ops.append(pickle.load(f))
            except EOFError:
                break
            except (pickle.UnpicklingError, ValueError):
                break
    return ops
