"""SSE streams through Flask's test client (the queue the hub fills, not a handed-over socket), on
the run's Postgres, woken by the job log's NOTIFY; and the stream hub's wake-up on SQLite."""

from __future__ import annotations

import json
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from flask.testing import FlaskClient

from app import create_app
from app.stream_hub import Opening, StreamHub
from app.stream_places import POSITIONS_EVERY, POSITIONS_SHARE, next_positions
from app.stream_sinks import QueueSink
from config import Settings
from models import feed, lifecycle
from models.db import Database, utcnow
from models.jobs import Job, JobEvent
from models.jobstore import JobStore, new_id
from models.migrate import upgrade
from models.together import insert_rows
from tests.conftest import KEYS
from tests.support.factories import _job_values, make_job, make_job_event
from tests.support.services import fresh_database
from tests.support.statements import sent_statements

ALICE = {"X-API-Key": KEYS[0][1]}
BOB = {"X-API-Key": KEYS[1][1]}
IMG = "http://images.example.com/a.png"


@pytest.fixture
def client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings.with_overrides(stream_keepalive=0.2))
    yield app.test_client()
    app.extensions["aiorch"].db.dispose()


def submit(client: FlaskClient) -> str:
    body = {"task": "upscale", "payload": {"image_url": IMG}}
    return str(client.post("/v1/jobs", json=body, headers=ALICE).json["job_id"])


def frames(response: Any) -> Iterator[dict[str, Any] | str]:
    """The stream's events as job objects, and its keep-alives as the string "keep-alive". A
    queued job's new place (an event with no id: no entry of its log) is left out."""
    for chunk in response.response:
        for block in chunk.decode().split("\n\n"):
            if block.startswith(": keep-alive"):
                yield "keep-alive"
            elif block:
                fields = dict(line.split(": ", 1) for line in block.splitlines())
                job = json.loads(fields["data"])
                assert fields["event"] == "job"
                if "id" not in fields:
                    assert job["status"] == "queued" and job["queue_position"] is not None, job
                    continue
                assert int(fields["id"]) > 0
                yield job


def test_a_stream_sends_the_job_then_its_changes_and_ends_when_final(client: FlaskClient) -> None:
    job_id = submit(client)
    response = client.get(f"/v1/jobs/{job_id}/events", headers=ALICE)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    seen = frames(response)
    first = next(seen)
    assert isinstance(first, dict) and first["status"] == "queued"
    assert next(seen) == "keep-alive"  # nothing happens for 0.2 s
    threading.Timer(0.1, lambda: client.post(f"/v1/jobs/{job_id}/cancel", headers=ALICE)).start()
    rest = [f for f in seen if f != "keep-alive"]
    assert [job["status"] for job in rest if isinstance(job, dict)] == ["cancelled"]
    response.close()


def test_a_submit_that_accepts_an_event_stream_is_answered_with_its_jobs_stream(settings: Settings) -> None:
    # A database of its own: its queue's slot is free (no other test's jobs), so the job is sent at once.
    app = create_app(settings.with_overrides(stream_keepalive=0.2, database_url=fresh_database(settings)))
    try:
        submit_and_follow(app.test_client())
    finally:
        app.extensions["aiorch"].db.dispose()


def submit_and_follow(client: FlaskClient) -> None:
    body = {"task": "upscale", "payload": {"image_url": IMG}}
    streamed = {**ALICE, "Accept": "text/event-stream"}
    with sent_statements(client.application.extensions["aiorch"].db) as sent:
        response = client.post("/v1/jobs", json=body, headers=streamed)
        assert response.status_code == 200 and response.mimetype == "text/event-stream"
        seen = frames(response)
        first = next(seen)
    assert isinstance(first, dict) and first["status"] == "queued" and first["task"] == "upscale"
    # Sent at once (a slot was free), its first word is its first event, from the submit's own
    # statement: the log is not read for it.
    assert not [s for s in sent if "FROM job_events WHERE" in s], sent
    job_id = first["job_id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=ALICE).json["status"] == "queued"  # a job like any
    threading.Timer(0.1, lambda: client.post(f"/v1/jobs/{job_id}/cancel", headers=ALICE)).start()
    rest = [f for f in seen if f != "keep-alive"]
    assert [job["status"] for job in rest if isinstance(job, dict)] == ["cancelled"]
    response.close()
    # A refused submit is answered in JSON, naming the field; JSON stays the default answer.
    bad = client.post("/v1/jobs", json={"task": "upscale", "payload": {}}, headers=streamed)
    assert bad.status_code == 422 and bad.mimetype == "application/json"
    assert "image_url" in json.dumps(bad.json["error"])
    either = {**ALICE, "Accept": "application/json, text/event-stream;q=0.5"}
    assert client.post("/v1/jobs", json=body, headers=either).status_code == 202
    assert client.post("/v1/jobs", json=body, headers={**ALICE, "Accept": "*/*"}).status_code == 202


def test_another_clients_job_is_404_like_a_missing_one(client: FlaskClient) -> None:
    job_id = submit(client)
    for path in (f"/v1/jobs/{job_id}/events", f"/v1/events?ids={job_id}"):
        response = client.get(path, headers=BOB)
        assert response.status_code == 404 and response.json["error"]["code"] == "job_not_found"
    assert client.get("/v1/events?ids=a,b", headers=ALICE).status_code == 422
    assert client.get("/v1/events", headers=ALICE).status_code == 422
    assert client.get("/v1/events?ids=" + job_id + "&batch_id=x", headers=ALICE).status_code == 404


def test_the_hub_follows_the_log_on_sqlite_without_notify(settings: Settings, tmp_path: Path) -> None:
    """The embedded default: the hub reads the log's tail, and a waiter wakes on the job's event."""
    local = settings.with_overrides(database_url=f"sqlite:///{tmp_path / 'a.db'}")
    db = Database(local)
    upgrade(db)
    store = JobStore(db, 3)
    hub = StreamHub(db, keepalive=30)
    job_id = make_job(db)
    sink = QueueSink()
    hub.open([job_id], None, sink)
    first = sink.frames.get(timeout=5)
    assert first is not None and b'"status":"queued"' in first
    done = threading.Event()
    cancelled = lambda: store.get(job_id).status == "cancelled"  # noqa: E731
    threading.Thread(target=lambda: done.set() if hub.wait(job_id, cancelled, 10) else None).start()
    assert store.cancel(job_id) is not None
    ended = sink.frames.get(timeout=5)
    assert ended is not None and b'"status":"cancelled"' in ended
    assert sink.frames.get(timeout=5) is None  # the stream ended after the final event
    assert done.wait(5)
    db.dispose()


def test_a_closed_stream_leaves_nothing_of_its_jobs_in_the_hub(settings: Settings, tmp_path: Path) -> None:
    """Streams on queued jobs closed before the jobs moved: the hub keeps no entry for them (an
    API that streams thousands of jobs a day stays the size it was, measured in ``make bench``)."""
    local = settings.with_overrides(database_url=f"sqlite:///{tmp_path / 'a.db'}")
    db = Database(local)
    upgrade(db)
    hub = StreamHub(db, keepalive=30)
    job_ids = [make_job(db, dispatched_at=None) for _ in range(3)]
    sink = QueueSink()
    stream = hub.open(job_ids, None, sink)
    seen = b""
    while not all(job_id.encode() in seen for job_id in job_ids):  # the first snapshots
        frame = sink.frames.get(timeout=5)
        assert frame is not None
        seen += frame
    hub.close(stream)
    deadline = threading.Event()
    for _ in range(50):  # the hub's thread forgets it on its next turn
        if not (set(job_ids) & (set(hub._streams) | hub._queued | set(hub._places._cache))):
            break
        deadline.wait(0.1)
    assert not set(job_ids) & (set(hub._streams) | hub._queued | set(hub._places._cache))
    db.dispose()


def test_places_of_followed_jobs_take_a_bounded_share_of_the_hubs_time() -> None:
    """A cheap pass is repeated every ``POSITIONS_EVERY``; one that took 0.2 s (jobs deep in a
    backlog) waits 4 s, so places never take more than 5 % of the hub's thread."""
    assert next_positions(100.0, 0.001) == 100.0 + POSITIONS_EVERY
    assert next_positions(100.0, 0.2) == pytest.approx(100.0 + 0.2 / POSITIONS_SHARE)
    assert POSITIONS_SHARE <= 0.05


def listen_to_every_channel(db: Database) -> Any:
    conn = psycopg2.connect(db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False))
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("; ".join(f'LISTEN "{feed.EVENT_CHANNEL}_{digit}"' for digit in "0123456789abcdef"))
    return conn


def heard_by(conn: Any, expected: int, timeout: float = 5.0) -> dict[str, list[str]]:
    """Job id -> the channels it was announced on, once ``expected`` ids were heard (or timed out)."""
    heard: dict[str, list[str]] = {}
    deadline = time.monotonic() + timeout
    while len(heard) < expected and time.monotonic() < deadline:
        select.select([conn], [], [], 0.1)
        conn.poll()
        while conn.notifies:
            note = conn.notifies.pop(0)
            for job_id in named(note.payload):
                heard.setdefault(job_id, []).append(note.channel)
    return heard


def named(payload: str) -> list[str]:
    """The jobs a notification names: the one whose event it carries, or its list of ids."""
    return [json.loads(payload)[1]] if payload.startswith("[") else payload.split(",")


def test_each_jobs_events_are_announced_on_the_channel_its_id_chooses(db: Database) -> None:
    """The trigger of ``job_events`` (a move, a statement logging 300 jobs) and ``feed.announce``
    pick the channel ``feed.channel_of`` picks, which is the one the hub LISTENs to for that job.
    The event that creates a job is announced to nobody (nothing can follow it yet)."""
    conn = listen_to_every_channel(db)
    store = JobStore(db, 3)
    try:
        created_only = [new_id() for _ in range(10)]
        for job_id in created_only:
            make_job_event(db, id=job_id)
        moved = [new_id() for _ in range(24)]
        for job_id in moved:
            make_job_event(db, id=job_id)
            assert store.cancel(job_id) == "cancelled"
        batch = [Job(**_job_values()) for _ in range(300)]
        with db.session() as session:
            lifecycle.create_many(session, batch)  # their first events: one statement, unannounced
        progress = [
            {
                "job_id": job.id,
                "seq": 2,
                "type": "job.progress",
                "created_at": utcnow(),
                "data": {"progress": 1},
            }
            for job in batch
        ]
        with db.session() as session:
            insert_rows(session, JobEvent.__table__, progress)  # type: ignore[arg-type]
        deleted = [new_id() for _ in range(5)]
        with db.session() as session:
            feed.announce(session, deleted)
        ids = moved + [job.id for job in batch] + deleted
        heard = heard_by(conn, len(ids))
        heard.update(heard_by(conn, 1, timeout=0.3))  # anything more that was on its way
    finally:
        conn.close()
    assert heard == {job_id: [feed.channel_of(job_id)] for job_id in ids}
    assert len({feed.channel_of(job_id) for job_id in ids}) == 16


def test_a_moves_notification_carries_its_event_unless_it_is_too_large(db: Database) -> None:
    """A statement that logs one event on a channel (a move) sends that event in its notification
    (``[id, job_id, data]``, as the log holds it); one too large for a notification's payload, or
    several events on one channel in one statement, name their jobs instead."""
    conn = listen_to_every_channel(db)
    try:
        job_id = new_id()
        make_job_event(db, id=job_id)
        assert JobStore(db, 3).cancel(job_id) == "cancelled"
        payloads = notes(conn, 1)
        with db.statement() as cursor:
            cursor.execute("SELECT id, job_id, data FROM job_events WHERE job_id = %s AND seq = 2", (job_id,))
            logged = list(cursor.fetchone())
        assert [json.loads(p) for p in payloads] == [logged]

        large, two = new_id(), [new_id(), new_id()]
        while feed.channel_of(two[1]) != feed.channel_of(two[0]):
            two[1] = new_id()
        for made in (large, *two):
            make_job_event(db, id=made)
        row = {"seq": 2, "type": "job.progress", "created_at": utcnow()}
        with db.session() as session:
            insert_rows(session, JobEvent.__table__, [{**row, "job_id": large, "data": {"x": "y" * 8000}}])  # type: ignore[arg-type]
        with db.session() as session:
            insert_rows(session, JobEvent.__table__, [{**row, "job_id": j, "data": {"p": 1}} for j in two])  # type: ignore[arg-type]
        got = notes(conn, 2)
        assert got[0] == large  # its event would not fit: its id
        assert sorted(got[1].split(",")) == sorted(two)  # two events on one channel: their ids
    finally:
        conn.close()


def notes(conn: Any, expected: int, timeout: float = 5.0) -> list[str]:
    """The payloads of the next ``expected`` notifications."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        select.select([conn], [], [], 0.1)
        conn.poll()
        got += [conn.notifies.pop(0).payload for _ in range(len(conn.notifies))]
    return got


def test_the_hub_sends_a_carried_event_without_reading_the_log(db: Database) -> None:
    """A followed job's move reaches its stream from the notification alone: no read of the log."""
    job_id = new_id()
    make_job_event(db, id=job_id)
    hub = StreamHub(db, keepalive=30)
    sink = QueueSink()
    hub.open([job_id], None, sink)
    opened = sink.frames.get(timeout=5)
    assert opened is not None and b'"status":"queued"' in opened
    for _ in range(50):  # the channel is LISTENed, and the job read once more, before the move
        if hub._listening and not hub._watch_changed:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    with sent_statements(db) as sent:
        assert JobStore(db, 3).cancel(job_id) == "cancelled"
        ended = sink.frames.get(timeout=5)
    assert ended is not None and b'"status":"cancelled"' in ended and ended.startswith(b"id: ")
    assert sink.frames.get(timeout=5) is None
    assert not [s for s in sent if "FROM job_events" in s and s.lstrip().upper().startswith("SELECT")], sent


def test_the_hub_listens_only_to_the_channels_of_what_it_watches(settings: Settings, db: Database) -> None:
    """Jobs on other channels do not wake it; a job whose channel it has just LISTENed to is read
    once more (what it logged before that was heard by nobody); a channel nobody watches any more
    is let go once it has lingered."""

    def on_channel(taken: set[str]) -> str:
        while (job_id := new_id()) and feed.channel_of(job_id) in taken:
            pass
        return job_id

    watched = on_channel(set())
    waited = on_channel({feed.channel_of(watched)})
    make_job_event(db, id=watched)
    make_job_event(db, id=waited)
    hub = StreamHub(db, keepalive=30, linger=0.5)
    heard: list[str] = []
    drain = hub._drain_notifies

    def drain_and_note() -> set[str]:
        jobs = drain()
        heard.extend(jobs)
        return jobs

    hub._drain_notifies = drain_and_note  # type: ignore[method-assign]
    sink = QueueSink()
    stream = hub.open([watched], None, sink)
    first = sink.frames.get(timeout=5)
    assert first is not None and b'"status":"queued"' in first
    for _ in range(50):
        if hub._listening == {feed.channel_of(watched)}:
            break
        time.sleep(0.1)
    assert hub._listening == {feed.channel_of(watched)}
    others = [on_channel({feed.channel_of(watched)}) for _ in range(20)]
    store = JobStore(db, 3)
    for job_id in others:
        make_job_event(db, id=job_id)
        assert store.cancel(job_id) == "cancelled"  # a move: announced, on another channel
    assert store.cancel(watched) is not None
    ended = sink.frames.get(timeout=5)
    assert ended is not None and b'"status":"cancelled"' in ended
    assert set(heard) == {watched}  # the others' twenty events woke nothing here
    hub.close(stream)
    closed = time.monotonic()
    for _ in range(50):
        if not hub._listening:
            break
        time.sleep(0.05)
    assert not hub._listening
    assert time.monotonic() - closed >= 0.4  # it lingered first

    # A waiter on a job whose move came before its channel was LISTENed: read once more. (A hub
    # of its own whose thread never starts, so the steps are the test's.)
    assert store.cancel(waited) is not None
    quiet = StreamHub(db, keepalive=30, linger=0)
    quiet._ensure_listener()
    try:
        assert quiet._sync_channels() == set() and not quiet._listening  # nothing watched yet
        with quiet._lock:  # as ``wait`` registers a waiter
            quiet._waiters[waited] = [threading.Event()]
            quiet._watch_changed = True
        assert quiet._sync_channels() == {waited}
        assert quiet._listening == {feed.channel_of(waited)}
        assert quiet._sync_channels() == set()  # nothing new: not even a look at what is watched
        with quiet._lock:
            quiet._waiters.pop(waited)
            quiet._watch_changed = True
        assert quiet._sync_channels() == set() and not quiet._listening
    finally:
        quiet._listener.close()


def test_a_stream_on_a_lingering_channel_opens_without_a_listen_or_a_second_read(db: Database) -> None:
    """A client that follows one job after another: the second job's channel, LISTENed for the
    first, is still LISTENed; its stream starts with one read of the log and is woken once more,
    by its move."""
    first = new_id()
    while (second := new_id()) and feed.channel_of(second) != feed.channel_of(first):
        pass
    make_job_event(db, id=first)
    make_job_event(db, id=second)
    hub = StreamHub(db, keepalive=30)  # the default linger
    reads: list[set[str]] = []
    deliver = hub._deliver

    def noted(job_ids: set[str]) -> None:
        reads.append(set(job_ids))
        deliver(job_ids)

    hub._deliver = noted  # type: ignore[method-assign]
    store = JobStore(db, 3)
    for job_id in (first, second):
        sink = QueueSink()
        hub.open([job_id], None, sink)
        opened = sink.frames.get(timeout=5)
        assert opened is not None and b'"status":"queued"' in opened
        assert store.cancel(job_id) == "cancelled"
        ended = sink.frames.get(timeout=5)
        assert ended is not None and b'"status":"cancelled"' in ended
        assert sink.frames.get(timeout=5) is None  # the stream ended
    # The first stream's job was read once more after its channel's LISTEN, then woken by its
    # move's notification (which carries the event); the second only by its move's notification.
    assert reads == [{first}, {first}, {second}]
    for _ in range(50):  # its end is synced on the hub's next turn: the channel lingers
        if feed.channel_of(first) in hub._unlisten_at:
            break
        time.sleep(0.05)
    assert hub._listening == {feed.channel_of(first)} and feed.channel_of(first) in hub._unlisten_at


def test_a_streams_opening_reads_the_check_and_the_log_in_one_statement(db: Database) -> None:
    """``feed.read_opening``: the job's client and its newest event, one statement on a bare
    cursor; the hub adds a queued job's place, read once for many streams on the job."""
    job_id = new_id()
    created = make_job_event(db, id=job_id, client_id="alice", dispatched_at=utcnow())
    with sent_statements(db) as sent:
        opened = feed.read_opening(db, job_id)
    assert len(sent) == 1, sent
    assert opened is not None and opened[1] is not None
    assert opened[0] == "alice" and opened[1][:2] == (created, job_id) and opened[1][2]["status"] == "queued"
    hub = StreamHub(db, keepalive=30)
    with sent_statements(db) as sent:
        for _ in range(3):
            sink = QueueSink()
            hub.open([job_id], None, sink, Opening([opened[1]], time.monotonic(), placed=False))
            first = sink.frames.get(timeout=5)
            assert first is not None and b'"queue_position":null' not in first, first  # its place
    assert len([s for s in sent if "standing_slots" in s]) == 1, sent  # its place, read once
    assert JobStore(db, 3).cancel(job_id) == "cancelled"
    opened = feed.read_opening(db, job_id)
    (newest,) = feed.read_latest(db, [job_id])
    assert opened == ("alice", newest) and newest[0] > created
    assert feed.read_opening(db, new_id()) is None


def test_an_event_heard_between_a_views_read_and_its_streams_start_is_not_lost(db: Database) -> None:
    """A view reads a stream's first word itself (``Opening``); an event that commits after that
    read and is heard by the hub before the stream starts there is read once more and sent."""
    job_id = new_id()
    while (neighbour := new_id()) and feed.channel_of(neighbour) != feed.channel_of(job_id):
        pass
    make_job_event(db, id=job_id)
    make_job_event(db, id=neighbour)
    hub = StreamHub(db, keepalive=30)
    kept = QueueSink()
    hub.open([neighbour], None, kept)  # keeps the channel LISTENed: the move below is heard
    assert kept.frames.get(timeout=5) is not None
    for _ in range(50):
        if hub._listening and not hub._watch_changed:
            break
        time.sleep(0.05)
    since = time.monotonic()
    opened = feed.read_opening(db, job_id)
    assert opened is not None and opened[1] is not None
    assert JobStore(db, 3).cancel(job_id) == "cancelled"
    for _ in range(100):  # the hub heard it, before any stream of this job was there
        if job_id in hub._recent:
            break
        time.sleep(0.02)
    assert job_id in hub._recent
    sink = QueueSink()
    hub.open([job_id], None, sink, Opening([opened[1]], since, placed=False))
    first, then = sink.frames.get(timeout=2), sink.frames.get(timeout=2)  # the safety net is 5 s away
    assert first is not None and b'"status":"queued"' in first
    assert then is not None and b'"status":"cancelled"' in then
    assert sink.frames.get(timeout=2) is None
