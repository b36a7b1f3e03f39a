"""Option values as people write them on command lines, the way qemu-img reads them.

Sizes (``parse_size``), and the ``-o key=value`` helpers every driver shares: byte counts
(``size_option``), on/off switches (``bool_option``) and one-of-a-list choices
(``choice_option``). Errors are ``InvalidRequest`` with one line naming the option and value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fractions import Fraction

from imgfs.errors import InvalidRequest

_SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                  "p": 1 << 50, "e": 1 << 60}  # fmt: skip
_SIZE = re.compile(
    r"^\s*(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<dec>\d+(?:\.\d*)?))\s*(?P<unit>[kmgtpeb]?)\s*$",
    re.IGNORECASE,
)
# qemu-img's largest image size (INT64_MAX rounded down to a sector).
MAX_IMAGE_SIZE = (1 << 63) - 512

# The spellings qemu accepts for a boolean option, plus 1/0 which our drivers always took.
_TRUE = frozenset(("on", "true", "yes", "y", "1"))
_FALSE = frozenset(("off", "false", "no", "n", "0"))


def parse_size(text: str) -> int:
    """``10G``, ``512k``, ``1.5M``, ``0x10000`` or a plain byte count, as qemu-img reads sizes.

    Suffixes k, M, G, T, P, E (powers of 1024) and b (bytes), any case. As in qemu-img, a
    fraction needs a unit larger than a byte (``1.5`` bytes is refused) and is truncated.
    """
    m = _SIZE.match(text)
    if not m:
        raise InvalidRequest(f"invalid size {text!r} (use bytes or a k, M, G, T, P, E suffix)")
    multiplier = _SIZE_SUFFIXES[m.group("unit").lower()]
    if m.group("hex") is not None:
        size = int(m.group("hex"), 16) * multiplier
    else:
        value = Fraction(m.group("dec").rstrip("."))
        if multiplier == 1 and value.denominator != 1:
            raise InvalidRequest(f"invalid size {text!r} (a fraction of a byte)")
        size = int(value * multiplier)
    if size > MAX_IMAGE_SIZE:
        raise InvalidRequest(f"size {text!r} is larger than {MAX_IMAGE_SIZE} bytes")
    return size


def size_option(options: Mapping[str, str], key: str, default: int) -> int:
    """The byte count ``options[key]`` (``64k``, ``65536``), or ``default`` when not given."""
    text = options.get(key)
    if text is None:
        return default
    try:
        return parse_size(text)
    except InvalidRequest as e:
        raise InvalidRequest(f"option {key}: {e}") from None


def bool_option(options: Mapping[str, str], key: str, default: bool = False) -> bool:
    """The switch ``options[key]``: on/off, true/false, yes/no, y/n or 1/0 in any case."""
    text = options.get(key)
    if text is None:
        return default
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidRequest(f"option {key}: expected on or off, not {text!r}")


def choice_option(
    options: Mapping[str, str], key: str, choices: Sequence[str], default: str
) -> str:
    """``options[key]`` if it is one of ``choices`` (any case; returned as spelled in
    ``choices``), or ``default`` when not given."""
    text = options.get(key)
    if text is None:
        return default
    value = text.strip().lower()
    for choice in choices:
        if choice.lower() == value:
            return choice
    raise InvalidRequest(f"option {key}: expected one of {', '.join(choices)}, not {text!r}")
