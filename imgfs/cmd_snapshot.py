"""``imgfs snapshot``: list, create, apply and delete internal snapshots (like ``qemu-img
snapshot``). The image is opened for writing through the normal path (``open_disk``), so the
host-file layer's image locking applies: an image open for writing elsewhere is refused."""

from __future__ import annotations

import argparse
import time

from imgfs.block.disk import open_disk
from imgfs.block.driver import SnapshotInfo
from imgfs.errors import Unsupported, UsageError

_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    action.add_argument("-c", dest="create", metavar="NAME", help="create snapshot NAME")
    action.add_argument("-a", dest="apply", metavar="SNAPSHOT",
                        help="revert the disk to SNAPSHOT (id or name)")  # fmt: skip
    action.add_argument("-d", dest="delete", metavar="SNAPSHOT",
                        help="delete SNAPSHOT (id or name)")  # fmt: skip
    p.add_argument("-f", "--format", help="image format (default: probe)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        disk = open_disk(args.image, args.format, read_only=True)
        try:
            snapshots = disk.top.snapshots()
        finally:
            disk.close()
        if snapshots:
            print(format_list(snapshots), end="")
        return 0
    from imgfs.formats.qcow2 import snapshot as qcow2_snapshot
    from imgfs.formats.qcow2.driver import Qcow2Driver

    disk = open_disk(args.image, args.format)
    try:
        drv = disk.top
        if not isinstance(drv, Qcow2Driver):
            raise Unsupported(f"{args.image}: {drv.format_name} images have no internal snapshots")
        if disk.read_only:
            raise UsageError(f"{args.image}: the image is read-only")
        if args.create is not None:
            qcow2_snapshot.create(drv, args.create)
        elif args.apply is not None:
            qcow2_snapshot.apply(drv, args.apply)
        else:
            qcow2_snapshot.delete(drv, args.delete)
    finally:
        disk.close()
    return 0


def format_list(snapshots: list[SnapshotInfo]) -> str:
    """The table ``qemu-img snapshot -l`` prints (dates in local time, as qemu-img)."""
    lines = [
        "Snapshot list:",
        f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}",
    ]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        secs, nsec = divmod(s.vm_clock_nsec, 1_000_000_000)
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{nsec // 1_000_000:03d}"
        icount = "" if s.icount is None else str(s.icount)
        lines.append(
            f"{s.id:<9} {s.name:<16} {size_text(s.vm_state_size):>8}{date:>20}{clock:>13}"
            f"{icount:>11}"
        )
    return "\n".join(lines) + "\n"


def size_text(n: int) -> str:
    """A byte count as qemu prints sizes: three significant digits, and the next unit up
    from 1000 of the current one (so 1000 B is 0.977 KiB)."""
    value = float(n)
    unit = 0
    while value >= 1000 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{value:.3g} {_UNITS[unit]}"
