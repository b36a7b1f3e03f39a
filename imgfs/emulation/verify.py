"""--verify: a model of what every 512-byte block should hold, kept by wrapping the target.

Each block is known data (a 16-byte BLAKE2b digest of its last write), known zeros (after a
discard or write-zeroes, which every device here makes read as zeros) or unknown (never written
in this replay, or its last update failed). Reads are checked block by block against it.
Overlapping requests in flight at the same time run one after another (a range lock), so the
model is updated in the order the target saw the requests.
"""

from __future__ import annotations

import bisect
import hashlib
import threading

from imgfs.emulation.target import Target, TargetError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)


def _digest(block: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(block, digest_size=16).digest()


class IntervalSet:
    """Disjoint half-open block ranges, sorted; safe to use from several threads."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self._lock = threading.Lock()

    def add(self, lo: int, hi: int) -> None:
        with self._lock:
            self._remove(lo, hi)
            self._add(lo, hi)

    def _add(self, lo: int, hi: int) -> None:
        i = bisect.bisect_left(self.starts, lo)
        # merge with neighbours that touch
        if i > 0 and self.ends[i - 1] == lo:
            i -= 1
            lo = self.starts[i]
            del self.starts[i], self.ends[i]
        if i < len(self.starts) and self.starts[i] == hi:
            hi = self.ends[i]
            del self.starts[i], self.ends[i]
        self.starts.insert(i, lo)
        self.ends.insert(i, hi)

    def remove(self, lo: int, hi: int) -> None:
        with self._lock:
            self._remove(lo, hi)

    def _remove(self, lo: int, hi: int) -> None:
        i = bisect.bisect_right(self.ends, lo)
        keep_s: list[int] = []
        keep_e: list[int] = []
        j = i
        while j < len(self.starts) and self.starts[j] < hi:
            s, e = self.starts[j], self.ends[j]
            if s < lo:
                keep_s.append(s)
                keep_e.append(lo)
            if e > hi:
                keep_s.append(hi)
                keep_e.append(e)
            j += 1
        self.starts[i:j] = keep_s
        self.ends[i:j] = keep_e

    def __contains__(self, block: int) -> bool:
        with self._lock:
            i = bisect.bisect_right(self.starts, block) - 1
            return i >= 0 and block < self.ends[i]


class RangeLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: list[tuple[int, int]] = []

    def acquire(self, lo: int, hi: int) -> None:
        with self._cond:
            while any(a < hi and lo < b for a, b in self._active):
                self._cond.wait()
            self._active.append((lo, hi))

    def release(self, lo: int, hi: int) -> None:
        with self._cond:
            self._active.remove((lo, hi))
            self._cond.notify_all()


class VerifyTarget(Target):
    """Wraps a target; keeps the block model; records read mismatches per thread."""

    def __init__(self, inner: Target, initial_zero: bool = False) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.read_only = inner.read_only
        self.can_discard = inner.can_discard
        self.data: dict[int, bytes] = {}
        self.zeros = IntervalSet()
        if initial_zero:
            self.zeros.add(0, -(-inner.size // BLOCK))
        self._locks = RangeLock()
        self._local = threading.local()
        self.blocks_checked = 0

    @property
    def writethrough(self) -> bool:  # type: ignore[override]
        return self.inner.writethrough

    @writethrough.setter
    def writethrough(self, value: bool) -> None:
        self.inner.writethrough = value

    def take_mismatches(self) -> list[str]:
        found = getattr(self._local, "mismatches", None)
        self._local.mismatches = None
        return found or []

    def _mismatch(self, text: str) -> None:
        found = getattr(self._local, "mismatches", None)
        if found is None:
            found = self._local.mismatches = []
        if len(found) < 4:
            found.append(text)

    def _range(self, offset: int, length: int) -> tuple[int, int]:
        return offset // BLOCK, -(-(offset + length) // BLOCK)

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        lo, hi = self._range(offset, length)
        self._locks.acquire(lo, hi)
        try:
            data = self.inner.read(offset, length)
            if offset % BLOCK == 0:
                self._check(lo, memoryview(data))
            return data
        finally:
            self._locks.release(lo, hi)

    def _check(self, first: int, view: memoryview) -> None:
        data = self.data
        zeros = self.zeros
        n = len(view) // BLOCK
        for i in range(n):
            block = first + i
            expected = data.get(block)
            piece = view[i * BLOCK : (i + 1) * BLOCK]
            if expected is not None:
                self.blocks_checked += 1
                if _digest(piece) != expected:
                    self._mismatch(
                        f"block {block} (byte {block * BLOCK}) differs from its last write"
                    )
            elif block in zeros:
                self.blocks_checked += 1
                if piece != _ZERO_BLOCK:
                    self._mismatch(f"block {block} (byte {block * BLOCK}) should read as zeros")

    def _forget(self, lo: int, hi: int) -> None:
        data = self.data
        if hi - lo <= len(data):
            for b in range(lo, hi):
                data.pop(b, None)
        else:
            for b in [b for b in data if lo <= b < hi]:
                del data[b]

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        lo, hi = self._range(offset, len(data))
        self._locks.acquire(lo, hi)
        try:
            try:
                self.inner.write(offset, data, fua)
            except TargetError:
                self._forget(lo, hi)
                self.zeros.remove(lo, hi)
                raise
            if offset % BLOCK or len(data) % BLOCK:
                self._forget(lo, hi)  # partial blocks: we no longer know them
                self.zeros.remove(lo, hi)
                return
            view = memoryview(data).cast("B")
            model = self.data
            for i in range(hi - lo):
                model[lo + i] = _digest(view[i * BLOCK : (i + 1) * BLOCK])
        finally:
            self._locks.release(lo, hi)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._zero(offset, length, lambda: self.inner.write_zeroes(offset, length, unmap))

    def discard(self, offset: int, length: int) -> None:
        self._zero(offset, length, lambda: self.inner.discard(offset, length))

    def _zero(self, offset: int, length: int, op: object) -> None:
        lo, hi = self._range(offset, length)
        self._locks.acquire(lo, hi)
        try:
            try:
                op()  # type: ignore[operator]
            except TargetError:
                self._forget(lo, hi)
                self.zeros.remove(lo, hi)
                raise
            self._forget(lo, hi)
            if offset % BLOCK == 0 and length % BLOCK == 0:
                self.zeros.add(lo, hi)
            else:
                self.zeros.remove(lo, hi)
        finally:
            self._locks.release(lo, hi)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
