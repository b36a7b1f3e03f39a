"""Images that live behind a URL instead of a local path.

A protocol backend turns a URL into a file-like object with HostFile's interface (pread, pwrite,
size, sync, punch_hole, zero_range, data_extents, allocated_size, close), so every format driver
runs on top of it unchanged. Backends register their URL schemes here; the chain layer and the
directory scanner call ``open_url`` for a name that ``is_url`` accepts (a ``NAME.url`` file in
IMAGES_DIR holds one URL; a backing name may be a URL).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from imgfs.block.hostfile import CacheMode, HostFile

#: scheme → opener(url, writable, cache) returning a HostFile-compatible object
Opener = Callable[[str, bool, "CacheMode"], "HostFile"]
SCHEMES: dict[str, Opener] = {}
#: Schemes whose opener takes the run-time options (``options=`` keyword): see register_scheme.
_TAKES_OPTIONS: set[str] = set()
#: Run-time option keys (``imgfs mount -o KEY=VALUE``) the backends read, with one line of help.
RUNTIME_OPTIONS: dict[str, str] = {}
_loaded = False


def register_scheme(
    scheme: str, opener: Opener, runtime_options: Mapping[str, str] | None = None
) -> None:
    """Make ``scheme://`` names open through ``opener``. A backend that names
    ``runtime_options`` gets the mount's ``-o`` options as ``opener(..., options=MAPPING)``."""
    SCHEMES[scheme] = opener
    if runtime_options is not None:
        _TAKES_OPTIONS.add(scheme)
        RUNTIME_OPTIONS.update(runtime_options)


def _load_backends() -> None:
    # Importing every module of this package runs their register_scheme() calls.
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def runtime_options() -> dict[str, str]:
    """Every backend's run-time option keys, with their help."""
    _load_backends()
    return dict(RUNTIME_OPTIONS)


def is_url(name: str) -> bool:
    """True for ``scheme://...`` names of a registered scheme."""
    if "://" not in name:
        return False
    _load_backends()
    try:
        return urlsplit(name).scheme in SCHEMES
    except ValueError:  # "http://[::1" and the like: not a URL we can open
        return False


def same_origin(a: str, b: str) -> bool:
    """Both URLs name the same scheme, host and port."""
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.netloc.rpartition("@")[2]) == (pb.scheme, pb.netloc.rpartition("@")[2])


def open_url(
    url: str, *, writable: bool, cache: CacheMode, options: Mapping[str, str] | None = None
) -> HostFile:
    _load_backends()
    scheme = urlsplit(url).scheme
    try:
        opener = SCHEMES[scheme]
    except KeyError:
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}") from None
    if scheme in _TAKES_OPTIONS:
        return opener(url, writable, cache, options=options or {})  # type: ignore[call-arg]
    return opener(url, writable, cache)


# Protocol backends register their schemes on import.
from imgfs.remote import nbd as _nbd  # noqa: E402,F401
