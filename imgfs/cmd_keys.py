"""Command-line options for passphrases (``--key``, ``--key-dir``, ``--target-key``) and what
``imgfs info`` says about an encrypted image it cannot open. Passphrases are only ever read
from files: never from argv, the environment or a prompt that could end up in a log."""

from __future__ import annotations

import argparse
import json
import os

from imgfs.block import registry
from imgfs.errors import ImgfsError, NeedsKey, WrongKey
from imgfs.keys import KeyRing


def add_key_options(p: argparse.ArgumentParser, target: bool = False) -> None:
    """``--key NAME=FILE`` (repeatable) and ``--key-dir DIR`` (mount, convert's source chain);
    ``--target-key FILE`` for convert's new image."""
    p.add_argument(
        "--key",
        action="append",
        metavar="NAME=FILE",
        help="passphrase file of the encrypted image file NAME (its exact bytes, as QEMU's "
        "secret file=); repeatable",
    )
    p.add_argument(
        "--key-dir",
        metavar="DIR",
        help="directory of passphrase files: DIR/NAME.key for image file NAME",
    )
    if target:
        p.add_argument(
            "--target-key",
            metavar="FILE",
            help="passphrase file for the new image (with -o encrypt.format=luks|aes)",
        )


def add_image_key_option(p: argparse.ArgumentParser) -> None:
    """``--key FILE`` (the image's passphrase) and ``--key-dir DIR`` (its backing files')."""
    p.add_argument("--key", metavar="FILE", help="passphrase file of the encrypted image")
    p.add_argument(
        "--key-dir", metavar="DIR", help="passphrase files DIR/NAME.key for backing images"
    )


def add_create_key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--key",
        metavar="FILE",
        help="passphrase file for -o encrypt.format=luks|aes or -f luks (its exact bytes)",
    )


def image_keys(args: argparse.Namespace) -> KeyRing | None:
    """The KeyRing of info/check: ``--key FILE`` for the image, ``--key-dir`` for the rest."""
    if not args.key and not args.key_dir:
        return None
    ring = KeyRing.from_args((), args.key_dir)
    if args.key:
        ring.files[os.path.basename(args.image)] = os.path.abspath(args.key)
    return ring


def print_locked_info(args: argparse.Namespace, error: NeedsKey) -> int:
    """``imgfs info`` of an encrypted image without (the right) key: what can be said, and why
    it does not open. Exit status 0 without a key (as qemu-img info), 1 with a wrong one."""
    try:
        fmt = args.format or registry.probe_file(args.image).format_name
    except ImgfsError:
        fmt = "?"
    if args.output == "json":
        data = {"filename": args.image, "format": fmt, "encrypted": True,
                "imgfs-notes": [str(error)]}  # fmt: skip
        print(json.dumps(data, indent=4))
    else:
        print(f"image: {args.image}")
        print(f"file format: {fmt}")
        print("encrypted: yes")
        print(f"note: cannot open without the key: {error}")
    return 1 if isinstance(error, WrongKey) else 0
