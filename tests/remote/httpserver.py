"""Web servers on loopback for the HTTP backend's tests and benchmark.

``Nginx`` runs the real nginx (Debian nginx-light) in the foreground with its own prefix,
config, pid, logs and temp paths under a scratch directory, on a free port. The small
``http.server`` handlers below are deliberately broken servers for the negative cases that a
real server cannot produce (ignoring Range, dropping connections, stalling).
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx serving ``root`` on 127.0.0.1; ``tls`` = (cert file, key file) for HTTPS.
    ``/forbidden.img`` answers 403. Started as root, the workers stay root (the scratch
    directories of the tests are private to their owner)."""

    def __init__(self, root: Path, scratch: Path, *, tls: tuple[Path, Path] | None = None) -> None:
        self.root = root
        self.prefix = scratch / "nginx"
        (self.prefix / "logs").mkdir(parents=True, exist_ok=True)
        (self.prefix / "tmp").mkdir(exist_ok=True)
        self.port = free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        listen = f"127.0.0.1:{self.port}" + (" ssl" if tls else "")
        tls_lines = (
            f"ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};" if tls else ""
        )
        tmp = self.prefix / "tmp"
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            f"""
{"user root root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {self.prefix}/logs/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen {listen};
        server_name localhost;
        {tls_lines}
        root {root};
        autoindex off;
        location = /forbidden.img {{ deny all; }}
    }}
}}
"""
        )
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    self.stop()
                    raise RuntimeError(f"nginx did not start: {err}") from None
                time.sleep(0.05)

    def requests(self) -> list[str]:
        """The access log's request lines so far."""
        log = self.prefix / "logs" / "access.log"
        return log.read_text().splitlines() if log.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client hanging up on a misbehaving server is the point of these servers

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def serve_in_thread(handler: type[http.server.BaseHTTPRequestHandler]) -> tuple[str, _Server]:
    """A threading HTTP server on loopback: (base URL, server); ``server.stop()`` ends it."""
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def file_handler(path: Path, *, honour_range: bool = True, drop_first: int = 0,
                 stall: float = 0.0, fail_status: int = 0, fail_first: int = 0,
                 content_range: bool = True,
                 ) -> type[http.server.BaseHTTPRequestHandler]:  # fmt: skip
    """A handler serving one file at any URL path, misbehaving as asked: ignoring Range (200
    with the whole body), closing the first ``drop_first`` connections without an answer,
    answering ``fail_status`` to the first ``fail_first`` requests, stalling ``stall``
    seconds before every answer, or leaving out Content-Range."""
    state = {"dropped": 0, "failed": 0, "requests": 0}
    lock = threading.Lock()

    class Handler(_Quiet):
        counts = state

        def do_GET(self) -> None:
            with lock:
                state["requests"] += 1
                drop = state["dropped"] < drop_first
                if drop:
                    state["dropped"] += 1
                fail = not drop and state["failed"] < fail_first
                if fail:
                    state["failed"] += 1
            if drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if stall:
                time.sleep(stall)
            if fail:
                self.send_response(fail_status)
                self.send_header("Content-Length", "0")
                self.send_header("Retry-After", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            rng = self.headers.get("Range")
            if not honour_range or not rng:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            first_text, _, last_text = rng.removeprefix("bytes=").partition("-")
            first, last = int(first_text), min(int(last_text), len(data) - 1)
            self.send_response(206)
            if content_range:
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            self.wfile.write(data[first : last + 1])

    return Handler
