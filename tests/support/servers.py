"""Real HTTP servers on 127.0.0.1 for tests: an input image server and a webhook receiver.

Both speak HTTP/1.1 with keep-alive, as real servers do, and serve https when given a ``TlsSite``:
a certificate for a host *name* from a throwaway CA (``trustme``), so a client has to send that
name as SNI and verify the certificate against it. Reach them by a name that resolves to
127.0.0.1 (``localhost``) and trust the CA with ``AIORCH_CA_BUNDLE`` (``TlsSite.ca_file``).
"""

from __future__ import annotations

import json
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims a huge 1-bit image: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that refuses the certificate, or hangs up mid-answer, is what some tests do.
        pass


class TlsSite:
    """A throwaway CA and a server certificate for ``names``; records the SNI of each handshake.

    Several sites may share one ``ca`` (a certificate for another name, same trusted CA).
    """

    def __init__(self, *names: str, ca: trustme.CA | None = None):
        self.ca = ca or trustme.CA()
        self.names = names
        self.cert = self.ca.issue_cert(*names)
        self.sni: list[str | None] = []

    def ca_file(self, folder: Path) -> Path:
        """The CA certificate as a PEM file, for ``AIORCH_CA_BUNDLE``."""
        path = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def wrap(self, server: _Server) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.cert.configure_cert(context)
        context.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        # The handshake runs in the request's thread, so a client that refuses the certificate
        # cannot stall the accept loop.
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)


def _listen(handler: type[BaseHTTPRequestHandler], tls: TlsSite | None) -> _Server:
    # HTTP/1.1: connections stay open between requests, so clients reuse them as in production.
    handler.protocol_version = "HTTP/1.1"
    server = _Server(("127.0.0.1", 0), handler)
    if tls is not None:
        tls.wrap(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class ImageServer:
    """Serves files from a folder, plus misbehaving routes.

    ``/img/<name>`` a file; ``/slow/<name>`` the file dripped 1 KiB per 0.2 s; ``/status/<code>``
    that status; ``/text`` a non-image; ``/bomb.png`` a decompression bomb; ``/redirect/<name>``
    a 302 to ``/img/<name>``; ``/goto/<url>`` a 302 to any URL.

    ``tls`` serves https; ``host`` is the name its URLs use (a name the certificate carries).
    ``headers`` holds each request's headers, in order (``Host`` above all).
    """

    folder: Path
    hits: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    tls: TlsSite | None = None
    host: str = "127.0.0.1"

    def start(self) -> ImageServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.hits.append(self.path)
                owner.headers.append(dict(self.headers.items()))
                parts = self.path.strip("/").split("/", 1)
                route, rest = parts[0], parts[1] if len(parts) > 1 else ""
                if route == "img" and (owner.folder / rest).is_file():
                    self._send(200, (owner.folder / rest).read_bytes(), "image/png")
                elif route == "slow" and (owner.folder / rest).is_file():
                    data = (owner.folder / rest).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    try:
                        for start in range(0, len(data), 1024):
                            self.wfile.write(data[start : start + 1024])
                            self.wfile.flush()
                            time.sleep(0.2)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                elif route == "status":
                    self._send(int(rest), b"{}", "application/json")
                elif route == "text":
                    self._send(200, b"hello, not an image", "text/plain")
                elif route == "bomb.png":
                    self._send(200, bomb_png(), "image/png")
                elif route in ("redirect", "goto"):
                    self.send_response(302)
                    self.send_header("Location", f"/img/{rest}" if route == "redirect" else rest)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(404, b"not found", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = _listen(Handler, self.tls)
        self.port = self.server.server_address[1]
        return self

    def url(self, path: str) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}/{path.lstrip('/')}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """Records every POST; ``plan`` decides each answer: a status code, or "hang" to stall.

    ``tls`` and ``host`` as for ``ImageServer``.
    """

    plan: Callable[[int], int | str] = lambda n: 200
    hang_seconds: float = 15.0
    received: list[Received] = field(default_factory=list)
    tls: TlsSite | None = None
    host: str = "127.0.0.1"

    def start(self) -> WebhookReceiver:
        owner = self
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with owner._lock:
                    owner.received.append(Received(dict(self.headers.items()), body, time.time()))
                    answer = owner.plan(len(owner.received))
                if answer == "hang":
                    time.sleep(owner.hang_seconds)
                    answer = 200
                try:
                    self.send_response(int(answer))
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = _listen(Handler, self.tls)
        self.port = self.server.server_address[1]
        return self

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}/hook"

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.received) >= count:
                return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"expected {count} webhook deliveries, got {len(self.received)}")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
