"""raw: the image file is the disk. The smallest driver, and the probe fallback."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Self

from imgfs.block.driver import (
    PROBE_HEAD_SIZE,
    PROBE_TAIL_SIZE,
    BlockDriver,
    OpenOptions,
    ProbeInput,
)
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import InvalidRequest, NotPermitted
from imgfs.units import choice_option


class RawDriver(BlockDriver):
    format_name = "raw"
    supports_write = True

    def __init__(self, file: HostFile, options: OpenOptions) -> None:
        super().__init__(file, options)
        self._size = file.size()
        # Only a probed raw image needs the guard; a named format is what the user asked for.
        self._guard = options.probe_is_raw if options.probed else None
        self._guard_lock = threading.Lock()

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        return 1

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        return cls(file, options)

    create_options = {
        "preallocation": "off (sparse; the default), falloc (reserve space), full (write zeros)"
    }

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        prealloc = choice_option(options, "preallocation", ("off", "falloc", "full"), "off")
        with open(path, "wb") as f:
            if prealloc == "full":
                chunk = bytes(1024 * 1024)
                for start in range(0, size, len(chunk)):
                    f.write(chunk[: min(len(chunk), size - start)])
            else:
                f.truncate(size)
                if prealloc == "falloc" and size:
                    os.posix_fallocate(f.fileno(), 0, size)

    @property
    def virtual_size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return self.file.pread(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_writable()
        if self._guard is not None and self._touches_probed_bytes(offset, len(data)):
            with self._guard_lock:
                self._check_still_raw(offset, data)
                self.file.pwrite(offset, data)
            return
        self.file.pwrite(offset, data)

    def _touches_probed_bytes(self, offset: int, length: int) -> bool:
        return offset < PROBE_HEAD_SIZE or offset + length > self._size - PROBE_TAIL_SIZE

    def _check_still_raw(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert self._guard is not None
        size = self._size
        head_len = min(PROBE_HEAD_SIZE, size)
        tail_start = max(0, size - PROBE_TAIL_SIZE)
        head = bytearray(self.file.pread(0, head_len))
        tail = bytearray(self.file.pread(tail_start, size - tail_start))
        for buf, base in ((head, 0), (tail, tail_start)):
            lo = max(offset, base)
            hi = min(offset + len(data), base + len(buf))
            if lo < hi:
                buf[lo - base : hi - base] = data[lo - offset : hi - offset]
        if not self._guard(bytes(head), bytes(tail)):
            raise NotPermitted(
                f"{self.file.path}: refusing a write that would make this probed raw image look "
                "like another format; name the format explicitly (-f raw) to allow it"
            )

    def discard(self, offset: int, length: int) -> None:
        self.check_writable()
        self.file.punch_hole(offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.check_writable()
        if self._guard is not None and self._touches_probed_bytes(offset, length):
            super().write_zeroes(offset, length, may_unmap)  # goes through the guarded write
            return
        done = (
            self.file.punch_hole(offset, length) if may_unmap else False
        ) or self.file.zero_range(offset, length)
        if not done:
            super().write_zeroes(offset, length, may_unmap)

    def block_status(self, offset: int, length: int) -> Extent:
        is_data, run = self.file.data_extents(offset, length)
        if is_data:
            return Extent(offset, run, Allocation.DATA, host_offset=offset)
        return Extent(offset, run, Allocation.ZERO)

    def resize(self, new_size: int) -> None:
        self.check_writable()
        if new_size < 0:
            raise InvalidRequest(f"{self.file.path}: bad size {new_size}")
        if self.file.is_block_device:
            raise InvalidRequest(f"{self.file.path}: cannot resize a block device")
        self.file.truncate(new_size)
        self._size = new_size


register(RawDriver)
