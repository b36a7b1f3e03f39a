"""``imgfs dedup IMAGES_DIR``: the command line, the run and its report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from imgfs.create import parse_size
from imgfs.dedup import rebase, reflink
from imgfs.dedup.control import Control, Interrupted
from imgfs.dedup.index import DedupIndex
from imgfs.dedup.scan import ScanResult, scan
from imgfs.errors import UsageError

DEFAULT_BLOCK_SIZE = 64 * 1024


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dedup", help="store blocks that several images of a directory hold only once"
    )
    p.add_argument("images_dir", metavar="IMAGES_DIR")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="report what could be saved; change no image (the index is updated)",
    )
    p.add_argument(
        "--method",
        choices=["rebase", "fideduperange", "both"],
        default="both",
        help="rebase: qcow2 images become overlays on a shared base image; "
        "fideduperange: share equal host extents (XFS reflink, btrfs); "
        "default: both",
    )
    p.add_argument(
        "--min-size",
        default="1M",
        metavar="SIZE",
        help="rewrite an image only if that saves at least SIZE (default 1M)",
    )
    p.add_argument(
        "--block-size",
        default="64k",
        metavar="SIZE",
        help="the unit compared and shared, a power of two, 4k to 2M (default 64k)",
    )
    p.add_argument(
        "--progress",
        action="store_true",
        help="show progress bars (shown anyway when stderr is a terminal)",
    )
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.images_dir)
    if not os.path.isdir(directory):
        raise UsageError(f"{args.images_dir}: not a directory")
    block_size = parse_size(args.block_size)
    if block_size < 4096 or block_size > 2 * 1024 * 1024 or block_size & (block_size - 1):
        raise UsageError(f"--block-size {args.block_size}: a power of two from 4k to 2M")
    min_size = parse_size(args.min_size)
    control = Control(args.progress or sys.stderr.isatty())
    report: dict[str, Any] = {"directory": directory, "block-size": block_size,
                              "dry-run": args.dry_run, "interrupted": False}  # fmt: skip
    index = DedupIndex(directory, block_size)
    status = 0
    try:
        with control.signals():
            try:
                _run(directory, args, block_size, min_size, index, control, report)
            except Interrupted as e:
                report["interrupted"] = True
                report["error"] = str(e)
                status = 130
    finally:
        index.close()
    if args.output == "json":
        print(json.dumps(report, indent=4))
    else:
        _print_human(report)
    return status


def _run(
    directory: str,
    args: argparse.Namespace,
    block_size: int,
    min_size: int,
    index: DedupIndex,
    control: Control,
    report: dict[str, Any],
) -> None:
    _remove_leftovers(directory)
    result = scan(directory, index, control)
    report["scan"] = _scan_report(result, block_size)
    images = result.images
    if args.method in ("rebase", "both"):
        plans, skipped = rebase.plan(images, block_size, min_size)
        report["rebase"] = {
            "plans": [
                {
                    "base": bp.name,
                    "new-base": not bp.exists,
                    "base-blocks": len(bp.blocks) if not bp.exists else len(bp.hashes),
                    "images": [m.image.name for m in bp.members],
                    "estimated-saving": bp.saving(block_size),
                }  # fmt: skip
                for bp in plans
            ],
            "skipped": skipped,
        }
        if not args.dry_run and plans:
            started = time.monotonic()
            done = rebase.execute(directory, plans, block_size, index, control)
            report["rebase"].update(
                {
                    "bases-made": done.bases_made,
                    "rewritten": done.rewritten,
                    "failed": done.failed,
                    "allocated-before": done.allocated_before,
                    "allocated-after": done.allocated_after,
                    "seconds": round(time.monotonic() - started, 3),
                }
            )
            # The rewritten images and the new bases: list them again (hashes come from the
            # index, which rebase kept current).
            images = scan(directory, index, control).images
    users = {img.backing for img in images}
    report["unused-bases"] = [img.name for img in images
                              if rebase.is_base(img.name) and img.name not in users]  # fmt: skip
    if args.method in ("fideduperange", "both"):
        done_r = reflink.execute(directory, images, block_size, index, control, args.dry_run)
        report["fideduperange"] = {
            "ranges-shared": done_r.ranges_shared, "bytes-shared": done_r.bytes_shared,
            "ranges-differ": done_r.ranges_differ, "errors": done_r.errors,
            "unsupported": done_r.unsupported, "seconds": round(done_r.seconds, 3),
        }  # fmt: skip


def _remove_leftovers(directory: str) -> None:
    """Temporary files of a run that was killed outright (SIGKILL, power loss)."""
    for name in os.listdir(directory):
        if name.startswith(".") and name.endswith(".imgfs-dedup-tmp"):
            os.unlink(os.path.join(directory, name))


def _scan_report(result: ScanResult, block_size: int) -> dict[str, Any]:
    by_offset: dict[tuple[int, bytes], int] = {}
    by_hash: dict[bytes, int] = {}
    total = 0
    by_name = {img.name: img for img in result.images}
    for img in result.images:
        # Count what each image stores itself: an overlay's blocks equal to its backing
        # image's (when that is in the directory) are the backing image's, not its own.
        below = by_name.get(os.path.basename(img.backing)) if img.backing else None
        below_hashes = below.hashes if below is not None else {}
        for i, h in img.hashes.items():
            if below_hashes.get(i) == h:
                continue
            by_offset[(i, h)] = by_offset.get((i, h), 0) + 1
            by_hash[h] = by_hash.get(h, 0) + 1
            total += 1
    return {
        "images": [img.name for img in result.images],
        "hashed": [img.name for img in result.images if img.hashed_now],
        "from-index": [img.name for img in result.images if not img.hashed_now],
        "hashed-bytes": result.hashed_bytes,
        "index-bytes": result.reused_bytes,
        "seconds": round(result.seconds, 3),
        "data-bytes": total * block_size,
        "distinct-bytes": len(by_hash) * block_size,
        # What storing each distinct block once would save, and the part of it that sits at
        # the same guest offset (what a shared backing image can express).
        "duplicate-bytes": (total - len(by_hash)) * block_size,
        "duplicate-bytes-same-offset": (total - len(by_offset)) * block_size,
        "errors": result.errors,
    }


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _print_human(report: dict[str, Any]) -> None:
    s = report.get("scan")
    if s:
        rate = s["hashed-bytes"] / s["seconds"] / (1 << 30) if s["seconds"] else 0.0
        speed = f" ({_size(s['hashed-bytes'])}, {rate:.2f} GiB/s)" if s["hashed"] else ""
        print(f"scanned {len(s['images'])} images: {len(s['hashed'])} hashed{speed}, "
              f"{len(s['from-index'])} unchanged (from the index)")  # fmt: skip
        print(f"data {_size(s['data-bytes'])}, distinct {_size(s['distinct-bytes'])}: "
              f"{_size(s['duplicate-bytes'])} duplicated, "
              f"{_size(s['duplicate-bytes-same-offset'])} of it at the same offset")  # fmt: skip
        for e in s["errors"]:
            print(f"  skipped: {e}")
    r = report.get("rebase")
    if r:
        for p in r["plans"]:
            verb = "new base" if p["new-base"] else "existing base"
            print(f"rebase: {verb} {p['base']} for {len(p['images'])} images, "
                  f"saving about {_size(p['estimated-saving'])}")  # fmt: skip
        on_base = sorted(n for n, why in r["skipped"].items() if why.startswith(rebase.ON_BASE))
        if on_base:
            print(f"rebase: {len(on_base)} images are already overlays on a dedup base")
        for name, why in sorted(r["skipped"].items()):
            if name not in on_base:
                print(f"  {name}: left alone: {why}")
        if "rewritten" in r:
            print(f"rebase: {len(r['rewritten'])} images rewritten, allocated "
                  f"{_size(r['allocated-before'])} -> {_size(r['allocated-after'])} "
                  f"(plus the new bases: {', '.join(r['bases-made']) or 'none'})")  # fmt: skip
            for name, why in sorted(r["failed"].items()):
                print(f"  {name}: not rewritten: {why}")
    for name in report.get("unused-bases", []):
        print(f"  {name}: no image uses this base any more; it may be deleted")
    f = report.get("fideduperange")
    if f:
        if f["unsupported"]:
            print(f"fideduperange: {f['unsupported']}")
        else:
            verb = "could share (where the file system can)" if report["dry-run"] else "shared"
            print(f"fideduperange: {verb} {_size(f['bytes-shared'])} in {f['ranges-shared']} "
                  f"ranges ({f['ranges-differ']} differed)")  # fmt: skip
        for e in f["errors"]:
            print(f"  {e}")
    if report["interrupted"]:
        print(
            f"imgfs dedup: {report['error']}; every image is as it was or fully rewritten",
            file=sys.stderr,
        )
