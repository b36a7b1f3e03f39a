"""Format registry: drivers register themselves; the format of a file is found by probing.

Like QEMU, every driver scores the file's first bytes (and, for trailer formats, its last bytes);
the highest score wins and raw, which scores 1 for anything, is the fallback.
"""

from __future__ import annotations

import errno
import importlib
import os
import pkgutil

from imgfs.block.driver import PROBE_HEAD_SIZE, PROBE_TAIL_SIZE, BlockDriver, ProbeInput
from imgfs.errors import HostIOError, Unsupported

_DRIVERS: dict[str, type[BlockDriver]] = {}
_loaded = False


def register(driver: type[BlockDriver]) -> type[BlockDriver]:
    """Class decorator (or plain call) that makes a driver known by its ``format_name``."""
    _DRIVERS[driver.format_name] = driver
    return driver


def _load_all() -> None:
    # Importing every module under imgfs.formats runs their register() calls.
    global _loaded
    if _loaded:
        return
    import imgfs.formats

    for module in pkgutil.iter_modules(imgfs.formats.__path__):
        importlib.import_module(f"imgfs.formats.{module.name}")
    _loaded = True


def get_driver(format_name: str) -> type[BlockDriver]:
    _load_all()
    try:
        return _DRIVERS[format_name]
    except KeyError:
        known = ", ".join(sorted(_DRIVERS))
        raise Unsupported(f"unknown format {format_name!r} (known: {known})") from None


def all_drivers() -> list[type[BlockDriver]]:
    """Every registered driver, by format name."""
    _load_all()
    return [_DRIVERS[name] for name in sorted(_DRIVERS)]


def read_probe_input(path: str) -> ProbeInput:
    """Read what the probes look at: the first 64 KiB and the last 4 KiB of the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise HostIOError(f"{path}: cannot open: {e.strerror}", e.errno or errno.EIO) from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        head = os.pread(fd, PROBE_HEAD_SIZE, 0)
        tail = os.pread(fd, PROBE_TAIL_SIZE, max(0, size - PROBE_TAIL_SIZE))
    except OSError as e:
        raise HostIOError(f"{path}: cannot read: {e.strerror}", e.errno or errno.EIO) from None
    finally:
        os.close(fd)
    return ProbeInput(filename=os.path.basename(path), size=size, head=head, tail=tail)


def probe(data: ProbeInput) -> type[BlockDriver]:
    """The best-scoring driver for the probe input (raw if nothing else matches)."""
    _load_all()
    best: type[BlockDriver] = _DRIVERS["raw"]
    best_score = 0
    for driver in _DRIVERS.values():
        try:
            score = driver.probe(data)
        except Exception:  # a probe must never break the scan; treat a failing one as no match
            score = 0
        if score > best_score:
            best, best_score = driver, score
    return best


def probe_file(path: str) -> type[BlockDriver]:
    return probe(read_probe_input(path))


def still_probes_raw(filename: str, size: int, head: bytes, tail: bytes) -> bool:
    """Would a file with this head and tail still probe as raw?

    QEMU asks the same question before a write to sector 0 of an image whose raw format was only
    guessed, so a guest cannot turn its disk into, say, a qcow2 that names /etc/shadow as its
    backing file. We ask it for every byte a probe looks at (the head and the tail), since some
    formats (fixed VHD, dmg) are recognised by a trailer.
    """
    data = ProbeInput(filename=filename, size=size, head=head, tail=tail)
    return probe(data).format_name == "raw"
