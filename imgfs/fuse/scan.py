"""Which files in IMAGES_DIR are disks, under which names, with what size and permissions.

Every regular file is probed. A file that a real format claims is a disk; the files that such a
disk owns (extents, external data files) are not. A file that only raw claims is a disk when its
name or size says so (see :func:`looks_like_raw_disk`), so that README.txt or a key file next to
the images is not exported as a disk. Probe results are cached by (device, inode, size, mtime).

A disk that another disk in the directory uses as its backing image is exported read-only
(unless the mount says otherwise): writing a base image silently corrupts every overlay on it.
A Parallels Desktop bundle (a ``NAME.hdd`` directory holding ``DiskDescriptor.xml``) is one disk,
opened through its descriptor. A ``NAME.url`` file holds the URL of a remote image (its first
line that is neither blank nor a ``#`` comment) and exports ``NAME.raw``, read-only: the remote
object is probed once per change of the ``.url`` file, not on every scan.

Each internal snapshot of a disk (qcow2) is exported read-only beside it as
``NAME@SNAPSHOT.raw``, or ``NAME@ID.raw`` when the snapshot's name is not a usable file name
(empty, holding ``/`` or NUL, too long, or shared with another snapshot of the disk).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from imgfs import remote
from imgfs.block import chain, locking, registry
from imgfs.block.driver import BlockDriver, SnapshotInfo
from imgfs.block.hostfile import CacheMode
from imgfs.errors import ImgfsError
from imgfs.keys import KeyRing

log = logging.getLogger(__name__)

EXPORT_SUFFIX = ".raw"
SNAPSHOT_SEPARATOR = "@"
NAME_MAX = 255

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
# A directory exported as a FAT32 disk: NAME.vvfat exports NAME.vvfat.raw.
VVFAT_SUFFIX = ".vvfat"
# Cache keys of the disks named on the command line (not directory entries).
EXTRA_KEY = "\0extra:"
# A file naming a remote image: NAME.url exports NAME.raw.
URL_SUFFIX = ".url"
MAX_URL_FILE = 64 * 1024


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
    snapshot: str | None = None  # the id of the internal snapshot this export shows


@dataclass(slots=True)
class _Probed:
    format: str | None  # None: not a disk
    virtual_size: int
    supports_write: bool
    companions: tuple[str, ...]
    error: str | None
    backing_files: tuple[str, ...] = ()  # real paths of every image under this one
    snapshots: tuple[SnapshotInfo, ...] = ()
    url: str | None = None  # a NAME.url file's URL: what the disk opens


class DirectoryScanner:
    def __init__(
        self,
        root: str,
        containment: chain.Containment,
        protect_backing: bool = True,
        driver_options: Mapping[str, str] | None = None,
        extra_images: Mapping[str, str] | None = None,
        keys: KeyRing | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        # NAME -> URL or directory given on the command line (--url, --vvfat): NAME.raw
        self.extra_images = dict(extra_images or {})
        # -o options: remote images need theirs (ca-file, timeouts) to be probed at all
        self.driver_options = dict(driver_options or {})
        self.containment = containment
        self.protect_backing = protect_backing
        self.keys = keys
        self._cache: dict[str, tuple[tuple[object, ...], _Probed]] = {}
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
        seen_paths.update(EXTRA_KEY + name for name in self.extra_images)
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
            if entry is not None and entry.name in entries:  # disk.qcow2 and disk.qcow2.url
                self._report_once(name, f"{entry.name} is {entries[entry.name].source_name}")
            elif entry is not None:
                entries[entry.name] = entry
                for snap in self._snapshot_entries(entry, probed):
                    entries.setdefault(snap.name, snap)
        for name, target in self.extra_images.items():
            entry = self._extra_entry(name, target)
            if entry is not None and entry.name in entries:
                self._report_once(name, f"{entry.name} is {entries[entry.name].source_name}")
            elif entry is not None:
                entries[entry.name] = entry
        return entries

    def _extra_entry(self, name: str, target: str) -> ImageEntry | None:
        """A disk named on the command line: a URL (owner and times from IMAGES_DIR) or a
        directory exported as vvfat. Probed once per change of what its stat says."""
        is_url = remote.is_url(target)
        try:
            st = os.stat(self.root if is_url else target)
        except OSError as e:
            self._report_once(name, f"{target}: {e.strerror}")
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._cache.get(EXTRA_KEY + name)
        if cached and cached[0] == key:
            probed = cached[1]
        else:
            probed = self._probe_extra(target, is_url)
            self._cache[EXTRA_KEY + name] = (key, probed)
        if probed.error is not None:
            self._report_once(name, probed.error)
            return None
        path = target if is_url else os.path.abspath(target)
        return ImageEntry(
            name + EXPORT_SUFFIX, path, probed.format, probed.virtual_size, False, st, name
        )

    def _probe_extra(self, target: str, is_url: bool) -> _Probed:
        if is_url:
            return self._probe_remote(target)
        try:  # the user named this directory: no containment for it
            top = chain.open_chain(target, "vvfat", read_only=True)
        except ImgfsError as e:
            return _Probed("?", 0, False, (), str(e))
        try:
            return _Probed(top.format_name, top.virtual_size, False, (), None, url=target)
        finally:
            chain.close_chain(top)

    def _snapshot_entries(self, entry: ImageEntry, probed: _Probed) -> list[ImageEntry]:
        """Read-only exports of the image's internal snapshots."""
        out: list[ImageEntry] = []
        names = [s.name for s in probed.snapshots]
        base = entry.source_name + SNAPSHOT_SEPARATOR
        for snap in probed.snapshots:
            label = snap.name
            exported = base + label + EXPORT_SUFFIX
            problem = None
            if not label or "/" in label or "\0" in label:
                problem = "is not a usable file name"
            elif names.count(label) > 1:
                problem = "is shared by several snapshots"
            elif len(os.fsencode(exported)) > NAME_MAX:
                problem = "is too long for a file name"
            if problem is not None:
                exported = base + snap.id + EXPORT_SUFFIX
                if "/" in snap.id or "\0" in snap.id or len(os.fsencode(exported)) > NAME_MAX:
                    self._report_once(entry.source_name, f"snapshot {snap.id!r} not exported: "
                                      "neither its name nor its id is a usable file name",
                                      level=logging.WARNING)  # fmt: skip
                    continue
                self._report_once(
                    entry.source_name,
                    f"snapshot name {label!r} {problem}: exported by its id as {exported}",
                    level=logging.INFO,
                )
            out.append(
                ImageEntry(exported, entry.path, entry.format, snap.virtual_size, False, entry.st,
                           entry.source_name, "it is an internal snapshot", snap.id)
            )  # fmt: skip
        return out

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
        is_vvfat = stat.S_ISDIR(st.st_mode) and name.endswith(VVFAT_SUFFIX)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode) or is_vvfat):
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, self._key_stamp(path))
        cached = self._cache.get(path)
        probed = cached[1] if cached and cached[0] == key else self._probe_safely(path, name, st)
        self._cache[path] = (key, probed)
        return st, probed

    def _key_stamp(self, path: str) -> tuple[int, int] | None:
        """When the image's key file was last changed: a key added or fixed while mounted
        makes the image probe again (and appear)."""
        key_file = self.keys.key_file(path) if self.keys is not None else None
        if key_file is None:
            return None
        try:
            st = os.stat(key_file)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns)

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
        if probed.url is not None:  # writable when the .url file is and the server allows it
            path = probed.url
            exported = name.removesuffix(URL_SUFFIX) + EXPORT_SUFFIX
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
        if name.endswith(URL_SUFFIX):
            return self._probe_url(path)
        if name.endswith(VVFAT_SUFFIX) and stat.S_ISDIR(st.st_mode):
            return self._probe_vvfat(path)
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
                keys=self.keys,
                locking=False,
            )
        except ImgfsError as e:
            return _Probed(fmt, 0, False, companions, str(e))
        try:
            backing = tuple(
                os.path.realpath(n.file.path)
                for n in list(chain.layers(top))[1:]
                if not remote.is_url(n.file.path)
            )
            return _Probed(
                fmt, top.virtual_size, driver_cls.supports_write, companions, None, backing,
                tuple(top.snapshots()),
            )  # fmt: skip
        finally:
            chain.close_chain(top)

    def _probe_vvfat(self, path: str) -> _Probed:
        """A ``NAME.vvfat`` directory: its FAT32 layout (the tree is walked once per change of
        the directory's own mtime; the disk itself scans again when it opens)."""
        try:
            self.containment.check(path, "image", self.root)
            top = chain.open_chain(path, "vvfat", read_only=True, containment=self.containment)
        except ImgfsError as e:
            return _Probed("?", 0, False, (), str(e))
        try:
            return _Probed(top.format_name, top.virtual_size, False, (), None)
        finally:
            chain.close_chain(top)

    def _probe_url(self, path: str) -> _Probed:
        """A ``NAME.url`` file: open the remote image it names (and its chain) once."""
        try:
            url = read_url_file(path)
        except ImgfsError as e:
            return _Probed("?", 0, False, (), str(e))
        return self._probe_remote(url)

    def _probe_remote(self, url: str) -> _Probed:
        """The remote image at ``url`` (a .url file's or --url's) and its chain, opened once."""
        try:
            top = chain.open_chain(
                url,
                None,
                read_only=True,
                cache=CacheMode.WRITEBACK,
                containment=self.containment,
                driver_options=self.driver_options,
                keys=self.keys,
            )
        except ImgfsError as e:
            return _Probed("?", 0, False, (), str(e))
        try:
            return _Probed(
                top.format_name, top.virtual_size, _remote_writable(top), (), None, url=url
            )
        finally:
            chain.close_chain(top)


def _remote_writable(top: BlockDriver) -> bool:
    """A remote image can be exported writable: its driver writes and its server (an NBD
    export not marked read-only) accepts writes. HTTP never does."""
    return type(top).supports_write and getattr(top.file, "server_allows_write", False)


def read_url_file(path: str) -> str:
    """The URL a ``NAME.url`` file holds: its first line that is not blank or a # comment."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_URL_FILE).decode("utf-8", "replace")
    except OSError as e:
        raise ImgfsError(f"cannot read: {e.strerror}") from None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            if not remote.is_url(line):
                schemes = ", ".join(sorted(remote.SCHEMES))
                raise ImgfsError(f"{line!r} is not a URL of a known scheme ({schemes})")
            return line
    raise ImgfsError("holds no URL")
