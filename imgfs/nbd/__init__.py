"""NBD (network block device): a client that serves as a remote host file for any format
driver (``nbd://``, ``nbds://``, ``nbd+unix://``, ``nbds+unix://`` URLs), and ``imgfs serve``,
a server exporting every disk of an images directory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfs.remote import register_scheme

if TYPE_CHECKING:
    from imgfs.block.hostfile import CacheMode, HostFile

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")


def _open(url: str, writable: bool, cache: CacheMode) -> HostFile:
    # The client (sockets, ssl) loads on first use, not with every import of imgfs.remote.
    from imgfs.nbd.client import NBDFile

    return NBDFile(url, writable=writable, cache=cache)  # type: ignore[return-value]


for _scheme in SCHEMES:
    register_scheme(_scheme, _open)
