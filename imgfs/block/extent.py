"""The one vocabulary for allocation: what a range of a disk is, and which layer answered."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Allocation(enum.Enum):
    """What a layer says about a guest range.

    DATA: the layer stores the bytes (at ``host_offset`` in its file when that is meaningful).
    ZERO: the layer knows the range reads as zeros (a zero cluster, a hole in a raw file).
    UNALLOCATED: the layer has nothing; the backing image answers, or zeros without one.
    """

    DATA = "data"
    ZERO = "zero"
    UNALLOCATED = "unallocated"


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest bytes with one allocation state.

    ``depth`` is the layer of the chain that answered: 0 is the image itself, 1 its backing
    image, and so on. ``host_offset`` is None when the range has no single place in the host
    file (zeros, compressed or encrypted data).
    """

    offset: int
    length: int
    allocation: Allocation
    depth: int = 0
    host_offset: int | None = None
