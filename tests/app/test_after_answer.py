"""A submitted job's message goes out just after its 202 (``tasks.after_answer``) while the broker
is known to answer, and in the request otherwise, so a broker that is down is still a 503."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from PIL import Image

from app import create_app
from bench.infra import queue_depths
from config import Settings
from models.jobs import Job
from tasks.celery_app import create_celery
from tests.conftest import KEYS
from tests.support.images import data_uri
from tests.support.services import fresh_database

ALICE = {"X-API-Key": KEYS[0][1]}
TINY = {"task": "upscale", "payload": {"image_url": data_uri(Image.new("RGB", (16, 16), "red")), "scale": 2}}
QUEUE = "gpu.superres"  # a fetch-free upscale goes straight to its run queue


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    # A database of its own, where nobody waits, and room for every job: each is sent at submit.
    own = settings.with_overrides(database_url=fresh_database(settings), dispatch_ahead=100_000)
    flask_app = create_app(own)
    yield flask_app
    flask_app.extensions["aiorch"].db.dispose()


def depth(flask_app: Flask) -> int:
    return int(queue_depths(flask_app.extensions["aiorch"].celery, [QUEUE])[QUEUE] or 0)


def row(flask_app: Flask, job_id: str) -> Job:
    with flask_app.extensions["aiorch"].db.session() as session:
        found = session.get(Job, job_id)
        assert found is not None
        session.expunge(found)
        return found


def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def test_the_first_submit_publishes_in_its_request_and_later_ones_just_after_answering(app: Flask) -> None:
    client, after = app.test_client(), app.extensions["aiorch"].after_answer
    assert not after.broker_answers()  # nothing published by this process yet
    before = depth(app)
    first = client.post("/v1/jobs", json=TINY, headers=ALICE)
    assert first.status_code == 202, first.get_json()
    assert depth(app) == before + 1  # published before the answer
    assert after.broker_answers()
    second = client.post("/v1/jobs", json=TINY, headers=ALICE)
    assert second.status_code == 202
    eventually(lambda: depth(app) == before + 2)  # and this one just after it
    assert row(app, second.get_json()["job_id"]).dispatched_at is not None


def test_a_publish_the_broker_refuses_after_answering_leaves_the_job_waiting_and_the_next_submit_503(
    app: Flask, settings: Settings
) -> None:
    client, svc = app.test_client(), app.extensions["aiorch"]
    assert client.post("/v1/jobs", json=TINY, headers=ALICE).status_code == 202
    assert svc.after_answer.broker_answers()
    # The broker goes away: the process's publishers now point at a port nobody listens on.
    dead = create_celery(settings.with_overrides(broker_url="amqp://guest:guest@127.0.0.1:9//"))
    svc.celery = svc.after_answer.app = dead
    accepted = client.post("/v1/jobs", json=TINY, headers=ALICE)
    assert accepted.status_code == 202  # answered before the publish was tried
    job_id = accepted.get_json()["job_id"]
    # It waits for its slot again (the next fill sends it), neither lost nor marked sent.
    eventually(lambda: row(app, job_id).dispatched_at is None)
    assert row(app, job_id).status == "queued"
    assert not svc.after_answer.broker_answers()
    # Once nothing waits before it (a waiting job's turn comes first), a submit publishes in its
    # request again, and a broker that is down is a 503 with nothing kept.
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=ALICE).status_code == 200
    refused = client.post("/v1/jobs", json=TINY, headers=ALICE)
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.get_json()["error"]["code"] == "broker_unavailable"
