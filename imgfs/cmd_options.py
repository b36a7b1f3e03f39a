"""Command-line options shared by the commands that export a directory of images (mount and
serve), so both say and check the same thing."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_directory_options(p: argparse.ArgumentParser) -> None:
    """--aio-threads, --allow-external-files and --writable-backing."""
    p.add_argument(
        "--aio-threads",
        type=positive_int,
        default=4,
        metavar="N",
        help="worker threads for blocking work: fsync, O_DIRECT I/O, cold reads (default: 4)",
    )
    p.add_argument(
        "--allow-external-files",
        action="store_true",
        help="let images use backing/extent files outside IMAGES_DIR",
    )
    p.add_argument(
        "--writable-backing",
        action="store_true",
        help="let disks that other disks use as backing images be written (corrupts overlays)",
    )
