"""A tiny real format for testing the generic layers (chain, probe guard, scan) before the real
formats land. Importing this module registers it.

Layout: a 512-byte header ``TOYFMT01`` + virtual size (u64 LE) + backing name length (u16 LE)
+ backing name (UTF-8); then the guest data, sector by sector. A sector of all zeros in the file
is "unallocated" and reads from the backing image (so it can only be written with non-zero data,
which is all these tests need). A sector holding ``BUG_SECTOR`` makes reads of it raise a plain
RuntimeError: a stand-in for a driver bug, to test how the layers above contain one.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Self

from imgfs.block.driver import BackingSpec, BlockDriver, OpenOptions, ProbeInput
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.errors import CorruptImage

MAGIC = b"TOYFMT01"
HEADER = struct.Struct("<8sQH")
SECTOR = 512
MAX_SIZE = 1 << 40
BUG_SECTOR = b"BUG!" * (SECTOR // 4)


def make_toy(path: Path, size: int, backing: str | None = None, data: bytes = b"") -> None:
    name = (backing or "").encode()
    header = HEADER.pack(MAGIC, size, len(name)) + name
    path.write_bytes(header.ljust(SECTOR, b"\0") + data)


class ToyDriver(BlockDriver):
    format_name = "toy"
    supports_write = True

    def __init__(self, file: HostFile, options: OpenOptions, size: int, backing: str) -> None:
        super().__init__(file, options)
        self._size = size
        self._backing = backing

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        return 100 if probe.head.startswith(MAGIC) else 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        header = bytes(file.pread(0, SECTOR))
        magic, size, name_len = HEADER.unpack_from(header)
        if magic != MAGIC:
            raise CorruptImage(f"{file.path}: not a toy image")
        if size > MAX_SIZE or size % SECTOR:
            raise CorruptImage(f"{file.path}: bad virtual size {size}")
        if name_len > SECTOR - HEADER.size:
            raise CorruptImage(f"{file.path}: backing name length {name_len} too long")
        name = header[HEADER.size : HEADER.size + name_len].decode()
        return cls(file, options, size, name)

    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def backing_spec(self) -> BackingSpec | None:
        return BackingSpec(self._backing) if self._backing else None

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while length:
            ext = self.block_status(offset, length)
            if ext.allocation is Allocation.DATA:
                data = bytes(self.file.pread(SECTOR + offset, ext.length))
                if BUG_SECTOR in data:
                    raise RuntimeError("toy driver bug triggered")
                out += data
            else:
                out += self.read_backing(offset, ext.length)
            offset += ext.length
            length -= ext.length
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.file.pwrite(SECTOR + offset, data)

    def block_status(self, offset: int, length: int) -> Extent:
        first = offset // SECTOR
        end = min(offset + length, self._size)
        sector = first
        state = None
        while sector * SECTOR < end:
            blob = bytes(self.file.pread(SECTOR + sector * SECTOR, SECTOR))
            allocated = blob != bytes(SECTOR)
            if state is None:
                state = allocated
            elif allocated != state:
                break
            sector += 1
        run = min(sector * SECTOR, end) - offset
        return Extent(offset, run, Allocation.DATA if state else Allocation.UNALLOCATED)


register(ToyDriver)
