"""Disk, registry, chain and raw driver, on real files."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imgfs.block import chain, registry
from imgfs.block.disk import Disk, open_disk
from imgfs.block.driver import BackingSpec, BlockDriver, ProbeInput, RepairMode
from imgfs.block.extent import Allocation
from imgfs.block.hostfile import CacheMode
from imgfs.errors import CorruptImage, NoSpace, NotPermitted, ReadOnly, Unsupported
from tests.toyformat import SECTOR, ToyDriver, make_toy


def raw_file(path: Path, size: int = 1 << 20, data: bytes | None = None) -> bytes:
    content = data if data is not None else os.urandom(size)
    path.write_bytes(content)
    return content


# -- Disk -----------------------------------------------------------------------------------


def test_reads_stop_at_the_end_and_writes_past_it_fail(tmp_path: Path) -> None:
    content = raw_file(tmp_path / "a.img", 4096)
    disk = open_disk(str(tmp_path / "a.img"))
    try:
        assert bytes(disk.read(4000, 500)) == content[4000:]
        assert disk.read(4096, 10) == b""
        assert disk.read(10_000, 10) == b""
        assert disk.write(4090, b"0123456789") == 6  # short at the end, like a block device
        with pytest.raises(NoSpace) as info:
            disk.write(4096, b"x")
        assert info.value.errno == errno.ENOSPC
    finally:
        disk.close()
    assert (tmp_path / "a.img").stat().st_size == 4096
    assert (tmp_path / "a.img").read_bytes()[4090:] == b"012345"


def test_read_only_disk_refuses_every_update(tmp_path: Path) -> None:
    raw_file(tmp_path / "a.img", 4096)
    disk = open_disk(str(tmp_path / "a.img"), read_only=True)
    try:
        for call in (
            lambda: disk.write(0, b"x"),
            lambda: disk.discard(0, 512),
            lambda: disk.write_zeroes(0, 512),
            lambda: disk.resize(8192),
        ):
            with pytest.raises(ReadOnly):
                call()
    finally:
        disk.close()


SYNC_COUNTER = textwrap.dedent(
    """
    import sys
    from imgfs.block.disk import open_disk
    from imgfs.block.hostfile import CacheMode
    disk = open_disk(sys.argv[1], "raw", cache=CacheMode(sys.argv[2]))
    for step in sys.argv[3].split(","):
        if step == "w":
            disk.write(4096, b"x" * 4096)
        elif step == "f":
            disk.flush()
    sys.stdout.write("closing\\n")
    sys.stdout.flush()
    disk.close()
    """
)


def count_syncs(tmp_path: Path, mode: str, steps: str) -> tuple[int, int]:
    """Run a workload under strace; (fdatasync calls before close, during close)."""
    image = tmp_path / "s.img"
    image.write_bytes(bytes(1 << 20))
    trace = tmp_path / "strace.txt"
    subprocess.run(
        ["strace", "-f", "-e", "trace=fdatasync,fsync,write", "-o", str(trace),
         sys.executable, "-c", SYNC_COUNTER, str(image), mode, steps],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    lines = trace.read_text().splitlines()
    closing = next(i for i, line in enumerate(lines) if "closing" in line)
    syncs_before = sum("fdatasync(" in line for line in lines[:closing])
    syncs_at_close = sum("fdatasync(" in line for line in lines[closing:])
    return syncs_before, syncs_at_close


@pytest.mark.parametrize(
    "mode,steps,before,at_close",
    [
        ("writeback", "w,w,w", 0, 1),  # durable only when flushed (here: at close)
        ("writeback", "w,f,f,f", 1, 0),  # flushes with nothing new to flush cost nothing
        ("writeback", "w,f,w,f", 2, 0),
        ("none", "w,w,f", 1, 0),
        ("writethrough", "w,w,w", 3, 0),  # every write durable when it returns
        ("directsync", "w,w", 2, 0),
        ("unsafe", "w,f,w,f", 0, 0),  # flush never syncs
    ],
)
def test_cache_mode_sync_points(
    tmp_path: Path, mode: str, steps: str, before: int, at_close: int
) -> None:
    assert count_syncs(tmp_path, mode, steps) == (before, at_close)


def test_direct_cache_modes_route_to_threads(tmp_path: Path) -> None:
    raw_file(tmp_path / "a.img", 8192)
    expect = {
        CacheMode.WRITEBACK: (False, False),
        CacheMode.UNSAFE: (False, False),
        CacheMode.WRITETHROUGH: (False, True),
        CacheMode.NONE: (True, True),
        CacheMode.DIRECTSYNC: (True, True),
    }
    for mode, (reads, writes) in expect.items():
        disk = open_disk(str(tmp_path / "a.img"), cache=mode)
        try:
            assert (disk.reads_may_block, disk.writes_may_block) == (reads, writes), mode
        finally:
            disk.close()


# -- raw driver -------------------------------------------------------------------------------


def test_raw_discard_punches_a_hole_and_block_status_sees_it(tmp_path: Path) -> None:
    raw_file(tmp_path / "a.img", 1 << 20)
    disk = open_disk(str(tmp_path / "a.img"))
    try:
        disk.discard(256 * 1024, 256 * 1024)
        assert bytes(disk.read(256 * 1024, 256 * 1024)) == bytes(256 * 1024)
        ext = disk.block_status(0, 1 << 20)
        assert (ext.allocation, ext.length) == (Allocation.DATA, 256 * 1024)
        ext = disk.block_status(256 * 1024, 1 << 20)
        assert (ext.allocation, ext.length) == (Allocation.ZERO, 256 * 1024)
        disk.write_zeroes(0, 4096, may_unmap=False)
        assert bytes(disk.read(0, 4096)) == bytes(4096)
    finally:
        disk.close()
    assert (tmp_path / "a.img").stat().st_blocks * 512 < (1 << 20)


def test_raw_resize_grows_with_zeros_and_shrinks(tmp_path: Path) -> None:
    content = raw_file(tmp_path / "a.img", 8192)
    disk = open_disk(str(tmp_path / "a.img"))
    try:
        disk.resize(16384)
        assert disk.size == 16384
        assert bytes(disk.read(0, 16384)) == content + bytes(8192)
        disk.resize(4096)
        assert bytes(disk.read(0, 8192)) == content[:4096]
    finally:
        disk.close()


def test_raw_has_no_check(tmp_path: Path) -> None:
    raw_file(tmp_path / "a.img", 4096)
    disk = open_disk(str(tmp_path / "a.img"))
    try:
        with pytest.raises(Unsupported):
            disk.check(RepairMode.NONE)
    finally:
        disk.close()


# -- the probe guard ---------------------------------------------------------------------------


def test_probed_raw_cannot_become_another_format(tmp_path: Path) -> None:
    raw_file(tmp_path / "a.img", 1 << 20)
    disk = open_disk(str(tmp_path / "a.img"))  # format probed
    try:
        with pytest.raises(NotPermitted):
            disk.write(0, b"TOYFMT01" + bytes(504))
        with pytest.raises(NotPermitted):  # a write that only completes the magic
            disk.write(4, b"MT01")
            disk.write(0, b"TOYF")
        disk.write(0, b"harmless boot sector".ljust(512, b"\0"))  # others are fine
        disk.write(100_000, b"TOYFMT01")  # the magic outside the probed bytes is fine too
    finally:
        disk.close()
    assert registry.probe_file(str(tmp_path / "a.img")).format_name == "raw"


def test_explicit_raw_may_write_anything(tmp_path: Path) -> None:
    raw_file(tmp_path / "a.img", 1 << 20)
    disk = open_disk(str(tmp_path / "a.img"), "raw")
    try:
        disk.write(0, b"TOYFMT01")
    finally:
        disk.close()
    assert registry.probe_file(str(tmp_path / "a.img")).format_name == "toy"


def test_probe_prefers_a_real_format_over_raw(tmp_path: Path) -> None:
    make_toy(tmp_path / "t.toy", 4096)
    raw_file(tmp_path / "r.img", 4096)
    assert registry.probe_file(str(tmp_path / "t.toy")).format_name == "toy"
    assert registry.probe_file(str(tmp_path / "r.img")).format_name == "raw"


# -- backing chains ----------------------------------------------------------------------------


def test_chain_reads_backing_data_and_reports_depth(tmp_path: Path) -> None:
    base = raw_file(tmp_path / "base.img", 4 * SECTOR)
    mid = b"M" * SECTOR
    make_toy(tmp_path / "mid.toy", 4 * SECTOR, "base.img", bytes(SECTOR) + mid)
    make_toy(tmp_path / "top.toy", 8 * SECTOR, "mid.toy", b"T" * SECTOR)
    disk = open_disk(str(tmp_path / "top.toy"))
    try:
        got = bytes(disk.read(0, 8 * SECTOR))
        # sector 0: top; 1: mid; 2-3: base; 4-7: past the short backing chain -> zeros
        assert got == b"T" * SECTOR + mid + base[2 * SECTOR :] + bytes(4 * SECTOR)
        depths = [disk.block_status(s * SECTOR, SECTOR).depth for s in range(4)]
        assert depths == [0, 1, 2, 2]
        assert disk.block_status(4 * SECTOR, SECTOR).allocation is Allocation.ZERO
        assert [i.format for i in disk.info()] == ["toy", "toy", "raw"]
        assert disk.top.backing is not None and disk.top.backing.read_only
    finally:
        disk.close()


def test_chain_loop_is_refused(tmp_path: Path) -> None:
    make_toy(tmp_path / "a.toy", 4096, "b.toy")
    make_toy(tmp_path / "b.toy", 4096, "a.toy")
    with pytest.raises(CorruptImage, match="loops"):
        open_disk(str(tmp_path / "a.toy"))


def test_chain_depth_is_capped(tmp_path: Path) -> None:
    depth = chain.MAX_CHAIN_DEPTH + 2
    for i in range(depth):
        make_toy(tmp_path / f"{i}.toy", 4096, f"{i + 1}.toy" if i + 1 < depth else None)
    with pytest.raises(CorruptImage, match="deeper than"):
        open_disk(str(tmp_path / "0.toy"))


def test_backing_outside_the_images_directory_is_refused(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    raw_file(tmp_path / "secret.img", 4096)
    make_toy(images / "evil.toy", 4096, "../secret.img")
    make_toy(images / "abs.toy", 4096, "/etc/passwd")
    inside = chain.Containment(str(images))
    for name in ("evil.toy", "abs.toy"):
        with pytest.raises(NotPermitted, match="outside the images directory"):
            open_disk(str(images / name), containment=inside)
    open_disk(str(images / "evil.toy")).close()  # allowed when no containment is asked for


def test_missing_backing_file_is_a_clear_error(tmp_path: Path) -> None:
    make_toy(tmp_path / "a.toy", 4096, "nowhere.img")
    with pytest.raises(CorruptImage, match="backing file 'nowhere.img' not found"):
        open_disk(str(tmp_path / "a.toy"))


def test_open_failure_closes_what_was_opened(tmp_path: Path) -> None:
    make_toy(tmp_path / "a.toy", 4096, "b.toy")
    (tmp_path / "b.toy").write_bytes(b"TOYFMT01" + bytes(504))  # size 0 is fine, so corrupt it:
    (tmp_path / "b.toy").write_bytes(b"TOYFMT01" + (3).to_bytes(8, "little") + bytes(496))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(CorruptImage, match="bad virtual size 3"):
        open_disk(str(tmp_path / "a.toy"))
    assert len(os.listdir("/proc/self/fd")) == before


class PickyToy(ToyDriver):
    """A toy that, like vhdx checking its parent's GUID, refuses a backing image whose size is
    not its own. ``link_first`` links before checking; ``forget_link`` never links."""

    format_name = "picky"
    link_first = False
    forget_link = False

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        return 0  # only opened when named (by the test or a .picky backing name)

    @property
    def backing_spec(self) -> BackingSpec | None:
        spec = super().backing_spec
        if spec is None:
            return None
        fmt = {".picky": "picky", ".vmdk": "vmdk"}.get(os.path.splitext(spec.filename)[1])
        return BackingSpec(spec.filename, fmt)

    def attach_backing(self, backing: BlockDriver) -> None:
        if self.forget_link:
            return
        if self.link_first:
            super().attach_backing(backing)
        if backing.virtual_size != self.virtual_size:
            raise CorruptImage(
                f"{self.file.path}: backing image is {backing.virtual_size} bytes, "
                f"not {self.virtual_size}"
            )
        super().attach_backing(backing)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def picky(monkeypatch: pytest.MonkeyPatch) -> type[PickyToy]:
    registry.all_drivers()  # load the real ones first
    monkeypatch.setitem(registry._DRIVERS, PickyToy.format_name, PickyToy)
    return PickyToy


@pytest.mark.parametrize("link_first", [False, True])
def test_refused_backing_closes_every_file(
    tmp_path: Path, picky: type[PickyToy], monkeypatch: pytest.MonkeyPatch, link_first: bool
) -> None:
    monkeypatch.setattr(picky, "link_first", link_first)
    # A backing image with a companion file (descriptor + flat extent), refused by the top.
    registry.get_driver("vmdk").create(
        str(tmp_path / "base.vmdk"), 4 * SECTOR, {"subformat": "monolithicFlat"}
    )
    assert (tmp_path / "base-flat.vmdk").exists()
    make_toy(tmp_path / "top.picky", 8 * SECTOR, "base.vmdk")
    # Refused one layer down: top and mid are linked, the refused base is not (yet).
    raw_file(tmp_path / "base.img", 8 * SECTOR)
    make_toy(tmp_path / "mid.picky", 4 * SECTOR, "base.img")
    make_toy(tmp_path / "top2.picky", 4 * SECTOR, "mid.picky")
    before = open_fds()
    with pytest.raises(CorruptImage, match="backing image is 2048 bytes, not 4096"):
        open_disk(str(tmp_path / "top.picky"), "picky")
    assert open_fds() == before
    with pytest.raises(CorruptImage, match="backing image is 4096 bytes, not 2048"):
        open_disk(str(tmp_path / "top2.picky"), "picky")
    assert open_fds() == before
    # An accepted backing image is linked and closed with the disk.
    make_toy(tmp_path / "ok.picky", 4 * SECTOR, "base.vmdk")
    disk = open_disk(str(tmp_path / "ok.picky"), "picky")
    try:
        assert open_fds() == before + 3
        assert disk.top.backing is not None and disk.top.backing.format_name == "vmdk"
        assert bytes(disk.read(0, 4 * SECTOR)) == bytes(4 * SECTOR)
    finally:
        disk.close()
    assert open_fds() == before


def test_attach_backing_that_forgets_to_link_is_caught(
    tmp_path: Path, picky: type[PickyToy], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(picky, "forget_link", True)
    make_toy(tmp_path / "base.toy", 4 * SECTOR)
    make_toy(tmp_path / "top.picky", 4 * SECTOR, "base.toy")
    before = open_fds()
    with pytest.raises(AssertionError, match="did not link"):
        open_disk(str(tmp_path / "top.picky"), "picky")
    assert open_fds() == before


def test_disk_flush_covers_every_layer_written(tmp_path: Path) -> None:
    make_toy(tmp_path / "a.toy", 4096)
    disk: Disk = open_disk(str(tmp_path / "a.toy"))
    try:
        disk.write(0, b"Z" * 512)
        disk.flush()
    finally:
        disk.close()
    assert (tmp_path / "a.toy").read_bytes()[512:1024] == b"Z" * 512
