"""Live status as clients see it: SSE streams from the real API (gunicorn, the connection handed to
the stream hub) fed by real workers through Postgres NOTIFY, and on the embedded default."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from aiorch.watch import ServerEvent, parse_events
from config import Settings
from tests.conftest import KEYS
from tests.support.platform import Platform
from tests.support.platform_fixtures import embedded_settings, platform_settings, running_platform

ALICE = KEYS[0][1]
BOB = KEYS[1][1]
FINAL = {"succeeded", "failed", "cancelled", "expired", "rejected"}


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("streams")
    # Keep-alives every half second, so a test sees them without waiting 15 s.
    settings = platform_settings(base_settings, tmp, broker_url=worker_amqp_url, stream_keepalive=0.5)
    with running_platform(settings, tmp) as plat:
        yield plat


def open_stream(platform: Platform, path: str, key: str = ALICE, **headers: str) -> requests.Response:
    return requests.get(
        platform.base_url + path,
        headers={"X-API-Key": key, **headers},
        stream=True,
        timeout=(5, 30),
    )


def read_all(response: requests.Response) -> tuple[list[ServerEvent], bytes]:
    """Every event until the server ends the stream, and the raw bytes (for keep-alives)."""
    raw = bytearray()

    def chunks() -> Iterator[bytes]:
        for chunk in response.iter_content(chunk_size=None):
            raw.extend(chunk)
            yield chunk

    events = list(parse_events(chunks()))
    return events, bytes(raw)


def jobs_of(events: list[ServerEvent]) -> list[dict[str, Any]]:
    assert all(e.event == "job" for e in events), [e.event for e in events]
    return [json.loads(e.data) for e in events]


def test_a_job_stream_sends_every_change_in_order_and_ends_on_the_final_one(platform: Platform) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 1.5}).json()["job_id"]
    response = open_stream(platform, f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events, raw = read_all(response)
    jobs = jobs_of(events)
    assert jobs[0]["job_id"] == job_id and jobs[0]["status"] in ("queued", "running")
    statuses = [j["status"] for j in jobs]
    assert statuses[-1] == "succeeded" and "running" in statuses, statuses
    assert all(s not in FINAL for s in statuses[:-1]), statuses
    progress = [j["progress"] for j in jobs if j["status"] == "running"]
    assert progress == sorted(progress) and len(set(progress)) >= 2, progress  # progress steps
    ids = [int(e.id) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    assert b": keep-alive" in raw  # the job ran for 1.5 s; keep-alives every 0.5 s
    # Every change the job's log holds after the first event was sent, none twice: what a
    # stream resumed from the first id gets is exactly what followed it here.
    resumed, _ = read_all(
        open_stream(platform, f"/v1/jobs/{job_id}/events", **{"Last-Event-ID": events[0].id})
    )
    assert [e.id for e in resumed] == [e.id for e in events[1:]]
    assert jobs_of(resumed) == jobs[1:]


def test_resume_with_last_event_id_repeats_nothing_and_a_final_job_ends_at_once(platform: Platform) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 0.6}).json()["job_id"]
    first = open_stream(platform, f"/v1/jobs/{job_id}/events")
    stream = parse_events(first.iter_content(chunk_size=None))
    seen = [next(stream)]
    first.close()  # the client drops the connection after one event...
    rest, _ = read_all(open_stream(platform, f"/v1/jobs/{job_id}/events", **{"Last-Event-ID": seen[0].id}))
    assert all(int(e.id) > int(seen[0].id) for e in rest)
    assert jobs_of(rest)[-1]["status"] == "succeeded"
    # ...and once the job is final, a plain stream is its final object and the end.
    again, _ = read_all(open_stream(platform, f"/v1/jobs/{job_id}/events"))
    assert [j["status"] for j in jobs_of(again)] == ["succeeded"]
    assert again[0].id == rest[-1].id
    # Resuming from the last id of a final job: nothing more, and the stream ends.
    done, _ = read_all(open_stream(platform, f"/v1/jobs/{job_id}/events", **{"Last-Event-ID": rest[-1].id}))
    assert done == []


def test_another_clients_job_is_404_and_bad_arguments_are_4xx_json(platform: Platform) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 0}).json()["job_id"]
    for path in (f"/v1/jobs/{job_id}/events", f"/v1/events?ids={job_id}"):
        response = open_stream(platform, path, key=BOB)
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
    assert open_stream(platform, f"/v1/jobs/{job_id}/events", key="nope").status_code == 401
    bad = open_stream(platform, f"/v1/jobs/{job_id}/events", **{"Last-Event-ID": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["details"]["field"] == "Last-Event-ID"
    too_many = ",".join("0" * 32 for _ in range(1001))
    assert open_stream(platform, f"/v1/events?ids={too_many}").status_code == 422
    assert open_stream(platform, "/v1/events").status_code == 422
    missing = open_stream(platform, "/v1/events?batch_id=no-such-batch")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "batch_not_found"


def test_a_submit_that_accepts_an_event_stream_follows_its_job_in_the_same_request(
    platform: Platform,
) -> None:
    """``POST /v1/jobs`` with ``Accept: text/event-stream``: the answer is the new job's stream,
    written by the hub on the handed-over connection, to the final event; the request thread is
    free meanwhile (the job is read by another request while its stream is open)."""
    response = requests.post(
        platform.base_url + "/v1/jobs",
        json={"task": "debug_sleep", "payload": {"seconds": 0.6}},
        headers={"X-API-Key": ALICE, "Accept": "text/event-stream"},
        stream=True,
        timeout=(5, 30),
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events: list[ServerEvent] = []
    for event in parse_events(response.iter_content(chunk_size=None)):
        events.append(event)
        if len(events) == 1:  # the job exists and is readable while its stream is open
            job_id = json.loads(event.data)["job_id"]
            assert platform.job(ALICE, job_id)["status"] in ("queued", "running")
            assert open_stream(platform, f"/v1/jobs/{job_id}/events", key=BOB).status_code == 404
    jobs = jobs_of(events)
    assert jobs[0]["status"] in ("queued", "running") and {j["job_id"] for j in jobs} == {job_id}
    assert [j["status"] for j in jobs][-1] == "succeeded" and "running" in [j["status"] for j in jobs]
    ids = [int(e.id) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # A refused one is answered in JSON, naming the field, like any submit.
    bad = requests.post(
        platform.base_url + "/v1/jobs",
        json={"task": "upscale", "payload": {"scale": 2}},
        headers={"X-API-Key": ALICE, "Accept": "text/event-stream"},
        timeout=10,
    )
    assert bad.status_code == 422 and bad.headers["Content-Type"].startswith("application/json")
    assert "image_url" in bad.text


def test_a_stream_of_many_jobs_ends_when_all_are_final(platform: Platform) -> None:
    ids = [platform.submit(ALICE, "debug_sleep", {"seconds": s}).json()["job_id"] for s in (0.2, 0.8, 0.4)]
    events, _ = read_all(open_stream(platform, f"/v1/events?ids={','.join(ids)}"))
    jobs = jobs_of(events)
    last = {}
    for job in jobs:
        last[job["job_id"]] = job["status"]
    assert last == {job_id: "succeeded" for job_id in ids}
    for job_id in ids:  # each job's own events in order, none after its final one
        mine = [(int(e.id), j["status"]) for e, j in zip(events, jobs, strict=True) if j["job_id"] == job_id]
        assert [i for i, _ in mine] == sorted(i for i, _ in mine)
        assert [s for _, s in mine].count("succeeded") == 1 and mine[-1][1] == "succeeded"


def test_a_batch_stream_follows_the_batch(platform: Platform) -> None:
    body = {"jobs": [{"task": "debug_sleep", "payload": {"seconds": 0.1}} for _ in range(5)]}
    created = requests.post(
        platform.base_url + "/v1/jobs/batch", headers={"X-API-Key": ALICE}, json=body, timeout=10
    ).json()
    events, _ = read_all(open_stream(platform, f"/v1/events?batch_id={created['batch_id']}"))
    final = {j["job_id"] for j in jobs_of(events) if j["status"] == "succeeded"}
    assert final == {job["job_id"] for job in created["jobs"]}


def test_a_deleted_job_ends_its_stream(platform: Platform) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 30}).json()["job_id"]
    response = open_stream(platform, f"/v1/jobs/{job_id}/events")
    result: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: result.update(events=read_all(response)[0]))
    reader.start()
    time.sleep(0.5)
    url = f"{platform.base_url}/v1/jobs/{job_id}"
    deleted = requests.delete(url, headers={"X-API-Key": ALICE}, timeout=10)
    assert deleted.ok
    reader.join(timeout=15)
    assert not reader.is_alive(), "the stream of a deleted job did not end"
    assert jobs_of(result["events"])[0]["job_id"] == job_id


def test_open_streams_hold_no_request_thread(platform: Platform) -> None:
    """More open streams than the API has request threads (32), and submits still answer."""
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 20}).json()["job_id"]
    streams = [open_stream(platform, f"/v1/jobs/{job_id}/events") for _ in range(48)]
    try:
        assert all(s.status_code == 200 for s in streams)
        started = time.monotonic()
        for _ in range(10):
            assert platform.submit(ALICE, "debug_sleep", {"seconds": 0}).status_code == 202
        assert time.monotonic() - started < 10
        first = [next(parse_events(s.iter_content(chunk_size=None))) for s in streams[:3]]
        assert {json.loads(e.data)["job_id"] for e in first} == {job_id}
    finally:
        for stream in streams:
            stream.close()
        requests.post(f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers={"X-API-Key": ALICE}, timeout=9)


def test_streams_on_the_embedded_default(base_settings: Settings, tmp_path: Path) -> None:
    """SQLite and the filesystem transport: the hub reads the log's tail instead of NOTIFY."""
    settings = embedded_settings(base_settings, tmp_path, stream_keepalive=0.5)
    with running_platform(settings, tmp_path) as plat:
        ids = [plat.submit(ALICE, "debug_sleep", {"seconds": 0.5}).json()["job_id"] for _ in range(2)]
        events, _ = read_all(open_stream(plat, f"/v1/jobs/{ids[0]}/events"))
        statuses = [j["status"] for j in jobs_of(events)]
        assert statuses[-1] == "succeeded" and "running" in statuses, statuses
        many, _ = read_all(open_stream(plat, f"/v1/events?ids={','.join(ids)}"))
        assert {j["job_id"] for j in jobs_of(many) if j["status"] == "succeeded"} == set(ids)
