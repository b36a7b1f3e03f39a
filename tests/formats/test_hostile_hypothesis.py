"""Hostile input chosen by hypothesis: header and table fields of every format's valid images
overwritten with values hypothesis draws (boundary integers in every width and byte order, and
arbitrary bytes), run through the same worker as the seeded mutants (address-space limit,
per-mutant deadline). Only ImgfsError may come out. On a failure hypothesis shrinks the patch
list to the smallest one that still fails, and the message names it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.formats.hostile import Base, Patch, make_bases, run_mutants, scratch_dir
from tests.formats.test_hostile import FORMATS

PATCHES_PER_EXAMPLE = 16
FIRST_ID = 50_000_000  # job ids, apart from the seeded mutants' seeds


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Base]]:
    return make_bases(tmp_path_factory.mktemp("bases"))


def field_values() -> st.SearchStrategy[bytes]:
    """What a hostile header field holds: boundary integers of 1, 2, 4 and 8 bytes in both byte
    orders, or any short run of bytes."""
    boundaries = st.sampled_from(
        [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF,
         0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF]
    )  # fmt: skip

    def pack(value: int, width: int, order: str) -> bytes:
        return (value & ((1 << (8 * width)) - 1)).to_bytes(width, order)  # type: ignore[arg-type]

    widths, orders = st.sampled_from([1, 2, 4, 8]), st.sampled_from(["little", "big"])
    packed = st.builds(pack, boundaries, widths, orders)
    small = st.builds(lambda v: struct.pack("<Q", v), st.integers(0, 1 << 40))
    return st.one_of(packed, small, st.binary(min_size=1, max_size=16))


def patches_for(base: Base) -> st.SearchStrategy[list[Patch]]:
    """A list of patches into the metadata regions of the base's files."""
    targets = [(name, start, end) for name, regions in sorted(base.regions.items())
               for start, end in regions if end > start]  # fmt: skip

    @st.composite
    def one(draw: st.DrawFn) -> Patch:
        name, start, end = draw(st.sampled_from(targets))
        value = draw(field_values())
        offset = draw(st.integers(start, max(start, end - 1)))
        return (name, offset, value)

    return st.lists(st.lists(one(), min_size=1, max_size=3), min_size=PATCHES_PER_EXAMPLE,
                    max_size=PATCHES_PER_EXAMPLE)  # fmt: skip


def check_patches(fmt: str, base: Base, batch: list[list[Patch]], tmp_path: Path) -> None:
    ids = list(range(FIRST_ID, FIRST_ID + len(batch)))
    outcome = run_mutants([base], ids, scratch_dir(tmp_path), patches=batch)
    assert len(outcome.results) + len(outcome.failures) >= len(batch)
    assert not outcome.failures, f"{fmt}: " + "\n".join(f[:3000] for f in outcome.failures)


@pytest.mark.parametrize("fmt", FORMATS)
def test_hypothesis_patched_headers_give_clear_errors(fmt: str, bases, tmp_path: Path) -> None:
    base = bases[fmt][0]

    @settings(
        # hypothesis tries the simplest example first (every patch the same minimal one): three
        # examples give two real batches
        max_examples=3,
        derandomize=True,  # the default tier is the same every run; the slow tier explores
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=patches_for(base))
    def run(batch: list[list[Patch]]) -> None:
        check_patches(fmt, base, batch, tmp_path)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_hypothesis_patched_headers_many(fmt: str, bases, tmp_path: Path) -> None:
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(index=st.integers(0, len(bases[fmt]) - 1), data=st.data())
    def run(index: int, data: st.DataObject) -> None:
        base = bases[fmt][index]
        check_patches(fmt, base, data.draw(patches_for(base)), tmp_path)

    run()
