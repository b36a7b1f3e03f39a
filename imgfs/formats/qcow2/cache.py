"""Bounded LRU caches of qcow2 metadata tables (L2 tables and refcount blocks).

A table is one cluster. It is held decoded (native-endian arrays) and re-encoded when written.
The caller owns the locking: every method runs under the driver's metadata lock.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

_BIG_ENDIAN_HOST = sys.byteorder == "big"


def _typecode(itemsize: int) -> str:
    for code in "BHILQ":
        if array(code).itemsize == itemsize:
            return code
    raise AssertionError(f"no array type of {itemsize} bytes")


U64_CODE = _typecode(8)


def decode_u64(data: bytes | bytearray | memoryview) -> array:
    a = array(U64_CODE)
    a.frombytes(data)
    if not _BIG_ENDIAN_HOST:
        a.byteswap()
    return a


def encode_u64(a: array) -> bytes:
    if _BIG_ENDIAN_HOST:
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


class RefcountBlock:
    """One refcount block: ``entries`` counters of ``bits`` bits (1..64)."""

    __slots__ = ("bits", "entries", "_a", "_raw", "dirty")

    def __init__(self, data: bytes | bytearray | memoryview, bits: int) -> None:
        self.bits = bits
        self.entries = len(data) * 8 // bits
        self.dirty = False
        if bits >= 8:
            a = array(_typecode(bits // 8))
            a.frombytes(data)
            if not _BIG_ENDIAN_HOST and bits > 8:
                a.byteswap()
            self._a: array | None = a
            self._raw = bytearray()
        else:
            self._a = None
            self._raw = bytearray(data)

    @property
    def max_value(self) -> int:
        return (1 << self.bits) - 1

    def get(self, i: int) -> int:
        a = self._a
        if a is not None:
            return a[i]
        bits = self.bits
        bit = i * bits
        return (self._raw[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1)

    def set(self, i: int, value: int) -> None:
        a = self._a
        if a is not None:
            a[i] = value
        else:
            bits = self.bits
            bit = i * bits
            mask = ((1 << bits) - 1) << (bit & 7)
            raw = self._raw
            raw[bit >> 3] = (raw[bit >> 3] & ~mask) | ((value << (bit & 7)) & mask)
        self.dirty = True

    def first_zero(self, start: int) -> int:
        """The first index >= start whose refcount is 0, or ``entries``."""
        a = self._a
        if a is not None:
            try:
                return a.index(0, start)
            except ValueError:
                return self.entries
        for i in range(start, self.entries):
            if self.get(i) == 0:
                return i
        return self.entries

    def zero_run(self, start: int, limit: int) -> int:
        """How many entries from ``start`` (at most ``limit``) are 0."""
        end = min(self.entries, start + limit)
        i = start
        while i < end and self.get(i) == 0:
            i += 1
        return i - start

    def to_bytes(self) -> bytes:
        a = self._a
        if a is None:
            return bytes(self._raw)
        if _BIG_ENDIAN_HOST or self.bits == 8:
            return a.tobytes()
        b = array(a.typecode, a)
        b.byteswap()
        return b.tobytes()


class L2Table:
    """One L2 table: raw 64-bit words (two per entry with extended L2)."""

    __slots__ = ("words", "dirty")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.words = decode_u64(data)
        self.dirty = False

    def to_bytes(self) -> bytes:
        return encode_u64(self.words)


T = TypeVar("T", L2Table, RefcountBlock)


class TableCache(Generic[T]):
    """LRU of tables keyed by host offset, at most ``capacity`` entries.

    ``load(offset)`` reads a table; ``write_back(offset, table)`` writes a dirty one (called on
    eviction, so it must respect the write ordering itself).
    """

    def __init__(
        self,
        capacity: int,
        load: Callable[[int], T],
        write_back: Callable[[int, T], None],
    ) -> None:
        self.capacity = max(2, capacity)
        self._load = load
        self._write_back = write_back
        self.tables: OrderedDict[int, T] = OrderedDict()

    def get(self, offset: int) -> T:
        tables = self.tables
        table = tables.get(offset)
        if table is not None:
            tables.move_to_end(offset)
            return table
        table = self._load(offset)
        self._insert(offset, table)
        return table

    def put_new(self, offset: int, table: T) -> None:
        """Insert a freshly created table (already marked dirty by the caller)."""
        self._insert(offset, table)

    def _insert(self, offset: int, table: T) -> None:
        tables = self.tables
        while len(tables) >= self.capacity:
            old_offset, old = next(iter(tables.items()))
            if old.dirty:
                self._write_back(old_offset, old)
                old.dirty = False
            del tables[old_offset]
        tables[offset] = table

    def dirty_items(self) -> Iterator[tuple[int, T]]:
        return iter([(o, t) for o, t in self.tables.items() if t.dirty])

    def has_dirty(self) -> bool:
        return any(t.dirty for t in self.tables.values())

    def drop(self, offset: int) -> None:
        self.tables.pop(offset, None)

    def clear(self) -> None:
        self.tables.clear()
