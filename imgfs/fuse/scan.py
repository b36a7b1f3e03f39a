"""Which files in IMAGES_DIR are disks, under which names, with what size and permissions.

Every regular file is probed. A file that a real format claims is a disk; the files that such a
disk owns (extents, external data files) are not. A file that only raw claims is a disk when its
name or size says so (see :func:`looks_like_raw_disk`), so that README.txt or a key file next to
the images is not exported as a disk. Probe results are cached by (device, inode, size, mtime).

A disk that another disk in the directory uses as its backing image is exported read-only
(unless the mount says otherwise): writing a base image silently corrupts every overlay on it.
A Parallels Desktop bundle (a ``NAME.hdd`` directory holding ``DiskDescriptor.xml``) is one disk,
opened through its descriptor.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from imgfs.block import chain, locking, registry
from imgfs.block.hostfile import CacheMode
from imgfs.errors import ImgfsError

log = logging.getLogger(__name__)

EXPORT_SUFFIX = ".raw"

# Names that are raw disks whatever their size.
RAW_DISK_EXTENSIONS = frozenset(
    {".img", ".raw", ".bin", ".iso", ".dd", ".dsk", ".ima", ".image", ".disk", ".vfd", ".flp"}
)
# Names that are never disks when only raw claims them: notes, keys, checksums, configs and
# the companion files other products put next to their disks.
NON_DISK_EXTENSIONS = frozenset(
    {
        ".txt", ".md", ".rst", ".xml", ".json", ".yaml", ".yml", ".log", ".lck", ".lock",
        ".sha256", ".sha1", ".md5", ".sum", ".tsv", ".csv", ".key", ".pass", ".passphrase",
        ".sh", ".py", ".conf", ".cfg", ".ini", ".vmx", ".vmxf", ".vmsd", ".vmsn", ".vbox",
        ".vbox-prev", ".ovf", ".mf", ".nvram", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar",
        ".pid", ".url", ".html", ".pdf",
    }
)  # fmt: skip
SECTOR = 512
# A directory that is one disk, and the file inside it that the driver opens.
BUNDLE_DESCRIPTORS = {".hdd": "DiskDescriptor.xml"}


def looks_like_raw_disk(name: str, size: int) -> bool:
    ext = os.path.splitext(name)[1].lower()
    if ext in RAW_DISK_EXTENSIONS:
        return True
    if ext in NON_DISK_EXTENSIONS:
        return False
    return size > 0 and size % SECTOR == 0


@dataclass(slots=True)
class ImageEntry:
    """One exported disk as the directory scan found it."""

    name: str  # the exported name, NAME.raw
    path: str  # the image file (a bundle's descriptor)
    format: str
    virtual_size: int
    image_writable: bool  # the image file is writable and the driver can write
    st: os.stat_result  # the image file's stat, for owner, mode and times
    source_name: str = ""  # the entry in IMAGES_DIR (a file, or a bundle directory)
    # Why a writable image is exported read-only anyway (it is another disk's backing image).
    read_only_reason: str | None = None


@dataclass(slots=True)
class _Probed:
    format: str | None  # None: not a disk
    virtual_size: int
    supports_write: bool
    companions: tuple[str, ...]
    error: str | None
    backing_files: tuple[str, ...] = ()  # real paths of every image under this one


class DirectoryScanner:
    def __init__(
        self, root: str, containment: chain.Containment, protect_backing: bool = True
    ) -> None:
        self.root = os.path.abspath(root)
        self.containment = containment
        self.protect_backing = protect_backing
        self._cache: dict[str, tuple[tuple[int, int, int, int], _Probed]] = {}
        self._reported: set[tuple[str, str]] = set()
        self._lock_reported: dict[str, str] = {}  # image -> the lock conflict last logged
        # real path of a backing image -> the exported disk that uses it (from the last scan)
        self._backing_users: dict[str, str] = {}

    def scan(self) -> dict[str, ImageEntry]:
        """The disks in the directory now, by exported name."""
        found: list[tuple[str, os.stat_result, _Probed]] = []
        claimed: set[str] = set()
        try:
            names = sorted(os.listdir(self.root))
        except OSError as e:
            log.error("%s: cannot list the images directory: %s", self.root, e.strerror)
            return {}
        for name in names:
            examined = self._examine(name)
            if examined is not None:
                claimed.update(examined[1].companions)
                found.append((name, *examined))
        seen_paths = {self._image_path(name) for name, _, _ in found}
        for stale in set(self._cache) - seen_paths:
            del self._cache[stale]
        self._backing_users = {
            backing: name + EXPORT_SUFFIX
            for name, _, probed in found
            if probed.error is None
            for backing in probed.backing_files
        }
        entries: dict[str, ImageEntry] = {}
        for name, st, probed in found:
            if os.path.realpath(self._image_path(name)) in claimed:
                continue
            entry = self._entry(name, st, probed)
            if entry is not None:
                entries[entry.name] = entry
        return entries

    def refresh(self, name: str) -> ImageEntry | None:
        """One image file again (after imgfs changed it), without rescanning the directory."""
        examined = self._examine(name)
        return None if examined is None else self._entry(name, *examined)

    def _image_path(self, name: str) -> str:
        """The file to open for directory entry ``name``: itself, or a bundle's descriptor."""
        path = os.path.join(self.root, name)
        descriptor = BUNDLE_DESCRIPTORS.get(os.path.splitext(name)[1].lower())
        if descriptor is not None and os.path.isdir(path):
            return os.path.join(path, descriptor)
        return path

    def _examine(self, name: str) -> tuple[os.stat_result, _Probed] | None:
        """Stat and probe one directory entry (probe results cached); None if it is not a
        file that could be a disk."""
        if name.startswith("."):
            return None
        path = self._image_path(name)
        try:
            st = os.stat(path)
        except OSError:
            return None  # vanished, a dangling symlink, a bundle without its descriptor
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._cache.get(path)
        probed = cached[1] if cached and cached[0] == key else self._probe_safely(path, name, st)
        self._cache[path] = (key, probed)
        return st, probed

    def _entry(self, name: str, st: os.stat_result, probed: _Probed) -> ImageEntry | None:
        if probed.format is None:
            return None
        if probed.error is not None:
            self._report_once(name, probed.error)
            return None
        path = self._image_path(name)
        # A file with no write bit is read-only even for root, who could write it anyway:
        # chmod a-w is how people protect an image.
        writable = probed.supports_write and st.st_mode & 0o222 != 0 and os.access(path, os.W_OK)
        exported = name + EXPORT_SUFFIX
        reason = None
        refused, shared_only = self._lock_state(path, probed, writable)
        # Logged when it changes, so a VM that takes the image again is reported again.
        lock_message = refused or shared_only
        if self._lock_reported.get(name) != lock_message:
            if lock_message is None:
                del self._lock_reported[name]
                log.info("%s: no longer locked by another process", name)
            else:
                self._lock_reported[name] = lock_message
                if refused is not None:
                    log.error("%s: not exported: %s", name, refused)
                else:
                    log.info("%s: exported read-only: %s", name, shared_only)
        if refused is not None:
            return None
        if shared_only is not None:
            writable = False
            reason = shared_only
        user = self._backing_users.get(os.path.realpath(path))
        if writable and self.protect_backing and user is not None:
            writable = False
            reason = f"it is the backing image of {user} (--writable-backing allows writing it)"
            self._report_once(name, f"exported read-only: {reason}", level=logging.INFO)
        return ImageEntry(
            exported, path, probed.format, probed.virtual_size, writable, st, name, reason
        )

    def _lock_state(
        self, path: str, probed: _Probed, writable: bool
    ) -> tuple[str | None, str | None]:
        """QEMU-style image locks of other processes (see imgfs.block.locking), tested now and
        never cached: (why the image cannot be opened at all, e.g. a VM has it open for
        writing; or why it can only be read, e.g. a qemu-io -r reads it)."""
        files = [path, *probed.companions]
        for file in (*files, *probed.backing_files):
            problem = locking.test(file, writable=False)
            if problem is not None:
                return f"{file}: {problem}: another process has it open for writing", None
        if writable:
            for file in files:
                problem = locking.test(file, writable=True)
                if problem is not None:
                    return None, f"another process uses {file} without sharing writes ({problem})"
        return None, None

    def _report_once(self, name: str, message: str, level: int = logging.ERROR) -> None:
        if (name, message) not in self._reported:
            self._reported.add((name, message))
            if level == logging.ERROR:
                message = f"not exported: {message}"
            log.log(level, "%s: %s", name, message)

    def _probe_safely(self, path: str, name: str, st: os.stat_result) -> _Probed:
        try:
            return self._probe(path, name, st)
        except Exception as e:  # a driver bug must not take the whole directory down
            log.exception("%s: unexpected error while probing", name)
            return _Probed("?", 0, False, (), f"unexpected error: {e!r}")

    def _probe(self, path: str, name: str, st: os.stat_result) -> _Probed:
        try:
            self.containment.check(path, "image", self.root)
            driver_cls = registry.probe_file(path)
        except ImgfsError as e:
            return _Probed("?", 0, False, (), str(e))
        fmt = driver_cls.format_name
        if fmt == "raw" and not looks_like_raw_disk(name, st.st_size):
            return _Probed(None, 0, False, (), None)
        companions = tuple(
            os.path.realpath(chain.resolve_relative(c, path))
            for c in driver_cls.companion_files(path)
        )
        if fmt == "raw":
            return _Probed(fmt, st.st_size, True, companions, None)
        try:
            # No image locks for a probe: they would conflict with this process's own opens of
            # the image; other programs' locks are tested on every scan (_lock_state).
            top = chain.open_chain(
                path,
                fmt,
                read_only=True,
                cache=CacheMode.WRITEBACK,
                containment=self.containment,
                locking=False,
            )
        except ImgfsError as e:
            return _Probed(fmt, 0, False, companions, str(e))
        try:
            backing = tuple(os.path.realpath(n.file.path) for n in list(chain.layers(top))[1:])
            return _Probed(
                fmt, top.virtual_size, driver_cls.supports_write, companions, None, backing
            )
        finally:
            chain.close_chain(top)
