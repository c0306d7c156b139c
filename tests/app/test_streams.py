"""SSE streams through Flask's test client (the queue the hub fills, not a handed-over socket), on
the run's Postgres, woken by the job log's NOTIFY; and the stream hub's wake-up on SQLite."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from app import create_app
from app.stream_hub import POSITIONS_EVERY, POSITIONS_SHARE, QueueSink, StreamHub, next_positions
from config import Settings
from models.db import Database
from models.jobstore import JobStore
from models.migrate import upgrade
from tests.conftest import KEYS
from tests.support.factories import make_job

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
    """The stream's events as job objects, and its keep-alives as the string "keep-alive"."""
    for chunk in response.response:
        for block in chunk.decode().split("\n\n"):
            if block.startswith(": keep-alive"):
                yield "keep-alive"
            elif block:
                fields = dict(line.split(": ", 1) for line in block.splitlines())
                assert fields["event"] == "job" and int(fields["id"]) > 0
                yield json.loads(fields["data"])


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
        if not (set(job_ids) & (set(hub._streams) | hub._queued | set(hub._live_cache))):
            break
        deadline.wait(0.1)
    assert not set(job_ids) & (set(hub._streams) | hub._queued | set(hub._live_cache))
    db.dispose()


def test_places_of_followed_jobs_take_a_bounded_share_of_the_hubs_time() -> None:
    """A cheap pass is repeated every ``POSITIONS_EVERY``; one that took 0.2 s (jobs deep in a
    backlog) waits 4 s, so places never take more than 5 % of the hub's thread."""
    assert next_positions(100.0, 0.001) == 100.0 + POSITIONS_EVERY
    assert next_positions(100.0, 0.2) == pytest.approx(100.0 + 0.2 / POSITIONS_SHARE)
    assert POSITIONS_SHARE <= 0.05
