"""Where a stream's events go (``app.stream_hub``): the connection itself under ``aiorch serve``
(``SocketSink``, written by the hub thread, non-blocking), or a queue that a WSGI response
generator drains under any other server (``QueueSink``)."""

from __future__ import annotations

import contextlib
import queue
import socket

MAX_BUFFERED = 1 << 20  # bytes a slow reader may fall behind before its stream is closed
HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Connection: close\r\n\r\n"
)


class SocketSink:
    """A stream's connection, written by the hub thread only: chunked HTTP/1.1, non-blocking,
    what the kernel does not take at once kept in ``pending``."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self.pending = bytearray(HEADERS)
        self.closed = False

    def send(self, data: bytes, last: bool = False) -> None:
        if self.closed:
            return
        if data:
            self.pending += b"%x\r\n%s\r\n" % (len(data), data)
        if last:
            self.pending += b"0\r\n\r\n"
        self.flush()

    def flush(self) -> None:
        try:
            while self.pending:
                sent = self.sock.send(self.pending)
                del self.pending[:sent]
        except (BlockingIOError, InterruptedError):
            if len(self.pending) > MAX_BUFFERED:
                self.give_up()
        except OSError:
            self.give_up()

    def give_up(self) -> None:
        """Stop writing (the reader is gone or too slow); the hub closes the socket once it has
        taken it out of its selector, so the descriptor is never reused under it."""
        self.closed = True
        self.pending.clear()

    def close(self) -> None:
        self.give_up()
        with contextlib.suppress(OSError):
            self.sock.close()


class QueueSink:
    """A stream read by a WSGI generator (servers other than ``aiorch serve``): frames go into a
    queue, None ends it."""

    def __init__(self) -> None:
        self.frames: queue.Queue[bytes | None] = queue.Queue()
        self.closed = False
        self.pending = b""

    def send(self, data: bytes, last: bool = False) -> None:
        if self.closed:
            return
        if data:
            self.frames.put(data)
        if last:
            self.frames.put(None)
            self.closed = True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.frames.put(None)
