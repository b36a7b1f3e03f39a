"""Sizes as people write them on command lines, the way qemu-img reads them."""

from __future__ import annotations

import re

from imgfs.errors import InvalidRequest

_SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                  "p": 1 << 50, "e": 1 << 60}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeEbB]?)\s*$")
# qemu-img's largest image size (INT64_MAX rounded down to a sector).
MAX_IMAGE_SIZE = (1 << 63) - 512


def parse_size(text: str) -> int:
    """``10G``, ``512k``, ``1.5M`` or a plain byte count, as qemu-img reads sizes."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidRequest(f"invalid size {text!r} (use bytes or a k, M, G, T suffix)")
    value = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    size = int(value * _SIZE_SUFFIXES[m.group(2).lower()])
    if size > MAX_IMAGE_SIZE:
        raise InvalidRequest(f"size {text!r} is larger than {MAX_IMAGE_SIZE} bytes")
    return size
