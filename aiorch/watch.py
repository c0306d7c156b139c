"""Following jobs until they end: one server-sent event stream per ≤ 1000 jobs when the server has
``GET /v1/events``, and batched polling of ``GET /v1/jobs?ids=`` (≤ 50 a call) when it has not.

Which of the two a server speaks is learnt once, by trying: a ``404`` on the stream is remembered
(``EventSupport``) and every later watch polls straight away. Either way the watcher hands back
each job object once per change (status, progress, queue position), and each job's final object
exactly once.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

from aiorch.errors import AiorchError, ApiError, NotFound, TransportError
from aiorch.transport import Transport

Job = dict[str, Any]
FINAL = frozenset({"succeeded", "failed", "rejected", "cancelled", "expired"})
STREAM_IDS = 1000  # ids in one GET /v1/events
POLL_IDS = 50  # ids in one GET /v1/jobs?ids=
# The server sends a keep-alive comment at least every 15 s: a stream silent for longer is dead.
STREAM_READ_TIMEOUT = 45.0
STREAM_FAILURES = 5  # broken streams in a row before a group of jobs falls back to polling


@dataclass
class ServerEvent:
    event: str
    data: str
    id: str | None


def parse_events(chunks: Iterable[bytes]) -> Iterator[ServerEvent]:
    """Server-sent events from raw byte chunks (the ``text/event-stream`` framing: ``field: value``
    lines, a blank line ends an event, ``:`` starts a comment, lines end in LF or CRLF)."""
    buffer = b""
    event, last_id = "message", None
    data: list[str] = []
    for chunk in chunks:
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line, buffer = buffer[:end].rstrip(b"\r").decode("utf-8", "replace"), buffer[end + 1 :]
            if not line:
                if data:
                    yield ServerEvent(event, "\n".join(data), last_id)
                event, data = "message", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                last_id = value


def job_events(response: requests.Response) -> Iterator[Job]:
    """The job objects of a stream's ``job`` events, to the first final one; a stream that breaks
    (or is closed under its reader) just ends."""
    try:
        for event in parse_events(_chunks(response)):
            if event.event == "job":
                job: Job = json.loads(event.data)
                yield job
                if job.get("status") in FINAL:
                    return
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError):
        return


class EventSupport:
    """Whether the server streams events: None until a stream was tried, then True or False."""

    def __init__(self) -> None:
        self.supported: bool | None = None


def _chunks(response: requests.Response) -> Iterator[bytes]:
    # read1 hands over whatever arrived (an event), chunked or not; iter_content would wait for
    # a full buffer, or for the end of an unchunked stream.
    while True:
        data = response.raw.read1(65536)
        if not data:
            return
        yield data


class JobWatcher:
    """Follows a growing set of jobs; ``next()`` returns the next change of any of them.

    Streams run one thread per group of ≤ 1000 jobs, polling one thread for every polled job. An
    error a thread cannot get past (the key revoked, the server gone after the retries) is raised
    by ``next()``."""

    def __init__(
        self,
        transport: Transport,
        events: EventSupport,
        *,
        poll_interval: float = 0.2,
        max_poll_interval: float = 2.0,
    ):
        self.transport = transport
        self.events = events
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.latest: dict[str, Job] = {}
        self._open: set[str] = set()  # added and not seen final
        self._polled: set[str] = set()
        self._changes: queue.Queue[Job | BaseException] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._poller: threading.Thread | None = None
        self._responses: set[requests.Response] = set()

    # -- the consumer's side --------------------------------------------------------------------
    def add(self, ids: Iterable[str]) -> None:
        """Follow these jobs too (ids already followed are ignored)."""
        with self._lock:
            new = [i for i in dict.fromkeys(ids) if i not in self._open and i not in self.latest]
            self._open.update(new)
        if not new:
            return
        if self.events.supported is False:
            self._poll(new)
            return
        for start in range(0, len(new), STREAM_IDS):
            group = new[start : start + STREAM_IDS]
            threading.Thread(target=self._follow_stream, args=(group,), daemon=True).start()

    def next(self, timeout: float | None = None) -> Job | None:
        """The next changed job object, or None when nothing changed within ``timeout``."""
        try:
            item = self._changes.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    @property
    def unfinished(self) -> set[str]:
        with self._lock:
            return set(self._open)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            responses = list(self._responses)
        for response in responses:  # unblocks a stream thread waiting for its next event
            response.close()

    # -- the threads' side ------------------------------------------------------------------------
    def _update(self, job: Job) -> bool:
        """Record ``job``; queue it if it changed. True when it did."""
        key = job.get("job_id")
        if not isinstance(key, str):
            return False
        with self._lock:
            if key not in self._open:
                return False  # final already, or never asked for
            before = self.latest.get(key)
            self.latest[key] = job
            final = job.get("status") in FINAL
            if final:
                self._open.discard(key)
                self._polled.discard(key)
        seen = ("status", "progress", "queue_position")
        if before is not None and all(before.get(f) == job.get(f) for f in seen):
            return False
        self._changes.put(job)
        return True

    def _fail(self, error: BaseException) -> None:
        self._changes.put(error)

    def _poll(self, ids: list[str]) -> None:
        with self._lock:
            self._polled.update(i for i in ids if i in self._open)
            if self._poller is None:
                self._poller = threading.Thread(target=self._poll_loop, daemon=True)
                self._poller.start()
        self._wake.set()

    def _poll_loop(self) -> None:
        interval = self.poll_interval
        while not self._stop.is_set():
            with self._lock:
                ids = sorted(self._polled)
            changed = False
            try:
                for start in range(0, len(ids), POLL_IDS):
                    chunk = ids[start : start + POLL_IDS]
                    params = {"ids": ",".join(chunk), "limit": POLL_IDS}
                    jobs = self.transport.json("GET", "/v1/jobs", params=params)["jobs"]
                    for job in jobs:
                        changed = self._update(job) or changed
                    for missing in set(chunk) - {job.get("job_id") for job in jobs}:
                        with self._lock:
                            self._open.discard(missing)
                            self._polled.discard(missing)
                        error = NotFound(404, "job_not_found", f"No job {missing}.", {"job_id": missing})
                        self._fail(error)
            except AiorchError as exc:
                self._fail(exc)
                return
            interval = self.poll_interval if changed else min(self.max_poll_interval, interval * 1.5)
            self._wake.wait(interval if ids else None)
            if self._wake.is_set():
                self._wake.clear()
                interval = self.poll_interval

    def _follow_stream(self, ids: list[str]) -> None:
        last_event: str | None = None
        failures = 0
        while not self._stop.is_set():
            remaining = [i for i in ids if i in self.unfinished]
            if not remaining:
                return
            headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
            if last_event is not None:
                headers["Last-Event-ID"] = last_event
            try:
                response = self.transport.request(
                    "GET",
                    "/v1/events",
                    params={"ids": ",".join(ids)},
                    headers=headers,
                    stream=True,
                    timeout=(self.transport.timeout, STREAM_READ_TIMEOUT),
                )
            except NotFound:
                # No such route (a server without streams), or a job that is not there: polling
                # answers both, the latter with a NotFound of its own.
                if self.events.supported is None:
                    self.events.supported = False
                self._poll(remaining)
                return
            except ApiError as exc:
                self._fail(exc)
                return
            except TransportError:
                self._poll(remaining)
                return
            self.events.supported = True
            with self._lock:
                self._responses.add(response)
            heard = 0
            try:
                for event in parse_events(_chunks(response)):
                    if event.id is not None:
                        last_event = event.id
                    if event.event == "job":
                        self._update(json.loads(event.data))
                        heard += 1
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError):
                pass  # a broken stream: reconnect below, from the last event it gave
            except AttributeError:
                # ``close()`` closed the response under this reader: http.client then reads from
                # a file object it has set to None. Anything else is a bug to show.
                if not self._stop.is_set():
                    raise
            finally:
                with self._lock:
                    self._responses.discard(response)
                response.close()
            # A stream that broke, or closed before its jobs ended without telling anything, counts
            # against the stream; one that brought news resets the count.
            failures = 0 if heard else failures + 1
            if failures >= STREAM_FAILURES:
                self._poll([i for i in ids if i in self.unfinished])
                return
            if failures:
                time.sleep(self.transport.delay(failures - 1))
