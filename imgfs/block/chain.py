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
from urllib.parse import urljoin

from imgfs import remote
from imgfs.block import registry
from imgfs.block.driver import (
    PROBE_HEAD_SIZE,
    PROBE_TAIL_SIZE,
    BlockDriver,
    OpenOptions,
    ProbeInput,
)
from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import CacheMode, HostFile
from imgfs.errors import CorruptImage, HostIOError, ImgfsError, InvalidRequest, NotPermitted
from imgfs.keys import KeyRing

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
            # A symlink (or ..) that leads out: name both ends.
            shown = repr(path) if os.path.abspath(path) == real else f"{path!r} (-> {real})"
            raise NotPermitted(
                f"{referrer}: {what} {shown} is outside the images directory {root}; "
                "use --allow-external-files to allow it"
            )
        return real


def image_containment(image: str, allow_external_files: bool) -> Containment:
    """The containment of a command that takes one image path (info, check, convert): its
    backing files, extents and data files must lie in the image's own directory (or below), as
    a mount's must lie in IMAGES_DIR, unless external files are allowed."""
    if allow_external_files or remote.is_url(image):  # a URL image: same-server rules apply
        return Containment()
    return Containment(os.path.dirname(os.path.abspath(image)))


def resolve_relative(name: str, referrer: str) -> str:
    """A file name stored in an image, made absolute against the referring image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(referrer)), name)


def resolve_backing(name: str, referrer: str, containment: Containment) -> str:
    """The path or URL of the backing image ``name`` that ``referrer`` stores, checked.

    A URL image's names are relative to its URL and must stay on its server (a remote image
    must not make imgfs read local files). A local image may name a URL only where external
    files are allowed (``imgfs info``/``convert``, or a mount with --allow-external-files):
    otherwise an image dropped into IMAGES_DIR could make the mount fetch any URL the host can
    reach (an internal service, a cloud metadata endpoint) and show the answer as disk data.
    """
    if remote.is_url(referrer):
        url = urljoin(referrer, name)
        if not remote.is_url(url) or not (
            remote.same_origin(url, referrer) or containment.root is None
        ):
            raise NotPermitted(
                f"{referrer}: backing file {name!r} is not on the same server; "
                "use --allow-external-files to allow it"
            )
        return url
    if remote.is_url(name):
        if containment.root is not None:
            raise NotPermitted(
                f"{referrer}: backing file {name!r} is a URL; "
                "use --allow-external-files to let images fetch URLs"
            )
        return name
    path = resolve_relative(name, referrer)
    containment.check(path, "backing file", referrer)
    if not os.path.exists(path):
        raise CorruptImage(f"{referrer}: backing file {name!r} not found")
    return path


# Test hook: when set, every host file of an image (and its companion files) is opened through
# it; imgfs.block.recording records or fails host I/O with it for crash-state and fault tests.
# Also selected by the IMGFS_RECORD_IO / IMGFS_FAIL_IO environment variables (see there).
host_file_factory: Callable[..., HostFile] | None = None
_checked_environment = False


def open_host_file(
    path: str, *, writable: bool, cache: CacheMode, lock: bool = True, force_share: bool = False
) -> HostFile:
    """``lock``/``force_share``: QEMU-compatible image locks (see imgfs.block.locking)."""
    global host_file_factory, _checked_environment
    if not _checked_environment:
        _checked_environment = True
        if os.environ.get("IMGFS_RECORD_IO") or os.environ.get("IMGFS_FAIL_IO"):
            from imgfs.block import recording

            host_file_factory = recording.from_environment()
    factory = host_file_factory if host_file_factory is not None else _plain_host_file
    return factory(path, writable=writable, cache=cache, lock=lock, force_share=force_share)


def _plain_host_file(
    path: str, *, writable: bool, cache: CacheMode, lock: bool, force_share: bool
) -> HostFile:
    return HostFile(
        path,
        writable=writable,
        direct=cache.direct,
        no_flush=cache.no_flush,
        lock=lock,
        force_share=force_share,
    )


def open_chain(
    path: str,
    fmt: str | None = None,
    *,
    read_only: bool,
    cache: CacheMode = CacheMode.WRITEBACK,
    containment: Containment | None = None,
    driver_options: Mapping[str, str] | None = None,
    snapshot: str | None = None,
    keys: KeyRing | None = None,
    locking: bool = True,
    force_share: bool = False,
) -> BlockDriver:
    """Open ``path`` (format ``fmt``, or probed) and its whole backing chain; ``snapshot``
    (an id or name) opens that internal snapshot of the top image instead, read-only.

    Returns the top driver; its ``backing`` attribute links down the chain. ``keys`` gives each
    layer the passphrase of its own file (a backing image may have its own key). Every host
    file takes QEMU's image locks unless ``locking`` is off (``force_share``: qemu-img's -U).
    """
    if snapshot is not None:
        read_only = True
    containment = containment or Containment()
    seen: set[str] = set()
    top: BlockDriver | None = None
    parent: BlockDriver | None = None
    current_path, current_fmt, writable = path, fmt, not read_only
    try:
        for depth in range(MAX_CHAIN_DEPTH + 1):
            real = current_path if remote.is_url(current_path) else os.path.realpath(current_path)
            if real in seen:
                raise CorruptImage(f"{path}: backing chain loops back to {current_path}")
            seen.add(real)
            driver = _open_one(
                current_path,
                current_fmt,
                writable,
                cache,
                containment,
                driver_options or {},
                snapshot=snapshot if parent is None else None,
                keys=keys,
                lock=(locking, force_share),
            )
            if parent is None:
                top = driver
                if snapshot is not None and not driver.snapshots():
                    raise InvalidRequest(f"{path}: the image has no snapshot {snapshot!r}")
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
            next_path = resolve_backing(spec.filename, current_path, containment)
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
    snapshot: str | None = None,
    keys: KeyRing | None = None,
    lock: tuple[bool, bool] = (True, False),
) -> BlockDriver:
    probed = fmt is None
    probe_is_raw = None
    is_url = remote.is_url(path)
    # A URL is opened first (one connection, the first block cached) and probed through it.
    # Asked for writing when the chain is (an NBD export may be written; HTTP never is): the
    # remote file's own ``writable`` then says whether the server allows it.
    url_file = (
        remote.open_url(path, writable=writable, cache=cache, options=driver_options)
        if is_url
        else None
    )
    directory_file = None
    if url_file is None and os.path.isdir(path) and (fmt or _dir_format(path)):
        # A directory is a disk only for a driver that builds one from it: NAME.vvfat, -f vvfat.
        driver_cls = registry.get_driver(fmt or _dir_format(path))
        if not getattr(driver_cls, "opens_directories", False):
            raise HostIOError(f"{path}: is a directory", errno.EISDIR)
        directory_file = driver_cls.directory_file(path)  # type: ignore[attr-defined]
        probed = False
    try:
        if directory_file is not None:
            pass
        elif probed:
            probe_input = (
                registry.read_probe_input(path)
                if url_file is None
                else _probe_input_of(url_file, path)
            )
            driver_cls = registry.probe(probe_input)
        else:
            driver_cls = registry.get_driver(fmt)  # type: ignore[arg-type]
    except BaseException:
        if url_file is not None:
            url_file.close()
        raise
    if probed:

        def probe_is_raw(head: bytes, tail: bytes) -> bool:
            return registry.still_probes_raw(probe_input.filename, probe_input.size, head, tail)

    if (writable and not driver_cls.supports_write) or (
        url_file is not None and not url_file.writable
    ):
        writable = False
    if directory_file is not None:
        writable = False
    locking, force_share = lock
    file = (
        url_file
        or directory_file
        or open_host_file(
            path, writable=writable, cache=cache, lock=locking, force_share=force_share
        )
    )

    def open_companion(name: str, want_write: bool) -> HostFile:
        if is_url:  # an extent or data file of a remote image: on the same server only
            url = urljoin(path, name)
            if not remote.is_url(url) or not remote.same_origin(url, path):
                raise NotPermitted(f"{path}: file {name!r} is not on the same server")
            return remote.open_url(
                url, writable=want_write and writable, cache=cache, options=driver_options
            )
        companion = resolve_relative(name, path)
        containment.check(companion, "file", path)
        return open_host_file(
            companion,
            writable=want_write and writable,
            cache=cache,
            lock=locking,
            force_share=force_share,
        )

    options = OpenOptions(
        read_only=not writable,
        cache=cache,
        probed=probed,
        probe_is_raw=probe_is_raw,
        open_file=open_companion,
        driver_options=driver_options,
        snapshot=snapshot,
    )
    try:
        options.key = keys.lookup(path) if keys is not None else None
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


def _dir_format(path: str) -> str:
    """The format a directory's name asks for (``NAME.vvfat``), or ""."""
    return "vvfat" if path.rstrip(os.sep).endswith(".vvfat") else ""


def _probe_input_of(file: HostFile, url: str) -> ProbeInput:
    """What the probes look at, read through an opened remote file."""
    size = file.size()
    head = bytes(file.pread(0, min(PROBE_HEAD_SIZE, size)))
    tail = bytes(file.pread(max(0, size - PROBE_TAIL_SIZE), min(PROBE_TAIL_SIZE, size)))
    name = os.path.basename(url.split("?", 1)[0].rstrip("/"))
    return ProbeInput(filename=name, size=size, head=head, tail=tail)


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
