"""``imgfs serve``: every disk of an images directory as an NBD export.

Export names are the image files' names in IMAGES_DIR (``disk.qcow2``; a Parallels bundle is
``NAME.hdd``), the names the mount shows without their ``.raw`` suffix; the mount's name
(``disk.qcow2.raw``) is accepted too, and the empty name means the only disk when there is
exactly one. Which disks exist and which are read-only follow the mount's rules
(:class:`~imgfs.fuse.scan.DirectoryScanner`: a base image another disk builds on is read-only
unless ``--writable-backing``; ``--read-only`` makes all of them read-only).

Protocol: fixed newstyle handshake with NBD_OPT_GO/INFO/LIST/EXPORT_NAME/ABORT/STARTTLS/
STRUCTURED_REPLY/LIST_META_CONTEXT/SET_META_CONTEXT (``base:allocation`` from the chain's block
status); structured replies with OFFSET_HOLE chunks for zero ranges of a read and error chunks
with messages; TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), FLUSH and FUA mapped to the Disk (whose
flush honours the cache mode); ``--detect-zeroes`` turns all-zero writes into write-zeroes;
optional TLS (STARTTLS; ``--tls`` refuses clients without it).

Concurrency (as the FUSE layer, measured here: a trio thread hop costs ~120 us): one trio
thread serves every connection; a read that the page cache holds and a write-back write run
inline, everything that waits for a device (cold reads, O_DIRECT, flush, FUA, zeroing, trim,
images on a remote host file) runs on the worker pool. Each connection has a bound on requests
in flight and on payload bytes held; a bad request gets an NBD error, a broken stream (bad
magic, a write payload over 32 MiB) a disconnect, and never the server.

Images open on a client's GO and are shared by every connection to the same export (so a flush
on one connection covers writes from all of them: NBD_FLAG_CAN_MULTI_CONN); the last
connection's disconnect flushes and closes the image, as does shutdown (SIGINT/SIGTERM).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import ssl
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from imgfs.block import chain
from imgfs.block.disk import Disk, open_disk
from imgfs.block.driver import BlockDriver
from imgfs.block.extent import Allocation
from imgfs.block.holes import DetectZeroes
from imgfs.block.hostfile import CacheMode, WouldBlock, call_nowait
from imgfs.errors import ImgfsError, UsageError
from imgfs.fuse.scan import EXPORT_SUFFIX, DirectoryScanner, ImageEntry
from imgfs.keys import KeyRing
from imgfs.nbd import protocol as P

log = logging.getLogger(__name__)

T = TypeVar("T")

HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take to reach the transmission phase
RESCAN_INTERVAL = 0.5
MAX_OPTIONS = 1024  # option requests per connection (a client looping forever is cut off)
MAX_QUERIES = 128  # metadata-context queries in one option
MAX_DESCRIPTORS = 1024  # block-status descriptors in one reply
MIN_HOLE_CHUNK = 64 * 1024  # smaller zero runs inside a read are sent as data
MAX_READ_RUNS = 16  # a read split into more data/hole runs than this is sent as one chunk
BASE_ALLOCATION_ID = 1
PREFERRED_BLOCK = 4096


@dataclass
class ServeOptions:
    cache: CacheMode = CacheMode.WRITEBACK
    read_only: bool = False
    aio_threads: int = 4
    allow_external_files: bool = False
    writable_backing: bool = False
    driver_options: dict[str, str] = field(default_factory=dict)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_required: bool = False
    max_connections: int = 64
    #: QEMU's detect-zeroes: "off", "on" (an all-zero write becomes write-zeroes) or "unmap"
    #: (... that may deallocate).
    detect_zeroes: str = "off"
    max_requests: int = 16  # per connection, in flight
    max_buffered: int = 64 * 1024 * 1024  # payload bytes per connection, in flight
    #: Passphrases of encrypted images (--key NAME=FILE, --key-dir DIR).
    keys: KeyRing | None = None


class Disconnect(Exception):
    """The client broke the protocol in a way that cannot be answered: drop the connection."""


@dataclass(eq=False)
class OpenExport:
    """A Disk shared by every connection to one export."""

    name: str
    entry: ImageEntry
    disk: Disk
    writable: bool
    reads_block: bool
    writes_block: bool
    fast_zero: bool
    users: int = 0


def _remote(top: BlockDriver) -> bool:
    return any(getattr(node.file, "remote", False) for node in chain.layers(top))


def _fast_zero(top: BlockDriver) -> bool:
    """Whether write-zeroes is a metadata operation for this image (the driver implements it)
    rather than the contract's fallback that writes zero buffers."""
    return type(top).write_zeroes is not BlockDriver.write_zeroes


class _Budget:
    """Payload bytes a connection may hold in flight."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._cond = trio.Condition()

    async def take(self, n: int) -> int:
        n = min(n, self.total)
        async with self._cond:
            while self.free < n:
                await self._cond.wait()
            self.free -= n
        return n

    async def give(self, n: int) -> None:
        async with self._cond:
            self.free += n
            self._cond.notify_all()


class _Reader:
    """Exact-size reads from a trio stream: small reads are buffered, big payloads land
    directly in their own buffer (recv_into on a plain socket)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.buf = bytearray()

    async def exactly(self, n: int) -> bytearray:
        if n <= len(self.buf):
            out = self.buf[:n]
            del self.buf[:n]
            return out
        if n < 4096:
            while len(self.buf) < n:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError
                self.buf += chunk
            out = self.buf[:n]
            del self.buf[:n]
            return out
        out = bytearray(n)
        have = len(self.buf)
        out[:have] = self.buf
        self.buf.clear()
        view = memoryview(out)
        while have < n:
            if self.sock is not None:
                got = await self.sock.recv_into(view[have:])
            else:
                chunk = await self.stream.receive_some(n - have)
                got = len(chunk)
                view[have : have + got] = chunk
            if got == 0:
                raise EOFError
            have += got
        return out


class NBDServer:
    def __init__(self, images_dir: str, options: ServeOptions) -> None:
        self.images_dir = os.path.abspath(images_dir)
        self.options = options
        self.containment = chain.Containment(
            None if options.allow_external_files else self.images_dir
        )
        self.scanner = DirectoryScanner(
            self.images_dir,
            self.containment,
            protect_backing=not options.writable_backing,
            keys=options.keys,
            driver_options=options.driver_options,  # e.g. ca-file= for the images of .url files
        )
        self.limiter = trio.CapacityLimiter(max(1, options.aio_threads))
        self.entries: dict[str, ImageEntry] = {}
        self.exports: dict[str, OpenExport] = {}
        self._export_locks: dict[str, trio.Lock] = {}
        self._last_scan = 0.0
        self._scan_lock = trio.Lock()
        self.connections = 0
        self.tls: ssl.SSLContext | None = None
        if options.tls_cert:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                self.tls.load_cert_chain(options.tls_cert, options.tls_key)
            except (OSError, ssl.SSLError) as e:
                raise UsageError(f"cannot load the TLS certificate/key: {e}") from None
        elif options.tls_required:
            raise UsageError("--tls needs --tls-cert and --tls-key")
        self._apply_scan(self.scanner.scan())  # before the loop starts: may block

    # -- exports --------------------------------------------------------------------------------

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def _apply_scan(self, entries: dict[str, ImageEntry]) -> None:
        self.entries = {entry.source_name: entry for entry in entries.values()}

    async def rescan(self) -> None:
        if time.monotonic() - self._last_scan < RESCAN_INTERVAL:
            return
        async with self._scan_lock:
            self._last_scan = time.monotonic()
            self._apply_scan(await self.in_thread(self.scanner.scan))

    def find(self, name: str) -> ImageEntry | None:
        if name == "" and len(self.entries) == 1:
            return next(iter(self.entries.values()))
        entry = self.entries.get(name)
        if entry is None and name.endswith(EXPORT_SUFFIX):
            entry = self.entries.get(name[: -len(EXPORT_SUFFIX)])
        return entry

    def writable(self, entry: ImageEntry) -> bool:
        return entry.image_writable and not self.options.read_only

    async def acquire(self, entry: ImageEntry) -> OpenExport:
        name = entry.source_name
        lock = self._export_locks.setdefault(name, trio.Lock())
        async with lock:
            export = self.exports.get(name)
            if export is None:
                writable = self.writable(entry)
                with trio.CancelScope(shield=True):  # an opened Disk must reach self.exports
                    disk = await self.in_thread(
                        functools.partial(
                            open_disk,
                            entry.path,
                            None,  # probe again: a probed raw image keeps its format guard
                            read_only=not writable,
                            cache=self.options.cache,
                            containment=self.containment,
                            driver_options=self.options.driver_options,
                            keys=self.options.keys,
                        )
                    )
                # The same zero detection as the mount's (imgfs.block.holes, in Disk.write).
                disk.detect_zeroes = DetectZeroes(self.options.detect_zeroes)
                remote = _remote(disk.top)
                export = OpenExport(
                    name,
                    entry,
                    disk,
                    writable=not disk.read_only,
                    reads_block=disk.reads_may_block or remote,
                    writes_block=disk.writes_may_block or remote,
                    fast_zero=_fast_zero(disk.top),
                )
                self.exports[name] = export
                log.info(
                    "%s: opened (%s, %s)",
                    name,
                    entry.format,
                    "read-write" if export.writable else "read-only",
                )
            export.users += 1
            return export

    async def release(self, export: OpenExport) -> None:
        # Shielded: a shutdown cancelling the connection must not skip the flush and close.
        with trio.CancelScope(shield=True):
            lock = self._export_locks.setdefault(export.name, trio.Lock())
            async with lock:
                export.users -= 1
                if export.users > 0:
                    return
                try:
                    await self.in_thread(export.disk.close)
                    log.info("%s: flushed and closed", export.name)
                except Exception:
                    log.exception("%s: flush at close failed", export.name)
                finally:
                    self.exports.pop(export.name, None)

    def close_all(self) -> int:
        """Flush and close every open image (at shutdown). Returns the number that failed."""
        failed = 0
        for export in list(self.exports.values()):
            try:
                export.disk.close()
                log.info("%s: flushed and closed", export.name)
            except Exception:
                failed += 1
                log.exception("%s: flush at shutdown failed", export.name)
        self.exports.clear()
        return failed

    # -- connections ----------------------------------------------------------------------------

    async def handle(self, stream: trio.abc.Stream) -> None:
        peer = _peer_name(stream)
        if self.connections >= self.options.max_connections:
            log.warning("%s: refused: %d connections already", peer, self.connections)
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        try:
            await _Connection(self, stream, peer).run()
        finally:
            self.connections -= 1


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _peer_name(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        try:
            peer = stream.socket.getpeername()
        except OSError:
            return "client"
        if isinstance(peer, tuple):
            return f"{peer[0]}:{peer[1]}"
        return "unix client"
    return "client"


class _Connection:
    def __init__(self, server: NBDServer, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.reader = _Reader(stream)
        self.send_lock = trio.Lock()
        self.tls_done = False
        self.structured = False
        self.meta_export: str | None = None  # export the base:allocation context was set for
        self.export: OpenExport | None = None
        self.block_status = False
        self.flags = 0

    async def send(self, *parts: bytes | bytearray | memoryview) -> None:
        """Send the parts as one message: on a plain socket one sendmsg (a reply's header and
        its data in one syscall; each send also pays for the kernel's receive processing)."""
        async with self.send_lock:
            sock = self.stream.socket if isinstance(self.stream, trio.SocketStream) else None
            if sock is None:
                for part in parts:
                    await self.stream.send_all(part)
                return
            views = [memoryview(p).cast("B") for p in parts if len(p)]
            try:
                while views:
                    sent = await sock.sendmsg(views)
                    while sent:
                        if sent >= len(views[0]):
                            sent -= len(views.pop(0))
                        else:
                            views[0] = views[0][sent:]
                            sent = 0
            except OSError as e:
                raise trio.BrokenResourceError(f"send failed: {e}") from None

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as e:
            for leaf in _leaves(e):
                self._report(leaf)
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _run(self) -> None:
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            export = await self.handshake()
        if scope.cancelled_caught:
            log.warning("%s: handshake timed out", self.peer)
            return
        if export is None:
            return
        try:
            await self.transmission(export)
        finally:
            await self.server.release(export)

    def _report(self, error: BaseException) -> None:
        if isinstance(error, (EOFError, trio.BrokenResourceError, trio.ClosedResourceError)):
            return  # the client went away
        if isinstance(error, Disconnect):
            log.warning("%s: %s; disconnecting", self.peer, error)
        elif isinstance(error, ssl.SSLError):
            log.warning("%s: TLS error: %s", self.peer, error)
        elif isinstance(error, OSError):
            log.warning("%s: connection error: %s", self.peer, error)
        else:
            log.error("%s: unexpected error", self.peer, exc_info=error)

    # -- handshake ------------------------------------------------------------------------------

    async def reply(self, option: int, reply: int, data: bytes = b"") -> None:
        await self.send(P.OPTION_REPLY.pack(P.OPTION_REPLY_MAGIC, option, reply, len(data)) + data)

    async def error(self, option: int, reply: int, message: str) -> None:
        await self.reply(option, reply, message.encode()[: P.MAX_STRING])

    async def handshake(self) -> OpenExport | None:
        await self.send(
            P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        )
        cflags = P.CLIENT_FLAGS.unpack(await self.reader.exactly(4))[0]
        if cflags & ~P.KNOWN_CLIENT_FLAGS:
            raise Disconnect(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = P.OPTION_HEADER.unpack(
                await self.reader.exactly(P.OPTION_HEADER.size)
            )
            if magic != P.IHAVEOPT:
                raise Disconnect(f"bad option magic {magic:#x}")
            if length > P.MAX_OPTION_DATA:
                if option == P.OPT_EXPORT_NAME or length > P.MAX_PAYLOAD:
                    raise Disconnect(f"option {option} with {length} bytes of data")
                await self.reader.exactly(length)  # skip it, staying in step
                await self.error(option, P.REP_ERR_TOO_BIG, f"option data of {length} bytes")
                continue
            data = bytes(await self.reader.exactly(length)) if length else b""
            if self.server.options.tls_required and not self.tls_done:
                if option == P.OPT_EXPORT_NAME:
                    raise Disconnect("EXPORT_NAME without TLS, which this server requires")
                if option not in (P.OPT_STARTTLS, P.OPT_ABORT):
                    await self.error(option, P.REP_ERR_TLS_REQD, "this server requires TLS")
                    continue
            result = await self.option(option, data)
            if result is not None:
                return result or None
        raise Disconnect(f"more than {MAX_OPTIONS} options")

    async def option(self, option: int, data: bytes) -> OpenExport | bool | None:
        """Answer one option. Returns the export to serve (transmission starts), False to
        close the connection, None to read the next option."""
        if option == P.OPT_ABORT:
            await self.reply(option, P.REP_ACK)
            return False
        if option == P.OPT_EXPORT_NAME:
            return await self.export_name(data)
        if option == P.OPT_LIST:
            if data:
                await self.error(option, P.REP_ERR_INVALID, "LIST takes no data")
                return None
            await self.server.rescan()
            for name in sorted(self.server.entries):
                encoded = name.encode("utf-8", "surrogateescape")
                await self.reply(option, P.REP_SERVER, P.U32.pack(len(encoded)) + encoded)
            await self.reply(option, P.REP_ACK)
            return None
        if option == P.OPT_STARTTLS:
            await self.starttls(data)
            return None
        if option in (P.OPT_INFO, P.OPT_GO):
            return await self.info_or_go(option, data)
        if option == P.OPT_STRUCTURED_REPLY:
            if data:
                await self.error(option, P.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                return None
            self.structured = True
            await self.reply(option, P.REP_ACK)
            return None
        if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            await self.meta_context(option, data)
            return None
        await self.error(option, P.REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    async def starttls(self, data: bytes) -> None:
        option = P.OPT_STARTTLS
        if self.server.tls is None:
            await self.error(option, P.REP_ERR_POLICY, "TLS is not configured on this server")
            return
        if data or self.tls_done:
            await self.error(option, P.REP_ERR_INVALID, "bad STARTTLS")
            return
        await self.reply(option, P.REP_ACK)
        if self.reader.buf:
            raise Disconnect("data sent before the TLS handshake")
        tls_stream = trio.SSLStream(self.stream, self.server.tls, server_side=True)
        await tls_stream.do_handshake()
        self.stream = tls_stream
        self.reader = _Reader(tls_stream)
        self.tls_done = True
        # Nothing negotiated before STARTTLS survives it.
        self.structured = False
        self.meta_export = None

    def _parse_name(self, data: bytes, what: str) -> tuple[str, int]:
        if len(data) < 4:
            raise ValueError(f"{what}: truncated")
        n = P.U32.unpack_from(data)[0]
        if n > P.MAX_STRING or 4 + n > len(data):
            raise ValueError(f"{what}: bad name length {n}")
        return data[4 : 4 + n].decode("utf-8", "surrogateescape"), 4 + n

    async def _lookup(self, option: int, name: str) -> ImageEntry | None:
        await self.server.rescan()
        entry = self.server.find(name)
        if entry is None:
            await self.error(option, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
        return entry

    def _transmission_flags(self, writable: bool, fast_zero: bool = True) -> int:
        flags = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_CAN_MULTI_CONN
        if self.structured:
            flags |= P.FLAG_SEND_DF
        if writable:
            flags |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES
            if fast_zero:
                flags |= P.FLAG_SEND_FAST_ZERO
        else:
            flags |= P.FLAG_READ_ONLY
        return flags

    async def info_or_go(self, option: int, data: bytes) -> OpenExport | None:
        try:
            name, pos = self._parse_name(data, "INFO/GO")
            if pos + 2 > len(data):
                raise ValueError("truncated")
            count = P.U16.unpack_from(data, pos)[0]
            if pos + 2 + 2 * count != len(data):
                raise ValueError(f"{count} information requests in {len(data) - pos - 2} bytes")
            requests = {P.U16.unpack_from(data, pos + 2 + 2 * i)[0] for i in range(count)}
        except ValueError as e:
            await self.error(option, P.REP_ERR_INVALID, str(e))
            return None
        entry = await self._lookup(option, name)
        if entry is None:
            return None
        export = None
        if option == P.OPT_GO:
            try:
                export = await self.server.acquire(entry)
            except ImgfsError as e:
                log.warning("%s: %s: cannot open: %s", self.peer, name, e)
                await self.error(option, P.REP_ERR_UNKNOWN, f"cannot open {name!r}: {e}")
                return None
            size, writable = export.disk.size, export.writable
            flags = self._transmission_flags(writable, export.fast_zero)
        else:
            size, writable = entry.virtual_size, self.server.writable(entry)
            flags = self._transmission_flags(writable)
        try:
            await self.reply(
                option, P.REP_INFO, P.INFO_EXPORT_BODY.pack(P.INFO_EXPORT, size, flags)
            )
            await self.reply(
                option,
                P.REP_INFO,
                P.INFO_BLOCK_SIZE_BODY.pack(P.INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, P.MAX_PAYLOAD),
            )
            if P.INFO_NAME in requests:
                canonical = entry.source_name.encode("utf-8", "surrogateescape")
                await self.reply(option, P.REP_INFO, P.INFO_TYPE.pack(P.INFO_NAME) + canonical)
            if P.INFO_DESCRIPTION in requests:
                text = f"{entry.format} image".encode()
                await self.reply(option, P.REP_INFO, P.INFO_TYPE.pack(P.INFO_DESCRIPTION) + text)
            await self.reply(option, P.REP_ACK)
        except BaseException:
            if export is not None:
                await self.server.release(export)
            raise
        if export is None:
            return None
        self.flags = flags
        self.block_status = self.structured and self.meta_export == entry.source_name
        log.info("%s: serving %s", self.peer, export.name)
        return export

    async def export_name(self, data: bytes) -> OpenExport:
        name = data.decode("utf-8", "surrogateescape")
        await self.server.rescan()
        entry = self.server.find(name)
        if entry is None:
            raise Disconnect(f"EXPORT_NAME for unknown export {name!r}")
        try:
            export = await self.server.acquire(entry)
        except ImgfsError as e:
            raise Disconnect(f"{name}: cannot open: {e}") from None
        try:
            self.flags = self._transmission_flags(export.writable, export.fast_zero)
            reply = P.EXPORT_NAME_REPLY.pack(export.disk.size, self.flags)
            await self.send(reply if self.no_zeroes else reply + bytes(P.EXPORT_NAME_PADDING))
        except BaseException:
            await self.server.release(export)
            raise
        self.block_status = self.structured and self.meta_export == entry.source_name
        log.info("%s: serving %s", self.peer, export.name)
        return export

    async def meta_context(self, option: int, data: bytes) -> None:
        if not self.structured:
            await self.error(option, P.REP_ERR_INVALID, "negotiate structured replies first")
            return
        try:
            name, pos = self._parse_name(data, "META_CONTEXT")
            if pos + 4 > len(data):
                raise ValueError("truncated")
            count = P.U32.unpack_from(data, pos)[0]
            pos += 4
            if count > MAX_QUERIES:
                await self.error(option, P.REP_ERR_TOO_BIG, f"{count} queries")
                return
            queries = []
            for _ in range(count):
                query, used = self._parse_name(data[pos:], "query")
                queries.append(query)
                pos += used
            if pos != len(data):
                raise ValueError("trailing data")
        except ValueError as e:
            await self.error(option, P.REP_ERR_INVALID, str(e))
            return
        if option == P.OPT_SET_META_CONTEXT:
            self.meta_export = None  # replaced even when the option fails
        entry = await self._lookup(option, name)
        if entry is None:
            return
        if option == P.OPT_LIST_META_CONTEXT:
            found = not queries or any(q in ("base:", P.CONTEXT_BASE_ALLOCATION) for q in queries)
        else:
            found = P.CONTEXT_BASE_ALLOCATION in queries
        if found:
            context = P.CONTEXT_BASE_ALLOCATION.encode()
            ident = BASE_ALLOCATION_ID if option == P.OPT_SET_META_CONTEXT else 0
            await self.reply(option, P.REP_META_CONTEXT, P.U32.pack(ident) + context)
            if option == P.OPT_SET_META_CONTEXT:
                self.meta_export = entry.source_name
        await self.reply(option, P.REP_ACK)

    # -- transmission ---------------------------------------------------------------------------

    async def transmission(self, export: OpenExport) -> None:
        options = self.server.options
        self.inflight = trio.Semaphore(options.max_requests)
        self.budget = _Budget(options.max_buffered)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    header = await self.reader.exactly(P.REQUEST.size)
                except EOFError:
                    break  # a hard disconnect; requests in flight still finish
                magic, flags, cmd, handle, offset, length = P.REQUEST.unpack(header)
                if magic != P.REQUEST_MAGIC:
                    raise Disconnect(f"bad request magic {magic:#x}")
                if cmd == P.CMD_DISC:
                    break
                payload = None
                held = 0
                if cmd == P.CMD_WRITE:
                    if length > P.MAX_PAYLOAD:
                        raise Disconnect(f"write of {length} bytes (limit {P.MAX_PAYLOAD})")
                    held = await self.budget.take(length)
                    try:
                        payload = await self.reader.exactly(length)
                    except BaseException:
                        await self.budget.give(held)
                        raise
                elif cmd == P.CMD_READ and length <= P.MAX_PAYLOAD:
                    held = await self.budget.take(length)
                await self.inflight.acquire()
                request = _Request(flags, cmd, handle, offset, length, payload, held)
                try:
                    done = await self.try_inline(export, request)
                except BaseException:
                    await self._done(request)
                    raise
                if done:
                    await self._done(request)
                else:
                    nursery.start_soon(self.in_worker, export, request)

    async def _done(self, request: _Request) -> None:
        self.inflight.release()
        if request.held:
            await self.budget.give(request.held)

    async def in_worker(self, export: OpenExport, request: _Request) -> None:
        try:
            await self.execute(export, request, inline=False)
        finally:
            await self._done(request)

    async def try_inline(self, export: OpenExport, request: _Request) -> bool:
        """Serve the request on the trio thread if it cannot block; False when it must go to a
        worker (it was not started, or it was and needs no more than a retry)."""
        cmd = request.cmd
        if cmd in (P.CMD_READ, P.CMD_BLOCK_STATUS) and not export.reads_block:
            return await self.execute(export, request, inline=True)
        if cmd == P.CMD_WRITE and not export.writes_block and not request.flags & P.CMD_FLAG_FUA:
            return await self.execute(export, request, inline=True)
        if cmd not in P.CMD_NAMES or cmd in (P.CMD_CACHE, P.CMD_DISC):
            return await self.execute(export, request, inline=True)  # an error reply
        return False

    async def execute(self, export: OpenExport, request: _Request, *, inline: bool) -> bool:
        """Run one request and send its reply. Inline, a read that would block returns False
        (nothing sent) so that it is retried on a worker."""
        cmd, offset, length, flags = request.cmd, request.offset, request.length, request.flags
        disk = export.disk
        try:
            self.validate(export, request)
            if cmd == P.CMD_READ:
                df = bool(flags & P.CMD_FLAG_DF) or not self.structured
                plan = await self.call(inline, self.read_plan, disk, offset, length, df)
                if plan is None:
                    return False
                await self.send_read(request, plan)
                return True
            if cmd == P.CMD_BLOCK_STATUS:
                one = bool(flags & P.CMD_FLAG_REQ_ONE)
                descriptors = await self.call(inline, self.extents, disk, offset, length, one)
                if descriptors is None:
                    return False
                body = P.U32.pack(BASE_ALLOCATION_ID) + b"".join(
                    P.BLOCK_DESCRIPTOR.pack(n, s) for n, s in descriptors
                )
                await self.send_chunk(request.handle, P.REPLY_TYPE_BLOCK_STATUS, body, done=True)
                return True
            if cmd == P.CMD_WRITE:
                assert request.payload is not None
                # Inline only for write-back images, and not in non-blocking mode: a write is
                # not retried half-way (the FUSE layer runs these inline too).
                if inline:
                    disk.write(offset, request.payload)
                else:
                    await self.server.in_thread(disk.write, offset, request.payload)
            elif cmd == P.CMD_FLUSH:
                if disk.flush_pending:
                    await self.server.in_thread(disk.flush)
            elif cmd == P.CMD_TRIM:
                await self.server.in_thread(disk.discard, offset, length)
            elif cmd == P.CMD_WRITE_ZEROES:
                if flags & P.CMD_FLAG_FAST_ZERO and not export.fast_zero:
                    raise _Error(P.NBD_ENOTSUP, "write-zeroes would not be faster than a write")
                may_unmap = not flags & P.CMD_FLAG_NO_HOLE
                await self.server.in_thread(disk.write_zeroes, offset, length, may_unmap)
            if flags & P.CMD_FLAG_FUA and cmd != P.CMD_FLUSH and disk.flush_pending:
                await self.server.in_thread(disk.flush)
            await self.send_simple(request.handle, 0)
        except _Error as e:
            await self.send_error(request, e.error, e.message)
        except ImgfsError as e:
            log.warning("%s: %s: %s", export.name, P.CMD_NAMES.get(cmd, cmd), e)
            await self.send_error(request, P.nbd_error(e.errno), str(e))
        except OSError as e:
            log.warning("%s: %s: %s", export.name, P.CMD_NAMES.get(cmd, cmd), e)
            await self.send_error(request, P.nbd_error(e.errno or errno.EIO), str(e))
        except Exception:
            log.exception("%s: unexpected error in %s", export.name, P.CMD_NAMES.get(cmd, cmd))
            await self.send_error(request, P.NBD_EIO, "internal error")
        return True

    async def call(self, inline: bool, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)`` inline in non-blocking mode (None when it would block), or on a
        worker thread."""
        if not inline:
            return await self.server.in_thread(fn, *args)
        try:
            return call_nowait(fn, *args)
        except WouldBlock:
            return None

    def validate(self, export: OpenExport, request: _Request) -> None:
        cmd, flags, offset, length = request.cmd, request.flags, request.offset, request.length
        allowed = P.CMD_FLAG_FUA
        if cmd == P.CMD_READ and self.structured:
            allowed |= P.CMD_FLAG_DF
        elif cmd == P.CMD_WRITE_ZEROES:
            allowed |= P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO
        elif cmd == P.CMD_BLOCK_STATUS:
            allowed |= P.CMD_FLAG_REQ_ONE
        name = P.CMD_NAMES.get(cmd)
        if name is None or cmd == P.CMD_CACHE:
            raise _Error(P.NBD_EINVAL, f"unknown command {cmd}")
        if flags & ~allowed:
            raise _Error(P.NBD_EINVAL, f"flags {flags:#x} are not valid for {name}")
        size = export.disk.size
        if cmd == P.CMD_FLUSH:
            if offset or length:
                raise _Error(P.NBD_EINVAL, "flush with a nonzero offset or length")
            return
        writes = cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM)
        if writes and not export.writable:
            raise _Error(P.NBD_EPERM, f"{export.name} is read-only")
        if cmd == P.CMD_BLOCK_STATUS and not self.block_status:
            raise _Error(P.NBD_EINVAL, "block status without the base:allocation context")
        if cmd == P.CMD_BLOCK_STATUS and length == 0:
            raise _Error(P.NBD_EINVAL, "block status of 0 bytes")
        if cmd == P.CMD_READ and length > P.MAX_PAYLOAD:
            raise _Error(P.NBD_EINVAL, f"read of {length} bytes (limit {P.MAX_PAYLOAD})")
        if offset + length > size:
            code = P.NBD_ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.NBD_EINVAL
            raise _Error(code, f"{name} at {offset}+{length} is past the end ({size})")

    # -- reads ----------------------------------------------------------------------------------

    @staticmethod
    def read_plan(
        disk: Disk, offset: int, length: int, one_chunk: bool
    ) -> list[tuple[int, int, bytes | bytearray | memoryview | None]]:
        """The read as runs of (offset, length, data or None for zeros)."""
        if length == 0:
            return []
        runs: list[list[Any]] = []  # [start, length, is_zero]
        if not one_chunk:
            pos, end = offset, offset + length
            while pos < end and len(runs) <= MAX_READ_RUNS:
                ext = disk.block_status(pos, end - pos)
                zero = ext.allocation is not Allocation.DATA
                if runs and runs[-1][2] == zero:
                    runs[-1][1] += ext.length
                else:
                    runs.append([pos, ext.length, zero])
                pos += ext.length
            if pos < end or len(runs) > MAX_READ_RUNS:
                runs = []
            else:  # short zero runs are cheaper as data than as a chunk of their own
                merged: list[list[Any]] = []
                for run in runs:
                    if run[2] and run[1] < MIN_HOLE_CHUNK and len(runs) > 1:
                        run[2] = False
                    if merged and merged[-1][2] == run[2] and not run[2]:
                        merged[-1][1] += run[1]
                    else:
                        merged.append(run)
                runs = merged
        if not runs:
            runs = [[offset, length, False]]
        return [(s, n, None if zero else disk.read(s, n)) for s, n, zero in runs]

    async def send_read(
        self, request: _Request, plan: list[tuple[int, int, bytes | bytearray | memoryview | None]]
    ) -> None:
        handle = request.handle
        if not self.structured:
            parts: list[bytes | bytearray | memoryview] = [
                P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle)
            ]
            parts += [data if data is not None else bytes(n) for _, n, data in plan]
            await self.send(*parts)
            return
        if not plan:
            await self.send_chunk(handle, P.REPLY_TYPE_NONE, b"", done=True)
            return
        chunks: list[bytes | bytearray | memoryview] = []
        for index, (start, n, data) in enumerate(plan):
            flags = P.REPLY_FLAG_DONE if index == len(plan) - 1 else 0
            if data is None:
                body = P.OFFSET_HOLE_BODY.pack(start, n)
                chunks.append(
                    P.STRUCTURED_REPLY.pack(
                        P.STRUCTURED_REPLY_MAGIC, flags, P.REPLY_TYPE_OFFSET_HOLE, handle,
                        len(body),
                    ) + body
                )  # fmt: skip
            else:
                chunks.append(
                    P.STRUCTURED_REPLY.pack(
                        P.STRUCTURED_REPLY_MAGIC, flags, P.REPLY_TYPE_OFFSET_DATA, handle, 8 + n
                    ) + P.OFFSET.pack(start)
                )  # fmt: skip
                chunks.append(data)
        await self.send(*chunks)

    @staticmethod
    def extents(disk: Disk, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        pos, end = offset, offset + length
        while pos < end and len(out) < MAX_DESCRIPTORS:
            ext = disk.block_status(pos, end - pos)
            status = 0 if ext.allocation is Allocation.DATA else P.STATE_HOLE | P.STATE_ZERO
            if out and out[-1][1] == status:
                out[-1][0] += ext.length
            else:
                if one and out:
                    break
                out.append([ext.length, status])
            pos += ext.length
        return [(n, s) for n, s in out]

    # -- replies --------------------------------------------------------------------------------

    async def send_simple(self, handle: int, error: int) -> None:
        await self.send(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, error, handle))

    async def send_chunk(self, handle: int, rtype: int, body: bytes, *, done: bool) -> None:
        flags = P.REPLY_FLAG_DONE if done else 0
        header = P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, flags, rtype, handle, len(body))
        await self.send(header + body)

    async def send_error(self, request: _Request, error: int, message: str) -> None:
        if not self.structured:
            await self.send_simple(request.handle, error)
            return
        text = message.encode("utf-8", "replace")[: P.MAX_STRING]
        body = P.ERROR_BODY.pack(error, len(text)) + text
        await self.send_chunk(request.handle, P.REPLY_TYPE_ERROR, body, done=True)


@dataclass(slots=True)
class _Request:
    flags: int
    cmd: int
    handle: int
    offset: int
    length: int
    payload: bytearray | None
    held: int  # payload budget bytes taken


class _Error(Exception):
    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


# -- listening ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str | None = None
    port: int = P.DEFAULT_PORT
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = self.host or "*"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` (every address), ``PORT``, or ``unix:PATH``."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise UsageError("--listen unix: needs a socket path")
        return ListenAddress(unix_path=os.path.abspath(path))
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--listen {text!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--listen {text!r}: port out of range")
    return ListenAddress(host or None, port)


async def open_listeners(address: ListenAddress) -> list[trio.SocketListener]:
    if address.unix_path is None:
        try:
            return await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as e:
            raise UsageError(f"cannot listen on {address}: {e.strerror or e}") from None
    path = address.unix_path
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {address}: {e.strerror or e}") from None
    return [trio.SocketListener(sock)]


def _bound(listeners: Sequence[trio.SocketListener], address: ListenAddress) -> str:
    if address.unix_path is not None:
        return str(address)
    names = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return ", ".join(names)


async def _serve(
    server: NBDServer, address: ListenAddress, on_ready: Callable[[str], None] | None
) -> None:
    listeners = await open_listeners(address)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            await nursery.start(trio.serve_listeners, server.handle, listeners)
            bound = _bound(listeners, address)
            log.info(
                "serving %s on %s (%d images, cache=%s%s%s)",
                server.images_dir,
                bound,
                len(server.entries),
                server.options.cache.value,
                ", read-only" if server.options.read_only else "",
                ", TLS required" if server.options.tls_required else "",
            )
            if on_ready is not None:
                on_ready(bound)
    finally:
        if address.unix_path is not None:
            try:
                os.unlink(address.unix_path)
            except OSError:
                pass


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s received: flushing images and stopping", signal.Signals(signum).name)
            scope.cancel()
            return


def serve(
    images_dir: str,
    address: ListenAddress,
    options: ServeOptions,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Serve until signalled. Every open image is flushed and closed before returning; the
    exit status is 1 when one of those flushes failed."""
    server = NBDServer(images_dir, options)
    try:
        trio.run(_serve, server, address, on_ready)
    finally:
        failed = server.close_all()
        log.info("stopped")
    return 1 if failed else 0
