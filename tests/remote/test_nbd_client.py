"""The NBD client (imgfs.nbd.client) against qemu-nbd and nbdkit, through imgfs.remote's
open_url and the format drivers on top of it."""

from __future__ import annotations

import errno
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from imgfs.block.hostfile import CacheMode, WouldBlock, call_nowait
from imgfs.errors import HostIOError, NoSpace, ReadOnly, UsageError
from imgfs.nbd import protocol as P
from imgfs.nbd.client import NBDFile, parse_url
from imgfs.remote import is_url, open_url
from tests.oracle import (
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    pattern_image,
    qemu_img,
    qemu_raw,
)
from tests.remote.nbdutil import (
    extents_of,
    map_runs,
    nbdkit,
    open_url_disk,
    qemu_nbd,
    read_all,
    stop,
)

MiB = 1024 * 1024


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def sparse_qcow2(path: Path, size: str = "64M") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    qemu_io(path, "qcow2", "write -P 0x5a 1M 3M", "write -P 0x11 40M 65k", "write -z 50M 1M")
    return path


def read_file(file: NBDFile, step: int = 3 * MiB + 17) -> bytes:
    return b"".join(bytes(file.pread(p, step)) for p in range(0, file.size(), step))[: file.size()]


def test_urls() -> None:
    t = parse_url("nbd://127.0.0.1:1234/a%20disk")
    assert (t.host, t.port, t.export, t.tls) == ("127.0.0.1", 1234, "a disk", False)
    t = parse_url("nbds+unix:///disk.qcow2?socket=/run/x.sock&timeout=5")
    assert (t.socket_path, t.export, t.tls, t.timeout) == ("/run/x.sock", "disk.qcow2", True, 5)
    assert parse_url("nbd://host").port == 10809 and parse_url("nbd://host").export == ""
    for bad in ("nbd+unix:///disk", "nbd:///disk", "nbd://h/x?timeout=abc", "nbd://h:99999/x"):
        with pytest.raises(UsageError):
            parse_url(bad)
    assert is_url("nbd://h/x") and is_url("nbd+unix:///x?socket=s") and is_url("nbds://h/x")


def test_qcow2_served_raw_over_tcp(tmp_path: Path) -> None:
    """qemu-nbd -f qcow2: the export is the guest disk; reads equal qemu-img convert and the
    block status walk equals qemu-img map of the image."""
    image = sparse_qcow2(tmp_path / "a.qcow2")
    expected = qemu_raw(image, tmp_path / "expected.raw").read_bytes()
    with qemu_nbd(image, "qcow2") as server:
        file = open_url(server.export("disk"), writable=False, cache=CacheMode.WRITEBACK)
        try:
            assert file.size() == len(expected)
            assert read_file(file) == expected
            assert bytes(file.pread(len(expected) - 10, 20)) == expected[-10:] + bytes(10)
            assert extents_of(file, file.size()) == map_runs(str(image), "qcow2", "-U")
            # Requests from several threads at once share the connection.
            errors: list[BaseException] = []

            def reader(seed: int) -> None:
                try:
                    for i in range(40):
                        off = ((seed * 7919 + i * 104729) * 4096) % (len(expected) - MiB)
                        n = 4096 * (1 + (seed + i) % 64)
                        assert bytes(file.pread(off, n)) == expected[off : off + n]
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
        finally:
            file.close()


def test_raw_over_unix_socket_writes(tmp_path: Path) -> None:
    """Writes at odd offsets, zeroing and flush through the raw driver on the client; the served
    file afterwards equals the expected bytes."""
    image = tmp_path / "disk.raw"
    expected = bytearray(pattern_image(image, 16 * MiB))
    sock = tmp_path / "nbd.sock"
    with qemu_nbd(image, "raw", unix=sock) as server:
        disk = open_url_disk(server.export("disk"), "raw", writable=True)
        try:
            assert not disk.read_only
            writes = [(1, b"a" * 4095), (3 * MiB - 7, b"b" * (2 * MiB + 9)), (16 * MiB - 3, b"end")]
            for off, data in writes:
                disk.write(off, data)
                expected[off : off + len(data)] = data
            disk.write_zeroes(5 * MiB + 100, 70000)
            expected[5 * MiB + 100 : 5 * MiB + 70100] = bytes(70000)
            disk.write_zeroes(8 * MiB, 2 * MiB, may_unmap=True)
            expected[8 * MiB : 10 * MiB] = bytes(2 * MiB)
            with pytest.raises(NoSpace):
                disk.top.file.pwrite(16 * MiB - 1, b"xx")
            disk.flush()
            assert read_all(disk) == bytes(expected)
            # a hole punched through the export shows in its block status
            assert disk.top.file.data_extents(8 * MiB, 2 * MiB) == (False, 2 * MiB)
        finally:
            disk.close()
    expected_path = tmp_path / "expected.raw"
    expected_path.write_bytes(expected)
    assert_qemu_compare_identical(image, expected_path, "raw")


def test_qcow2_bytes_served_with_imgfs_driver_on_top(tmp_path: Path) -> None:
    """qemu-nbd -f raw serves a qcow2 file's bytes; imgfs's qcow2 driver reads and writes it.
    The export cannot grow, so an allocating write fails with ENOSPC and leaves the image
    consistent."""
    image = sparse_qcow2(tmp_path / "a.qcow2")
    expected = bytearray(qemu_raw(image, tmp_path / "expected.raw").read_bytes())
    with qemu_nbd(image, "raw") as server:
        disk = open_url_disk(server.export("disk"), writable=True)  # probed: qcow2
        try:
            assert disk.top.format_name == "qcow2"
            assert read_all(disk) == bytes(expected)
            disk.write(2 * MiB + 3, b"in place")  # inside an allocated cluster
            expected[2 * MiB + 3 : 2 * MiB + 11] = b"in place"
            with pytest.raises(NoSpace):
                disk.write(60 * MiB, b"needs a new cluster")
            disk.flush()
        finally:
            disk.close()
    path = tmp_path / "expected2.raw"
    path.write_bytes(expected)
    assert_qemu_check_clean(image, "qcow2", allow_leaks=True)
    assert_qemu_compare_identical(image, path, "qcow2")


def test_read_only_export(tmp_path: Path) -> None:
    image = tmp_path / "ro.raw"
    data = pattern_image(image, 4 * MiB)
    with qemu_nbd(image, "raw", read_only=True) as server:
        file = open_url(server.export("disk"), writable=True, cache=CacheMode.WRITEBACK)
        try:
            assert not file.writable
            with pytest.raises(ReadOnly):
                file.pwrite(0, b"x")
            assert bytes(file.pread(0, 100)) == data[:100]
        finally:
            file.close()
        disk = open_url_disk(server.export("disk"), "raw", writable=True)
        try:
            assert disk.read_only
        finally:
            disk.close()


def test_nbdkit_memory_and_sparse_random(tmp_path: Path) -> None:
    sock = tmp_path / "kit.sock"
    with nbdkit("memory", "64M", unix=sock) as server:
        file = open_url(server.export(), writable=True, cache=CacheMode.WRITEBACK)
        try:
            assert file.data_extents(0, 64 * MiB) == (False, 64 * MiB)
            file.pwrite(MiB + 1, b"x" * 5000)
            assert bytes(file.pread(MiB, 5002)) == b"\0" + b"x" * 5000 + b"\0"
            assert file.data_extents(MiB, 4096)[0]
            file.sync()
        finally:
            file.close()
    sock2 = tmp_path / "kit2.sock"
    with nbdkit("sparse-random", "32M", "seed=7", "percent=20", unix=sock2) as server:
        url = server.export()
        reference = tmp_path / "ref.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", url, str(reference))
        file = open_url(url, writable=False, cache=CacheMode.WRITEBACK)
        try:
            # sparse-random derives a block's bytes from the request, so read as qemu-img did
            assert read_file(file, MiB) == reference.read_bytes()
            assert extents_of(file, file.size()) == map_runs(url, "raw")
        finally:
            file.close()


def test_nbdkit_file_plugin_and_old_protocol_paths(tmp_path: Path) -> None:
    """nbdkit's file plugin, with structured replies off (simple replies, no block status), and
    with fixed newstyle masked off (NBD_OPT_EXPORT_NAME, the old servers' way in)."""
    image = tmp_path / "f.raw"
    data = pattern_image(image, 8 * MiB)
    for extra in (("--no-sr",), ("--mask-handshake=0",)):
        sock = tmp_path / f"{extra[0][2:6]}.sock"
        with nbdkit("file", str(image), unix=sock, extra=extra) as server:
            file = open_url(server.export(), writable=True, cache=CacheMode.WRITEBACK)
            try:
                assert not file.info.structured and file.info.meta_context is None
                assert read_file(file, MiB + 1) == data
                assert file.data_extents(0, 100) == (True, 100)
                file.pwrite(3, b"abc")
                file.sync()
                assert bytes(file.pread(0, 8)) == data[:3] + b"abc" + data[6:8]
            finally:
                file.close()
        data = data[:3] + b"abc" + data[6:]
    assert image.read_bytes() == data


def test_reads_never_block_the_event_loop(tmp_path: Path) -> None:
    """In non-blocking mode (the trio thread) a read raises WouldBlock so the FUSE layer or the
    server retries it on a worker thread instead of waiting for the network inline."""
    image = tmp_path / "n.raw"
    pattern_image(image, MiB)
    with qemu_nbd(image, "raw") as server:
        file = open_url(server.export("disk"), writable=False, cache=CacheMode.WRITEBACK)
        try:
            with pytest.raises(WouldBlock):
                call_nowait(file.pread, 0, 10)
        finally:
            file.close()


def test_server_going_away_and_reconnect(tmp_path: Path) -> None:
    """A dead server fails requests with an error (no hang); a new server on the same socket
    is reconnected to. Writes acknowledged but never flushed when the connection dropped make
    every later flush fail: the server may have lost them."""
    image = tmp_path / "r.raw"
    data = pattern_image(image, 4 * MiB)
    sock = tmp_path / "r.sock"
    url = f"nbd+unix:///disk?socket={sock}&connect-timeout=2"
    with qemu_nbd(image, "raw", unix=sock) as server:
        file = open_url(url, writable=True, cache=CacheMode.WRITEBACK)
        assert bytes(file.pread(0, 10)) == data[:10]
        stop(server.proc)
    try:
        start = time.monotonic()
        with pytest.raises(HostIOError):
            file.pread(0, 10)
        assert time.monotonic() - start < 5
        with qemu_nbd(image, "raw", unix=sock):
            assert bytes(file.pread(100, 10)) == data[100:110]  # reconnected
            file.pwrite(0, b"unflushed")
            file.sync()  # flushed: fine
            file.pwrite(0, b"lost?")
        with qemu_nbd(image, "raw", unix=sock):
            assert bytes(file.pread(0, 5)) == b"lost?"
            with pytest.raises(HostIOError) as info:
                file.sync()
            assert info.value.errno == errno.EIO and "unflushed" in str(info.value)
    finally:
        file.close()


def test_timeouts(tmp_path: Path) -> None:
    """A server that accepts and never speaks: the handshake gives up after connect-timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        start = time.monotonic()
        with pytest.raises(HostIOError) as info:
            NBDFile(f"nbd://127.0.0.1:{port}/x?connect-timeout=0.5", writable=False)
        assert info.value.errno == errno.ETIMEDOUT
        assert time.monotonic() - start < 3
    finally:
        listener.close()
    with pytest.raises(HostIOError):
        NBDFile(f"nbd+unix:///x?socket={tmp_path}/none.sock", writable=False)
    # a server that answers the handshake but not a read (nbdkit's delay filter)
    sock = tmp_path / "slow.sock"
    with nbdkit("--filter=delay", "memory", "1M", "rdelay=20", unix=sock) as server:
        file = NBDFile(server.export() + "&timeout=0.5", writable=False)
        try:
            start = time.monotonic()
            with pytest.raises(HostIOError) as info:
                file.pread(0, 512)
            assert info.value.errno in (errno.ETIMEDOUT, errno.EIO)
            assert time.monotonic() - start < 5  # one retry on a new connection, then the error
        finally:
            file.close()


def test_unknown_export_is_a_clear_error(tmp_path: Path) -> None:
    image = tmp_path / "u.raw"
    pattern_image(image, MiB)
    with qemu_nbd(image, "raw") as server:
        with pytest.raises(HostIOError) as info:
            open_url(server.export("nope"), writable=False, cache=CacheMode.WRITEBACK)
        assert "nope" in str(info.value)


def test_many_threads_big_writes_and_reads_share_one_connection(tmp_path: Path) -> None:
    """Threads writing 4 MiB requests while others read: replies keep flowing while a thread is
    busy sending (no deadlock), and every region ends up with its own thread's bytes."""
    image = tmp_path / "c.raw"
    qemu_img("create", "-q", "-f", "raw", str(image), "64M")
    sock = tmp_path / "c.sock"
    with qemu_nbd(image, "raw", unix=sock) as server:
        file = open_url(server.export("disk"), writable=True, cache=CacheMode.WRITEBACK)
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                region = i * 8 * MiB
                for k in range(6):
                    data = bytes([i * 16 + k]) * (4 * MiB - 512 * k)
                    file.pwrite(region, data)
                    assert bytes(file.pread(region, len(data))) == data
                    assert bytes(file.pread(region + 4 * MiB, 4096)) == bytes(4096)
            except BaseException as e:
                errors.append(e)

        try:
            threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads), "client threads hung"
            assert not errors, errors
            file.sync()
        finally:
            file.close()
    content = image.read_bytes()
    for i in range(8):
        last = bytes([i * 16 + 5]) * (4 * MiB - 512 * 5)
        assert content[i * 8 * MiB : i * 8 * MiB + len(last)] == last


class FakeServer:
    """A server that negotiates properly (structured replies, GO) and then answers the first
    request with ``reply(handle, offset, length)``'s bytes: hostile or broken servers."""

    def __init__(self, reply: object) -> None:
        self.reply = reply
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    self.session(conn)
                except OSError:
                    pass

    @staticmethod
    def recv(conn: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError
            out += chunk
        return out

    def session(self, conn: socket.socket) -> None:
        conn.sendall(P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE))
        self.recv(conn, 4)
        while True:
            _, option, length = P.OPTION_HEADER.unpack(self.recv(conn, P.OPTION_HEADER.size))
            self.recv(conn, length)
            if option == P.OPT_GO:
                info = P.INFO_EXPORT_BODY.pack(P.INFO_EXPORT, MiB, P.FLAG_HAS_FLAGS)
                conn.sendall(P.OPTION_REPLY.pack(P.OPTION_REPLY_MAGIC, option, P.REP_INFO,
                                                 len(info)) + info)  # fmt: skip
                conn.sendall(P.OPTION_REPLY.pack(P.OPTION_REPLY_MAGIC, option, P.REP_ACK, 0))
                break
            conn.sendall(P.OPTION_REPLY.pack(P.OPTION_REPLY_MAGIC, option, P.REP_ACK, 0))
        _, _, _, handle, offset, length = P.REQUEST.unpack(self.recv(conn, P.REQUEST.size))
        conn.sendall(self.reply(handle, offset, length))  # type: ignore[operator]
        time.sleep(0.2)

    def close(self) -> None:
        self.listener.close()


def _chunk(flags: int, rtype: int, handle: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, flags, rtype, handle, n) + body


HOSTILE_REPLIES = {
    "bad magic": lambda h, o, n: b"\xde\xad\xbe\xef" + bytes(12),
    "unknown handle": lambda h, o, n: _chunk(1, P.REPLY_TYPE_NONE, h + 1, b""),
    "data outside the request": lambda h, o, n: _chunk(
        1, P.REPLY_TYPE_OFFSET_DATA, h, P.OFFSET.pack(o + n) + bytes(n)
    ),
    "huge chunk": lambda h, o, n: _chunk(1, P.REPLY_TYPE_BLOCK_STATUS, h, b"", 0xFFFFFFFF),
    "short read": lambda h, o, n: (
        _chunk(0, P.REPLY_TYPE_OFFSET_DATA, h, P.OFFSET.pack(o) + bytes(n // 2))
        + _chunk(1, P.REPLY_TYPE_NONE, h, b"")
    ),
    "hole chunk of bad size": lambda h, o, n: _chunk(
        1, P.REPLY_TYPE_OFFSET_HOLE, h, P.OFFSET_HOLE_BODY.pack(o, n) + b"x"
    ),
    "error message longer than its chunk": lambda h, o, n: _chunk(
        1, P.REPLY_TYPE_ERROR, h, P.ERROR_BODY.pack(5, 500) + b"oops"
    ),
    "unknown chunk type": lambda h, o, n: _chunk(1, 77, h, b""),
    "simple reply with data to a structured read": lambda h, o, n: (
        P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, h) + bytes(n)
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REPLIES))
def test_hostile_server_replies_are_errors(case: str) -> None:
    server = FakeServer(HOSTILE_REPLIES[case])
    try:
        file = NBDFile(f"nbd://127.0.0.1:{server.port}/x?timeout=3", writable=False)
        try:
            start = time.monotonic()
            with pytest.raises(HostIOError):
                file.pread(0, 4096)
            assert time.monotonic() - start < 10
        finally:
            file.close()
    finally:
        server.close()
