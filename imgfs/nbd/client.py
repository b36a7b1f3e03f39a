"""An NBD client with HostFile's interface, so any format driver runs on an NBD export.

URLs (NetworkBlockDevice/nbd doc/uri.md)::

    nbd://HOST[:PORT]/EXPORT            TCP (port 10809 by default)
    nbds://HOST[:PORT]/EXPORT           TCP, TLS required
    nbd+unix:///EXPORT?socket=PATH      Unix socket
    nbds+unix:///EXPORT?socket=PATH     Unix socket, TLS required

Query parameters: ``socket``; ``tls-certificates=DIR`` (``ca-cert.pem`` and optionally
``client-cert.pem``/``client-key.pem``, as libnbd reads them), ``tls-verify-peer=0|1``,
``tls-hostname``; ``timeout=SECONDS`` (I/O timeout, default 120), ``connect-timeout=SECONDS``
(default 10).

Handshake: fixed newstyle; STARTTLS for nbds; STRUCTURED_REPLY; SET_META_CONTEXT
``base:allocation`` (block status, so holes of the export are visible through
``data_extents``); GO asking for the block size constraints, falling back to EXPORT_NAME for
servers without GO.

Concurrency: several threads (FUSE workers) share one connection. Each request is registered
under a fresh handle and sent under a send lock; replies are read by whichever waiting thread
holds the receive lock ("leader/followers"): it reads replies until its own has arrived, hands
others' replies to their owners, then wakes one waiter to take over. A single thread therefore
never pays a thread hop, and read payloads land directly in the caller's buffer.

Connection loss: requests in flight fail over to a new connection (one attempt; reads, writes,
zeroing and trim are idempotent). If writes had been acknowledged but not flushed when the
connection dropped, the server may have lost them, so every later flush fails with EIO: a
successful fsync must never be a lie.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from imgfs.block.hostfile import CacheMode, WouldBlock, in_nowait_mode
from imgfs.errors import HostIOError, InvalidRequest, NoSpace, ReadOnly, UsageError
from imgfs.nbd import SCHEMES
from imgfs.nbd import protocol as P

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
DEFAULT_CONNECT_TIMEOUT = 10.0
# Option replies are small (names, contexts); anything bigger is a broken server.
MAX_OPTION_REPLY = 64 * 1024
# Block-status answers kept to serve the next data_extents calls (a map walks the export).
EXTENT_CACHE_DESCRIPTORS = 4096


class ProtocolError(HostIOError):
    """The server broke the protocol; the connection is dropped."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EIO)


@dataclass(frozen=True, slots=True)
class Target:
    """Where an NBD URL points, and how to talk to it."""

    url: str  # for messages
    export: str
    host: str | None = None
    port: int = P.DEFAULT_PORT
    socket_path: str | None = None
    tls: bool = False
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    tls_hostname: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


def parse_url(url: str) -> Target:
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise UsageError(f"{url}: not an NBD URL (schemes: {', '.join(SCHEMES)})")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if "\0" in export or len(export.encode()) > P.MAX_STRING:
        raise UsageError(f"{url}: bad export name {export!r}")

    def seconds(key: str, default: float) -> float:
        text = query.get(key)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{url}: {key}={text!r} is not a number of seconds") from None
        if not 0 < value <= 86400:
            raise UsageError(f"{url}: {key}={text!r} is out of range")
        return value

    verify = query.get("tls-verify-peer", "1")
    if verify not in ("0", "1", "true", "false"):
        raise UsageError(f"{url}: tls-verify-peer={verify!r} must be 0 or 1")
    common = dict(
        url=url,
        export=export,
        tls=scheme.startswith("nbds"),
        tls_certificates=query.get("tls-certificates"),
        tls_verify_peer=verify in ("1", "true"),
        tls_hostname=query.get("tls-hostname"),
        timeout=seconds("timeout", DEFAULT_TIMEOUT),
        connect_timeout=seconds("connect-timeout", DEFAULT_CONNECT_TIMEOUT),
    )
    if scheme.endswith("+unix"):
        path = query.get("socket")
        if not path:
            raise UsageError(f"{url}: a {scheme} URL needs ?socket=PATH")
        return Target(socket_path=path, **common)  # type: ignore[arg-type]
    if not parts.hostname:
        raise UsageError(f"{url}: no host")
    try:
        port = parts.port or P.DEFAULT_PORT
    except ValueError:
        raise UsageError(f"{url}: bad port") from None
    return Target(host=parts.hostname, port=port, **common)  # type: ignore[arg-type]


def tls_client_context(target: Target) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    certs = target.tls_certificates
    if certs:
        ca = os.path.join(certs, "ca-cert.pem")
        if os.path.exists(ca):
            ctx.load_verify_locations(ca)
        cert, key = os.path.join(certs, "client-cert.pem"), os.path.join(certs, "client-key.pem")
        if os.path.exists(cert) and os.path.exists(key):
            ctx.load_cert_chain(cert, key)
    else:
        ctx.load_default_certs()
    if not target.tls_verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(eq=False, slots=True)
class _Pending:
    """One request in flight: where its reply goes."""

    cmd: int
    offset: int
    length: int
    buf: memoryview | None = None  # read target
    covered: int = 0  # bytes of a structured read reply received
    extents: list[tuple[int, int]] = field(default_factory=list)  # block status
    error: BaseException | None = None
    done: bool = False
    waiting: bool = False  # its thread is in _wait (so it can take over reading replies)
    event: threading.Event = field(default_factory=threading.Event)


@dataclass(slots=True)
class ExportInfo:
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = P.MAX_PAYLOAD
    structured: bool = False
    meta_context: int | None = None  # base:allocation's id, when selected


class Connection:
    """One negotiated connection in the transmission phase."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sock = self._connect()
        try:
            self.info = self._handshake()
        except BaseException:
            self.sock.close()
            raise
        self._set_io_timeout(target.timeout)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._handles = itertools.count(1)
        self.broken: BaseException | None = None

    def _set_io_timeout(self, seconds: float) -> None:
        """The I/O timeout. On a plain socket it is the kernel's (SO_RCVTIMEO/SO_SNDTIMEO on a
        blocking socket): Python's own timeout polls before every recv, a syscall per call."""
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(seconds)
            return
        self.sock.settimeout(None)
        whole = int(seconds)
        timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    # -- connecting and the handshake -----------------------------------------------------------

    def _connect(self) -> socket.socket:
        t = self.target
        try:
            if t.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(t.connect_timeout)
                try:
                    sock.connect(t.socket_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                assert t.host is not None
                sock = socket.create_connection((t.host, t.port), timeout=t.connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise HostIOError(
                f"{t.url}: cannot connect: {e.strerror or e}", e.errno or errno.EHOSTUNREACH
            ) from None
        return sock

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return buf

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except (TimeoutError, BlockingIOError):
                raise HostIOError(
                    f"{self.target.url}: the server did not answer in time", errno.ETIMEDOUT
                ) from None
            except OSError as e:
                raise HostIOError(
                    f"{self.target.url}: connection lost: {e.strerror or e}", e.errno or errno.EIO
                ) from None
            if n == 0:
                raise HostIOError(f"{self.target.url}: the server closed the connection", errno.EIO)
            got += n

    def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        try:
            for part in parts:
                self.sock.sendall(part)
        except (TimeoutError, BlockingIOError):
            raise HostIOError(f"{self.target.url}: send timed out", errno.ETIMEDOUT) from None
        except OSError as e:
            raise HostIOError(
                f"{self.target.url}: connection lost: {e.strerror or e}", e.errno or errno.EIO
            ) from None

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._send(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, echoed, reply, length = P.OPTION_REPLY.unpack(self._recv_exact(P.OPTION_REPLY.size))
        if magic != P.OPTION_REPLY_MAGIC or echoed != option:
            raise ProtocolError(
                f"{self.target.url}: bad option reply (magic {magic:#x}, option {echoed})"
            )
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"{self.target.url}: option reply of {length} bytes")
        return reply, bytes(self._recv_exact(length)) if length else b""

    def _option_error(self, option: str, reply: int, data: bytes) -> HostIOError:
        what = P.REP_ERROR_NAMES.get(reply, f"error {reply:#x}")
        message = data.decode("utf-8", "replace").strip()
        detail = f" ({message})" if message else ""
        code = errno.ENOENT if reply == P.REP_ERR_UNKNOWN else errno.EIO
        if reply == P.REP_ERR_TLS_REQD:
            code = errno.EACCES
            detail += "; use an nbds:// URL"
        return HostIOError(f"{self.target.url}: {option}: {what}{detail}", code)

    def _handshake(self) -> ExportInfo:
        t = self.target
        magic, second, hflags = P.GREETING.unpack(self._recv_exact(P.GREETING.size))
        if magic != P.NBDMAGIC:
            raise ProtocolError(f"{t.url}: not an NBD server (magic {magic:#x})")
        if second == P.CLISERV_MAGIC:
            raise HostIOError(f"{t.url}: oldstyle NBD servers are not supported", errno.EPROTO)
        if second != P.IHAVEOPT:
            raise ProtocolError(f"{t.url}: bad newstyle magic {second:#x}")
        fixed = bool(hflags & P.FLAG_FIXED_NEWSTYLE)
        no_zeroes = bool(hflags & P.FLAG_NO_ZEROES)
        cflags = (P.FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (
            P.FLAG_C_NO_ZEROES if no_zeroes else 0
        )
        self._send(P.CLIENT_FLAGS.pack(cflags))
        if not fixed:
            if t.tls:
                raise HostIOError(f"{t.url}: the server cannot do TLS", errno.EPROTO)
            return self._export_name(no_zeroes, structured=False)
        if t.tls:
            self._send_option(P.OPT_STARTTLS)
            reply, data = self._option_reply(P.OPT_STARTTLS)
            if reply != P.REP_ACK:
                raise self._option_error("STARTTLS", reply, data)
            ctx = tls_client_context(t)
            hostname = t.tls_hostname or t.host or "localhost"
            try:
                self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)
            except (ssl.SSLError, OSError) as e:
                raise HostIOError(f"{t.url}: TLS handshake failed: {e}", errno.EACCES) from None
        structured = self._structured_replies()
        meta_context = self._select_base_allocation() if structured else None
        info = self._go()
        if info is None:  # no NBD_OPT_GO: an old server
            info = self._export_name(no_zeroes, structured)
        info.structured = structured
        info.meta_context = meta_context
        return info

    def _structured_replies(self) -> bool:
        self._send_option(P.OPT_STRUCTURED_REPLY)
        reply, data = self._option_reply(P.OPT_STRUCTURED_REPLY)
        if reply == P.REP_ACK:
            return True
        if reply == P.REP_ERR_TLS_REQD:
            raise self._option_error("STRUCTURED_REPLY", reply, data)
        return False

    def _select_base_allocation(self) -> int | None:
        name = self.target.export.encode()
        query = P.CONTEXT_BASE_ALLOCATION.encode()
        data = P.U32.pack(len(name)) + name + P.U32.pack(1) + P.U32.pack(len(query)) + query
        self._send_option(P.OPT_SET_META_CONTEXT, data)
        selected = None
        while True:
            reply, payload = self._option_reply(P.OPT_SET_META_CONTEXT)
            if reply == P.REP_META_CONTEXT and len(payload) >= 4:
                if payload[4:].decode("utf-8", "replace") == P.CONTEXT_BASE_ALLOCATION:
                    selected = P.U32.unpack_from(payload)[0]
            elif reply == P.REP_ACK:
                return selected
            elif reply & P.REP_FLAG_ERROR:
                return None  # no block status; everything reads as data
            else:
                raise ProtocolError(f"{self.target.url}: unexpected reply {reply} to SET_META")

    def _go(self) -> ExportInfo | None:
        name = self.target.export.encode()
        data = P.U32.pack(len(name)) + name + P.U16.pack(1) + P.U16.pack(P.INFO_BLOCK_SIZE)
        self._send_option(P.OPT_GO, data)
        info: ExportInfo | None = None
        sizes: tuple[int, int, int] | None = None
        while True:
            reply, payload = self._option_reply(P.OPT_GO)
            if reply == P.REP_INFO and len(payload) >= 2:
                kind = P.INFO_TYPE.unpack_from(payload)[0]
                if kind == P.INFO_EXPORT and len(payload) == P.INFO_EXPORT_BODY.size:
                    _, size, flags = P.INFO_EXPORT_BODY.unpack(payload)
                    info = ExportInfo(size, flags)
                elif kind == P.INFO_BLOCK_SIZE and len(payload) == P.INFO_BLOCK_SIZE_BODY.size:
                    sizes = P.INFO_BLOCK_SIZE_BODY.unpack(payload)[1:]
            elif reply == P.REP_ACK:
                if info is None:
                    raise ProtocolError(f"{self.target.url}: GO succeeded without export info")
                if sizes is not None:
                    self._apply_block_sizes(info, *sizes)
                return info
            elif reply == P.REP_ERR_UNSUP:
                return None
            elif reply & P.REP_FLAG_ERROR:
                raise self._option_error(f"export {self.target.export!r}", reply, payload)
            else:
                raise ProtocolError(f"{self.target.url}: unexpected reply {reply} to GO")

    def _apply_block_sizes(
        self, info: ExportInfo, minimum: int, preferred: int, maximum: int
    ) -> None:
        if minimum < 1 or minimum > 65536 or minimum & (minimum - 1):
            raise ProtocolError(f"{self.target.url}: bad minimum block size {minimum}")
        info.min_block = minimum
        info.preferred_block = max(preferred, minimum)
        # Never more than our own cap; never less than a block (a hostile 0 would loop).
        info.max_payload = max(min(maximum, P.MAX_PAYLOAD) // minimum * minimum, minimum)

    def _export_name(self, no_zeroes: bool, structured: bool) -> ExportInfo:
        self._send_option(P.OPT_EXPORT_NAME, self.target.export.encode())
        try:
            size, flags = P.EXPORT_NAME_REPLY.unpack(self._recv_exact(P.EXPORT_NAME_REPLY.size))
        except HostIOError:
            raise HostIOError(
                f"{self.target.url}: the server refused export {self.target.export!r}",
                errno.ENOENT,
            ) from None
        if not no_zeroes:
            self._recv_exact(P.EXPORT_NAME_PADDING)
        return ExportInfo(size, flags, structured=structured)

    # -- requests -------------------------------------------------------------------------------

    def request(
        self,
        cmd: int,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        payload: bytes | bytearray | memoryview | None = None,
        buf: memoryview | None = None,
    ) -> _Pending:
        """Send one request and wait for its whole reply. Raises the request's error."""
        pending = _Pending(cmd, offset, length, buf)
        with self._state_lock:
            if self.broken is not None:
                raise ConnectionLost(str(self.broken), errno.EIO)
            handle = next(self._handles)
            self._pending[handle] = pending
        header = P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, handle, offset, length)
        try:
            with self._send_lock:
                if payload is None:
                    self._send(header)
                else:
                    self._send(header, payload)
        except HostIOError as e:
            self._fail(e)
        self._wait(pending)
        if pending.error is not None:
            raise pending.error
        return pending

    def _wait(self, pending: _Pending) -> None:
        # Marked waiting before trying the lock: a reader that releases it after our failed
        # attempt then sees us and wakes us to take over.
        pending.waiting = True
        while not pending.done:
            if self._recv_lock.acquire(blocking=False):
                try:
                    while not pending.done:
                        self._read_reply(pending)
                finally:
                    self._recv_lock.release()
                    self._wake_next_reader()
            else:
                pending.event.wait()
                pending.event.clear()

    def _wake_next_reader(self) -> None:
        """Hand the reader role to a thread waiting for its reply. Only a waiting one: a thread
        still sending a large write cannot read, and replies must keep flowing meanwhile (the
        server may stop reading our requests while its replies pile up)."""
        with self._state_lock:
            for other in self._pending.values():
                if other.waiting and not other.done:
                    other.event.set()
                    return

    def _read_reply(self, mine: _Pending) -> None:
        try:
            self._read_one(mine)
        except HostIOError as e:
            self._fail(e)

    def _take(self, handle: int) -> _Pending:
        with self._state_lock:
            pending = self._pending.get(handle)
        if pending is None:
            raise ProtocolError(f"{self.target.url}: reply for unknown handle {handle}")
        return pending

    def _finish(self, handle: int, pending: _Pending, mine: _Pending) -> None:
        with self._state_lock:
            self._pending.pop(handle, None)
        pending.done = True
        if pending is not mine:
            pending.event.set()

    def _read_one(self, mine: _Pending) -> None:
        url = self.target.url
        head = self._recv_exact(P.SIMPLE_REPLY.size)  # 16 bytes: both reply kinds start so
        magic = P.REPLY_MAGIC.unpack_from(head)[0]
        if magic == P.SIMPLE_REPLY_MAGIC:
            _, error, handle = P.SIMPLE_REPLY.unpack(head)
            pending = self._take(handle)
            if error:
                pending.error = self._server_error(pending, error, "")
            elif pending.cmd == P.CMD_READ:
                if self.info.structured:
                    raise ProtocolError(f"{url}: simple reply with data to a structured read")
                assert pending.buf is not None
                self._recv_into(pending.buf)
            self._finish(handle, pending, mine)
            return
        if magic != P.STRUCTURED_REPLY_MAGIC or not self.info.structured:
            raise ProtocolError(f"{url}: bad reply magic {magic:#x}")
        head += self._recv_exact(P.STRUCTURED_REPLY.size - len(head))
        _, rflags, rtype, handle, length = P.STRUCTURED_REPLY.unpack(head)
        pending = self._take(handle)
        if length > self.info.max_payload + 4096 and rtype != P.REPLY_TYPE_OFFSET_DATA:
            raise ProtocolError(f"{url}: reply chunk of {length} bytes")
        if rtype == P.REPLY_TYPE_OFFSET_DATA:
            self._data_chunk(pending, length)
        elif rtype == P.REPLY_TYPE_OFFSET_HOLE:
            if length != P.OFFSET_HOLE_BODY.size or pending.cmd != P.CMD_READ:
                raise ProtocolError(f"{url}: bad hole chunk ({length} bytes)")
            offset, size = P.OFFSET_HOLE_BODY.unpack(self._recv_exact(length))
            start = self._chunk_start(pending, offset, size)
            assert pending.buf is not None
            pending.buf[start : start + size] = bytes(size)  # the buffer may be reused
            pending.covered += size
        elif rtype == P.REPLY_TYPE_BLOCK_STATUS:
            self._block_status_chunk(pending, length)
        elif rtype == P.REPLY_TYPE_NONE:
            if length:
                raise ProtocolError(f"{url}: NONE chunk with {length} bytes")
        elif rtype & P.REPLY_TYPE_ERROR_BIT:
            body = self._recv_exact(length)
            if length < P.ERROR_BODY.size:
                raise ProtocolError(f"{url}: error chunk of {length} bytes")
            error, mlen = P.ERROR_BODY.unpack_from(body)
            if mlen > length - P.ERROR_BODY.size:
                raise ProtocolError(f"{url}: error message longer than its chunk")
            text = bytes(body[6 : 6 + mlen]).decode("utf-8", "replace")
            if pending.error is None:
                pending.error = self._server_error(pending, error or P.NBD_EIO, text)
        else:
            raise ProtocolError(f"{url}: unknown reply chunk type {rtype}")
        if rflags & P.REPLY_FLAG_DONE:
            if pending.error is None:
                if pending.cmd == P.CMD_READ and pending.covered != pending.length:
                    pending.error = ProtocolError(
                        f"{url}: read of {pending.length} bytes answered with {pending.covered}"
                    )
                elif pending.cmd == P.CMD_BLOCK_STATUS and not pending.extents:
                    pending.error = ProtocolError(f"{url}: block status without extents")
            self._finish(handle, pending, mine)

    def _chunk_start(self, pending: _Pending, offset: int, size: int) -> int:
        start = offset - pending.offset
        if start < 0 or size <= 0 or start + size > pending.length:
            raise ProtocolError(
                f"{self.target.url}: chunk {offset}+{size} outside the read "
                f"{pending.offset}+{pending.length}"
            )
        return start

    def _data_chunk(self, pending: _Pending, length: int) -> None:
        if pending.cmd != P.CMD_READ or length <= P.OFFSET.size:
            raise ProtocolError(f"{self.target.url}: bad data chunk ({length} bytes)")
        offset = P.OFFSET.unpack(self._recv_exact(P.OFFSET.size))[0]
        size = length - P.OFFSET.size
        start = self._chunk_start(pending, offset, size)
        assert pending.buf is not None
        self._recv_into(pending.buf[start : start + size])
        pending.covered += size

    def _block_status_chunk(self, pending: _Pending, length: int) -> None:
        if pending.cmd != P.CMD_BLOCK_STATUS or length < 12 or (length - 4) % 8:
            raise ProtocolError(f"{self.target.url}: bad block status chunk ({length} bytes)")
        body = self._recv_exact(length)
        context = P.U32.unpack_from(body)[0]
        if context != self.info.meta_context:
            return  # a context we did not select: ignore
        for length_, status in P.BLOCK_DESCRIPTOR.iter_unpack(memoryview(body)[4:]):
            if length_ == 0:
                raise ProtocolError(f"{self.target.url}: block status extent of length 0")
            pending.extents.append((length_, status))

    def _server_error(self, pending: _Pending, error: int, message: str) -> HostIOError:
        what = P.CMD_NAMES.get(pending.cmd, str(pending.cmd))
        detail = f": {message}" if message else ""
        code = P.host_errno(error)
        return HostIOError(
            f"{self.target.url}: {what} at {pending.offset}+{pending.length}: "
            f"{os.strerror(code)}{detail}",
            code,
        )

    def _fail(self, error: HostIOError) -> None:
        """The connection is unusable: fail every request in flight with ``error``."""
        with self._state_lock:
            if self.broken is None:
                self.broken = error
                log.warning("%s", error)
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            if not p.done:
                p.error = ConnectionLost(str(self.broken), errno.EIO)
                p.done = True
                p.event.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._state_lock:
            idle = self.broken is None and not self._pending
            self.broken = self.broken or ConnectionLost(f"{self.target.url}: closed", errno.EBADF)
        if idle:
            with contextlib.suppress(OSError, HostIOError), self._send_lock:
                self._send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 0, 0, 0))
        with contextlib.suppress(OSError):
            self.sock.close()


class ConnectionLost(HostIOError):
    """The request did not complete because the connection dropped (it may be retried)."""


class NBDFile:
    """An NBD export with HostFile's interface (pread/pwrite/size/sync/punch_hole/zero_range/
    data_extents/allocated_size/truncate/close).

    The export behaves like a block device: its size is fixed (writes past the end fail with
    ENOSPC, growing ``truncate`` too; shrinking is ignored).
    """

    is_block_device = True
    direct = False
    #: Every request waits for the network: callers must not run it on an event loop.
    remote = True

    def __init__(self, url: str, *, writable: bool, cache: CacheMode = CacheMode.WRITEBACK) -> None:
        self.target = parse_url(url)
        self.path = url
        self.no_flush = cache.no_flush
        self._conn_lock = threading.Lock()
        self._conn: Connection | None = Connection(self.target)
        info = self._conn.info
        self.info = info
        self._size = info.size
        #: The server lets clients write this export (whether or not this one asked to).
        self.server_allows_write = not info.flags & P.FLAG_READ_ONLY
        self.writable = writable and self.server_allows_write
        if writable and not self.writable:
            log.info("%s: the server exports it read-only", url)
        self.alignment = info.min_block
        self._rmw_lock = threading.Lock()
        # Writes completed since the last successful flush (a generation, not a bool: a flush
        # only covers writes that completed before it started).
        self._dirty_lock = threading.Lock()
        self._write_gen = 0
        self._flushed_gen = 0
        self._lost_writes: str | None = None
        self._extent_lock = threading.Lock()
        self._extents: tuple[int, list[tuple[int, int]]] | None = None  # (start, [(len, flags)])

    # -- connection management ------------------------------------------------------------------

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and conn.broken is None:
            return conn
        with self._conn_lock:
            conn = self._conn
            if conn is not None and conn.broken is None:
                return conn
            if conn is not None:
                conn.close()
                self._conn = None
                with self._dirty_lock:
                    if self._write_gen != self._flushed_gen:
                        self._lost_writes = str(conn.broken)
            log.info("%s: reconnecting", self.path)
            conn = Connection(self.target)
            if conn.info.size != self._size:
                conn.close()
                raise HostIOError(
                    f"{self.path}: the export's size changed from {self._size} to "
                    f"{conn.info.size} across a reconnect",
                    errno.EIO,
                )
            self._conn = conn
            return conn

    def _request(self, cmd: int, offset: int, length: int, **kw: object) -> _Pending:
        try:
            return self._connection().request(cmd, offset, length, **kw)  # type: ignore[arg-type]
        except ConnectionLost:
            pass  # once more on a new connection
        return self._connection().request(cmd, offset, length, **kw)  # type: ignore[arg-type]

    # -- geometry -------------------------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def allocated_size(self) -> int:
        return 0  # not knowable through NBD

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0:
            raise InvalidRequest(f"{self.path}: bad {what} offset {offset} length {length}")

    # -- reads ----------------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes | memoryview:
        """Exactly ``length`` bytes from ``offset``; past the end of the export reads zeros."""
        self._check_range(offset, length, "read")
        if length == 0:
            return b""
        if in_nowait_mode():
            raise WouldBlock  # every read waits for the network
        buf = bytearray(length)
        end = min(offset + length, self._size)
        if offset < end:
            self._read_into(offset, memoryview(buf)[: end - offset])
        return memoryview(buf)

    def _read_into(self, offset: int, view: memoryview) -> None:
        align = self.alignment
        if offset % align or len(view) % align:
            start = offset - offset % align
            stop = min(-(-(offset + len(view)) // align) * align, self._size)
            tmp = bytearray(stop - start)
            self._read_into(start, memoryview(tmp))
            view[:] = memoryview(tmp)[offset - start : offset - start + len(view)]
            return
        step = self.info.max_payload
        for pos in range(0, len(view), step):
            part = view[pos : pos + step]
            self._request(P.CMD_READ, offset + pos, len(part), buf=part)

    # -- writes ---------------------------------------------------------------------------------

    def _check_writable(self, offset: int, length: int, what: str) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.path}: the export is read-only")
        self._check_range(offset, length, what)
        if offset + length > self._size:
            raise NoSpace(
                f"{self.path}: {what} at {offset}+{length} is past the end of the export "
                f"({self._size} bytes)"
            )

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check_writable(offset, len(view), "write")
        if not len(view):
            return
        align = self.alignment
        if offset % align or len(view) % align:
            with self._rmw_lock:  # two unaligned writes into one block must not lose an update
                start = offset - offset % align
                stop = -(-(offset + len(view)) // align) * align
                block = bytearray(self.pread(start, stop - start))
                block[offset - start : offset - start + len(view)] = view
                self._write_aligned(start, memoryview(block))
            return
        self._write_aligned(offset, view)

    def _write_aligned(self, offset: int, view: memoryview) -> None:
        step = self.info.max_payload
        for pos in range(0, len(view), step):
            part = view[pos : pos + step]
            self._request(P.CMD_WRITE, offset + pos, len(part), payload=part)
        self._written()

    def _written(self) -> None:
        with self._dirty_lock:
            self._write_gen += 1
        with self._extent_lock:
            self._extents = None

    def _zero(self, offset: int, length: int, flags: int) -> bool:
        self._check_writable(offset, length, "write-zeroes")
        if not self.info.flags & P.FLAG_SEND_WRITE_ZEROES:
            return False
        if length == 0:
            return True
        step = 1 << 30  # no payload, but keep each request's effect bounded
        step -= step % self.alignment
        for pos in range(0, length, step):
            self._request(P.CMD_WRITE_ZEROES, offset + pos, min(step, length - pos), flags=flags)
        self._written()
        return True

    def punch_hole(self, offset: int, length: int) -> bool:
        """Zeros that the server may deallocate (WRITE_ZEROES without NO_HOLE). TRIM is not
        used: after a trim the export's content is undefined, and this must read back zeros."""
        return self._zero(offset, length, 0)

    def zero_range(self, offset: int, length: int) -> bool:
        """Zeros kept allocated (WRITE_ZEROES with NO_HOLE)."""
        return self._zero(offset, length, P.CMD_FLAG_NO_HOLE)

    def trim(self, offset: int, length: int) -> bool:
        """A discard hint (NBD_CMD_TRIM): the range's content becomes undefined."""
        self._check_writable(offset, length, "trim")
        if not self.info.flags & P.FLAG_SEND_TRIM or length == 0:
            return False
        self._request(P.CMD_TRIM, offset, length)
        self._written()
        return True

    def truncate(self, size: int) -> None:
        if size > self._size:
            raise NoSpace(f"{self.path}: cannot grow an NBD export ({self._size} bytes) to {size}")
        # Shrinking a fixed-size device is a no-op, as for a block device.

    # -- allocation -----------------------------------------------------------------------------

    def data_extents(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether ``offset`` is data (True) or reads as zeros (False), and for how many bytes
        (at most ``length``), from the server's base:allocation block status."""
        if offset >= self._size:
            return False, length
        if self.info.meta_context is None:
            return True, length
        length = min(length, self._size - offset)
        found = self._cached_extent(offset, length)
        if found is not None:
            return found
        ask = min(max(length, 1), 0xFFFFFFFF - 0xFFFFFFFF % self.alignment)
        pending = self._request(P.CMD_BLOCK_STATUS, offset, ask)
        with self._extent_lock:
            self._extents = (offset, pending.extents[:EXTENT_CACHE_DESCRIPTORS])
        found = self._cached_extent(offset, length)
        assert found is not None
        return found

    def _cached_extent(self, offset: int, length: int) -> tuple[bool, int] | None:
        with self._extent_lock:
            cached = self._extents
        if cached is None:
            return None
        pos, extents = cached
        if offset < pos:
            return None
        for index, (ext_len, status) in enumerate(extents):
            if offset < pos + ext_len:
                is_data = not status & P.STATE_ZERO
                run = pos + ext_len - offset
                # Merge following extents of the same kind, so a caller makes progress in big
                # steps even when the server splits runs.
                for more_len, more_status in extents[index + 1 :]:
                    if (not more_status & P.STATE_ZERO) != is_data or run >= length:
                        break
                    run += more_len
                return is_data, min(run, length)
            pos += ext_len
        return None

    # -- durability -----------------------------------------------------------------------------

    def sync(self) -> None:
        """Flush the server's cache (NBD_CMD_FLUSH), unless the cache mode is unsafe. A server
        without a flush command has no cache: its acknowledged writes are durable."""
        if self.no_flush or not self.writable or not self.info.flags & P.FLAG_SEND_FLUSH:
            return
        self._check_lost_writes()
        with self._dirty_lock:
            target = self._write_gen
        self._request(P.CMD_FLUSH, 0, 0)
        self._check_lost_writes()  # the flush may have been retried on a new connection
        with self._dirty_lock:
            self._flushed_gen = max(self._flushed_gen, target)

    def _check_lost_writes(self) -> None:
        if self._lost_writes is not None:
            raise HostIOError(
                f"{self.path}: the connection dropped with unflushed writes, which the server "
                f"may have lost ({self._lost_writes}); reopen the image",
                errno.EIO,
            )

    def close(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
