"""The host-file backend under every cache mode, against an in-memory model."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfs.block.hostfile import CacheMode, HostFile, WouldBlock, call_nowait, in_nowait_mode
from imgfs.errors import HostIOError, UsageError

SIZE = 256 * 1024

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.integers(0, SIZE + 8192),
            st.binary(min_size=1, max_size=20000),
        ),
        st.tuples(st.just("read"), st.integers(0, SIZE + 8192), st.integers(0, 20000)),
        st.tuples(st.just("sync"), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.parametrize("mode", list(CacheMode), ids=lambda m: m.value)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sequence=ops)
def test_unaligned_io_matches_model(tmp_path: Path, mode: CacheMode, sequence: list) -> None:
    path = tmp_path / f"img-{mode.value}"
    initial = os.urandom(SIZE)
    path.write_bytes(initial)
    model = bytearray(initial)
    f = HostFile(str(path), writable=True, direct=mode.direct, no_flush=mode.no_flush)
    try:
        for op, offset, arg in sequence:
            if op == "write":
                f.pwrite(offset, arg)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(arg)] = arg
            elif op == "read":
                got = bytes(f.pread(offset, arg))
                want = bytes(model[offset : offset + arg])
                want += bytes(arg - len(want))  # past EOF reads zeros
                assert got == want, f"read {offset}+{arg}"
            else:
                f.sync()
            assert f.size() == len(model), "a write must not grow the file past its end"
    finally:
        f.close()
    assert path.read_bytes() == bytes(model)


def test_direct_mode_really_uses_o_direct(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(8192))
    f = HostFile(str(path), writable=True, direct=True)
    try:
        flags = int(Path(f"/proc/self/fdinfo/{f.fd}").read_text().split("flags:")[1].split()[0], 8)
        assert flags & os.O_DIRECT
        assert f.alignment in (512, 4096)
    finally:
        f.close()


def test_o_direct_refused_gives_one_line_error(tmp_path: Path) -> None:
    # ramfs has no O_DIRECT support at all (tmpfs gained it in Linux 6.6).
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        (mnt / "img").write_bytes(bytes(4096))
        with pytest.raises(UsageError) as info:
            HostFile(str(mnt / "img"), writable=True, direct=True)
        message = str(info.value)
        assert "\n" not in message
        assert "O_DIRECT" in message and "--cache writeback" in message
        HostFile(str(mnt / "img"), writable=True, direct=False).close()  # buffered still works
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_punch_hole_and_data_extents(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(os.urandom(1 << 20))
    f = HostFile(str(path), writable=True)
    try:
        assert f.punch_hole(256 * 1024, 512 * 1024)
        assert f.pread(256 * 1024, 512 * 1024) == bytes(512 * 1024)
        assert f.data_extents(0, 1 << 20) == (True, 256 * 1024)
        assert f.data_extents(256 * 1024, 1 << 20) == (False, 512 * 1024)
        assert f.data_extents(768 * 1024, 256 * 1024) == (True, 256 * 1024)
        assert f.size() == 1 << 20
    finally:
        f.close()


def test_nowait_read_of_cached_data_is_served(tmp_path: Path) -> None:
    path = tmp_path / "img"
    data = os.urandom(64 * 1024)
    path.write_bytes(data)
    f = HostFile(str(path), writable=False)
    try:
        f.pread(0, len(data))  # now in the page cache
        assert bytes(call_nowait(f.pread, 0, len(data))) == data
        assert bytes(call_nowait(f.pread, 60 * 1024, 8192)) == data[60 * 1024 :] + bytes(4096)
    finally:
        f.close()


def test_nowait_read_of_uncached_data_would_block(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(os.urandom(4 << 20))
    f = HostFile(str(path), writable=False)
    try:
        os.fsync(f.fd)
        os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(WouldBlock):
            call_nowait(f.pread, 2 << 20, 1 << 20)
        assert len(f.pread(2 << 20, 1 << 20)) == 1 << 20  # a blocking read still works
    finally:
        f.close()


def test_in_nowait_mode_is_true_only_inside_call_nowait() -> None:
    assert not in_nowait_mode()
    assert call_nowait(in_nowait_mode)
    assert call_nowait(call_nowait, in_nowait_mode)  # nested
    with pytest.raises(WouldBlock):
        call_nowait(_raise_would_block)
    assert not in_nowait_mode()  # restored after an exception too


def _raise_would_block() -> None:
    raise WouldBlock


def test_read_only_file_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(4096))
    f = HostFile(str(path), writable=False)
    try:
        with pytest.raises(HostIOError) as info:
            f.pwrite(0, b"x")
        assert info.value.errno == errno.EBADF
    finally:
        f.close()
