"""Backing chains: open an image and the images under it, and walk them for block status.

Every backing image is opened read-only, with the format the overlay pins (``backing_fmt``) or
by probing, to a fixed depth. Names are resolved against the overlay's directory and, unless the
caller allows external files, must stay inside the images directory (``root``): a hostile image
must not make imgfs read ``/etc/shadow`` on its behalf.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from imgfs.block import registry
from imgfs.block.driver import BlockDriver, OpenOptions
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import CacheMode, HostFile
from imgfs.errors import CorruptImage, HostIOError, ImgfsError, NotPermitted

# Deep enough for any real chain; it bounds open files and recursion for hostile ones.
MAX_CHAIN_DEPTH = 64
# What a parser raises when it trips over bad data instead of validating it first: reported as a
# corrupt image rather than a crash.
PARSER_ERRORS = (
    ValueError, IndexError, KeyError, OverflowError, UnicodeError, ZeroDivisionError, struct.error
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Containment:
    """Where an image's other files may live. ``root`` None means anywhere."""

    root: str | None = None

    def check(self, path: str, what: str, referrer: str) -> str:
        """The real path of ``path``, or NotPermitted when it leaves the root."""
        real = os.path.realpath(path)
        if self.root is None:
            return real
        root = os.path.realpath(self.root)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise NotPermitted(
                f"{referrer}: {what} {path!r} is outside the images directory {root}; "
                "use --allow-external-files to allow it"
            )
        return real


def resolve_relative(name: str, referrer: str) -> str:
    """A file name stored in an image, made absolute against the referring image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(referrer)), name)


# Test hook: when set, every host file of an image (and its companion files) is opened through
# it; imgfs.block.recording records or fails host I/O with it for crash-state and fault tests.
# Also selected by the IMGFS_RECORD_IO / IMGFS_FAIL_IO environment variables (see there).
host_file_factory: Callable[..., HostFile] | None = None
_checked_environment = False


def open_host_file(path: str, *, writable: bool, cache: CacheMode) -> HostFile:
    global host_file_factory, _checked_environment
    if not _checked_environment:
        _checked_environment = True
        if os.environ.get("IMGFS_RECORD_IO") or os.environ.get("IMGFS_FAIL_IO"):
            from imgfs.block import recording

            host_file_factory = recording.from_environment()
    if host_file_factory is not None:
        return host_file_factory(path, writable=writable, cache=cache)
    return HostFile(path, writable=writable, direct=cache.direct, no_flush=cache.no_flush)


def open_chain(
    path: str,
    fmt: str | None = None,
    *,
    read_only: bool,
    cache: CacheMode = CacheMode.WRITEBACK,
    containment: Containment | None = None,
    driver_options: Mapping[str, str] | None = None,
) -> BlockDriver:
    """Open ``path`` (format ``fmt``, or probed) and its whole backing chain.

    Returns the top driver; its ``backing`` attribute links down the chain.
    """
    containment = containment or Containment()
    seen: set[str] = set()
    top: BlockDriver | None = None
    parent: BlockDriver | None = None
    current_path, current_fmt, writable = path, fmt, not read_only
    try:
        for depth in range(MAX_CHAIN_DEPTH + 1):
            real = os.path.realpath(current_path)
            if real in seen:
                raise CorruptImage(f"{path}: backing chain loops back to {current_path}")
            seen.add(real)
            driver = _open_one(
                current_path, current_fmt, writable, cache, containment, driver_options or {}
            )
            if parent is None:
                top = driver
            else:
                _attach(parent, driver)
            parent = driver
            spec = driver.backing_spec
            if spec is None:
                return top  # type: ignore[return-value]
            if depth == MAX_CHAIN_DEPTH:
                raise CorruptImage(f"{path}: backing chain deeper than {MAX_CHAIN_DEPTH}")
            if "\0" in spec.filename:  # the OS would refuse it with a bare ValueError
                raise CorruptImage(
                    f"{current_path}: backing file name {spec.filename!r} holds a NUL"
                )
            next_path = resolve_relative(spec.filename, current_path)
            containment.check(next_path, "backing file", current_path)
            if not os.path.exists(next_path):
                raise CorruptImage(f"{current_path}: backing file {spec.filename!r} not found")
            current_path, current_fmt, writable = next_path, spec.format, False
    except BaseException:
        if top is not None:
            close_chain(top)
        raise
    raise AssertionError("unreachable")


def _attach(overlay: BlockDriver, backing: BlockDriver) -> None:
    """Hand the freshly opened ``backing`` to ``overlay``, which may refuse it. When the overlay
    raises before linking it, the backing image is not yet part of the chain that the caller
    closes, so it is closed here."""
    try:
        overlay.attach_backing(backing)
        if overlay.backing is not backing:  # an override that forgot super().attach_backing()
            raise AssertionError(
                f"{overlay.format_name} driver: attach_backing() did not link {backing.file.path}"
            )
    except BaseException:
        if overlay.backing is not backing:
            with contextlib.suppress(Exception):  # the refusal is the error worth reporting
                backing.close()
        raise


def _open_one(
    path: str,
    fmt: str | None,
    writable: bool,
    cache: CacheMode,
    containment: Containment,
    driver_options: Mapping[str, str],
) -> BlockDriver:
    probed = fmt is None
    probe_is_raw = None
    if probed:
        probe_input = registry.read_probe_input(path)
        driver_cls = registry.probe(probe_input)

        def probe_is_raw(head: bytes, tail: bytes) -> bool:
            return registry.still_probes_raw(probe_input.filename, probe_input.size, head, tail)

    else:
        driver_cls = registry.get_driver(fmt)
    if writable and not driver_cls.supports_write:
        writable = False
    file = open_host_file(path, writable=writable, cache=cache)

    def open_companion(name: str, want_write: bool) -> HostFile:
        companion = resolve_relative(name, path)
        containment.check(companion, "file", path)
        return open_host_file(companion, writable=want_write and writable, cache=cache)

    options = OpenOptions(
        read_only=not writable,
        cache=cache,
        probed=probed,
        probe_is_raw=probe_is_raw,
        open_file=open_companion,
        driver_options=driver_options,
    )
    try:
        return driver_cls.open(file, options)
    except ImgfsError:
        file.close()
        raise
    except PARSER_ERRORS as e:
        # A parser that tripped over bad data instead of validating it: still a corrupt image.
        file.close()
        raise CorruptImage(f"{path}: corrupt {driver_cls.format_name} image ({e})") from e
    except OSError as e:
        file.close()
        raise HostIOError(f"{path}: {e.strerror or e}", e.errno or errno.EIO) from e


def layers(top: BlockDriver) -> Iterator[BlockDriver]:
    node: BlockDriver | None = top
    while node is not None:
        yield node
        node = node.backing


def close_chain(top: BlockDriver) -> None:
    """Close every layer, top first; the first error is raised after all are closed."""
    first: BaseException | None = None
    for node in list(layers(top)):
        try:
            node.close()
        except BaseException as e:  # keep closing the others
            first = first or e
    if first is not None:
        raise first


def chain_block_status(top: BlockDriver, offset: int, length: int) -> Extent:
    """Block status of the whole chain at ``offset``: the first layer that has the range
    answers, with its depth. Past a short backing image's end, the range reads as zeros."""
    node: BlockDriver | None = top
    depth = 0
    while node is not None:
        if offset >= node.virtual_size:
            return Extent(offset, length, Allocation.ZERO, depth)
        ext = node.block_status(offset, min(length, node.virtual_size - offset))
        if ext.allocation is not Allocation.UNALLOCATED:
            return Extent(ext.offset, ext.length, ext.allocation, depth, ext.host_offset)
        length = ext.length  # the next layer answers only for this run
        node = node.backing
        depth += 1
    return Extent(offset, length, Allocation.UNALLOCATED, depth - 1)
