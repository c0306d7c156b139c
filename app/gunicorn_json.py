"""gunicorn's own error answers in the API's error shape.

A request gunicorn cannot parse (a malformed request line, a URL or headers over its limits, a bad
chunked body) never reaches Flask: gunicorn answers it itself, with an HTML page. That breaks the
contract (every error is ``{"error": {"code", "message"}}``), so ``aiorch serve`` runs this worker
class, which answers those in JSON.

gunicorn keeps deciding everything else: ``handle_error`` of the base worker picks the status,
logs the client error and writes the access log line; only the page it writes is replaced. Its
page is captured instead of sent, and its status line kept, so the mapping from parse errors to
400/414/431/... stays exactly gunicorn's, in this version and the next.

Loaded by gunicorn by name (``app.gunicorn_json.JsonErrorWorker``), in the master too: stdlib and
gunicorn only, no Flask.
"""

from __future__ import annotations

import json
from typing import Any

from gunicorn import util
from gunicorn.http.errors import (
    ChunkMissingTerminator,
    InvalidChunkExtension,
    InvalidChunkSize,
    InvalidHeader,
    InvalidHeaderName,
    InvalidHTTPVersion,
    InvalidRequestLine,
    InvalidRequestMethod,
    LimitRequestHeaders,
    LimitRequestLine,
    ObsoleteFolding,
)
from gunicorn.workers.gthread import ThreadWorker

# The API's codes (app/errors.py) for the statuses gunicorn answers itself.
CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}
# What the client did wrong, in words; gunicorn's own text quotes the request back, which a
# client does not need to be told.
MESSAGES: tuple[tuple[tuple[type[Exception], ...], str], ...] = (
    ((LimitRequestLine,), "The request line (method and URL) is too long."),
    ((LimitRequestHeaders,), "The request headers are too large or too many."),
    (
        (InvalidRequestLine, InvalidRequestMethod, InvalidHTTPVersion),
        "The request line is not valid HTTP/1.1.",
    ),
    ((InvalidHeader, InvalidHeaderName, ObsoleteFolding), "A request header is not valid HTTP/1.1."),
    (
        (InvalidChunkSize, ChunkMissingTerminator, InvalidChunkExtension),
        "The chunked request body is malformed.",
    ),
)
STATUS_MESSAGES = {
    403: "The request is forbidden.",
    417: "The Expect header cannot be met.",
    500: "Something went wrong on our side.",
    501: "The request's transfer coding is not supported.",
}


class _CapturedPage:
    """Stands in for the client socket while gunicorn writes its HTML page, and keeps the bytes
    (``util.write_error`` needs only these three methods)."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data


def json_error_response(status: int, reason: str, exc: BaseException) -> bytes:
    """The whole HTTP response for ``status``: the error shape, and ``Connection: close`` as
    gunicorn's own (the connection cannot be trusted after a parse error)."""
    message = next((text for kinds, text in MESSAGES if isinstance(exc, kinds)), None)
    if message is None or status >= 500:
        message = STATUS_MESSAGES.get(status, "The request is malformed.")
    code = CODES.get(status, "bad_request" if status < 500 else "internal_error")
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


def _status_line(page: bytes) -> tuple[int, str]:
    """``(414, "URI Too Long")`` from ``HTTP/1.1 414 URI Too Long``; a 500 if gunicorn wrote
    nothing we can read."""
    line = page.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ", 2)
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1]), (parts[2] if len(parts) == 3 else "Error")
    return 500, "Internal Server Error"


class JsonErrorWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's gthread worker, its own error pages in the API's JSON error shape."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        page = _CapturedPage()
        super().handle_error(req, page, addr, exc)
        status, reason = _status_line(page.data)
        try:
            util.write_nonblock(client, json_error_response(status, reason, exc))
        except Exception:  # the client may be gone: as in gunicorn, nothing more to do
            self.log.debug("Failed to send error message.")
