"""Mount and unmount: checks, the trio main loop, signals and clean shutdown.

Shutdown order, whatever starts it (SIGINT/SIGTERM, ``imgfs umount``, ``fusermount3 -u``): the
request loop stops, every open image is flushed and closed, then the mount is removed and the
process exits. ``imgfs umount`` waits for that exit, so when it returns the images are durable.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable

import pyfuse3
import trio

from imgfs.errors import UsageError
from imgfs.fuse.ops import PID_XATTR, PYFUSE3_HAS_HOLES, ImageFS, MountOptions

log = logging.getLogger(__name__)

FSTYPE = "fuse.imgfs"


def mount_table() -> list[tuple[str, str]]:
    """(mountpoint, fstype) for every mount this process sees."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                point = fields[4].encode().decode("unicode_escape")
                out.append((point, right.split()[0]))
    return out


def check_images_dir(images_dir: str) -> str:
    path = os.path.abspath(images_dir)
    if not os.path.isdir(path):
        raise UsageError(f"images directory {images_dir} does not exist or is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"images directory {images_dir} is not readable")
    return path


def check_mountpoint(mountpoint: str) -> str:
    path = os.path.abspath(mountpoint)
    if not os.path.exists(path):
        raise UsageError(f"mountpoint {mountpoint} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(path) or any(point == path for point, _ in mount_table()):
        raise UsageError(f"mountpoint {mountpoint} is busy: something is already mounted there")
    return path


def check_direct_io(images_dir: str) -> None:
    """cache=none/directsync need O_DIRECT: fail the mount now, in one line, if the file system
    holding the images refuses it (tried on the first regular file found)."""
    for entry in os.scandir(images_dir):
        if entry.is_file() and not entry.name.startswith("."):
            try:
                os.close(os.open(entry.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
            except OSError as e:
                if e.errno == errno.EINVAL:
                    raise UsageError(
                        f"the file system holding {images_dir} does not support O_DIRECT, "
                        "which --cache none and directsync need; use --cache writeback "
                        "or writethrough"
                    ) from None
                continue
            return


def fuse_options(images_dir: str, read_only: bool, allow_other: bool, extra: list[str]) -> set[str]:
    """The libfuse mount options. ``extra`` (from -o) wins over ours for the same key."""
    opts: dict[str, str] = {o.split("=", 1)[0]: o for o in pyfuse3.default_options}
    # default_permissions (from pyfuse3's defaults): the kernel checks owner and mode.
    opts["fsname"] = "fsname=" + images_dir.replace(",", "_").replace(" ", "_")
    opts["subtype"] = "subtype=imgfs"
    if read_only:
        opts["ro"] = "ro"
    if allow_other:
        opts["allow_other"] = "allow_other"
    for item in extra:
        for option in item.split(","):
            if option:
                opts[option.split("=", 1)[0]] = option
    return set(opts.values())


async def _serve(fs: ImageFS) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s received: flushing images and unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_request_buffers_in_heap() -> None:
    """Let freed request-sized buffers (up to 8 MiB) be reused from the heap instead of being
    mmapped and unmapped for every request: with glibc's defaults, decrypting or decompressing
    1 MiB requests spends a quarter of its CPU on page faults of fresh mappings. The heap may
    then keep up to 64 MiB free before returning it to the system (measured in
    bench/RESULTS-crypto.md)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 8 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):  # not glibc: keep its defaults
        pass


def serve(
    images_dir: str,
    mountpoint: str,
    options: MountOptions,
    *,
    allow_other: bool = False,
    extra_options: list[str] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Mount and serve until unmounted or signalled. Returns the exit status."""
    images_dir = check_images_dir(images_dir)
    mountpoint = check_mountpoint(mountpoint)
    keep_request_buffers_in_heap()
    fs = ImageFS(images_dir, options)
    opts = fuse_options(images_dir, options.read_only, allow_other, extra_options or [])
    try:
        pyfuse3.init(fs, mountpoint, opts)
    except RuntimeError as e:
        raise UsageError(f"cannot mount on {mountpoint}: {e}") from None
    log.info(
        "mounted %s on %s (cache=%s%s, %d images)",
        images_dir,
        mountpoint,
        options.cache.value,
        ", read-only" if options.read_only else "",
        len(fs.nodes),
    )
    if not PYFUSE3_HAS_HOLES:
        log.info(
            "this pyfuse3 has no fallocate/lseek handlers: hole punching and SEEK_DATA/SEEK_HOLE "
            "are unsupported on the exported files (see third_party/pyfuse3)"
        )
    if on_ready is not None:
        on_ready()
    failed = 0
    try:
        trio.run(_serve, fs)
    finally:
        failed = fs.close_all()
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)
    return 1 if failed else 0


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")  # an exited daemon nobody reaped is as good as gone


def unmount(mountpoint: str, timeout: float | None = None) -> None:
    """Unmount an imgfs mount and wait until its daemon has flushed and exited."""
    path = os.path.abspath(mountpoint)
    types = [fstype for point, fstype in mount_table() if point == path]
    if not types:
        raise UsageError(f"{mountpoint} is not mounted")
    if types[-1] != FSTYPE:
        raise UsageError(f"{mountpoint} is not an imgfs mount (it is {types[-1]})")
    try:
        pid: int | None = int(os.getxattr(path, PID_XATTR))
    except (OSError, ValueError):
        pid = None  # the daemon is gone (ENOTCONN): only the stale mount is left
    result = subprocess.run(
        ["fusermount3", "-u", path], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        reason = reason.rpartition(": ")[2]
        if "busy" in reason:
            reason += " (a process still uses the mount; see fuser -m)"
        raise UsageError(f"cannot unmount {mountpoint}: {reason}")
    if pid is None or pid == os.getpid():
        return
    start = time.monotonic()
    warned = False
    while not _process_gone(pid):
        waited = time.monotonic() - start
        if timeout is not None and waited > timeout:
            raise UsageError(f"imgfs (pid {pid}) did not exit within {timeout:.0f} s")
        if waited > 5 and not warned:
            log.warning("waiting for imgfs (pid %d) to flush its images", pid)
            warned = True
        time.sleep(0.02)
