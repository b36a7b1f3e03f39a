"""Images that live behind a URL instead of a local path.

A protocol backend turns a URL into a file-like object with HostFile's interface (pread, pwrite,
size, sync, punch_hole, zero_range, data_extents, allocated_size, close), so every format driver
runs on top of it unchanged. Backends register their URL schemes here; the chain layer and the
directory scanner call ``open_url`` for a name that ``is_url`` accepts (a ``NAME.url`` file in
IMAGES_DIR holds one URL; a backing name may be a URL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from imgfs.block.hostfile import CacheMode, HostFile

#: scheme → opener(url, writable, cache) returning a HostFile-compatible object
Opener = Callable[[str, bool, "CacheMode"], "HostFile"]
SCHEMES: dict[str, Opener] = {}


def register_scheme(scheme: str, opener: Opener) -> None:
    SCHEMES[scheme] = opener


def is_url(name: str) -> bool:
    """True for ``scheme://...`` names of a registered scheme."""
    return "://" in name and urlsplit(name).scheme in SCHEMES


def open_url(url: str, *, writable: bool, cache: CacheMode) -> HostFile:
    scheme = urlsplit(url).scheme
    try:
        opener = SCHEMES[scheme]
    except KeyError:
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}") from None
    return opener(url, writable, cache)


# Protocol backends register their schemes on import.
from imgfs.remote import nbd as _nbd  # noqa: E402,F401
