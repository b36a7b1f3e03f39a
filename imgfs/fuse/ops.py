"""pyfuse3 operations: map exported files to Disks. No format knowledge lives here.

Routing of requests (measured on this 2-core machine: a trio thread hop costs ~120 us, a 16 KiB
read served inline ~50 us):

* reads of buffered images run inline on the trio thread with RWF_NOWAIT; a read that would
  wait for the disk (cold page cache) is retried on the worker pool, so it stalls nobody;
* writes of buffered, write-back images run inline (they end in the host page cache);
* O_DIRECT I/O, writethrough writes, fsync, opens and closes go to the worker pool
  (``--aio-threads``), since they wait for the device.

Every handler raises only FUSEError. An ImgfsError maps to its errno; anything else is a bug in
a driver, logged with the image name, and the request gets EIO while the mount stays up.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from imgfs.block import chain, holes
from imgfs.block.disk import Disk, open_disk
from imgfs.block.hostfile import CacheMode, WouldBlock, call_nowait
from imgfs.errors import ImgfsError
from imgfs.fuse.scan import DirectoryScanner, ImageEntry
from imgfs.keys import KeyRing

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

ROOT = pyfuse3.ROOT_INODE
# How long the kernel may cache names and attributes. Short, so images added or removed in
# IMAGES_DIR show up quickly; long enough that a busy VM does not cause a lookup per request.
ENTRY_TIMEOUT = 1.0
# A readdir or lookup rescans the directory at most this often.
RESCAN_INTERVAL = 0.5
PID_XATTR = b"user.imgfs.pid"
# pyfuse3 calls fallocate/lseek handlers only with third_party/pyfuse3's patch (or a release
# that has them); on another pyfuse3 the kernel gets ENOSYS and falls back (see mount.py).
PYFUSE3_HAS_HOLES = hasattr(pyfuse3.Operations, "fallocate") and hasattr(
    pyfuse3.Operations, "lseek"
)


@dataclass
class MountOptions:
    cache: CacheMode = CacheMode.WRITEBACK
    read_only: bool = False
    kernel_cache: bool = False
    aio_threads: int = 4
    allow_external_files: bool = False
    # Let base images that other disks in the directory build on be written.
    writable_backing: bool = False
    # Format run-time options (-o KEY=VALUE that a driver names, e.g. l2-cache-size).
    driver_options: dict[str, str] = field(default_factory=dict)
    # QEMU's detect-zeroes and discard (imgfs.block.holes); SEEK_DATA/SEEK_HOLE answers.
    detect_zeroes: holes.DetectZeroes = holes.DetectZeroes.OFF
    discard: holes.DiscardMode = holes.DiscardMode.UNMAP
    seek_holes: bool = True
    # Passphrases of encrypted images (--key NAME=FILE, --key-dir DIR).
    keys: KeyRing | None = None
    # Disks named on the command line: NAME -> URL (--url) or directory (--vvfat).
    extra_images: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class OpenImage:
    """A Disk shared by every open handle of one exported file."""

    entry: ImageEntry
    disk: Disk
    handles: int = 0


@dataclass(eq=False)
class Node:
    """An exported file's inode: stable for the life of the mount."""

    inode: int
    entry: ImageEntry
    open_image: OpenImage | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)


def fuse_errors(
    image_of: Callable[..., str],
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Turn every exception of a handler into a FUSEError, logging the unexpected ones."""

    def wrap(handler: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(handler)
        async def run(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await handler(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except ImgfsError as e:
                log.warning("%s: %s: %s", image_of(*args), handler.__name__, e)
                raise pyfuse3.FUSEError(e.errno) from None
            except OSError as e:
                log.warning("%s: %s: %s", image_of(*args), handler.__name__, e)
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            except Exception:
                log.exception("%s: unexpected error in %s", image_of(*args), handler.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return run

    return wrap


class ImageFS(pyfuse3.Operations):
    enable_writeback_cache = False  # the guest's flush semantics need every write to reach us

    def __init__(self, images_dir: str, options: MountOptions) -> None:
        super().__init__()
        self.images_dir = os.path.abspath(images_dir)
        self.options = options
        self.containment = chain.Containment(
            None if options.allow_external_files else self.images_dir
        )
        self.scanner = DirectoryScanner(
            self.images_dir,
            self.containment,
            protect_backing=not options.writable_backing,
            keys=options.keys,
            driver_options=options.driver_options,
            extra_images=options.extra_images,
        )
        self.limiter = trio.CapacityLimiter(max(1, options.aio_threads))
        self.nodes: dict[str, Node] = {}  # by exported name
        self.by_inode: dict[int, Node] = {}
        self.handles: dict[int, OpenImage] = {}
        self._next_inode = ROOT + 1
        self._next_fh = 1
        self._last_scan = 0.0
        # Read once (logging is set up before the mount) so the hot path tests a plain bool.
        self.debug = log.isEnabledFor(logging.DEBUG)
        self._scan_lock = trio.Lock()
        self._apply_scan(self.scanner.scan())  # before the loop starts: may block

    # -- helpers --------------------------------------------------------------------------------

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def rescan(self, force: bool = False) -> None:
        """Rescan IMAGES_DIR (at most every RESCAN_INTERVAL unless forced). Probing and opening
        new images blocks, so the scan runs on a worker thread, one at a time."""
        if not force and time.monotonic() - self._last_scan < RESCAN_INTERVAL:
            return
        async with self._scan_lock:
            self._last_scan = time.monotonic()
            self._apply_scan(await self.in_thread(self.scanner.scan))

    async def _refresh(self, node: Node) -> None:
        """Re-read one closed image's size, times and mode after imgfs changed it (a full rescan
        per close would cost a directory scan on every last release)."""
        if node.entry.snapshot is not None:
            return  # a read-only snapshot export: nothing changed
        async with self._scan_lock:
            entry = await self.in_thread(self.scanner.refresh, node.entry.source_name)
        if entry is not None and node.open_image is None:
            node.entry = entry

    def _apply_scan(self, entries: dict[str, ImageEntry]) -> None:
        for name, entry in entries.items():
            node = self.nodes.get(name)
            if node is None:
                node = Node(self._next_inode, entry)
                self._next_inode += 1
                self.nodes[name] = node
                self.by_inode[node.inode] = node
            elif node.open_image is None:
                node.entry = entry
        for name in list(self.nodes):
            node = self.nodes[name]
            if name not in entries and node.open_image is None:
                del self.nodes[name]
                del self.by_inode[node.inode]

    def _inode_name(self, inode: int) -> str:
        node = self.by_inode.get(inode)
        return node.entry.name if node is not None else "imgfs"

    def _fh_name(self, fh: int) -> str:
        image = self.handles.get(fh)
        return image.entry.name if image is not None else "imgfs"

    def writable(self, entry: ImageEntry) -> bool:
        return entry.image_writable and not self.options.read_only

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        entry = node.entry
        st = entry.st
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ENTRY_TIMEOUT
        mode = stat.S_IMODE(st.st_mode) & 0o666
        if not self.writable(entry):
            mode &= ~0o222
        attr.st_mode = stat.S_IFREG | mode
        attr.st_nlink = 1
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = 0
        if node.open_image is not None:
            attr.st_size = node.open_image.disk.size
        else:
            attr.st_size = entry.virtual_size
        attr.st_blksize = 4096
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def root_attributes(self) -> pyfuse3.EntryAttributes:
        st = os.stat(self.images_dir)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ROOT
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ENTRY_TIMEOUT
        attr.st_mode = stat.S_IFDIR | (stat.S_IMODE(st.st_mode) & 0o555)
        attr.st_nlink = 2
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_size = 0
        attr.st_blksize = 4096
        attr.st_blocks = 0
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def node(self, inode: int) -> Node:
        try:
            return self.by_inode[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def image(self, fh: int) -> OpenImage:
        try:
            return self.handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    # -- directory ------------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        text = os.fsdecode(name)
        if text == ".":
            return self.root_attributes()
        if text not in self.nodes:
            await self.rescan()  # a new image may have appeared; rate-limited
        node = self.nodes.get(text)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attributes(node)

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self.root_attributes()
        return self.attributes(self.node(inode))

    @fuse_errors(lambda self, inode, *a, **k: self._inode_name(inode))
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self.node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)  # owner and mode follow the image file
        if fields.update_size:
            if not self.writable(node.entry):
                raise pyfuse3.FUSEError(errno.EROFS if self.options.read_only else errno.EACCES)
            await self._resize(node, attr.st_size)
        # atime/mtime updates (touch) are accepted and ignored: times follow the image file.
        return self.attributes(node)

    async def _resize(self, node: Node, size: int) -> None:
        async with node.lock:
            if node.open_image is not None:
                disk = node.open_image.disk
                await self.in_thread(disk.resize, size)
                return
            disk = await self._open_disk(node.entry, writable=True)
            try:
                await self.in_thread(disk.resize, size)
            finally:
                await self.in_thread(disk.close)
            await self._refresh(node)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            await self.rescan()
        names = sorted(self.nodes)
        for index in range(start_id, len(names)):
            node = self.nodes[names[index]]
            if not pyfuse3.readdir_reply(
                token, os.fsencode(names[index]), self.attributes(node), index + 1
            ):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.images_dir)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = 255
        return out

    # -- extended attributes: a small window on the mount for tools ------------------------------

    def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        if inode == ROOT:
            return {
                PID_XATTR: str(os.getpid()).encode(),
                b"user.imgfs.images_dir": os.fsencode(self.images_dir),
                b"user.imgfs.cache": self.options.cache.value.encode(),
            }
        entry = self.node(inode).entry
        return {
            b"user.imgfs.image": os.fsencode(entry.path),
            b"user.imgfs.format": entry.format.encode(),
        }

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return self._xattrs(inode)[name]
        except KeyError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self._xattrs(inode))

    # -- files ----------------------------------------------------------------------------------

    async def _open_disk(self, entry: ImageEntry, writable: bool) -> Disk:
        disk = await self.in_thread(
            functools.partial(
                open_disk,
                entry.path,
                None,  # probe again: a probed raw image keeps its guard against format changes
                read_only=not writable,
                cache=self.options.cache,
                containment=self.containment,
                driver_options=self.options.driver_options,
                snapshot=entry.snapshot,
                keys=self.options.keys,
                # A snapshot view shares writing (qemu-img -U): writes to the active image copy
                # shared clusters first, so they never change what the view reads.
                force_share=entry.snapshot is not None,
            )
        )
        disk.detect_zeroes = self.options.detect_zeroes
        disk.discard_mode = self.options.discard
        return disk

    @fuse_errors(lambda self, inode, *a, **k: self._inode_name(inode))
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.node(inode)
        wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY
        writable = self.writable(node.entry)
        if wants_write and not writable:
            raise pyfuse3.FUSEError(errno.EROFS if self.options.read_only else errno.EACCES)
        # O_TRUNC is ignored, as a block device ignores it: `dd of=` and `cp` onto an exported
        # disk overwrite its start and keep its size (libfuse's atomic_o_trunc passes the flag
        # here instead of a setattr to size 0). An explicit truncate(1) still resizes.
        async with node.lock:
            image = node.open_image
            if image is None:
                # Writable images open read-write even for a reader, so that a writer arriving
                # later shares the same Disk (one cache, one set of flush generations).
                disk = await self._open_disk(node.entry, writable)
                image = node.open_image = OpenImage(node.entry, disk)
                log.info(
                    "%s: opened (%s, %s)",
                    node.entry.name,
                    node.entry.format,
                    "read-write" if not disk.read_only else "read-only",
                )
            image.handles += 1
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = image
        direct = not self.options.kernel_cache
        return pyfuse3.FileInfo(fh=fh, direct_io=direct, keep_cache=not direct)

    @fuse_errors(lambda self, fh, *a, **k: self._fh_name(fh))
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        disk = self.image(fh).disk
        if self.debug:
            log.debug("%s: read %d+%d", disk.name, off, size)
        if not disk.reads_may_block:
            try:
                return call_nowait(disk.read, off, size)
            except WouldBlock:
                pass
        return await self.in_thread(disk.read, off, size)

    @fuse_errors(lambda self, fh, *a, **k: self._fh_name(fh))
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        disk = self.image(fh).disk
        if self.debug:
            log.debug("%s: write %d+%d", disk.name, off, len(buf))
        if disk.writes_may_block:
            return await self.in_thread(disk.write, off, buf)
        return disk.write(off, buf)

    async def flush(self, fh: int) -> None:
        # close(2) of one descriptor: no durability promise (fsync is the guest's flush). The
        # image is flushed when its last handle is released and at unmount.
        self.image(fh)

    @fuse_errors(lambda self, fh, *a, **k: self._fh_name(fh))
    async def fsync(self, fh: int, datasync: bool) -> None:
        disk = self.image(fh).disk
        if self.debug:
            log.debug("%s: fsync", disk.name)
        if disk.flush_pending:  # otherwise nothing to sync: spare the thread hop
            await self.in_thread(disk.flush)

    @fuse_errors(lambda self, fh, *a, **k: self._fh_name(fh))
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """Punch holes and zero ranges (imgfs.block.holes.fallocate). Needs a pyfuse3 with
        fallocate support; otherwise the kernel answers EOPNOTSUPP itself."""
        disk = self.image(fh).disk
        if self.debug:
            log.debug("%s: fallocate mode %#x %d+%d", disk.name, mode, offset, length)
        await self.in_thread(holes.fallocate, disk, mode, offset, length)

    @fuse_errors(lambda self, fh, *a, **k: self._fh_name(fh))
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE from the chain's block status. ENOSYS (the kernel then treats
        the whole file as data from now on) when the mount was told not to report holes."""
        if not self.options.seek_holes:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        disk = self.image(fh).disk
        if whence == os.SEEK_DATA:
            find = holes.seek_data
        elif whence == os.SEEK_HOLE:
            find = holes.seek_hole
        else:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            found = holes.seek_cached(disk, offset, whence)
            if found is None:
                found = await self.in_thread(find, disk, offset)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset: an answer, not a failure
                raise pyfuse3.FUSEError(errno.ENXIO) from None
            raise
        if self.debug:
            log.debug("%s: lseek %d whence %d -> %d", disk.name, offset, whence, found)
        return found

    @fuse_errors(lambda self, fh, *a, **k: self._fh_name(fh))
    async def release(self, fh: int) -> None:
        image = self.handles.pop(fh, None)
        if image is None:
            return
        node = self.nodes.get(image.entry.name)
        lock = node.lock if node is not None and node.open_image is image else trio.Lock()
        async with lock:
            image.handles -= 1
            if image.handles > 0:
                return
            if node is not None and node.open_image is image:
                node.open_image = None
            await self.in_thread(image.disk.close)
            log.info("%s: closed", image.entry.name)
            if node is not None:
                await self._refresh(node)

    # -- shutdown -------------------------------------------------------------------------------

    def close_all(self) -> int:
        """Flush and close every open image (at unmount). Returns the number that failed."""
        failed = 0
        images = {id(i): i for i in self.handles.values()}
        for node in self.nodes.values():
            if node.open_image is not None:
                images[id(node.open_image)] = node.open_image
        for image in images.values():
            try:
                image.disk.close()
                log.info("%s: flushed and closed", image.entry.name)
            except Exception:
                failed += 1
                log.exception("%s: flush at unmount failed", image.entry.name)
        self.handles.clear()
        for node in self.nodes.values():
            node.open_image = None
        return failed
