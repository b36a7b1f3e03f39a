"""``imgfs create``: make a new image of any format whose driver can create one.

Sizes and ``-o`` options are written the way qemu-img takes them, so a qemu-img command line
carries over: ``imgfs create -f qcow2 -o cluster_size=64k,backing_file=base.raw,backing_fmt=raw
top.qcow2 10G``.
"""

from __future__ import annotations

import os
import re

from imgfs.block import registry
from imgfs.block.chain import resolve_relative
from imgfs.block.disk import open_disk
from imgfs.errors import InvalidRequest, Unsupported, UsageError
from imgfs.units import parse_size


def parse_options(items: list[str] | None) -> dict[str, str]:
    """``-o a=1,b=2`` (repeatable) into a dict. As in qemu-img, ``,,`` is a literal comma."""
    options: dict[str, str] = {}
    for item in items or []:
        for part in re.split(r"(?<!,),(?!,)", item):
            part = part.replace(",,", ",")
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep:
                # qemu-img treats a bare key as a boolean switched on.
                value = "on"
            options[key.strip()] = value
    return options


def options_help(fmt: str) -> str:
    driver = registry.get_driver(fmt)
    if not driver.create_options:
        return f"imgfs cannot create {fmt} images"
    width = max(len(k) for k in driver.create_options)
    lines = [f"Supported options for {fmt}:"]
    lines += [f"  {k:<{width}}  {v}" for k, v in driver.create_options.items()]
    return "\n".join(lines)


def create_image(
    path: str, fmt: str, size: int | None, options: dict[str, str], *, quiet: bool = True
) -> int:
    """Create ``path``; returns the virtual size used. ``size`` None takes the backing image's
    size (``backing_file`` in ``options``)."""
    driver = registry.get_driver(fmt)
    if not driver.create_options:
        raise Unsupported(f"imgfs cannot create {fmt} images")
    options = dict(options)
    if "size" in options:
        from_option = parse_size(options.pop("size"))
        if size is not None and size != from_option:
            raise InvalidRequest(f"size given twice: {size} and -o size={from_option}")
        size = from_option
    unknown = sorted(set(options) - set(driver.create_options))
    if unknown:
        raise InvalidRequest(
            f"{fmt} does not take the option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)} (known: {', '.join(driver.create_options)})"
        )
    if size is None:
        backing = options.get("backing_file")
        if not backing:
            raise UsageError("a size is needed (or -o backing_file= to take the size from)")
        backing_path = resolve_relative(backing, path)
        if not os.path.exists(backing_path):
            raise InvalidRequest(f"backing file {backing!r} not found (looked for {backing_path})")
        disk = open_disk(backing_path, options.get("backing_fmt"), read_only=True)
        try:
            size = disk.size
        finally:
            disk.close()
    driver.create(path, size, options)
    return size
