"""One thread per API process that follows the job event log and feeds every live reader: SSE
streams (``app.streams``) and the blocking endpoints' waiters (``app.blocking``).

Why a thread of its own: an open stream must not hold one of the API's request threads (there are
32, and a client may hold a thousand streams). Under ``aiorch serve`` the request thread checks
the stream's request (key, ids, ownership) and hands the connection's socket over
(``app.gunicorn_json``); from then on this thread writes the stream, non-blocking, with a
thousand others, and the request thread is free for the next request. Any other WSGI server (the
Flask test client) gets the same events through a queue that the response generator drains.

Wake-ups: on Postgres a dedicated connection LISTENs on the channels of the jobs watched here
(``models.feed.channel_of``, one of 16 per job: each notification names the jobs that just logged
events, sent on COMMIT), so moves of other jobs rarely wake this thread; a channel stays LISTENed
for ``CHANNEL_LINGER`` seconds after its last watched job went. A job whose channel was just
LISTENed is read once more, for what it logged before, and the watched jobs are re-read every
``SAFETY_NET`` seconds in case a notification was lost while reconnecting. Places of followed
queued jobs are recomputed on a timer, when the log has moved. On SQLite
(the embedded default) the log's tail is read by id every ``TAIL_INTERVAL`` seconds while anyone
is watching. Either way one query per wake-up reads the new events of all the jobs it names.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.extensions

from app.stream_places import POSITIONS_EVERY, LivePlaces, next_positions
from app.stream_sinks import QueueSink, SocketSink
from models import feed
from models.db import Database, utcnow
from models.state import FINAL_STATUSES

log = logging.getLogger("aiorch.streams")

SAFETY_NET = 5.0  # seconds between re-reads of watched jobs on Postgres
CHANNEL_LINGER = 30.0  # seconds a channel stays LISTENed after the last job watched on it went
TAIL_INTERVAL = 0.01  # seconds between reads of the log's tail on SQLite, while anyone watches
KEEPALIVE = b": keep-alive\n\n"
RECENT = 5.0  # seconds the newest notified event of each job is remembered (``Opening``)


def frame(event_id: int, job: dict[str, Any]) -> bytes:
    """One SSE event: the job object after a change."""
    return b"id: %d\nevent: job\ndata: %s\n\n" % (event_id, json.dumps(job, separators=(",", ":")).encode())


def placed(job: dict[str, Any]) -> bytes:
    """An SSE event of a queued job whose place changed: no ``id``, since it is no entry of the
    job's log (a resumed stream gets the place afresh, not replayed)."""
    return b"event: job\ndata: %s\n\n" % json.dumps(job, separators=(",", ":")).encode()


def is_final(job: dict[str, Any]) -> bool:
    return job.get("status") in FINAL_STATUSES


@dataclass(frozen=True)
class Opening:
    """A stream's first word, read before the stream came here (by its view, ``feed.read_opening``:
    the caller's check and the newest event in one statement; or by a followed submit, its first
    event): the rows to send first, and when that read began (``time.monotonic()``). A job notified
    since then is read once more, so an event that committed between that read and the stream's
    start here is not lost."""

    rows: list[feed.Logged]
    read_since: float
    placed: bool = True  # False: a queued job's place is still to be added (``_placed``)


@dataclass(eq=False)  # one stream is itself: compared and hashed by identity
class Stream:
    """One open stream: the jobs it follows and the id of the last event sent for each."""

    job_ids: list[str]
    resume_after: int | None  # Last-Event-ID: send only events after it, no first snapshot
    sink: SocketSink | QueueSink
    opening: Opening | None = None
    last: dict[str, int] = field(default_factory=dict)
    final: set[str] = field(default_factory=set)
    next_keepalive: float = 0.0
    positions: dict[str, int] = field(default_factory=dict)  # the queue_position last sent per job


class StreamHub:
    """The thread, its listener and the streams and waiters it feeds (one per API process)."""

    def __init__(self, db: Database, keepalive: float = 15.0, ahead: int = 1, linger: float = CHANNEL_LINGER):
        self.db = db
        self.linger = linger
        self.keepalive = keepalive
        self.dsn: str | None = None
        if db.is_postgres:
            self.dsn = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._lock = threading.Lock()
        self._waiters: dict[str, list[threading.Event]] = {}
        self._streams: dict[str, list[Stream]] = {}  # job id -> streams following it
        self._open: set[Stream] = set()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listener: Any = None
        self._listener_fd = -1
        self._listening: set[str] = set()  # the channels LISTENed on the listener connection
        self._unlisten_at: dict[str, float] = {}  # listened channels nobody watches: when they go
        self._watch_changed = False  # jobs were watched or let go since the channels were synced
        # Events that came in their notifications (migration 0015), by job, since the last delivery;
        # and the jobs whose log must be read all the same (named by id only, newly LISTENed, or due
        # for the safety net's re-read).
        self._carried: dict[str, list[feed.Logged]] = {}
        self._must_read: set[str] = set()
        # Each job's newest notified event id (inf: named by id only) and when it was heard, for
        # ``RECENT`` seconds at least; and the jobs of streams opened since that must be read.
        self._recent: dict[str, tuple[float, float]] = {}
        self._forget_recent_at = 0.0
        self._late: set[str] = set()
        self._log_seen = -1  # the log's newest id at the last pass over places
        self._tail_after = 0
        self._next_net = 0.0
        self._queued: set[str] = set()  # followed jobs last seen queued (their place may change)
        self._places = LivePlaces(db, ahead)  # AIORCH_DISPATCH_AHEAD counts in them
        self._next_positions = 0.0
        # How often keep-alives are looked at; each is sent up to this much early, never late.
        self._check = min(1.0, keepalive / 4)
        self._next_check = 0.0

    # -- called from request threads ---------------------------------------------------------
    def open(
        self,
        job_ids: list[str],
        resume_after: int | None,
        sink: SocketSink | QueueSink,
        opening: Opening | None = None,
    ) -> Stream:
        """Start streaming ``job_ids`` (already checked to be the caller's) into ``sink``, from
        ``opening`` when the view read the first word itself."""
        stream = Stream(job_ids, resume_after, sink, opening)
        self._call(lambda: self._start(stream))
        return stream

    def close(self, stream: Stream) -> None:
        """The reader of a queue stream went away."""
        self._call(lambda: self._forget(stream))

    def adopt(
        self, sock: socket.socket, job_ids: list[str], resume_after: int | None, opening: Opening | None
    ) -> None:
        """Take over a connection (the server forgets it) and stream ``job_ids`` on it."""
        self.open(job_ids, resume_after, SocketSink(sock), opening)

    def wait(self, job_id: str, is_done: Callable[[], bool], timeout: float) -> bool:
        """Block this thread until ``is_done()`` holds or ``timeout`` passes (True when done),
        re-checking whenever the job logs an event."""
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(job_id, []).append(event)
            self._watch_changed = True
        self._call(lambda: None)  # start the thread (and on SQLite, its tail reads)
        try:
            deadline = time.monotonic() + timeout
            while not is_done():  # registered before the check: no event is missed in between
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                event.wait(min(left, SAFETY_NET))
                event.clear()
            return True
        finally:
            with self._lock:
                waiting = self._waiters.get(job_id, [])
                if event in waiting:
                    waiting.remove(event)
                if not waiting:
                    self._waiters.pop(job_id, None)
                    self._watch_changed = True

    def _call(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        self._ensure_thread()
        with contextlib.suppress(BlockingIOError):  # the pipe is full of wake-ups already
            os.write(self._wake_w, b"x")

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="aiorch-streams", daemon=True)
                self._thread.start()

    # -- the hub thread ----------------------------------------------------------------------
    def _run(self) -> None:
        with self.db.reading() as session:
            self._tail_after = feed.last_id(session)
        while True:
            try:
                self._loop_once()
            except Exception:  # one bad read must not end every stream in the process
                log.exception("stream hub: error in its loop; going on")
                time.sleep(0.1)

    def _watching(self) -> bool:
        return bool(self._open or self._waiters)

    def _timeout(self) -> float:
        if self._watch_changed and self._listener is not None:
            return 0.0  # the channels are synced at once (a stream that ended starts its linger)
        now = time.monotonic()
        timeout = max(0.0, self._next_check - now) if self._open else 30.0
        if self._watching():
            timeout = min(timeout, max(0.0, self._next_net - now))
            if self.dsn is None:
                timeout = min(timeout, TAIL_INTERVAL)
        if self._queued:
            timeout = min(timeout, max(0.0, self._next_positions - now))
        if self._unlisten_at:
            timeout = min(timeout, max(0.0, min(self._unlisten_at.values()) - now))
        return timeout

    def _loop_once(self) -> None:
        self._ensure_listener()
        woken: set[str] = set()
        for key, mask in self._selector.select(self._timeout()):
            if key.data == "wake":
                self._drain_wake()
            elif key.data == "listen":
                woken |= self._notified()
            else:
                self._on_socket(key.data, mask)
        while self._commands:
            self._commands.popleft()()
        if self._late:
            woken |= self._read_anyway(self._late)
            self._late = set()
        woken |= self._sync_channels()
        now = time.monotonic()
        if now >= self._forget_recent_at:
            self._recent = {job_id: at for job_id, at in self._recent.items() if now - at[0] < RECENT}
            self._forget_recent_at = now + RECENT
        if self.dsn is None and self._watching():
            woken |= self._read_anyway(self._tail())
        if self._watching() and now >= self._next_net:
            self._next_net = now + SAFETY_NET
            woken |= self._read_anyway(set(self._streams) | set(self._waiters))
        if woken:
            self._deliver(woken)
        self._carried, self._must_read = {}, set()
        if self._queued and now >= self._next_positions:
            self._positions()
        self._keep_alive(now)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _ensure_listener(self) -> None:
        if self.dsn is None or self._listener is not None:
            return
        try:
            conn = psycopg2.connect(self.dsn)
            conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        except psycopg2.Error as exc:
            log.warning("stream hub: cannot LISTEN (%s); retrying", exc)
            time.sleep(1.0)
            return
        self._listener = conn
        self._listening = set()  # a new session: each channel is LISTENed again (``_sync_channels``)
        self._unlisten_at = {}
        self._watch_changed = True
        # By descriptor: a connection object that broke can no longer say which one it had.
        self._listener_fd = conn.fileno()
        self._selector.register(self._listener_fd, selectors.EVENT_READ, "listen")
        self._next_net = 0.0  # re-read everything watched: notifications may have been missed

    def _notified(self) -> set[str]:
        try:
            self._listener.poll()
        except psycopg2.Error as exc:
            self._lost_listener(exc)
            return set()
        return self._drain_notifies()

    def _drain_notifies(self) -> set[str]:
        """The jobs named by the notifications that arrived. One that carries its event (a JSON
        array ``[id, job_id, data]``, migration 0015) leaves it in ``_carried``, to be sent without
        reading the log; one that names job ids (a comma-separated list) has them read."""
        conn = self._listener
        jobs: set[str] = set()
        now = time.monotonic()
        while conn.notifies:
            payload = conn.notifies.pop(0).payload
            if payload.startswith("["):
                event_id, job_id, data = json.loads(payload)
                self._carried.setdefault(job_id, []).append((int(event_id), job_id, data))
                self._recent[job_id] = (now, max(int(event_id), self._recent.get(job_id, (0, 0))[1]))
                jobs.add(job_id)
            else:
                named = set(payload.split(","))
                self._recent.update(dict.fromkeys(named, (now, math.inf)))
                jobs |= self._read_anyway(named)
        return jobs

    def _read_anyway(self, job_ids: set[str]) -> set[str]:
        """``job_ids``, marked to have their log read at this delivery even where events of theirs
        came in notifications."""
        self._must_read |= job_ids
        return job_ids

    def _lost_listener(self, exc: Exception) -> None:
        log.warning("stream hub: listener lost its connection (%s); reconnecting", exc)
        self._selector.unregister(self._listener_fd)
        with contextlib.suppress(psycopg2.Error):
            self._listener.close()
        self._listener = None

    def _sync_channels(self) -> set[str]:
        """LISTEN to the channels of the jobs watched now; UNLISTEN a channel once nothing has been
        watched on it for ``linger`` seconds (a client that follows one job after another, or
        reconnects, finds its channels still LISTENed: no LISTEN, and no read once more). Returns
        the watched jobs on channels just LISTENed (to be read once more: what they logged before
        the LISTEN was heard by nobody) and the jobs named by notifications that arrived meanwhile."""
        if self._listener is None:
            return set()
        now = time.monotonic()
        due = bool(self._unlisten_at) and min(self._unlisten_at.values()) <= now
        if not self._watch_changed and not due:
            return set()
        with self._lock:
            self._watch_changed = False
            watched = set(self._streams) | set(self._waiters)
        by_channel = feed.by_channel(watched)
        for channel in self._listening:
            if channel in by_channel:
                self._unlisten_at.pop(channel, None)
            else:
                self._unlisten_at.setdefault(channel, now + self.linger)
        new = by_channel.keys() - self._listening
        gone = {channel for channel, at in self._unlisten_at.items() if at <= now}
        if not new and not gone:
            return set()
        commands = [f'LISTEN "{c}"' for c in sorted(new)] + [f'UNLISTEN "{c}"' for c in sorted(gone)]
        try:
            with self._listener.cursor() as cursor:
                cursor.execute("; ".join(commands))
        except psycopg2.Error as exc:
            self._lost_listener(exc)
            return set()
        for channel in gone:
            del self._unlisten_at[channel]
        self._listening = (self._listening | new) - gone
        return self._drain_notifies() | self._read_anyway(
            {job_id for channel in new for job_id in by_channel[channel]}
        )

    def _tail(self) -> set[str]:
        with self.db.reading() as session:
            rows = feed.tail(session, self._tail_after)
        if rows:
            self._tail_after = rows[-1][0]
        return {job_id for _, job_id in rows}

    def _start(self, stream: Stream) -> None:
        """Register the stream and send what it has not seen: each job's current object, or on
        resume the events after Last-Event-ID."""
        if stream.opening is not None:
            rows = stream.opening.rows
            if not stream.opening.placed:
                rows = self._placed(stream, rows)
            self._late |= self._notified_since(stream.opening)
        elif stream.resume_after is None:
            rows = self._placed(stream, feed.read_latest(self.db, stream.job_ids))
        else:
            rows = self._placed(stream, feed.read_after(self.db, stream.job_ids, stream.resume_after))
        for job_id in stream.job_ids:
            # -1: a job whose log was pruned is sent as its row, with id 0 (``feed.latest``).
            stream.last[job_id] = -1 if stream.resume_after is None else stream.resume_after
            self._streams.setdefault(job_id, []).append(stream)
        self._open.add(stream)
        self._watch_changed = True
        if isinstance(stream.sink, SocketSink):
            self._selector.register(stream.sink.sock, selectors.EVENT_READ, stream)
        stream.next_keepalive = time.monotonic() + self.keepalive - self._check
        stream.sink.flush()  # the response's headers, at once
        self._send(stream, rows)
        if stream.resume_after is not None:
            # A resumed stream whose jobs all ended before it came back has nothing more to say.
            for event_id, job_id, job in feed.read_latest(self.db, stream.job_ids):
                if is_final(job) and stream.last[job_id] >= event_id:
                    stream.final.add(job_id)
            self._end_if_done(stream)

    def _notified_since(self, opening: Opening) -> set[str]:
        """The jobs of ``opening`` notified of an event newer than its rows since its read began
        (all of them, should that be too long ago to tell)."""
        newest = {job_id: event_id for event_id, job_id, _ in opening.rows}
        if time.monotonic() - opening.read_since > RECENT / 2:
            return set(newest)
        heard = ((job_id, self._recent.get(job_id)) for job_id in newest)
        return {
            job_id
            for job_id, seen in heard
            if seen is not None and seen[0] >= opening.read_since and seen[1] > newest[job_id]
        }

    def _placed(self, stream: Stream, rows: list[feed.Logged]) -> list[feed.Logged]:
        """``rows`` with the last object of each job that is still queued replaced by its live
        one (its place in its queue, an ETA that counts it), so a stream's first word on a queued
        job says where it stands."""
        last = {job_id: i for i, (_, job_id, _) in enumerate(rows)}
        queued = [job_id for job_id, i in last.items() if rows[i][2].get("status") == "queued"]
        if not queued:
            return rows
        rows = list(rows)
        lives = self._places.of(queued, utcnow())
        for job_id, body in lives.items():
            event_id, _, _ = rows[last[job_id]]
            rows[last[job_id]] = (event_id, job_id, body)
            stream.positions[job_id] = body["queue_position"]
        return rows

    def _deliver(self, job_ids: set[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                for event in self._waiters.get(job_id, ()):
                    event.set()
        watched = [job_id for job_id in job_ids if job_id in self._streams]
        if not watched:
            return
        # A job whose events all came in their notifications is not read: each notification of a
        # job's events arrives in the order they were committed, which is their order in its log.
        unread = [job_id for job_id in watched if job_id in self._carried and job_id not in self._must_read]
        read = [job_id for job_id in watched if job_id not in unread]
        rows: list[feed.Logged] = []
        if read:
            after = min(s.last[job_id] for job_id in read for s in self._streams[job_id])
            rows = feed.read_after(self.db, read, after)
        if unread:
            rows = sorted(rows + [e for job_id in unread for e in self._carried[job_id]], key=lambda e: e[0])
        quiet = set(read) - {job_id for _, job_id, _ in rows}
        gone: set[str] = set()
        if quiet:
            with self.db.reading() as session:
                gone = quiet - feed.visible_jobs(session, sorted(quiet), None)
        streams = {id(s): s for job_id in watched for s in self._streams[job_id]}
        for stream in streams.values():
            stream.final |= gone & stream.last.keys()  # deleted: nothing more will come
            self._send(stream, rows)

    def _send(self, stream: Stream, rows: Iterable[tuple[int, str, dict[str, Any]]]) -> None:
        out = bytearray()
        for event_id, job_id, job in rows:
            if job_id not in stream.last or event_id <= stream.last[job_id]:
                continue
            stream.last[job_id] = event_id
            out += frame(event_id, job)
            if is_final(job):
                stream.final.add(job_id)
            if job.get("status") == "queued":
                self._queued.add(job_id)
            else:
                self._queued.discard(job_id)
        if out:
            stream.sink.send(bytes(out))
            stream.next_keepalive = time.monotonic() + self.keepalive - self._check
        self._end_if_done(stream)
        if stream in self._open:
            self._want_writes(stream)

    def _positions(self) -> None:
        """Send the followed queued jobs whose place in their queue changed, when anything was
        logged since the last pass. At most every ``POSITIONS_EVERY`` seconds, less often when they cost more
        (``next_positions``). Such an event has no ``id``: it is no entry of the job's log, so a
        resumed stream gets the place afresh (its first object says it) instead of a replay."""
        began = time.monotonic()
        self._next_positions = began + POSITIONS_EVERY
        watched = [job_id for job_id in self._queued if job_id in self._streams]
        if not watched:
            return
        now = utcnow()
        with self.db.reading() as session:
            newest = feed.last_id(session)
        if newest == self._log_seen:
            return
        self._log_seen = newest
        places = self._places.of(watched, now)
        self._next_positions = next_positions(began, time.monotonic() - began)
        for job_id, body in places.items():
            for stream in list(self._streams.get(job_id, ())):
                if stream.positions.get(job_id) == body["queue_position"]:
                    continue
                stream.positions[job_id] = body["queue_position"]
                stream.sink.send(placed(body))
                self._want_writes(stream)

    def _end_if_done(self, stream: Stream) -> None:
        if stream.sink.closed:
            self._forget(stream)
        elif len(stream.final) == len(stream.last):
            stream.sink.send(b"", last=True)
            self._forget(stream, lingering=isinstance(stream.sink, SocketSink) and bool(stream.sink.pending))

    def _forget(self, stream: Stream, lingering: bool = False) -> None:
        self._open.discard(stream)
        for job_id in stream.last:
            following = self._streams.get(job_id, [])
            if stream in following:
                following.remove(stream)
            if not following:  # nobody follows it any more: nothing of it stays here
                self._streams.pop(job_id, None)
                self._watch_changed = True
                self._queued.discard(job_id)
                self._places.forget(job_id)
        if isinstance(stream.sink, SocketSink):
            if lingering:  # the end is still being written: keep only its socket's writes going
                self._selector.modify(stream.sink.sock, selectors.EVENT_WRITE, stream)
                return
            self._unregister(stream.sink.sock)
        stream.sink.close()

    def _unregister(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _on_socket(self, stream: Stream, mask: int) -> None:
        sink = stream.sink
        assert isinstance(sink, SocketSink)
        if mask & selectors.EVENT_READ:
            try:
                data = sink.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                data = b"-"
            except OSError:
                data = b""
            if not data:  # the client went away
                sink.give_up()
                self._forget(stream)
                return
        if mask & selectors.EVENT_WRITE or sink.pending:
            sink.flush()
            if sink.closed:
                self._forget(stream)
            elif stream not in self._open and not sink.pending:  # a lingering end, written
                self._unregister(sink.sock)
                sink.close()
            else:
                wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if sink.pending else 0)
                if stream not in self._open:
                    wanted = selectors.EVENT_WRITE
                self._selector.modify(sink.sock, wanted, stream)

    def _keep_alive(self, now: float) -> None:
        """Every ``check`` seconds (not on every wake-up: with a thousand streams open, each
        NOTIFY would cost a pass over all of them), a keep-alive to each stream that is due."""
        if now < self._next_check:
            return
        self._next_check = now + self._check
        for stream in list(self._open):
            if now >= stream.next_keepalive:
                stream.next_keepalive = now + self.keepalive - self._check
                stream.sink.send(KEEPALIVE)
                self._want_writes(stream)

    def _want_writes(self, stream: Stream) -> None:
        """Watch the stream's socket for room to write while part of what it was sent waits."""
        sink = stream.sink
        if sink.closed:
            self._forget(stream)
        elif isinstance(sink, SocketSink):
            wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if sink.pending else 0)
            if self._selector.get_key(sink.sock).events != wanted:
                self._selector.modify(sink.sock, wanted, stream)
