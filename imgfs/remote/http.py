"""HTTP(S) images: a read-only HostFile over Range requests.

An image at an ``http://`` or ``https://`` URL opens like a local file, read-only, and every
format driver runs on top of it. The object is fetched in aligned blocks (1 MiB by default)
through a bounded LRU cache; a read that continues an earlier one grows a read-ahead window, so
a sequential scan turns into a few large Range requests instead of many small ones.

Correctness rules (each failure is one line naming the URL):

* the server must answer a Range request with 206 and a ``Content-Range`` that gives the total
  size; a 200 with the whole body means it ignores ranges, and we refuse rather than download
  gigabytes per read;
* the object must not change while open: every request carries ``If-Match`` (strong ETag) or
  ``If-Unmodified-Since`` (Last-Modified), and the ETag/size of every answer is compared with
  the first one, so two versions of the object are never mixed into one disk;
* connection errors, timeouts, 5xx and 429 are retried with exponential backoff, a bounded
  number of times; 4xx are not;
* certificates are checked against the system CA store (or ``ca-file``); turning the check off
  takes an explicit ``sslverify=off`` and is logged.

Run-time options (``imgfs mount -o KEY=VALUE``, or ``IMGFS_HTTP_OPTIONS="KEY=VALUE,..."`` for
every command; ``IMGFS_CA_FILE`` names the CA file): see ``RUNTIME_OPTIONS``.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import errno
import http.client
import logging
import os
import posixpath
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

from imgfs.block.hostfile import CacheMode, WouldBlock, in_nowait_mode
from imgfs.errors import HostIOError, InvalidRequest, ReadOnly, Unsupported, UsageError
from imgfs.remote import register_scheme
from imgfs.units import bool_option, size_option

log = logging.getLogger(__name__)

RUNTIME_OPTIONS = {
    "ca-file": "HTTPS: PEM file of CA certificates to trust instead of the system store "
    "(also IMGFS_CA_FILE)",
    "sslverify": "HTTPS: on (default) or off; off accepts any certificate (logged)",
    "http-cache-size": "HTTP: bytes of fetched blocks kept in memory (default 32M)",
    "http-block-size": "HTTP: fetch and cache unit, 64K to 16M (default 1M)",
    "http-readahead": "HTTP: largest read-ahead window for sequential reads (default 8M)",
    "http-timeout": "HTTP: seconds to wait for a server's answer or more data (default 30)",
    "http-connect-timeout": "HTTP: seconds to wait for a connection (default 10)",
    "http-retries": "HTTP: retries of a failed request, with exponential backoff (default 5)",
    "http-connections": "HTTP: persistent connections kept per image (default 4)",
}

# Status codes worth retrying: the server is overloaded or failing for a moment.
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
BACKOFF_FIRST = 0.1  # seconds before the first retry; doubles each time
BACKOFF_MAX = 5.0
MAX_REDIRECTS = 5
# One Range request never asks for more than this (the read-ahead window is smaller anyway).
MAX_REQUEST = 64 * 1024 * 1024
# How many concurrent sequential readers we follow.
MAX_STREAMS = 8


class _Retry(Exception):
    """A transient failure: try the request again (after a backoff)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class HttpOptions:
    ca_file: str | None = None
    verify: bool = True
    cache_size: int = 32 * 1024 * 1024
    block_size: int = 1024 * 1024
    readahead: int = 8 * 1024 * 1024
    timeout: float = 30.0
    connect_timeout: float = 10.0
    retries: int = 5
    connections: int = 4

    @classmethod
    def from_mapping(cls, given: Mapping[str, str] | None) -> HttpOptions:
        """Options from ``IMGFS_HTTP_OPTIONS`` and ``IMGFS_CA_FILE``, overridden by ``given``."""
        merged: dict[str, str] = {}
        for item in os.environ.get("IMGFS_HTTP_OPTIONS", "").split(","):
            key, sep, value = item.strip().partition("=")
            if sep:
                merged[key] = value
        if os.environ.get("IMGFS_CA_FILE"):
            merged["ca-file"] = os.environ["IMGFS_CA_FILE"]
        merged.update({k: v for k, v in (given or {}).items() if k in RUNTIME_OPTIONS})
        block = size_option(merged, "http-block-size", cls.block_size)
        if not 64 * 1024 <= block <= 16 * 1024 * 1024 or block & (block - 1):
            raise UsageError(f"http-block-size={block}: must be a power of two, 64K to 16M")
        cache = max(size_option(merged, "http-cache-size", cls.cache_size), 2 * block)
        readahead = min(size_option(merged, "http-readahead", cls.readahead), cache // 2)
        return cls(
            ca_file=merged.get("ca-file") or None,
            verify=bool_option(merged, "sslverify", True),
            cache_size=cache,
            block_size=block,
            readahead=max(0, readahead),
            timeout=_seconds(merged, "http-timeout", cls.timeout),
            connect_timeout=_seconds(merged, "http-connect-timeout", cls.connect_timeout),
            retries=_count(merged, "http-retries", cls.retries, 0, 100),
            connections=_count(merged, "http-connections", cls.connections, 1, 64),
        )


def _seconds(options: Mapping[str, str], key: str, default: float) -> float:
    text = options.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise UsageError(f"{key}={text!r}: must be a number of seconds, above 0 and up to 3600")
    return value


def _count(options: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    text = options.get(key)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise UsageError(f"{key}={text!r}: must be a whole number from {low} to {high}")
    return int(text)


def _ssl_context(options: HttpOptions, url: str) -> ssl.SSLContext:
    if not options.verify:
        log.warning("%s: sslverify=off: the server's certificate is NOT checked", url)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=options.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"ca-file {options.ca_file!r}: cannot load: {e}") from None


def redact(url: str) -> str:
    """The URL without a password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


class HttpFile:
    """A read-only HostFile stand-in for one object on an HTTP(S) server."""

    writable = False
    server_allows_write = False
    direct = False
    no_flush = True
    is_block_device = False
    alignment = 1

    def __init__(self, url: str, options: HttpOptions) -> None:
        self.url = url
        self.path = redact(url)  # what drivers quote in messages
        self.options = options
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        self._closed = False
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._cache_blocks = max(2, options.cache_size // options.block_size)
        self._inflight: dict[int, threading.Event] = {}
        self._prefetcher: concurrent.futures.ThreadPoolExecutor | None = None
        # next expected block of a sequential reader -> its read-ahead window in blocks
        self._streams: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._set_target(url)
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._size = 0
        self._open()

    # -- connection handling ---------------------------------------------------------------------

    def _set_target(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{self.path}: not an http or https URL")
        self._scheme = parts.scheme
        self._host = parts.hostname
        try:
            self._port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise UsageError(f"{self.path}: bad port in the URL") from None
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"User-Agent": "imgfs", "Accept-Encoding": "identity"}
        if parts.username is not None:
            creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
        self._context = _ssl_context(self.options, self.path) if self._scheme == "https" else None

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._context is not None:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.options.connect_timeout, context=self._context
            )
        else:
            conn = http.client.HTTPConnection(
                self._host, self._port, timeout=self.options.connect_timeout
            )
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self.options.timeout)  # connect and read time out separately
        return conn

    def _checkout(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection and whether it was used before (a reused one may have been closed by
        the server's keep-alive timeout: its first failure is retried at once)."""
        with self._lock:
            if self._closed:
                raise HostIOError(f"{self.path}: closed", errno.EBADF)
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.options.connections:
                self._idle.append(conn)
                return
        conn.close()

    # -- requests -------------------------------------------------------------------------------

    def _request(self, start: int, length: int, *, first: bool = False) -> memoryview:
        """Bytes ``[start, start + length)`` of the object, with retries."""
        attempt = 0
        while True:
            try:
                return self._request_once(start, length, first)
            except _Retry as e:
                if attempt >= self.options.retries:
                    raise HostIOError(
                        f"{self.path}: {e} (gave up after {attempt + 1} attempts)",
                        errno.ETIMEDOUT if "timed out" in str(e) else errno.EIO,
                    ) from None
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt)
                if e.retry_after is not None:
                    delay = min(BACKOFF_MAX, max(delay, e.retry_after))
                log.info("%s: %s; retrying in %.1f s", self.path, e, delay)
                time.sleep(delay)
                attempt += 1

    def _request_once(self, start: int, length: int, first: bool) -> memoryview:
        for _ in range(2):  # a second try only when a reused idle connection was stale
            try:
                conn, reused = self._checkout()
            except ssl.SSLCertVerificationError as e:
                raise HostIOError(
                    f"{self.path}: certificate verification failed: {e.verify_message}; give "
                    "the CA with -o ca-file=FILE (or IMGFS_CA_FILE)",
                    errno.EACCES,
                ) from None
            except (OSError, http.client.HTTPException) as e:
                raise _Retry(f"cannot connect to {self._host}:{self._port}: {_reason(e)}") from None
            try:
                return self._exchange(conn, start, length, first)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if reused:
                    continue  # the server closed an idle connection: not a failure
                raise _Retry(f"connection lost: {_reason(e)}") from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise _Retry(f"request failed: {_reason(e)}") from None
            except BaseException:
                conn.close()
                raise
        raise _Retry("connection lost twice")

    def _exchange(
        self, conn: http.client.HTTPConnection, start: int, length: int, first: bool
    ) -> memoryview:
        headers = dict(self._headers)
        headers["Range"] = f"bytes={start}-{start + length - 1}"
        if self._etag is not None and not self._etag.startswith("W/"):
            headers["If-Match"] = self._etag
        elif self._last_modified is not None:
            headers["If-Unmodified-Since"] = self._last_modified
        conn.request("GET", self._target, headers=headers)
        resp = conn.getresponse()
        status = resp.status
        if status != 206:
            self._refuse(conn, resp, first)  # raises, or _Redirect at open
        total = self._check_headers(resp, first)
        if total != self._size and not first:
            conn.close()
            raise HostIOError(
                f"{self.path}: the object changed on the server (size {self._size} -> {total})",
                errno.EIO,
            )
        expected = min(length, total - start) if total > start else 0
        got_range = resp.getheader("Content-Range", "")
        if not got_range.startswith(f"bytes {start}-{start + expected - 1}/"):
            conn.close()
            raise HostIOError(
                f"{self.path}: asked for bytes {start}-{start + length - 1}, "
                f"got Content-Range {got_range!r}",
                errno.EIO,
            )
        body_length = resp.getheader("Content-Length")
        if body_length is not None and body_length.strip() != str(expected):
            conn.close()
            raise HostIOError(
                f"{self.path}: Content-Length {body_length!r} does not match the range "
                f"({expected} bytes)",
                errno.EIO,
            )
        buf = bytearray(expected)
        view = memoryview(buf)
        done = 0
        while done < expected:
            n = resp.readinto(view[done:])
            if not n:
                raise http.client.IncompleteRead(bytes(0), expected - done)
            done += n
        if resp.will_close:
            conn.close()
        else:
            resp.read()  # nothing left; leaves the connection ready for the next request
            self._checkin(conn)
        if first:
            self._size = total
        return view

    def _check_headers(self, resp: http.client.HTTPResponse, first: bool) -> int:
        """The object's total size from Content-Range; the ETag/Last-Modified the first answer
        gave are compared with every later one."""
        content_range = resp.getheader("Content-Range")
        total_text = (content_range or "").rpartition("/")[2].strip()
        if not content_range or not content_range.startswith("bytes ") or not total_text.isdigit():
            resp.close()
            raise Unsupported(
                f"{self.path}: the server's 206 answer has no usable Content-Range "
                f"({content_range!r}): cannot tell the object's size"
            )
        etag = resp.getheader("ETag")
        last_modified = resp.getheader("Last-Modified")
        if first:
            self._etag, self._last_modified = etag, last_modified
        elif (self._etag is not None and etag != self._etag) or (
            self._last_modified is not None and last_modified != self._last_modified
        ):
            resp.close()
            raise HostIOError(
                f"{self.path}: the object changed on the server (ETag {self._etag!r} -> "
                f"{etag!r}, Last-Modified {self._last_modified!r} -> {last_modified!r})",
                errno.EIO,
            )
        return int(total_text)

    def _refuse(
        self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, first: bool
    ) -> None:
        """Every answer but 206: a one-line error, a retry, or (at open) a redirect."""
        status, reason = resp.status, resp.reason
        retry_after = resp.getheader("Retry-After")
        location = resp.getheader("Location")
        content_range = resp.getheader("Content-Range") or ""
        conn.close()  # never read a body we did not ask for (a 200 may be the whole image)
        if status == 200:
            raise Unsupported(
                f"{self.path}: the server ignores Range requests (it answered 200 with the "
                "whole object); imgfs needs a server that serves byte ranges"
            )
        if status in (301, 302, 303, 307, 308) and first and location:
            raise _Redirect(location)
        if status == 416 and first and content_range.strip() == "bytes */0":
            raise _EmptyObject
        if status == 412:
            raise HostIOError(
                f"{self.path}: the object changed on the server (412 Precondition Failed)",
                errno.EIO,
            )
        if status in RETRY_STATUS:
            delay = float(retry_after) if retry_after and retry_after.isdigit() else None
            raise _Retry(f"HTTP {status} {reason}", delay)
        code = {404: errno.ENOENT, 410: errno.ENOENT, 401: errno.EACCES, 403: errno.EACCES}
        raise HostIOError(f"{self.path}: HTTP {status} {reason}", code.get(status, errno.EIO))

    def _open(self) -> None:
        """First request: the object's size and version, and its first block (cached)."""
        block = self.options.block_size
        for _ in range(MAX_REDIRECTS + 1):
            try:
                data = self._request(0, block, first=True)
                break
            except _EmptyObject:
                self._size = 0
                return
            except _Redirect as r:
                new = urljoin(self.url, r.location)
                if self._scheme == "https" and not new.startswith("https://"):
                    raise HostIOError(
                        f"{self.path}: redirected from https to {redact(new)!r}: refused",
                        errno.EACCES,
                    ) from None
                log.info("%s: redirected to %s", self.path, redact(new))
                self.close_connections()
                self.url = new
                self._set_target(new)
        else:
            raise HostIOError(f"{self.path}: more than {MAX_REDIRECTS} redirects", errno.ELOOP)
        self._cache[0] = bytes(data)

    # -- HostFile interface ---------------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def allocated_size(self) -> int:
        return self._size  # a remote object has no holes we can see

    def data_extents(self, offset: int, length: int) -> tuple[bool, int]:
        return True, length

    def pread(self, offset: int, length: int) -> bytes | memoryview:
        """Exactly ``length`` bytes from ``offset``; past the end of the object reads zeros."""
        if offset < 0 or length < 0:
            raise InvalidRequest(f"{self.path}: bad read offset {offset} length {length}")
        end = min(offset + length, self._size)
        if end <= offset:
            return bytes(length)
        bs = self.options.block_size
        first, last = offset // bs, (end - 1) // bs
        if in_nowait_mode():
            # On the FUSE event loop: serve cached blocks, leave the network to a worker thread.
            with self._lock:
                if any(index not in self._cache for index in range(first, last + 1)):
                    raise WouldBlock
        blocks = self._blocks(offset, end)
        if first == last:
            start = offset - first * bs
            piece = memoryview(blocks[first])[start : start + end - offset]
            return piece if end - offset == length else bytes(piece) + bytes(length - len(piece))
        out = bytearray(length)
        pos = 0
        for index in range(first, last + 1):
            block = blocks[index]
            lo = offset - index * bs if index == first else 0
            hi = end - index * bs if index == last else len(block)
            out[pos : pos + hi - lo] = memoryview(block)[lo:hi]
            pos += hi - lo
        return memoryview(out)

    def _blocks(self, offset: int, end: int) -> dict[int, bytes]:
        """The blocks holding ``[offset, end)``, from the cache or fetched, single-flight: a
        block another thread is fetching is waited for, not fetched again. A sequential reader
        also starts a background fetch of the blocks after it (the read-ahead window), so the
        next reads find them in the cache or already on the way."""
        bs = self.options.block_size
        first, last = offset // bs, (end - 1) // bs
        nblocks = -(-self._size // bs)
        found: dict[int, bytes] = {}
        mine: list[int] = []
        ahead: list[int] = []
        waits: list[tuple[int, threading.Event]] = []
        with self._lock:
            window = self._track_stream(offset, end)
            for index in range(first, last + 1):
                self._claim(index, found, mine, waits)
            # Read ahead when a sequential reader is about to run out of fetched blocks.
            trigger = last + 1 + window // 2
            if (
                window
                and trigger < nblocks
                and trigger not in self._cache
                and trigger not in self._inflight
            ):
                for index in range(last + 1, min(nblocks, last + 1 + window)):
                    if index not in self._cache and index not in self._inflight:
                        self._inflight[index] = threading.Event()
                        ahead.append(index)
        if ahead:
            self._start_prefetch(ahead)
        self._fetch_claimed(mine, found)
        for index, event in waits:
            event.wait()
            with self._lock:
                block = self._cache.get(index)
            if block is None:  # the other fetch failed, or the block was evicted already
                block = bytes(self._request(index * bs, bs))
            found[index] = block
        return found

    def _fetch_claimed(self, indices: list[int], found: dict[int, bytes] | None) -> None:
        """Fetch blocks this thread claimed (in ``_inflight``) into the cache (and ``found``);
        their events are set whatever happens, so waiters never hang."""
        bs = self.options.block_size
        try:
            for run_first, run_last in _runs(indices, MAX_REQUEST // bs):
                data = self._request(run_first * bs, (run_last - run_first + 1) * bs)
                with self._lock:
                    for index in range(run_first, run_last + 1):
                        block = bytes(data[(index - run_first) * bs : (index - run_first + 1) * bs])
                        if found is not None:
                            found[index] = block
                        self._cache[index] = block
                        self._cache.move_to_end(index)
                    while len(self._cache) > self._cache_blocks:
                        self._cache.popitem(last=False)
        finally:
            with self._lock:
                for index in indices:
                    self._inflight.pop(index).set()

    def _start_prefetch(self, indices: list[int]) -> None:
        with self._lock:
            if self._prefetcher is None:
                self._prefetcher = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="imgfs-http-readahead"
                )
            executor = self._prefetcher
        try:
            executor.submit(self._prefetch, indices)
        except RuntimeError:  # shut down (closing): release the claims
            with self._lock:
                for index in indices:
                    self._inflight.pop(index).set()

    def _prefetch(self, indices: list[int]) -> None:
        try:
            self._fetch_claimed(indices, None)
        except Exception as e:  # a reader that needs the block fetches it and reports
            log.debug("%s: read-ahead failed: %s", self.path, e)

    def _claim(
        self,
        index: int,
        found: dict[int, bytes],
        mine: list[int],
        waits: list[tuple[int, threading.Event]],
    ) -> None:
        block = self._cache.get(index)
        if block is not None:
            self._cache.move_to_end(index)
            found[index] = block
        elif index in self._inflight:
            waits.append((index, self._inflight[index]))
        else:
            self._inflight[index] = threading.Event()
            mine.append(index)

    def _track_stream(self, offset: int, end: int) -> int:
        """The read-ahead window (in blocks) for a read of ``[offset, end)``: it doubles while
        reads keep starting where an earlier one ended, up to the ``readahead`` bound. Up to
        MAX_STREAMS readers are followed at once (keyed by where each one will read next)."""
        max_window = self.options.readahead // self.options.block_size
        window = self._streams.pop(offset, None)
        window = 0 if window is None else min(max_window, max(1, window * 2))
        self._streams[end] = window
        while len(self._streams) > MAX_STREAMS:
            self._streams.popitem(last=False)
        return window

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise ReadOnly(f"{self.path}: HTTP images are read-only")

    def punch_hole(self, offset: int, length: int) -> bool:
        raise ReadOnly(f"{self.path}: HTTP images are read-only")

    def zero_range(self, offset: int, length: int) -> bool:
        raise ReadOnly(f"{self.path}: HTTP images are read-only")

    def truncate(self, size: int) -> None:
        raise ReadOnly(f"{self.path}: HTTP images are read-only")

    def sync(self) -> None:
        return None

    def close_connections(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is not None:
            prefetcher.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._closed = True
            self._cache.clear()
        self.close_connections()

    @property
    def name(self) -> str:
        """The object's file name (the last path component of the URL)."""
        return posixpath.basename(urlsplit(self.url).path) or self._host


class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class _EmptyObject(Exception):
    pass


def _runs(indices: list[int], max_len: int) -> list[tuple[int, int]]:
    """Sorted indices as (first, last) runs of consecutive values, each at most max_len long."""
    runs: list[tuple[int, int]] = []
    for index in sorted(indices):
        if runs and runs[-1][1] == index - 1 and index - runs[-1][0] < max_len:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def _reason(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def open_http(
    url: str, writable: bool, cache: CacheMode, options: Mapping[str, str] | None = None
) -> HttpFile:
    """The opener registered for http and https: always read-only (``writable`` is ignored;
    the driver on top sees ``writable = False`` and opens the image read-only)."""
    return HttpFile(url, HttpOptions.from_mapping(options))


register_scheme("http", open_http, RUNTIME_OPTIONS)
register_scheme("https", open_http, RUNTIME_OPTIONS)
