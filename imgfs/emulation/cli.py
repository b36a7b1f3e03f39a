"""`imgfs replay` and `imgfs trace import`.

The main CLI calls :func:`add_subcommands`; ``python -m imgfs.emulation.cli`` runs them alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from imgfs.block.hostfile import CacheMode
from imgfs.errors import ImgfsError, UsageError

if TYPE_CHECKING:
    from imgfs.emulation.target import Target

# The device models, replay engine and importers load only when a command runs: every other
# imgfs command builds this parser too, and should not pay ~0.1 s for them.


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 1024")
    return value


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay", help="replay a device trace (SCSI/ATA/virtio-blk) against an image"
    )
    p.add_argument(
        "trace", metavar="TRACE", help="trace file (JSON Lines, see imgfs-trace(5)); - for stdin"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--image", metavar="IMAGE", help="open this image through its driver")
    where.add_argument(
        "--file", metavar="EXPORTED_FILE", help="use an exported raw file (or any raw file)"
    )
    p.add_argument("-f", "--format", help="image format for --image (default: probe)")
    p.add_argument(
        "--cache",
        choices=[m.value for m in CacheMode],
        default="writeback",
        help="host cache mode, as QEMU's -drive cache= (default: writeback)",
    )
    p.add_argument(
        "--timing",
        choices=["asap", "recorded"],
        default="asap",
        help="issue requests as fast as possible, or at their recorded times",
    )
    p.add_argument(
        "--queue-depth",
        type=_positive,
        default=1,
        metavar="N",
        help="requests in flight at once (default: 1)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every read against what the trace wrote before it",
    )
    p.add_argument(
        "--verify-initial",
        choices=["unknown", "zero"],
        default="unknown",
        help="what --verify assumes blocks hold before the trace writes them",
    )
    p.add_argument("--results", metavar="OUT.jsonl", help="write one result record per request")
    p.add_argument("--read-only", action="store_true", help="open the image read-only")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=cmd_replay)

    p = subparsers.add_parser("trace", help="trace tools")
    tsub = p.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    q = tsub.add_parser("import", help="convert a qemu, blkparse or fio trace to imgfs-trace(5)")
    q.add_argument("--from", dest="source", choices=["qemu", "blkparse", "fio"], required=True)
    q.add_argument("input", metavar="IN")
    q.add_argument("output", metavar="OUT", help="trace to write; - for stdout")
    q.add_argument(
        "--bus",
        choices=["scsi", "ata", "virtio"],
        help="bus to encode blkparse/fio requests for (default: virtio); for qemu, "
        "the bus is found in the log",
    )
    q.add_argument("--disk", help="disk name to put in the trace")
    q.add_argument(
        "--strace",
        metavar="FILE",
        help="qemu only: strace log of the same run (fallocate calls) for the discard ranges",
    )
    q.set_defaults(func=cmd_trace_import)


def open_target(args: argparse.Namespace) -> Target:
    from imgfs.emulation.target import DiskTarget, FileTarget

    cache = CacheMode(args.cache)
    if args.image:
        if not os.path.exists(args.image):
            raise UsageError(f"{args.image}: no such image")
        return DiskTarget.open(args.image, args.format, cache, read_only=args.read_only)
    if not os.path.exists(args.file):
        raise UsageError(f"{args.file}: no such file")
    return FileTarget(args.file, cache, read_only=args.read_only)


def cmd_replay(args: argparse.Namespace) -> int:
    from imgfs.emulation.replay import Replayer

    if args.trace != "-" and not os.path.isfile(args.trace):
        raise UsageError(f"{args.trace}: no such trace file")
    progress = not args.no_progress and sys.stderr.isatty()
    total = None
    if progress and args.trace != "-":
        with open(args.trace, "rb") as f:
            total = sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 20), b""))
    target = open_target(args)
    results = open(args.results, "w", encoding="utf-8") if args.results else None
    trace = sys.stdin if args.trace == "-" else open(args.trace, encoding="utf-8", errors="replace")
    try:
        replayer = Replayer(
            target,
            queue_depth=args.queue_depth,
            timing=args.timing,
            verify=args.verify,
            verify_initial_zero=args.verify_initial == "zero",
            results=results,
            progress=progress,
            total=total,
        )
        summary = replayer.run(trace)
    finally:
        if trace is not sys.stdin:
            trace.close()
        if results is not None:
            results.close()
        target.close()
    print(summary.text())
    return 0 if summary.ok else 1


def cmd_trace_import(args: argparse.Namespace) -> int:
    from imgfs.emulation import importers

    if not os.path.isfile(args.input):
        raise UsageError(f"{args.input}: no such file")
    with open(args.input, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if args.source == "qemu":
        strace = None
        if args.strace:
            if not os.path.isfile(args.strace):
                raise UsageError(f"{args.strace}: no such file")
            with open(args.strace, encoding="utf-8", errors="replace") as f:
                strace = f.read()
        lines, notes = importers.from_qemu(text, disk=args.disk, strace=strace)
    elif args.source == "blkparse":
        lines, notes = importers.from_blkparse(text, bus=args.bus or "virtio", disk=args.disk)
    else:
        lines, notes = importers.from_fio(text, bus=args.bus or "virtio", disk=args.disk)
    out = "\n".join(lines) + "\n"
    if args.output == "-":
        sys.stdout.write(out)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(out)
    for note in notes:
        print(f"imgfs trace import: {note}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgfs", description="device trace replay")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_subcommands(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ImgfsError as e:
        print(f"imgfs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
