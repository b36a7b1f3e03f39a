"""The shared option parsers: sizes as qemu-img reads them, switches and choices."""

from __future__ import annotations

import pytest

from imgfs.errors import InvalidRequest
from imgfs.units import MAX_IMAGE_SIZE, bool_option, choice_option, parse_size, size_option

KiB = 1 << 10


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("512", 512), ("00012", 12), ("7b", 7), ("7B", 7), ("1k", KiB), ("1K", KiB),
     ("64k", 64 * KiB), ("1m", 1 << 20), ("1M", 1 << 20), ("2g", 2 << 30), ("2G", 2 << 30),
     ("1t", 1 << 40), ("1T", 1 << 40), ("1p", 1 << 50), ("1P", 1 << 50), ("1e", 1 << 60),
     ("7E", 7 << 60), ("1.5k", 1536), ("0.5k", 512), ("1.k", KiB), ("1.0", 1),
     ("1.5M", 3 << 19), ("0x10", 16), ("0X10", 16), ("0x10k", 16 * KiB), (" 4k ", 4 * KiB)],
)  # fmt: skip
def test_sizes_read_like_qemu_img(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_largest_size() -> None:
    assert parse_size(str(MAX_IMAGE_SIZE)) == MAX_IMAGE_SIZE
    with pytest.raises(InvalidRequest, match="larger than"):
        parse_size(str(MAX_IMAGE_SIZE + 1))


@pytest.mark.parametrize(
    "text",
    ["", " ", "k", "ten", "-1", "+1", "5Q", "1kb", "1KiB", "1 k k", ".5k", "1e3", "1.5",
     "1.5b", "0x", "0x1.8k", "8E", "9E", "1,5k"],
)  # fmt: skip
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_size(text)
    message = str(e.value)
    assert "\n" not in message
    assert repr(text) in message


def test_size_option() -> None:
    assert size_option({}, "cluster_size", 65536) == 65536
    assert size_option({"cluster_size": "2M"}, "cluster_size", 65536) == 2 << 20
    assert size_option({"other": "junk"}, "cluster_size", 7) == 7
    with pytest.raises(InvalidRequest) as e:
        size_option({"cluster_size": "64kib"}, "cluster_size", 65536)
    assert str(e.value).startswith("option cluster_size: ")
    assert "'64kib'" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["on", "ON", "true", "True", "yes", "YES", "y", "Y", "1", " on "])
def test_bool_true(text: str) -> None:
    assert bool_option({"lazy_refcounts": text}, "lazy_refcounts") is True


@pytest.mark.parametrize("text", ["off", "OFF", "false", "FALSE", "no", "No", "n", "N", "0"])
def test_bool_false(text: str) -> None:
    assert bool_option({"lazy_refcounts": text}, "lazy_refcounts", True) is False


def test_bool_default() -> None:
    assert bool_option({}, "static") is False
    assert bool_option({}, "static", True) is True
    assert bool_option({}, "static", default=False) is False


@pytest.mark.parametrize("text", ["", "maybe", "2", "onn", "enabled", "-1"])
def test_bad_bool_names_option_and_value(text: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        bool_option({"static": text}, "static")
    message = str(e.value)
    assert message == f"option static: expected on or off, not {text!r}"


def test_choices() -> None:
    choices = ("off", "metadata", "falloc", "full")
    assert choice_option({}, "preallocation", choices, "off") == "off"
    assert choice_option({"preallocation": "full"}, "preallocation", choices, "off") == "full"
    assert choice_option({"preallocation": "FULL"}, "preallocation", choices, "off") == "full"
    # The spelling returned is the one in ``choices``, whatever case was given.
    subformats = ("monolithicSparse", "streamOptimized")
    assert choice_option({"subformat": "streamoptimized"}, "subformat", subformats, "x") == (
        "streamOptimized"
    )


@pytest.mark.parametrize("text", ["", "sparse", "fulll", "of"])
def test_bad_choice_lists_the_choices(text: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        choice_option({"preallocation": text}, "preallocation", ("off", "falloc", "full"), "off")
    assert str(e.value) == (
        f"option preallocation: expected one of off, falloc, full, not {text!r}"
    )
