"""The driver contract: what every image format implements.

A driver is one layer of a disk: it maps guest byte ranges of *its own* image to its host file(s).
The layers around it are generic and composed by :mod:`imgfs.block.chain` and
:mod:`imgfs.block.disk`:

* the host-file backend (:class:`~imgfs.block.hostfile.HostFile`) under it does the I/O and
  applies O_DIRECT / no-flush from the cache mode;
* its backing image, if any, is another opened driver handed to :meth:`BlockDriver.attach_backing`
  by the chain layer, which keeps it as ``self.backing`` (read-only, format pinned,
  depth-capped, names resolved inside the images directory);
* the :class:`~imgfs.block.disk.Disk` above it clamps requests to the virtual size, applies
  writethrough, and serialises and deduplicates flushes.

So a driver never sees a request outside ``[0, virtual_size)``, never resolves a backing name
itself, and never decides whether to sync: it calls ``HostFile.sync()`` in ``flush`` and the
cache mode decides.

Thread safety: the Disk may call read/write/block_status from several threads at once (and
from the trio thread). A driver protects its own metadata (one lock per image is enough);
HostFile I/O is positioned and needs no lock. Reads must be exception-safe: any host read may
raise (``WouldBlock`` in non-blocking mode, a host I/O error) and the request is then retried
or failed; a half-done read must leave the driver's caches consistent.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

from imgfs.block.extent import Allocation, Extent
from imgfs.block.hostfile import CacheMode, HostFile
from imgfs.errors import CorruptImage, ReadOnly, Unsupported
from imgfs.units import size_option

if TYPE_CHECKING:
    from imgfs.crypto.secret import Secret

# How much of a file the registry hands to each probe.
PROBE_HEAD_SIZE = 64 * 1024
PROBE_TAIL_SIZE = 4096

# Zero buffers bigger than this are produced in pieces (write_zeroes fallback).
ZERO_CHUNK = 1024 * 1024
_ZEROS = bytes(ZERO_CHUNK)


@dataclass(frozen=True, slots=True)
class ProbeInput:
    """What a probe may look at: the file's first bytes, its last bytes, its name and size."""

    filename: str
    size: int
    head: bytes
    tail: bytes


@dataclass(slots=True)
class OpenOptions:
    """How the chain layer asks a driver to open an image.

    ``probed`` is True when the format was guessed from the content rather than named: the raw
    driver then refuses writes that would make the image probe as another format.
    ``probe_is_raw(head, tail)`` answers that question for a candidate head and tail of the file
    (``PROBE_HEAD_SIZE`` and ``PROBE_TAIL_SIZE`` bytes).
    ``open_file`` opens another host file that belongs to this image (an extent, a data file),
    with the same cache mode and access, after checking that it is allowed.
    """

    read_only: bool
    cache: CacheMode
    probed: bool = False
    probe_is_raw: Callable[[bytes, bytes], bool] | None = None
    open_file: Callable[[str, bool], HostFile] | None = None
    #: Format-specific run-time options (``-o key=value`` of ``imgfs mount``/``info``), such as
    #: qcow2's ``l2-cache-size``. A driver ignores keys it does not know.
    driver_options: Mapping[str, str] = field(default_factory=dict)
    #: Open this internal snapshot (by id, or else by name) instead of the active layer,
    #: read-only. A driver without snapshots leaves ``snapshots()`` empty and the chain layer
    #: refuses the open.
    snapshot: str | None = None
    #: The passphrase of this image file, if the user gave one (``--key``); an encrypted image
    #: opened without it raises KeyRequired, with a wrong one WrongKey.
    key: Secret | None = None

    def size_option(self, key: str, default: int) -> int:
        """A byte-count run-time option (``8M``, ``65536``), or ``default`` when not given."""
        return size_option(self.driver_options, key, default)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One internal snapshot of an image (the fields ``qemu-img snapshot -l`` shows)."""

    id: str
    name: str
    virtual_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    icount: int | None = None


@dataclass(frozen=True, slots=True)
class BackingSpec:
    """A backing image as the overlay names it: the name stored in the image (relative names
    are relative to the overlay's directory) and the format, if the overlay pins one."""

    filename: str
    format: str | None = None


@dataclass(slots=True)
class ImageInfo:
    """The fields ``qemu-img info --output=json`` gives, for the image itself (one layer)."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    cluster_size: int | None = None
    dirty_flag: bool | None = None
    encrypted: bool = False
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_filename_format: str | None = None
    format_specific: dict[str, Any] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    # Things a person should know: read-only reasons, ignored features, repairs made.
    notes: list[str] = field(default_factory=list)

    def to_qemu_json(self) -> dict[str, Any]:
        """The same keys and nesting as ``qemu-img info --output=json``."""
        out: dict[str, Any] = {
            "virtual-size": self.virtual_size,
            "filename": self.filename,
            "format": self.format,
            "actual-size": self.actual_size,
        }
        if self.cluster_size is not None:
            out["cluster-size"] = self.cluster_size
        if self.encrypted:
            out["encrypted"] = True
        if self.snapshots:
            out["snapshots"] = self.snapshots
        if self.backing_filename is not None:
            out["backing-filename"] = self.backing_filename
            if self.full_backing_filename is not None:
                out["full-backing-filename"] = self.full_backing_filename
            if self.backing_filename_format is not None:
                out["backing-filename-format"] = self.backing_filename_format
        if self.format_specific:
            out["format-specific"] = {"type": self.format, "data": self.format_specific}
        out["dirty-flag"] = bool(self.dirty_flag)
        if self.notes:
            out["imgfs-notes"] = self.notes
        return out


class RepairMode(enum.Enum):
    NONE = "none"
    LEAKS = "leaks"
    ALL = "all"


@dataclass(slots=True)
class CheckResult:
    """What a consistency check found, counted the way ``qemu-img check`` counts."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 check failed, 2 corrupt, 3 leaks only."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


def read_stored_name(
    file: HostFile, offset: int, size: int, *, first: int, end: int, max_size: int, what: str
) -> str:
    """A file name an image stores as (offset, size) in its header area (qcow, qed): checked to
    lie in ``[first, end)`` and to be 1 to ``max_size`` bytes without a NUL, then decoded so
    that any bytes survive a round trip."""
    if size == 0 or size > max_size or offset < first or offset + size > end:
        raise CorruptImage(f"{file.path}: bad {what} at {offset}, {size} bytes")
    name = bytes(file.pread(offset, size))
    if b"\0" in name:
        raise CorruptImage(f"{file.path}: {what} {name!r} holds a NUL byte")
    return name.decode("utf-8", "surrogateescape")


class BlockDriver(ABC):
    """One image format. Subclasses set ``format_name`` and register themselves with
    :func:`imgfs.block.registry.register` at the bottom of their module."""

    format_name: ClassVar[str]
    #: The driver implements write() and friends at all (an image may still open read-only).
    supports_write: ClassVar[bool] = False
    #: Reads are page-cache-speed lookups plus host reads (no decompression or crypto), so the
    #: FUSE layer may serve them inline on the trio thread; or the driver raises WouldBlock when
    #: ``hostfile.in_nowait_mode()`` and a read would decompress much (cloop does this). A
    #: driver may set it per instance.
    cheap_reads: ClassVar[bool] = True
    #: A new image from :meth:`create` reads as zeros (False for LUKS, whose unwritten payload
    #: decrypts to noise): ``convert`` may then leave zero ranges unwritten.
    zero_init: ClassVar[bool] = True

    #: The backing image, opened read-only; set by :meth:`attach_backing`.
    backing: BlockDriver | None = None

    def __init__(self, file: HostFile, options: OpenOptions) -> None:
        self.file = file
        self.options = options
        self.read_only = options.read_only or not file.writable

    # -- discovery ------------------------------------------------------------------------------

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        """How sure this driver is that the file is its format: 0 (no) to 100 (magic matched).

        Raw answers 1, so any real match wins. Must not raise on any input.
        """
        return 0

    @classmethod
    def companion_files(cls, path: str) -> list[str]:
        """Other files in the directory that are part of this image (extents, external data
        files), so the directory scan does not list them as disks of their own. Backing images
        are not companions: they are disks too. Must not raise on a bad image (return [])."""
        return []

    @classmethod
    @abstractmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        """Parse and validate the image's header and metadata, raising CorruptImage (quoting
        the bad value) or Unsupported. Big tables load lazily. Does not open the backing
        image: the chain layer does, from ``backing_spec``."""

    #: Run-time options this driver reads from ``OpenOptions.driver_options`` (``imgfs mount -o
    #: KEY=VALUE``), with one line of help each. The mount sends a ``-o`` key here instead of to
    #: FUSE when some driver names it.
    runtime_options: ClassVar[dict[str, str]] = {}

    #: The ``-o`` options ``create`` understands, with one line of help each (``imgfs create
    #: -f FMT -o help`` prints them). Empty when the driver cannot create images.
    create_options: ClassVar[dict[str, str]] = {}

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        """Create a new, empty image of ``size`` guest bytes at ``path`` (the file may exist
        and is then truncated), with qemu-img's ``-o`` options for this format as strings
        (``backing_file``, ``backing_fmt``, ``cluster_size``...). Unknown keys or bad values
        raise InvalidRequest naming them. The result must pass ``qemu-img check`` and open in
        qemu-img. The CLI has already taken ``size`` from the backing image when none was given."""
        raise Unsupported(f"imgfs cannot create {cls.format_name} images")

    # -- geometry -------------------------------------------------------------------------------

    @property
    @abstractmethod
    def virtual_size(self) -> int:
        """The guest-visible disk size in bytes."""

    @property
    def backing_spec(self) -> BackingSpec | None:
        """The backing image this one names, if any."""
        return None

    def attach_backing(self, backing: BlockDriver) -> None:
        """Take ``backing`` as this image's backing image (``self.backing``).

        Called by the chain layer once the backing image named by ``backing_spec`` is open, so a
        driver can validate it (the parent's UUID/GUID, its size...) and raise CorruptImage
        quoting both values. An override checks first and then calls
        ``super().attach_backing(backing)``; on failure the chain layer closes both images,
        whether or not the backing image was linked.
        """
        self.backing = backing

    def snapshots(self) -> list[SnapshotInfo]:
        """The image's internal snapshots (each can be opened read-only with
        ``OpenOptions.snapshot``). Formats without them return []."""
        return []

    # -- data -----------------------------------------------------------------------------------

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Return exactly ``length`` guest bytes from ``offset``.

        The caller guarantees ``0 <= offset`` and ``offset + length <= virtual_size``; no
        alignment. Unallocated ranges read from ``self.backing`` (see :meth:`read_backing`),
        or as zeros without one.
        """

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (range guaranteed inside the disk, no alignment).

        On return the data is in the host file or the host page cache; metadata may still be
        dirty in memory until :meth:`flush`. Data must reach the host file before any metadata
        that points at it.
        """
        raise ReadOnly(f"{self.file.path}: the {self.format_name} driver cannot write")

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole clusters compressed (``imgfs convert -c``). ``offset`` and ``len(data)``
        are multiples of :meth:`compressed_write_unit`, except a short last unit at the end of
        the disk. Formats without compression raise Unsupported."""
        raise Unsupported(f"the {self.format_name} format has no compressed clusters")

    def compressed_write_unit(self) -> int:
        """The size of the pieces :meth:`write_compressed` takes (the cluster size)."""
        raise Unsupported(f"the {self.format_name} format has no compressed clusters")

    def flush(self) -> None:
        """Write dirty metadata in dependency order, then ``HostFile.sync()`` every file the
        image uses. After it returns, every write that completed before it is durable (unless
        the cache mode is unsafe)."""
        self.file.sync()

    def discard(self, offset: int, length: int) -> None:
        """The guest no longer needs the range: free what can be freed. Reads afterwards return
        zeros or the backing image's data, as the format defines; it may also do nothing.
        Range guaranteed inside the disk; no alignment. This default keeps the data."""
        return None

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make the range read as zeros (never the backing image's data). ``may_unmap`` allows
        deallocating instead of writing. This default writes zero buffers."""
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            self.write(offset, _ZEROS[:n])
            offset += n

    def block_status(self, offset: int, length: int) -> Extent:
        """The allocation of this layer at ``offset``: one extent starting at ``offset``, of
        1 to ``length`` bytes. Depth is 0; the chain layer walks backing images. This default
        says everything is data."""
        return Extent(offset, length, Allocation.DATA)

    # -- management -----------------------------------------------------------------------------

    def info(self) -> ImageInfo:
        """This layer's description (qemu-img info's fields)."""
        spec = self.backing_spec
        return ImageInfo(
            filename=self.file.path,
            format=self.format_name,
            virtual_size=self.virtual_size,
            actual_size=self.file.allocated_size(),
            backing_filename=spec.filename if spec else None,
            backing_filename_format=spec.format if spec else None,
        )

    def check(self, repair: RepairMode) -> CheckResult:
        """Check metadata consistency, repairing what ``repair`` allows (needs a writable
        open). Formats with nothing to check raise Unsupported (qemu-img's exit status 63)."""
        raise Unsupported(f"{self.file.path}: the {self.format_name} format has no check")

    def resize(self, new_size: int) -> None:
        """Change the virtual size. Growing reads zeros in the new range."""
        raise Unsupported(f"{self.file.path}: the {self.format_name} driver cannot resize")

    def close(self) -> None:
        """Release host files. The Disk flushes first; close does not flush."""
        self.file.close()

    # -- helpers for subclasses ----------------------------------------------------------------

    def check_writable(self) -> None:
        """Raise ReadOnly unless this layer was opened for writing (the Disk checks too; this
        guards direct calls, as the tests and ``convert`` make)."""
        if self.read_only:
            raise ReadOnly(f"{self.file.path}: opened read-only")

    def read_backing(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Guest bytes of the backing image for an unallocated range: zeros where there is no
        backing image or the backing image is shorter than this one."""
        backing = self.backing
        if backing is None:
            return bytes(length)
        available = max(0, min(length, backing.virtual_size - offset))
        if available == length:
            return backing.read(offset, length)
        if available == 0:
            return bytes(length)
        return bytes(backing.read(offset, available)) + bytes(length - available)
