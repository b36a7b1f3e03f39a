"""The imgfs command line: mount, umount, info, check, create, convert, replay, trace import.

Errors are one line on stderr (``imgfs: error: ...``) with exit status 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imgfs import __version__, cmd_map
from imgfs.block import chain, holes
from imgfs.block.chain import image_containment
from imgfs.block.disk import open_disk
from imgfs.block.driver import CheckResult, ImageInfo, RepairMode
from imgfs.block.hostfile import CacheMode
from imgfs.cmd_keys import (
    add_create_key_option,
    add_image_key_option,
    add_key_options,
    image_keys,
    print_locked_info,
)
from imgfs.cmd_options import add_directory_options
from imgfs.cmd_serve import add_parser as add_serve_subcommand
from imgfs.cmd_snapshot import add_parser as add_snapshot_parser
from imgfs.dedup import command as cmd_dedup
from imgfs.emulation.cli import add_subcommands as add_emulation_subcommands
from imgfs.errors import ImgfsError, NeedsKey, Unsupported, UsageError
from imgfs.keys import KeyRing

if TYPE_CHECKING:
    from imgfs.fuse.ops import MountOptions

log = logging.getLogger("imgfs")


def default_log_path(mountpoint: str) -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    name = os.path.abspath(mountpoint).strip("/").replace("/", "_") or "root"
    return os.path.join(state, "imgfs", name + ".log")


def setup_logging(*, to_stderr: bool, log_file: str | None, debug: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if to_stderr:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("imgfs: %(message)s"))
        root.addHandler(handler)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
        )
        root.addHandler(handler)


# -- mount / umount ---------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    # The FUSE modules (pyfuse3, trio) load only for mount/umount: info and check start faster.
    from imgfs.fuse.mount import check_direct_io, check_images_dir, check_mountpoint, serve
    from imgfs.fuse.ops import MountOptions

    fuse_opts, driver_opts = split_mount_options(args.o or [])
    detect_zeroes, discard, seek_holes = holes.mount_policy(
        args.detect_zeroes, args.discard, False if args.no_seek_holes else None, driver_opts
    )
    options = MountOptions(
        cache=CacheMode(args.cache),
        read_only=args.read_only,
        kernel_cache=args.kernel_cache,
        aio_threads=args.aio_threads,
        allow_external_files=args.allow_external_files,
        writable_backing=args.writable_backing,
        driver_options=driver_opts,
        detect_zeroes=detect_zeroes,
        discard=discard,
        seek_holes=seek_holes,
        keys=KeyRing.from_args(args.key or [], args.key_dir),
        extra_images=extra_images(args),
    )
    log_file = args.log or default_log_path(args.mountpoint)
    # Check before forking so that the common mistakes are reported by this process.
    check_images_dir(args.images_dir)
    check_mountpoint(args.mountpoint)
    if options.cache.direct:
        check_direct_io(args.images_dir)
    kwargs = dict(allow_other=args.allow_other, extra_options=fuse_opts)
    if args.foreground:
        setup_logging(to_stderr=True, log_file=log_file, debug=args.debug)
        return serve(args.images_dir, args.mountpoint, options, **kwargs)
    return _mount_in_background(args, options, log_file, kwargs)


def extra_images(args: argparse.Namespace) -> dict[str, str]:
    """``--url NAME=URL`` and ``--vvfat NAME=DIR``: disks exported as NAME.raw besides the
    images in IMAGES_DIR."""
    from imgfs import remote

    out: dict[str, str] = {}
    for flag, items in (("--url", args.url or []), ("--vvfat", args.vvfat or [])):
        for item in items:
            name, sep, target = item.partition("=")
            if not sep or not name or "/" in name or name.startswith("."):
                raise UsageError(f"{flag} {item!r}: expected NAME=TARGET, NAME a file name")
            if flag == "--url" and not remote.is_url(target):
                raise UsageError(f"{flag} {item!r}: {target!r} is not a URL imgfs can open")
            if flag == "--vvfat" and not os.path.isdir(target):
                raise UsageError(f"{flag} {item!r}: {target!r} is not a directory")
            if name in out:
                raise UsageError(f"{flag} {item!r}: {name} is named twice")
            out[name] = target
    return out


def split_mount_options(items: list[str]) -> tuple[list[str], dict[str, str]]:
    """``-o`` items into FUSE options and format run-time options (the keys some driver names
    in ``runtime_options``, such as ``l2-cache-size``)."""
    from imgfs import remote
    from imgfs.block import registry

    driver_keys = {key for d in registry.all_drivers() for key in d.runtime_options}
    driver_keys.update(holes.MOUNT_OPTION_KEYS)  # taken out again by holes.mount_policy
    driver_keys.update(remote.runtime_options())  # ca-file, http-timeout, ...
    fuse: list[str] = []
    driver: dict[str, str] = {}
    for item in items:
        for option in item.split(","):
            key, _, value = option.partition("=")
            if key in driver_keys:
                driver[key] = value
            elif option:
                fuse.append(option)
    return fuse, driver


def _mount_in_background(
    args: argparse.Namespace, options: MountOptions, log_file: str, kwargs: dict[str, Any]
) -> int:
    """Fork a daemon; return when its mount is ready (0) or it failed (1, its error shown)."""
    from imgfs.fuse.mount import serve

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        if message == "ready":
            return 0
        print(
            f"imgfs: error: {message or 'the mount daemon exited'} (log: {log_file})",
            file=sys.stderr,
        )
        return 1
    # The daemon.
    os.close(read_end)
    os.setsid()
    status = 1
    try:
        setup_logging(to_stderr=False, log_file=log_file, debug=args.debug)
        devnull = os.open(os.devnull, os.O_RDWR)

        def ready() -> None:
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.write(write_end, b"ready\n")
            os.close(write_end)

        status = serve(args.images_dir, args.mountpoint, options, on_ready=ready, **kwargs)
    except ImgfsError as e:
        log.error("%s", e)
        _try_write(write_end, str(e))
    except BaseException as e:
        log.exception("mount failed")
        _try_write(write_end, f"{type(e).__name__}: {e}")
    finally:
        logging.shutdown()
        os._exit(status)


def _try_write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        pass


def cmd_umount(args: argparse.Namespace) -> int:
    from imgfs.fuse.mount import unmount

    setup_logging(to_stderr=True, log_file=None, debug=False)
    unmount(args.mountpoint)
    return 0


# -- info / check -------------------------------------------------------------------------------


def _human_size(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    value = float(n)
    for unit in units:
        if value < 1024 or unit == units[-1]:
            if unit == "B":
                return f"{n} B"
            return f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _print_info(info: ImageInfo) -> None:
    print(f"image: {info.filename}")
    print(f"file format: {info.format}")
    print(f"virtual size: {_human_size(info.virtual_size)} ({info.virtual_size} bytes)")
    print(f"disk size: {_human_size(info.actual_size)}")
    if info.cluster_size is not None:
        print(f"cluster_size: {info.cluster_size}")
    if info.encrypted:
        print("encrypted: yes")
    if info.backing_filename is not None:
        print(f"backing file: {info.backing_filename}")
        if info.backing_filename_format:
            print(f"backing file format: {info.backing_filename_format}")
    if info.dirty_flag:
        print("dirty flag: yes")
    if info.format_specific:
        print("Format specific information:")
        for key, value in info.format_specific.items():
            print(f"    {key}: {value}")
    for note in info.notes:
        print(f"note: {note}")


def cmd_info(args: argparse.Namespace) -> int:
    from imgfs import info_alloc

    try:
        disk = open_disk(
            args.image,
            args.format,
            read_only=True,
            keys=image_keys(args),
            containment=image_containment(args.image, args.allow_external_files),
            force_share=args.force_share,
        )
    except NeedsKey as e:
        return print_locked_info(args, e)
    try:
        infos = disk.info()
        layers = list(chain.layers(disk.top))[: len(infos) if args.backing_chain else 1]
        allocation = [info_alloc.summarize_or_none(layer) for layer in layers]
    finally:
        disk.close()
    if not args.backing_chain:
        infos = infos[:1]
    if args.output == "json":
        data = [i.to_qemu_json() | ({"imgfs-allocation": a.to_json()} if a else {})
                for i, a in zip(infos, allocation, strict=True)]  # fmt: skip
        print(json.dumps(data if args.backing_chain else data[0], indent=4))
    else:
        for n, info in enumerate(infos):
            if n:
                print()
            _print_info(info)
            _print_allocation(allocation[n])
    return 0


def _print_allocation(a: Any) -> None:
    """imgfs's allocation lines (after qemu-img's fields)."""
    if a is None:
        return
    print(f"data in this image: {_human_size(a.data)}; zeros: {_human_size(a.zero)}; "
          f"from the backing chain: {_human_size(a.backing)}; "
          f"unallocated: {_human_size(a.unallocated)}")  # fmt: skip
    if a.host_shared:
        print(f"host bytes shared with other files (reflink): {_human_size(a.host_shared)}")


def cmd_check(args: argparse.Namespace) -> int:
    repair = RepairMode(args.repair) if args.repair else RepairMode.NONE
    if args.force_share and repair is not RepairMode.NONE:
        raise UsageError("-U (--force-share) cannot be used with -r: a repair writes the image")
    disk = open_disk(
        args.image,
        args.format,
        read_only=repair is RepairMode.NONE,
        keys=image_keys(args),
        containment=image_containment(args.image, args.allow_external_files),
        force_share=args.force_share,
    )
    try:
        try:
            result = disk.check(repair)
        except Unsupported as e:
            print(f"imgfs: {e}", file=sys.stderr)
            return 63  # qemu-img check's status for "this format has no check"
    finally:
        disk.close()
    if args.output == "json":
        print(
            json.dumps(
                {
                    "filename": args.image,
                    "format": disk.top.format_name,
                    "check-errors": result.check_errors,
                    "corruptions": result.corruptions,
                    "leaks": result.leaks,
                    "corruptions-fixed": result.corruptions_fixed,
                    "leaks-fixed": result.leaks_fixed,
                    "image-end-offset": result.image_end_offset,
                    "total-clusters": result.total_clusters,
                    "allocated-clusters": result.allocated_clusters,
                    "fragmented-clusters": result.fragmented_clusters,
                    "compressed-clusters": result.compressed_clusters,
                },
                indent=4,
            )
        )
    else:
        for message in result.messages:
            print(message)
        if result.exit_status == 0:
            print("No errors were found on the image.")
        else:
            print(
                f"{result.corruptions} errors, {result.leaks} leaked clusters, "
                f"{result.check_errors} internal errors"
            )
        _print_check_stats(result)
    return result.exit_status


def _print_check_stats(result: CheckResult) -> None:
    """The allocation summary qemu-img check prints after its verdict."""
    total, allocated = result.total_clusters, result.allocated_clusters
    if total and allocated is not None:
        share = 100.0 / allocated if allocated else 0.0
        print(
            f"{allocated}/{total} = {100.0 * allocated / total:.2f}% allocated, "
            f"{(result.fragmented_clusters or 0) * share:.2f}% fragmented, "
            f"{(result.compressed_clusters or 0) * share:.2f}% compressed clusters"
        )
    if result.image_end_offset is not None:
        print(f"Image end offset: {result.image_end_offset}")


# -- create / convert ---------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    from imgfs.create import create_image, options_help, parse_options, parse_size

    options = parse_options(args.o)
    if options.pop("help", None) is not None:
        print(options_help(args.format))
        return 0
    if args.backing_file:
        options["backing_file"] = args.backing_file
    if args.backing_format:
        options["backing_fmt"] = args.backing_format
    if args.key:
        options["key-file"] = args.key  # the file's name; the passphrase stays in the file
    if args.filename is None:
        raise UsageError("FILE is needed")
    size = parse_size(args.size) if args.size is not None else None
    size = create_image(args.filename, args.format, size, options)
    if not args.quiet:
        opts = "".join(f" {k}={v}" for k, v in options.items())
        print(f"Formatting '{args.filename}', fmt={args.format} size={size}{opts}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from imgfs.convert import convert
    from imgfs.create import parse_options

    bar = _ProgressBar() if args.progress else None
    options = parse_options(args.o)
    if args.target_key:
        options["key-file"] = args.target_key  # the file's name, not the passphrase
    try:
        convert(
            args.source,
            args.destination,
            src_fmt=args.source_format,
            dst_fmt=args.output_format,
            options=options,
            compress=args.compress,
            progress=bar,
            keys=KeyRing.from_args(args.key or [], args.key_dir),
            containment=image_containment(args.source, args.allow_external_files),
            force_share=args.force_share,
        )
    finally:
        if bar is not None:
            bar.close()
    return 0


class _ProgressBar:
    """A tqdm bar made on the first update, when the disk's size is known."""

    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc="convert", file=sys.stderr)  # fmt: skip
        self._bar.update(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- argument parsing ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgfs", description="Mount a directory of virtual-disk images as raw files."
    )
    parser.add_argument("--version", action="version", version=f"imgfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("mount", help="export every disk image in a directory as NAME.raw")
    p.add_argument("images_dir", metavar="IMAGES_DIR")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "--cache",
        choices=[m.value for m in CacheMode],
        default="writeback",
        help="host cache mode, as QEMU's -drive cache= (default: writeback)",
    )
    p.add_argument("--read-only", action="store_true", help="export every disk read-only")
    p.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground and log to stderr"
    )
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users use the mount (needs user_allow_other for non-root)",
    )
    p.add_argument(
        "--kernel-cache",
        action="store_true",
        help="let the kernel page cache hold exported data (default: direct_io)",
    )
    add_directory_options(p)
    p.add_argument(
        "--detect-zeroes",
        choices=[m.value for m in holes.DetectZeroes],
        help="all-zero writes become write-zeroes (on) or may deallocate (unmap, needs "
        "--discard unmap), as QEMU's detect-zeroes (default: off; also -o detect-zeroes=)",
    )
    p.add_argument(
        "--discard",
        choices=[m.value for m in holes.DiscardMode],
        help="whether discards and punched holes free space in the image (default: unmap; "
        "ignore still zeroes the range; also -o discard=)",
    )
    p.add_argument(
        "--no-seek-holes",
        action="store_true",
        help="do not report holes to lseek(SEEK_DATA/SEEK_HOLE): every byte is data "
        "(also -o seek-holes=off)",
    )
    p.add_argument(
        "-o",
        action="append",
        metavar="OPT[,OPT...]",
        help="FUSE mount options, and format options such as l2-cache-size=SIZE",
    )
    p.add_argument(
        "--url",
        action="append",
        metavar="NAME=URL",
        help="also export the image at URL (http, https, nbd, nbd+unix, ...) as NAME.raw",
    )
    p.add_argument(
        "--vvfat",
        action="append",
        metavar="NAME=DIR",
        help="also export directory DIR as a read-only FAT32 disk NAME.raw",
    )
    p.add_argument("--log", metavar="FILE", help="log file (default: under $XDG_STATE_HOME)")
    p.add_argument("--debug", action="store_true", help="log every request")
    add_key_options(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="flush every image, unmount and wait for the daemon")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("info", help="describe an image (like qemu-img info)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-f", "--format", help="image format (default: probe)")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("--backing-chain", action="store_true", help="describe every layer")
    add_image_key_option(p)
    add_sharing_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("check", help="check an image's metadata (like qemu-img check)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-f", "--format", help="image format (default: probe)")
    p.add_argument("-r", "--repair", choices=["leaks", "all"])
    p.add_argument("--output", choices=["human", "json"], default="human")
    add_image_key_option(p)
    add_sharing_options(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("create", help="create a new image (like qemu-img create)")
    p.add_argument("-f", "--format", required=True, help="image format (qcow2, vmdk, raw, ...)")
    p.add_argument("-o", action="append", metavar="OPT=VAL[,...]",
                   help="format options; -o help lists them")  # fmt: skip
    p.add_argument("-b", "--backing-file", help="backing image (same as -o backing_file=)")
    p.add_argument("-F", "--backing-format", help="backing image format (-o backing_fmt=)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("filename", metavar="FILE", nargs="?")
    p.add_argument("size", metavar="SIZE", nargs="?", help="bytes, or with a k/M/G/T suffix")
    add_create_key_option(p)
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("convert", help="copy an image into a new one (like qemu-img convert)")
    p.add_argument("-f", dest="source_format", metavar="FMT", help="source format (default: probe)")
    p.add_argument("-O", dest="output_format", metavar="FMT", default="raw",
                   help="output format (default: raw)")  # fmt: skip
    p.add_argument("-o", action="append", metavar="OPT=VAL[,...]", help="output format options")
    p.add_argument("-c", dest="compress", action="store_true", help="write compressed clusters")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("source", metavar="SRC")
    p.add_argument("destination", metavar="DST")
    add_key_options(p, target=True)
    add_sharing_options(p)
    p.set_defaults(func=cmd_convert)

    add_snapshot_parser(sub)
    add_emulation_subcommands(sub)  # replay, trace import
    add_serve_subcommand(sub)  # serve (NBD)
    cmd_map.add_parser(sub)
    cmd_dedup.add_parser(sub)
    return parser


def add_sharing_options(p: argparse.ArgumentParser) -> None:
    """-U and --allow-external-files for the commands that read one image."""
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image even if another process (a VM) has it open for "
                   "writing, as qemu-img -U does; what it reads may be inconsistent")  # fmt: skip
    p.add_argument("--allow-external-files", action="store_true",
                   help="let the image use backing files, extents and data files outside its "
                   "own directory")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ImgfsError as e:
        print(f"imgfs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
