"""What the provider fakes share: a live server thread, fault injection, a clock, real images.

Each fake is a small Flask app that follows its seed document; tests run it on 127.0.0.1 on a
free port (``werkzeug.serving.make_server`` in a thread) and point a real client at it, so the
HTTP, the auth and the JSON shapes are exercised end to end.
"""

from __future__ import annotations

import io
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from PIL import Image
from werkzeug.serving import make_server

# The dev server logs every request at INFO; tests only care about failures.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


class FakeClock:
    """A clock both a client and a fake can share, moved forward by the test."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@dataclass
class Fault:
    """One injected misbehaviour: ``kind`` is rate_limit, server_error, slow or malformed."""

    kind: str
    on: str = "any"  # which endpoint kind it hits: submit, poll, batch, models, download or any
    params: dict[str, Any] = field(default_factory=dict)


class Faults:
    """A FIFO of faults; each request takes the first one aimed at its endpoint kind."""

    def __init__(self) -> None:
        self._queue: deque[Fault] = deque()
        self._lock = threading.Lock()

    def add(self, kind: str, *, on: str = "any", times: int = 1, **params: Any) -> None:
        with self._lock:
            for _ in range(times):
                self._queue.append(Fault(kind, on, params))

    def take(self, endpoint: str) -> Fault | None:
        with self._lock:
            for fault in self._queue:
                if fault.on in ("any", endpoint):
                    self._queue.remove(fault)
                    return fault
        return None

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()


class LiveServer:
    """A WSGI app served from a background thread on 127.0.0.1 and a free port."""

    def __init__(self, app: Flask):
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> LiveServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class FakeProvider:
    """Base of the fakes: the Flask app, its server, fault queue, clock and stored files."""

    def __init__(self, *, clock: FakeClock | None = None, polls_to_finish: int = 2):
        self.app = Flask(type(self).__name__)
        self.clock = clock or FakeClock()
        self.faults = Faults()
        # Polls a job answers "queued"/"running" before the next one finishes it.
        self.polls_to_finish = polls_to_finish
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self.lock = threading.RLock()
        self.server: LiveServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None, "the fake is not running"
        return self.server.url

    @contextmanager
    def running(self) -> Iterator[FakeProvider]:
        self.server = LiveServer(self.app).start()
        try:
            yield self
        finally:
            self.server.stop()
            self.server = None

    def reset(self) -> None:
        """Forget jobs, faults and recorded requests (the server keeps running)."""
        with self.lock:
            self.faults.clear()
            self.files.clear()
            self.requests.clear()
            self.polls_to_finish = 2

    def next_id(self) -> int:
        return next(self._ids)

    def store_image(self, *, fmt: str = "PNG", size: tuple[int, int] = (64, 48), seed: int = 0) -> str:
        """Make a real image, keep it under a file name, and return the name."""
        name = f"out{self.next_id()}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        self.files[name] = (image_bytes(fmt=fmt, size=size, seed=seed), f"image/{fmt.lower()}")
        return name


def image_bytes(*, fmt: str = "PNG", size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    """A small real image whose colour depends on ``seed``, encoded as ``fmt``."""
    color = ((seed * 53) % 256, (seed * 97 + 80) % 256, (seed * 31 + 160) % 256)
    image = Image.new("RGB", size, color)
    # A second colour block so the picture is not flat (some encoders special-case flat images).
    image.paste((255 - color[0], 255 - color[1], 255 - color[2]), (0, 0, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


VIDEO_FRAMES = 5  # frames of every fake video (tests count them in what we serve)


def video_bytes(
    *,
    frames: int = VIDEO_FRAMES,
    size: tuple[int, int] = (64, 48),
    fps: int = 8,
    container_format: str = "mp4",
) -> bytes:
    """A tiny real video (H.264, ``frames`` frames of a moving block; MP4 unless told), made with PyAV."""
    from fractions import Fraction

    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            pixels = np.full((size[1], size[0], 3), 40, dtype=np.uint8)
            pixels[:, i * 4 : i * 4 + 16] = (200, 120, 60)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def slow(fault: Fault | None) -> None:
    """Apply a ``slow`` fault: hold the request so the client's read timeout fires."""
    if fault is not None and fault.kind == "slow":
        time.sleep(float(fault.params.get("seconds", 2.0)))


@contextmanager
def all_running(fakes: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every fake of ``fakes`` serving at once (a test module's providers), stopped on exit."""
    with ExitStack() as stack:
        for fake in fakes.values():
            stack.enter_context(fake.running())
        yield fakes
