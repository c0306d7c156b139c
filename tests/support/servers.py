"""Real HTTP servers on 127.0.0.1 for tests: an input image server and a webhook receiver."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


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


@dataclass
class ImageServer:
    """Serves files from a folder, plus misbehaving routes.

    ``/img/<name>`` a file; ``/slow/<name>`` the file dripped 1 KiB per 0.2 s; ``/status/<code>``
    that status; ``/text`` a non-image; ``/bomb.png`` a decompression bomb; ``/redirect/<name>``
    a 302 to ``/img/<name>``.
    """

    folder: Path
    hits: list[str] = field(default_factory=list)

    def start(self) -> ImageServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.hits.append(self.path)
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
                elif route == "redirect":
                    self.send_response(302)
                    self.send_header("Location", f"/img/{rest}")
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

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

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
    """Records every POST; ``plan`` decides each answer: a status code, or "hang" to stall."""

    plan: Callable[[int], int | str] = lambda n: 200
    hang_seconds: float = 15.0
    received: list[Received] = field(default_factory=list)

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

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

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
