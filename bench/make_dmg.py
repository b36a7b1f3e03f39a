#!/usr/bin/env python3
"""Write a raw disk image as a zlib-compressed UDIF (.dmg), the way `hdiutil convert -format UDZO`
lays one out, for the format benchmark (QEMU and imgfs must both read it; neither writes dmg).

Layout: the data fork (every chunk, in order) from offset 0; the XML property list with one
``blkx`` table for the whole disk; the 512-byte ``koly`` trailer. Chunks of ``--chunk`` bytes
(default 1 MiB, hdiutil's 2048 sectors) are zlib-compressed; an all-zero chunk is a zero-fill
entry with no data. CRC32 checksums (data fork, table, master) are filled in, so `imgfs check`
passes. The source size must be a multiple of 512.

Usage: bench/make_dmg.py [--chunk BYTES] [--level N] [--jobs N] SOURCE.raw OUT.dmg
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import plistlib
import struct
import sys
import uuid
import zlib
from collections.abc import Iterator

SECTOR = 512
KOLY = struct.Struct(">4s I I I Q Q Q Q Q I I 16s I I 128s Q Q 120s I I 128s I Q 12s")
MISH = struct.Struct(">4s I Q Q Q I I 24s I I 128s I")
CHUNK = struct.Struct(">I I Q Q Q Q")
assert (KOLY.size, MISH.size, CHUNK.size) == (512, 204, 40)
CT_ZERO, CT_ZLIB, CT_TERMINATOR = 0x00000000, 0x80000005, 0xFFFFFFFF
CRC32 = 2
UDIF_FLATTENED = 1
VARIANT_DEVICE = 1


def pieces(path: str, chunk: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            yield block


def compress(block: bytes, level: int) -> tuple[bool, bytes]:
    """(all zero, zlib stream); the stream is empty for a zero chunk."""
    if block.count(0) == len(block):
        return True, b""
    return False, zlib.compress(block, level)


def write_dmg(source: str, out: str, chunk: int, level: int, jobs: int) -> None:
    size = os.path.getsize(source)
    if size % SECTOR or chunk % SECTOR or chunk <= 0:
        raise SystemExit(f"source size {size} and chunk {chunk} must be multiples of {SECTOR}")
    entries: list[bytes] = []
    data_crc = 0
    table_crc = 0
    offset = 0
    sector = 0
    with (
        open(out, "wb") as f,
        concurrent.futures.ProcessPoolExecutor(jobs) as pool,
    ):
        blocks = pieces(source, chunk)
        # Bounded look-ahead: at most 2 * jobs chunks in flight.
        window: list[concurrent.futures.Future[tuple[bool, bytes]]] = []
        lengths: list[int] = []
        done = False
        while window or not done:
            while not done and len(window) < 2 * jobs:
                block = next(blocks, None)
                if block is None:
                    done = True
                    break
                lengths.append(len(block))
                # The table's checksum runs over the decoded data in order.
                table_crc = zlib.crc32(block, table_crc)
                window.append(pool.submit(compress, block, level))
            if not window:
                break
            zero, stream = window.pop(0).result()
            n_sectors = lengths.pop(0) // SECTOR
            if zero:
                entries.append(CHUNK.pack(CT_ZERO, 0, sector, n_sectors, offset, 0))
            else:
                f.write(stream)
                data_crc = zlib.crc32(stream, data_crc)
                entries.append(CHUNK.pack(CT_ZLIB, 0, sector, n_sectors, offset, len(stream)))
                offset += len(stream)
            sector += n_sectors
        entries.append(CHUNK.pack(CT_TERMINATOR, 0, sector, 0, offset, 0))
        table_sum = struct.pack(">I", table_crc).ljust(128, b"\0")
        mish = MISH.pack(
            b"mish",
            1,
            0,
            sector,
            0,
            chunk // SECTOR + 8,
            0,
            b"",
            CRC32,
            32,
            table_sum,
            len(entries),
        ) + b"".join(entries)
        plist = plistlib.dumps(
            {
                "resource-fork": {
                    "blkx": [
                        {
                            "Attributes": "0x0050",
                            "CFName": "whole disk (Apple_HFS : 0)",
                            "Data": mish,
                            "ID": "0",
                            "Name": "whole disk (Apple_HFS : 0)",
                        }
                    ]
                }
            },
            fmt=plistlib.FMT_XML,
        )
        xml_offset = offset
        f.write(plist)
        master = zlib.crc32(struct.pack(">I", table_crc))
        f.write(
            KOLY.pack(
                b"koly", 4, KOLY.size, UDIF_FLATTENED,
                0, 0, offset,  # running data fork offset, data fork offset, length
                0, 0,  # no resource fork
                1, 1, uuid.uuid4().bytes,
                CRC32, 32, struct.pack(">I", data_crc).ljust(128, b"\0"),
                xml_offset, len(plist), b"",
                CRC32, 32, struct.pack(">I", master).ljust(128, b"\0"),
                VARIANT_DEVICE, sector, b"",
            )
        )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=1 << 20, help="bytes per chunk (default 1 MiB)")
    ap.add_argument("--level", type=int, default=6, help="zlib level (default 6)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("source")
    ap.add_argument("out")
    args = ap.parse_args()
    write_dmg(args.source, args.out, args.chunk, args.level, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
