"""``imgfs serve``: qemu-img, qemu-io, nbdinfo, nbdcopy and imgfs's own client against it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from imgfs.block.hostfile import CacheMode
from imgfs.errors import HostIOError
from imgfs.nbd import protocol as P
from imgfs.remote import open_url
from tests.oracle import (
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    pattern_image,
    qemu_img,
    qemu_raw,
)
from tests.remote.nbdutil import Server, extents_of, imgfs_serve, make_tls_dir, map_runs

MiB = 1024 * 1024


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=120)


def qemu_io(target: str, *commands: str, fmt: str = "raw") -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    return run(*args, target, check=False)


def make_images(images: Path) -> dict[str, Path]:
    """A sparse qcow2, a raw file, a vmdk, and a qcow2 overlay on a raw base."""
    qcow2 = images / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(qcow2), "64M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x11 40M 65k",
        "-c", "write -z 50M 1M", str(qcow2))  # fmt: skip
    raw = images / "plain.img"
    pattern_image(raw, 8 * MiB)
    vmdk = images / "v.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "16M")
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x77 5M 1M", str(vmdk))
    base = images / "base.raw"
    pattern_image(base, 4 * MiB, seed=3)
    overlay = images / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(overlay))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 64k", str(overlay))
    return {"disk.qcow2": qcow2, "plain.img": raw, "v.vmdk": vmdk, "base.raw": base,
            "top.qcow2": overlay}  # fmt: skip


def stopped_cleanly(server: Server) -> str:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    assert server.log is not None
    text = server.log.read_text()
    assert "Traceback" not in text and "unexpected error" not in text, text
    return text


def test_qemu_and_libnbd_clients(images: Path, tmp_path: Path) -> None:
    paths = make_images(images)
    with imgfs_serve(images, log=tmp_path / "serve.log") as server:
        listed = run("nbdinfo", "--list", "--json", server.export()).stdout
        exports = {e["export-name"]: e for e in json.loads(listed)["exports"]}
        assert set(exports) == set(paths)
        assert exports["base.raw"]["is_read_only"]  # top.qcow2 builds on it
        assert not exports["disk.qcow2"]["is_read_only"]
        for name, path in paths.items():
            url = server.export(name)
            info = json.loads(run("qemu-img", "info", "--output=json", url).stdout)
            reference = qemu_raw(path, tmp_path / f"{name}.ref")
            assert info["virtual-size"] == reference.stat().st_size
            out = tmp_path / f"{name}.out"
            run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out))
            assert out.read_bytes() == reference.read_bytes(), name
            copied = tmp_path / f"{name}.nbdcopy"
            run("nbdcopy", url, str(copied))
            assert copied.read_bytes() == reference.read_bytes(), name
            # block status over NBD is the image's own map (data vs zeros)
            assert map_runs(url, "raw") == map_runs(str(path), None, "-U"), name
        nbdmap = run("nbdinfo", "--map", "--json", server.export("disk.qcow2")).stdout
        zeros = [e for e in json.loads(nbdmap) if e["type"] & P.STATE_ZERO]
        assert zeros and zeros[0]["offset"] == 0
        # the mount's name and, with several disks, no default export
        run("qemu-img", "info", server.export("disk.qcow2.raw"))
        assert run("qemu-img", "info", server.export(""), check=False).returncode != 0
        assert run("qemu-img", "info", server.export("nope"), check=False).returncode != 0
        # the server's sparse reads: a read of a hole comes back as zeros
        file = open_url(server.export("disk.qcow2"), writable=False, cache=CacheMode.WRITEBACK)
        try:
            assert bytes(file.pread(10 * MiB, 4 * MiB)) == bytes(4 * MiB)
            assert extents_of(file, file.size()) == map_runs(str(paths["disk.qcow2"]), None, "-U")
        finally:
            file.close()
        stopped_cleanly(server)


def test_writes_through_qemu_io_and_nbdcopy(images: Path, tmp_path: Path) -> None:
    paths = make_images(images)
    expected = bytearray(qemu_raw(paths["disk.qcow2"], tmp_path / "e.raw").read_bytes())
    with imgfs_serve(images, log=tmp_path / "serve.log") as server:
        url = server.export("disk.qcow2")
        r = qemu_io(url, "write -P 0xab 1000 5000", "write -z 20M 64k", "flush",
                    "write -P 0xcd -f 33M 4097")  # fmt: skip
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        expected[1000:6000] = b"\xab" * 5000
        expected[33 * MiB : 33 * MiB + 4097] = b"\xcd" * 4097
        assert "Permission" in qemu_io(server.export("base.raw"), "write 0 512").stderr
        # nbdcopy from a file into an export
        source = tmp_path / "src.raw"
        src = pattern_image(source, 8 * MiB, seed=9)
        run("nbdcopy", str(source), server.export("plain.img"))
        stopped_cleanly(server)
    e = tmp_path / "expected.raw"
    e.write_bytes(expected)
    assert_qemu_check_clean(paths["disk.qcow2"], "qcow2")
    assert_qemu_compare_identical(paths["disk.qcow2"], e, "qcow2")
    assert paths["plain.img"].read_bytes() == src


@pytest.mark.parametrize("cache", ["writeback", "none", "writethrough"])
def test_several_clients_writing_disjoint_regions(images: Path, tmp_path: Path, cache: str) -> None:
    """Inline writes (writeback) and writes on the worker pool (O_DIRECT, writethrough)."""
    qcow2 = images / "shared.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(qcow2), "32M")
    with imgfs_serve(images, "--cache", cache, log=tmp_path / "serve.log") as server:
        url = server.export("shared.qcow2")
        procs = [
            subprocess.Popen(
                [
                    "qemu-io",
                    "-f",
                    "raw",
                    "-c",
                    f"write -P {0x10 + i} {i * 4}M 4M",
                    "-c",
                    "flush",
                    url,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(6)
        ]
        errors: list[BaseException] = []

        def own_client(i: int) -> None:  # and imgfs's client from threads, meanwhile
            try:
                f = open_url(url, writable=True, cache=CacheMode.WRITEBACK)
                try:
                    for k in range(16):
                        f.pwrite(24 * MiB + i * MiB + k * 65536, bytes([0x40 + i]) * 65536)
                    f.sync()
                finally:
                    f.close()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=own_client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, out + err
        assert not errors, errors
        stopped_cleanly(server)
    expected = bytearray(32 * MiB)
    for i in range(6):
        expected[i * 4 * MiB : (i + 1) * 4 * MiB] = bytes([0x10 + i]) * 4 * MiB
    for i in range(4):
        expected[24 * MiB + i * MiB : 25 * MiB + i * MiB] = bytes([0x40 + i]) * MiB
    e = tmp_path / "expected.raw"
    e.write_bytes(expected)
    assert_qemu_check_clean(qcow2, "qcow2")
    assert_qemu_compare_identical(qcow2, e, "qcow2")


def test_unix_socket_read_only_and_default_export(images: Path, tmp_path: Path) -> None:
    raw = images / "only.img"
    data = pattern_image(raw, 4 * MiB)
    sock = tmp_path / "s.sock"
    with imgfs_serve(images, "--read-only", log=tmp_path / "l", listen=f"unix:{sock}") as server:
        url = f"nbd+unix:///?socket={sock}"  # the empty name: the only disk
        out = tmp_path / "o.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out))
        assert out.read_bytes() == data
        info = json.loads(run("nbdinfo", "--json", url).stdout)
        assert info["exports"][0]["is_read_only"]
        assert qemu_io(server.export("only.img"), "write 0 512").returncode != 0
        stopped_cleanly(server)
    assert not sock.exists()
    assert raw.read_bytes() == data


def test_tls(images: Path, tmp_path: Path) -> None:
    raw = images / "secret.img"
    data = pattern_image(raw, 2 * MiB)
    certs = make_tls_dir(tmp_path / "pki")
    args = ("--tls", "--tls-cert", str(certs / "server-cert.pem"),
            "--tls-key", str(certs / "server-key.pem"))  # fmt: skip
    with imgfs_serve(images, *args, log=tmp_path / "serve.log") as server:
        port = server.port
        secure = f"nbds://127.0.0.1:{port}/secret.img?tls-certificates={certs}"
        info = json.loads(run("nbdinfo", "--json", secure).stdout)
        assert info["exports"][0]["export-size"] == len(data)
        assert run("nbdinfo", server.export("secret.img"), check=False).returncode != 0
        out = tmp_path / "q.raw"
        run("qemu-img", "convert", "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}", "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={port},export=secret.img,tls-creds=tls0",
            "-O", "raw", str(out))  # fmt: skip
        assert out.read_bytes() == data
        # imgfs's client: nbds with the CA, and a clear error without TLS
        file = open_url(secure, writable=True, cache=CacheMode.WRITEBACK)
        try:
            file.pwrite(0, b"tls!")
            file.sync()
            assert bytes(file.pread(0, 6)) == b"tls!" + data[4:6]
        finally:
            file.close()
        with pytest.raises(Exception, match="TLS"):
            open_url(server.export("secret.img"), writable=False, cache=CacheMode.WRITEBACK)
        stopped_cleanly(server)
    assert raw.read_bytes()[:4] == b"tls!"


# -- hostile and broken clients ---------------------------------------------------------------


class RawClient:
    """Just enough of a client to send bad requests: fixed newstyle, GO, simple replies."""

    def __init__(self, port: int, export: str, *, client_flags: int | None = None) -> None:
        """GO by default; with ``client_flags``, the old way in: NBD_OPT_EXPORT_NAME."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.recv(P.GREETING.size)
        name = export.encode()
        if client_flags is not None:
            self.sock.sendall(
                P.CLIENT_FLAGS.pack(client_flags)
                + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, len(name))
                + name
            )
            self.size = P.EXPORT_NAME_REPLY.unpack(self.recv(P.EXPORT_NAME_REPLY.size))[0]
            if not client_flags & P.FLAG_C_NO_ZEROES:
                assert self.recv(P.EXPORT_NAME_PADDING) == bytes(P.EXPORT_NAME_PADDING)
            return
        self.sock.sendall(P.CLIENT_FLAGS.pack(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
        data = P.U32.pack(len(name)) + name + P.U16.pack(0)
        self.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(data)) + data)
        while True:
            _, _, reply, length = P.OPTION_REPLY.unpack(self.recv(P.OPTION_REPLY.size))
            body = self.recv(length)
            if reply == P.REP_INFO and P.U16.unpack_from(body)[0] == P.INFO_EXPORT:
                self.size = P.INFO_EXPORT_BODY.unpack(body)[1]
            if reply == P.REP_ACK:
                break
            assert not reply & P.REP_FLAG_ERROR, body

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def request(self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b"",
                magic: int = P.REQUEST_MAGIC) -> int:  # fmt: skip
        self.sock.sendall(P.REQUEST.pack(magic, flags, cmd, 7, offset, length) + payload)
        _, error, handle = P.SIMPLE_REPLY.unpack(self.recv(P.SIMPLE_REPLY.size))
        assert handle == 7
        if cmd == P.CMD_READ and not error:
            self.recv(length)
        return error

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True
        finally:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()


def test_bad_requests_get_errors_not_crashes(images: Path, tmp_path: Path) -> None:
    raw = images / "x.img"
    pattern_image(raw, MiB)
    pattern_image(images / "ro.img", MiB)
    (images / "ro.img").chmod(0o444)
    with imgfs_serve(images, log=tmp_path / "serve.log") as server:
        assert server.port is not None
        c = RawClient(server.port, "x.img")
        assert c.request(P.CMD_READ, MiB - 10, 20) == P.NBD_EINVAL
        assert c.request(P.CMD_WRITE, MiB - 2, 4, payload=b"abcd") == P.NBD_ENOSPC
        assert c.request(P.CMD_TRIM, MiB, 4096) == P.NBD_EINVAL
        assert c.request(P.CMD_WRITE_ZEROES, MiB - 512, 1024) == P.NBD_ENOSPC
        assert c.request(P.CMD_READ, 0, 64 * MiB) == P.NBD_EINVAL
        assert c.request(P.CMD_BLOCK_STATUS, 0, 512) == P.NBD_EINVAL  # no context selected
        assert c.request(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_NO_HOLE) == P.NBD_EINVAL
        assert c.request(99, 0, 0) == P.NBD_EINVAL
        assert c.request(P.CMD_READ, 0, 4096) == 0  # still in step
        assert c.request(P.CMD_WRITE, 0, 3, flags=P.CMD_FLAG_FUA, payload=b"abc") == 0
        assert c.request(P.CMD_FLUSH, 0, 0) == 0
        ro = RawClient(server.port, "ro.img")
        assert ro.request(P.CMD_WRITE, 0, 2, payload=b"no") == P.NBD_EPERM
        assert ro.request(P.CMD_WRITE_ZEROES, 0, 512) == P.NBD_EPERM
        ro.close()
        # a stream that cannot be resynchronised is dropped
        c.sock.sendall(P.REQUEST.pack(0xDEADBEEF, 0, P.CMD_READ, 1, 0, 512))
        assert c.closed()
        c = RawClient(server.port, "x.img")
        c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 64 * MiB))
        assert c.closed()
        # garbage instead of a handshake, and a client that vanishes mid-option
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.recv(P.GREETING.size)
            s.sendall(b"\xff" * 64)
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.recv(P.GREETING.size)
            s.sendall(P.CLIENT_FLAGS.pack(1) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 100))
        # still serving, also to clients that enter with NBD_OPT_EXPORT_NAME
        for flags in (0, P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            c = RawClient(server.port, "x.img", client_flags=flags)
            assert c.size == MiB
            assert c.request(P.CMD_READ, 0, 3) == 0
            c.close()
        c = RawClient(server.port, "x.img")
        assert c.request(P.CMD_READ, 0, 3) == 0
        c.close()
        text = stopped_cleanly(server)
        assert "bad request magic" in text
    assert raw.read_bytes()[:3] == b"abc"


def test_serve_usage_errors(images: Path, tmp_path: Path) -> None:
    from imgfs.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--listen", "127.0.0.1:0"]) == 1
    assert main(["serve", str(images), "--listen", "127.0.0.1:notaport"]) == 1
    assert main(["serve", str(images), "--tls"]) == 1


def test_sigterm_with_clients_connected_flushes_every_image(images: Path, tmp_path: Path) -> None:
    qcow2 = images / "busy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(qcow2), "16M")
    with imgfs_serve(images, log=tmp_path / "serve.log") as server:
        files = [open_url(server.export("busy.qcow2"), writable=True, cache=CacheMode.WRITEBACK)
                 for _ in range(2)]  # fmt: skip
        try:
            files[0].pwrite(3 * MiB, b"written, never flushed by the client" * 100)
            files[1].pwrite(9 * MiB + 5, b"another connection")
            text = stopped_cleanly(server)
        finally:
            for f in files:
                f.close()
        assert "busy.qcow2: flushed and closed" in text
    expected = bytearray(16 * MiB)
    data = b"written, never flushed by the client" * 100
    expected[3 * MiB : 3 * MiB + len(data)] = data
    expected[9 * MiB + 5 : 9 * MiB + 23] = b"another connection"
    e = tmp_path / "expected.raw"
    e.write_bytes(expected)
    assert_qemu_check_clean(qcow2, "qcow2")
    assert_qemu_compare_identical(qcow2, e, "qcow2")


def test_zeroing_trim_and_error_chunks(images: Path, tmp_path: Path) -> None:
    """WRITE_ZEROES with and without NO_HOLE, FAST_ZERO, TRIM and FLUSH from imgfs's client;
    an error chunk's message reaches the client and the connection stays usable."""
    qcow2 = images / "z.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(qcow2), "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 8M", str(qcow2))
    expected = bytearray(b"\x61" * 8 * MiB + bytes(8 * MiB))
    with imgfs_serve(images, log=tmp_path / "serve.log") as server:
        file = open_url(server.export("z.qcow2"), writable=True, cache=CacheMode.WRITEBACK)
        try:
            assert file.zero_range(1 * MiB, MiB)  # NO_HOLE: kept allocated
            assert file.punch_hole(3 * MiB, 2 * MiB)  # may deallocate
            expected[1 * MiB : 2 * MiB] = bytes(MiB)
            expected[3 * MiB : 5 * MiB] = bytes(2 * MiB)
            conn = file._conn
            assert conn is not None
            conn.request(P.CMD_WRITE_ZEROES, 7 * MiB, 65536, flags=P.CMD_FLAG_FAST_ZERO)
            expected[7 * MiB : 7 * MiB + 65536] = bytes(65536)
            assert file.trim(5 * MiB, MiB)  # content undefined afterwards: rewrite it
            file.pwrite(5 * MiB, b"\x62" * MiB)
            expected[5 * MiB : 6 * MiB] = b"\x62" * MiB
            file.sync()
            assert bytes(file.pread(0, 16 * MiB)) == bytes(expected)
            assert file.data_extents(3 * MiB, 2 * MiB) == (False, 2 * MiB)
            with pytest.raises(HostIOError, match="past the end"):
                conn.request(P.CMD_READ, 16 * MiB - 10, 20, buf=memoryview(bytearray(20)))
            with pytest.raises(HostIOError, match="past the end"):
                conn.request(P.CMD_WRITE_ZEROES, 16 * MiB, 512)
            assert bytes(file.pread(0, 4)) == b"\x61" * 4
        finally:
            file.close()
        stopped_cleanly(server)
    e = tmp_path / "expected.raw"
    e.write_bytes(expected)
    assert_qemu_check_clean(qcow2, "qcow2")
    assert_qemu_compare_identical(qcow2, e, "qcow2")


def test_detect_zeroes_unmap(images: Path, tmp_path: Path) -> None:
    raw = images / "dz.img"
    data = bytearray(pattern_image(raw, 4 * MiB))
    with imgfs_serve(images, "--detect-zeroes", "unmap", log=tmp_path / "serve.log") as server:
        r = qemu_io(server.export("dz.img"), "write -P 0 1M 1M", "write -P 0 3M 4096")
        assert r.returncode == 0, r.stdout + r.stderr
        stopped_cleanly(server)
    data[1 * MiB : 2 * MiB] = bytes(MiB)
    data[3 * MiB : 3 * MiB + 4096] = bytes(4096)
    assert raw.read_bytes() == data
    runs = map_runs(str(raw), "raw")
    assert (1 * MiB, 1 * MiB, False, True) in runs  # deallocated, not written
