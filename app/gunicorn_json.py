"""gunicorn's own error answers in the API's error shape.

A request gunicorn cannot parse (a malformed request line, a URL or headers over its limits, a bad
chunked body) never reaches Flask: gunicorn answers it itself, with an HTML page. That breaks the
contract (every error is ``{"error": {"code", "message"}}``), so ``aiorch serve`` runs this worker
class, which answers those in JSON.

gunicorn keeps deciding everything else: ``handle_error`` of the base worker picks the status,
logs the client error and writes the access log line; only the page it writes is replaced. Its
page is captured instead of sent, and its status line kept, so the mapping from parse errors to
400/414/431/... stays exactly gunicorn's, in this version and the next.

It also hands live streams over (``GET .../events``, and ``POST /v1/jobs`` with ``Accept:
text/event-stream``, which answers with the new job's stream): the request is handled by Flask in a request
thread as any other (key, ids, ownership: any error is answered as usual), and a stream that may
start leaves a callable in ``environ["aiorch.stream"]``; the worker then writes nothing, gives the
callable a duplicate of the connection's socket and forgets the connection, and the request thread
is free again. The API's stream hub (``app.stream_hub``, one thread per process) writes the stream
from then on, with every other open stream.

Loaded by gunicorn by name (``app.gunicorn_json.JsonErrorWorker``), in the master too: stdlib and
gunicorn only, no Flask.
"""

from __future__ import annotations

import json
import select
import ssl
import time
from datetime import datetime
from typing import Any

from gunicorn import util
from gunicorn.http import message, wsgi
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

from config.settings import REQUEST_LINE_LIMIT

# How long a pool thread waits on its kept-alive connection for the next request before handing
# it back to gthread's poller, and how often meanwhile it looks whether another connection waits.
KEEPALIVE_LINGER = 0.02
LINGER_STEP = 0.005

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
# The environ key our worker sets to say a stream's socket can be handed over, and the key a
# stream view answers with (``app.streams``).
ADOPT = "aiorch.can_adopt"
STREAM = "aiorch.stream"
STREAM_SUFFIX = "/events"
EVENT_STREAM = "text/event-stream"

# gunicorn clamps ``limit_request_line`` to 8190 (and 0 turns the check off altogether); the ceiling
# it clamps to is raised here, in the master and every worker, to the limit ``aiorch serve`` sets
# (``config.REQUEST_LINE_LIMIT``, for ``GET /v1/events?ids=``): a longer line is still a 414.
message.MAX_REQUEST_LINE = max(message.MAX_REQUEST_LINE, REQUEST_LINE_LIMIT)

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


class _HandedOver:
    """What gunicorn holds of a connection handed to a stream: closing it does nothing."""

    def setblocking(self, flag: bool) -> None:
        pass

    def shutdown(self, how: int) -> None:
        raise OSError("the connection was handed over to a stream")

    def close(self) -> None:
        pass

    def fileno(self) -> int:
        return -1


def may_stream(req: Any) -> bool:
    """Whether the view may start a stream: a stream route, or a request that accepts one (a
    submit that follows its job, ``POST /v1/jobs`` with ``Accept: text/event-stream``)."""
    if req.path.endswith(STREAM_SUFFIX):
        return True
    return any(name == "ACCEPT" and EVENT_STREAM in value for name, value in req.headers)


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
    """gunicorn's gthread worker, its own error pages in the API's JSON error shape, and a thread
    that lingers briefly on its kept-alive connection for the client's next request.

    gthread hands a kept-alive connection back to its main thread after every answer (a wake-up
    through a pipe), which watches it and hands the next request to a pool thread again (another
    wake-up): two thread switches per request, a millisecond or more of a poll's time on this kind
    of machine. A client that asks again at once (a poller every 10 ms, a script submitting in a
    loop) is served by the same thread instead, as long as no other connection waits for a thread
    (no client can keep one to itself while others queue) and for at most ``KEEPALIVE_LINGER``."""

    def handle(self, conn: Any) -> Any:
        result = super().handle(conn)
        while result is True and self.alive and self._next_request_here(conn):
            result = super().handle(conn)
        return result

    def _next_request_here(self, conn: Any) -> bool:
        """Whether the connection's next request arrived within ``KEEPALIVE_LINGER`` while no
        other connection waited for a thread (then this thread serves it)."""
        if conn.is_http2:
            return False
        sock = conn.sock
        if conn.parser.unreader.buf.getvalue() or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return True  # read ahead already: no socket readiness would announce it
        deadline = time.monotonic() + KEEPALIVE_LINGER
        # poll, not select: a process holding a thousand streams gives its new connections
        # descriptors past select's 1024, and select refused those (every request then went
        # through gthread's main thread: POST beside 1,000 streams ran at 0.72 of its rate).
        watch = select.poll()
        try:
            watch.register(sock, select.POLLIN)
        except (OSError, ValueError):  # closed meanwhile: gthread's usual path ends it
            return False
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._pool_idle():
                return False
            try:
                readable = watch.poll(min(LINGER_STEP, left) * 1000)
            except (OSError, ValueError):
                return False
            if readable:
                return True

    def _pool_idle(self) -> bool:
        """No connection waits in the thread pool's queue (``ThreadPoolExecutor``'s own)."""
        waiting = getattr(self.tpool, "_work_queue", None)
        return waiting is not None and waiting.empty()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        page = _CapturedPage()
        super().handle_error(req, page, addr, exc)
        status, reason = _status_line(page.data)
        try:
            util.write_nonblock(client, json_error_response(status, reason, exc))
        except Exception:  # the client may be gone: as in gunicorn, nothing more to do
            self.log.debug("Failed to send error message.")

    def handle_request(self, req: Any, conn: Any) -> bool:
        if not may_stream(req) or isinstance(conn.sock, ssl.SSLSocket):
            return bool(super().handle_request(req, conn))
        return self.handle_stream_request(req, conn)

    def handle_stream_request(self, req: Any, conn: Any) -> bool:
        """gunicorn's ``handle_request`` for a stream route: an answer the view writes (an error)
        is sent as usual; a stream the view starts takes the socket over."""
        self.cfg.pre_request(self, req)
        started = datetime.now()
        resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, self.cfg)
        environ["wsgi.multithread"] = True
        environ[ADOPT] = True
        self.nr += 1
        resp.force_close()  # a stream ends its connection; so does any answer on this path
        try:
            body = self.wsgi(environ, resp.start_response)
            adopt = environ.get(STREAM)
            try:
                if adopt is None:
                    for item in body:
                        resp.write(item)
                    resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - started)
                if hasattr(body, "close"):
                    body.close()
            if adopt is not None:
                # The stream owns a duplicate of the socket; gunicorn is left a stand-in to
                # close, since its graceful close would half-close the connection itself.
                sock, conn.sock = conn.sock, _HandedOver()
                adopt(sock.dup())
                sock.close()
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")
        return False
