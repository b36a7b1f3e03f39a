"""A bounded LRU cache of decompressed chunks, shared by the read-only compressed formats.

The budget is in bytes, not entries: chunks differ in size (a dmg chunk is anything from one
sector to tens of MiB). Loading is single-flight: when several threads want the same missing
chunk, one decompresses it and the others wait for its result, so a chunk is decoded once even
under parallel reads. A failed load caches nothing and the next caller tries again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sized
from typing import Generic, TypeVar

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024

V = TypeVar("V", bound=Sized)


class _Pending(Generic[V]):
    """A load in progress: waiters block on ``done`` and then take ``value`` or ``error``."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: V | None = None
        self.error: BaseException | None = None


class ChunkCache(Generic[V]):
    """``get(key, load)`` returns the cached value for ``key`` or calls ``load()`` once for it.

    Values are charged ``len(value)`` bytes (decoded bytes, or an object that is filled later
    and reports its final size). A value bigger than the whole budget is returned but not kept.
    ``max_bytes`` of 0 disables caching (every get loads).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"bad cache size {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._pending: dict[Hashable, _Pending[V]] = {}
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def __contains__(self, key: Hashable) -> bool:
        """Cached or being loaded."""
        with self._lock:
            return key in self._entries or key in self._pending

    def peek(self, key: Hashable) -> V | None:
        """The cached value for ``key`` (counted as a hit), or None when it is missing or still
        being loaded: never waits and never loads."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return value

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return value
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = _Pending[V]()
                self._pending[key] = pending
                self.misses += 1
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                # The owner's failure (a host read error, a corrupt chunk) is ours too; the
                # next request after this one starts a fresh load.
                raise pending.error
            assert pending.value is not None
            return pending.value
        try:
            value = load()
        except BaseException as e:
            pending.error = e
            with self._lock:
                del self._pending[key]
            pending.done.set()
            raise
        pending.value = value
        with self._lock:
            del self._pending[key]
            self._insert(key, value)
        pending.done.set()
        return value

    def _insert(self, key: Hashable, value: V) -> None:
        size = len(value)
        if size > self.max_bytes:
            return
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
