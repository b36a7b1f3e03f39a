"""``imgfs serve IMAGES_DIR --listen ADDR``: export every disk of a directory over NBD."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from imgfs.block.hostfile import CacheMode
from imgfs.cmd_keys import add_key_options
from imgfs.cmd_options import add_directory_options
from imgfs.keys import KeyRing


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="export every disk image in a directory over NBD (like qemu-nbd, for many disks)",
        description=(
            "Serve every disk of IMAGES_DIR as an NBD export named after its file "
            "(disk.qcow2; the mount's disk.qcow2.raw works too; the empty name is the only "
            "disk when there is one). Runs in the foreground until SIGINT/SIGTERM, then "
            "flushes every image."
        ),
    )
    p.add_argument("images_dir", metavar="IMAGES_DIR")
    p.add_argument(
        "--listen",
        metavar="ADDR",
        default="127.0.0.1:10809",
        help="HOST:PORT, [IPV6]:PORT, :PORT (all addresses) or unix:PATH "
        "(default: 127.0.0.1:10809; port 0 picks a free one)",
    )
    p.add_argument(
        "--cache",
        choices=[m.value for m in CacheMode],
        default="writeback",
        help="host cache mode, as QEMU's -drive cache= (default: writeback)",
    )
    p.add_argument("--read-only", action="store_true", help="export every disk read-only")
    add_directory_options(p)
    p.add_argument(
        "-o",
        action="append",
        metavar="KEY=VALUE[,...]",
        help="format run-time options, such as l2-cache-size=SIZE",
    )
    p.add_argument(
        "--detect-zeroes",
        choices=["off", "on", "unmap"],
        default="off",
        help="turn all-zero writes into write-zeroes (unmap: that may deallocate), as "
        "QEMU's detect-zeroes (default: off)",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM) for STARTTLS")
    p.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    p.add_argument(
        "--tls", action="store_true", help="require TLS: refuse clients that do not STARTTLS"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=64,
        metavar="N",
        help="clients served at once (default: 64)",
    )
    add_key_options(p)
    p.add_argument("--log", metavar="FILE", help="also log to FILE")
    p.add_argument("--debug", action="store_true", help="log debugging detail")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from imgfs.cli import setup_logging, split_mount_options
    from imgfs.errors import UsageError
    from imgfs.fuse.mount import check_direct_io, check_images_dir, keep_request_buffers_in_heap
    from imgfs.nbd.server import ServeOptions, parse_listen, serve

    if args.aio_threads < 1 or args.max_connections < 1:
        raise UsageError("--aio-threads and --max-connections must be at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    unknown, driver_opts = split_mount_options(args.o or [])
    if unknown:
        raise UsageError(f"unknown -o option(s): {', '.join(unknown)}")
    options = ServeOptions(
        cache=CacheMode(args.cache),
        read_only=args.read_only,
        aio_threads=args.aio_threads,
        allow_external_files=args.allow_external_files,
        writable_backing=args.writable_backing,
        driver_options=driver_opts,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_required=args.tls,
        max_connections=args.max_connections,
        detect_zeroes=args.detect_zeroes,
        keys=KeyRing.from_args(args.key or [], args.key_dir),
    )
    address = parse_listen(args.listen)
    check_images_dir(args.images_dir)
    if options.cache.direct:
        check_direct_io(args.images_dir)
    setup_logging(to_stderr=True, log_file=args.log, debug=args.debug)
    keep_request_buffers_in_heap()

    def ready(bound: str) -> None:
        print(f"imgfs: listening on {bound}", file=sys.stderr, flush=True)

    return serve(args.images_dir, address, options, on_ready=ready)
