"""Registers the NBD URL schemes (``nbd``, ``nbds``, ``nbd+unix``, ``nbds+unix``); the client
is :mod:`imgfs.nbd.client`, loaded on the first open (sockets and ssl are not needed before)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfs.nbd import SCHEMES
from imgfs.remote import register_scheme

if TYPE_CHECKING:
    from imgfs.block.hostfile import CacheMode, HostFile


def open_nbd(url: str, writable: bool, cache: CacheMode) -> HostFile:
    from imgfs.nbd.client import NBDFile

    return NBDFile(url, writable=writable, cache=cache)  # type: ignore[return-value]


for _scheme in SCHEMES:
    register_scheme(_scheme, open_nbd)
