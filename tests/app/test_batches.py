"""Batches through Flask's test client, on the run's real Postgres and RabbitMQ (unit vhost):
``POST /v1/jobs/batch``, ``GET /v1/jobs?batch_id=``, ``GET /v1/batches/{id}``, ``POST /v1/jobs/cancel``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import event, select

from app import create_app
from config import Settings
from models import lifecycle
from models.jobs import Job, JobEvent
from tests.conftest import KEYS

ALICE = {"X-API-Key": KEYS[0][1]}
BOB = {"Authorization": f"Bearer {KEYS[1][1]}"}
IMG = "http://images.example.com/a.png"


@pytest.fixture
def client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["aiorch"].db.dispose()


def job(n: int = 0, **extra: Any) -> dict[str, Any]:
    return {"task": "upscale", "payload": {"image_url": IMG}, "metadata": {"n": n}, **extra}


def batch(client: FlaskClient, jobs: list[Any], headers: dict[str, str] = ALICE, **extra: Any) -> Any:
    return client.post("/v1/jobs/batch", json={"jobs": jobs, **extra}, headers=headers)


def accepted(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def new_client_key(client: FlaskClient) -> dict[str, str]:
    """A key of a client of its own, so counts and limits see only this test's jobs."""
    _, key = client.application.extensions["aiorch"].keyring.create(f"c{uuid.uuid4().hex[:12]}")
    return {"X-API-Key": key}


def test_a_batch_answers_one_job_per_item_in_order_all_in_one_batch(client: FlaskClient) -> None:
    body = accepted(batch(client, [job(n) for n in range(5)]))
    batch_id = body["batch_id"]
    assert len(batch_id) == 32
    assert [entry["metadata"]["n"] for entry in body["jobs"]] == list(range(5))
    assert all(
        e["status"] == "queued" and e["reused"] is False and e["batch_id"] == batch_id for e in body["jobs"]
    )
    listed = client.get(f"/v1/jobs?batch_id={batch_id}", headers=ALICE).get_json()["jobs"]
    assert {j["job_id"] for j in listed} == {e["job_id"] for e in body["jobs"]}
    fetched = client.get(f"/v1/jobs/{body['jobs'][0]['job_id']}", headers=ALICE).get_json()
    assert fetched["batch_id"] == batch_id


def test_a_batch_id_given_by_the_client_is_on_every_job_and_a_malformed_one_is_a_422(
    client: FlaskClient,
) -> None:
    mine = f"run-{uuid.uuid4().hex[:8]}.part:1"
    body = accepted(batch(client, [job(1), job(2)], batch_id=mine))
    assert body["batch_id"] == mine and {e["batch_id"] for e in body["jobs"]} == {mine}
    for bad in ("", "has space", "x" * 65, "-leading", "a\n", "\u00e9t\u00e9"):
        response = batch(client, [job()], batch_id=bad)
        assert response.status_code == 422, bad
        assert "batch_id" in response.get_json()["error"]["details"]


def test_refused_items_get_their_own_error_and_the_valid_ones_are_accepted(client: FlaskClient) -> None:
    items = [
        job(0),
        {"task": "paint_my_house", "payload": {}},
        job(2),
        {"task": "upscale", "payload": {"image_url": IMG, "scale": 9}},
        "not an object",
        {"task": "upscale", "payload": {"image_url": IMG}, "surprise": 1},
        {"task": "generate", "payload": {"prompt": "a cat"}},  # no engine installed here
        job(7, webhook_url="not a url"),
        job(8),
    ]
    entries = accepted(batch(client, items))["jobs"]
    assert len(entries) == len(items)
    assert [e["metadata"]["n"] for i, e in enumerate(entries) if i in (0, 2, 8)] == [0, 2, 8]
    codes = {i: e["error"]["code"] for i, e in enumerate(entries) if "job_id" not in e}
    assert codes == {
        1: "unknown_task",
        3: "invalid_payload",
        4: "validation_error",
        5: "validation_error",
        6: "task_not_installed",
        7: "validation_error",
    }
    for i in codes:
        assert set(entries[i]) == {"error"} and entries[i]["error"]["message"]
        assert isinstance(entries[i]["error"]["details"], dict)
    assert "task" in entries[1]["error"]["details"] and "payload" in entries[3]["error"]["details"]
    assert "surprise" in entries[5]["error"]["details"] and "webhook_url" in entries[7]["error"]["details"]
    # The same refusal as POST /v1/jobs gives the item alone.
    alone = client.post("/v1/jobs", json=items[3], headers=ALICE).get_json()
    assert alone == {"error": entries[3]["error"]}


def test_idempotency_keys_replay_per_item_within_and_across_batches(client: FlaskClient) -> None:
    k1, k2, k3 = (f"k-{uuid.uuid4().hex}" for _ in range(3))
    first = accepted(batch(client, [job(1, idempotency_key=k1), job(2, idempotency_key=k2), job(3)]))["jobs"]
    again = accepted(
        batch(
            client,
            [
                job(1, idempotency_key=k1),  # the same body: the earlier job
                job(99, idempotency_key=k2),  # another body under the key: refused
                job(3, idempotency_key=k3),  # new
                job(3, idempotency_key=k3),  # the same key twice in one batch: one job
                job(4, idempotency_key=k3),  # ... but not with another body
            ],
        )
    )["jobs"]
    assert again[0]["job_id"] == first[0]["job_id"] and again[0]["reused"] is True
    assert again[0]["batch_id"] == first[0]["batch_id"]  # the job's own batch
    assert again[1]["error"]["code"] == "idempotency_key_reused"
    assert (
        again[2]["reused"] is False
        and again[3]["job_id"] == again[2]["job_id"]
        and again[3]["reused"] is True
    )
    assert again[4]["error"]["code"] == "idempotency_key_reused"
    # A key replays across the single and the batch submit alike.
    single = client.post("/v1/jobs", json=job(1), headers={**ALICE, "Idempotency-Key": k1})
    assert single.status_code == 200 and single.get_json()["job_id"] == first[0]["job_id"]
    fresh = f"k-{uuid.uuid4().hex}"
    created = client.post("/v1/jobs", json=job(5), headers={**ALICE, "Idempotency-Key": fresh}).get_json()
    replay = accepted(batch(client, [job(5, idempotency_key=fresh)]))["jobs"][0]
    assert replay["job_id"] == created["job_id"] and replay["reused"] is True


@pytest.mark.parametrize("count", [0, 1001])
def test_an_empty_batch_or_one_of_1001_items_is_a_422_naming_jobs(client: FlaskClient, count: int) -> None:
    response = batch(client, [job()] * count)
    assert response.status_code == 422
    assert "jobs" in response.get_json()["error"]["details"]


def test_a_batch_of_1000_is_accepted_with_one_insert_of_jobs_and_one_of_events_in_one_transaction(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = client.application.extensions["aiorch"].db.engine
    statements: list[str] = []
    commits: list[int] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement.split("(")[0].strip().upper().replace('"', ""))

    # The multi-row writes go through ``lifecycle.insert_rows`` (one COPY each) on the session's
    # connection, which SQLAlchemy's cursor events do not see.
    insert_rows = lifecycle.insert_rows

    def spy(session: Any, table: Any, rows: list[Any]) -> None:
        statements.append(f"INSERT INTO {table.name.upper()} x{len(rows)}")
        insert_rows(session, table, rows)

    monkeypatch.setattr(lifecycle, "insert_rows", spy)
    event.listen(engine, "before_cursor_execute", seen)
    event.listen(engine, "commit", lambda _conn: commits.append(len(statements)))
    try:
        entries = accepted(batch(client, [job(n) for n in range(1000)]))["jobs"]
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len({e["job_id"] for e in entries}) == 1000
    inserts = [s for s in statements if s.startswith("INSERT INTO JOB")]
    assert inserts == ["INSERT INTO JOBS x1000", "INSERT INTO JOB_EVENTS x1000"], statements
    # No COMMIT between the two INSERTs (``commits``: how many statements had run at each).
    first, last = statements.index(inserts[0]), statements.index(inserts[1])
    assert not [c for c in commits if first < c <= last], (statements, commits)


def test_a_batch_stores_text_with_backslashes_tabs_and_newlines_as_sent(client: FlaskClient) -> None:
    # The batch's rows are written with COPY's text format, where these characters are escapes.
    tricky = "a\\b\tc\nd\re \\N \\x41 \u00e9 \\\\"
    metadata = {"note": tricky, "n": 1.5, "flag": True, "none": None}
    entry = accepted(batch(client, [job(metadata=metadata)]))["jobs"][0]
    assert entry["metadata"] == metadata
    stored = client.get(f"/v1/jobs/{entry['job_id']}", headers=ALICE).get_json()
    assert stored["metadata"] == metadata
    assert stored["created_at"] == entry["created_at"] and stored["status"] == "queued"
    with client.application.extensions["aiorch"].db.session() as session:
        data = session.scalars(select(JobEvent.data).where(JobEvent.job_id == entry["job_id"])).one()
    assert data["metadata"] == metadata and data["created_at"] == entry["created_at"]


def test_admission_limits_apply_item_by_item(client: FlaskClient, settings: Settings) -> None:
    app = create_app(settings.with_overrides(max_queued_per_client=3))
    limited = app.test_client()
    try:
        key = new_client_key(limited)
        entries = accepted(batch(limited, [job(n) for n in range(5)], headers=key))["jobs"]
        assert [("job_id" in e) for e in entries] == [True, True, True, False, False]
        error = entries[3]["error"]
        assert error["code"] == "too_many_queued_jobs" and error["details"]["retry_after"] == 5
    finally:
        app.extensions["aiorch"].db.dispose()


def test_every_accepted_job_is_published_when_its_queue_has_room(settings: Settings) -> None:
    from bench.infra import queue_depths

    app = create_app(settings.with_overrides(dispatch_ahead=100_000))  # room for everyone
    roomy = app.test_client()
    try:
        celery, db = app.extensions["aiorch"].celery, app.extensions["aiorch"].db
        before = queue_depths(celery, ["cpu"])["cpu"] or 0
        entries = accepted(batch(roomy, [job(n) for n in range(25)] + [{"task": "nope"}]))["jobs"]
        ids = [e["job_id"] for e in entries if "job_id" in e]
        with db.session() as session:
            rows = session.query(Job).filter(Job.id.in_(ids)).all()
            assert len(rows) == 25 and all(r.dispatched_at is not None for r in rows)
        # Each to its prepare task; with them, whatever other tests left waiting got its turn too.
        assert queue_depths(celery, ["cpu"])["cpu"] >= before + 25
    finally:
        app.extensions["aiorch"].db.dispose()


def test_jobs_beyond_the_free_slots_wait_unpublished(settings: Settings) -> None:
    """No worker has slots here and none are sent ahead: every job waits in the database for its
    turn (models/dispatch.py), nothing reaches the broker, and none is lost."""
    from bench.infra import queue_depths

    app = create_app(settings.with_overrides(dispatch_ahead=0))
    tight = app.test_client()
    try:
        celery, db = app.extensions["aiorch"].celery, app.extensions["aiorch"].db
        before = queue_depths(celery, ["cpu"])["cpu"] or 0
        ids = [e["job_id"] for e in accepted(batch(tight, [job(n) for n in range(5)]))["jobs"]]
        assert queue_depths(celery, ["cpu"])["cpu"] == before
        with db.session() as session:
            rows = session.query(Job).filter(Job.id.in_(ids)).all()
            assert len(rows) == 5 and all(r.status == "queued" and r.dispatched_at is None for r in rows)
    finally:
        app.extensions["aiorch"].db.dispose()


def test_when_the_broker_is_down_the_batch_is_a_503_and_no_job_stays(settings: Settings) -> None:
    # Room for every job: they are published at once (a job waiting for a slot is not sent yet,
    # so a broker that is down refuses nothing then; the sweep sends it later).
    down_settings = settings.with_overrides(
        broker_url="amqp://guest:guest@127.0.0.1:9//", dispatch_ahead=100_000
    )
    app = create_app(down_settings)
    down = app.test_client()
    try:
        mine = f"down-{uuid.uuid4().hex[:8]}"
        response = batch(down, [job(1), job(2)], batch_id=mine)
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.get_json()["error"]["code"] == "broker_unavailable"
        assert down.get(f"/v1/jobs?batch_id={mine}", headers=ALICE).get_json()["jobs"] == []
    finally:
        app.extensions["aiorch"].db.dispose()


def test_batch_status_counts_jobs_by_status(client: FlaskClient) -> None:
    body = accepted(batch(client, [job(n) for n in range(3)]))
    batch_id, ids = body["batch_id"], [e["job_id"] for e in body["jobs"]]
    cancelled = client.post("/v1/jobs/cancel", json={"ids": ids[:1]}, headers=ALICE)
    assert cancelled.get_json() == {"cancelled": 1, "already_final": 0}
    status = client.get(f"/v1/batches/{batch_id}", headers=ALICE).get_json()
    assert status["batch_id"] == batch_id and status["total"] == 3
    assert status["counts"] == {"queued": 2, "cancelled": 1}
    assert status["progress"] == 33  # one of three is final
    assert status["eta_utc"] > status["created_at"]
    assert status["created_at"] == min(e["created_at"] for e in body["jobs"])


def test_cancel_by_batch_ends_queued_jobs_flags_running_ones_and_counts_finished_ones(
    client: FlaskClient,
) -> None:
    store = client.application.extensions["aiorch"].store
    body = accepted(batch(client, [job(n) for n in range(4)]))
    batch_id, ids = body["batch_id"], [e["job_id"] for e in body["jobs"]]
    store.claim(ids[0], redelivered=False, from_prepare=True)  # running now
    assert client.get(f"/v1/jobs/{ids[0]}", headers=ALICE).get_json()["status"] == "running"
    done = client.post("/v1/jobs/cancel", json={"batch_id": batch_id}, headers=ALICE).get_json()
    assert done == {"cancelled": 4, "already_final": 0}
    statuses = [client.get(f"/v1/jobs/{i}", headers=ALICE).get_json()["status"] for i in ids]
    assert statuses == ["running", "cancelled", "cancelled", "cancelled"]
    assert store.cancel_requested(ids[0])
    again = client.post("/v1/jobs/cancel", json={"batch_id": batch_id}, headers=ALICE).get_json()
    assert again == {"cancelled": 1, "already_final": 3}  # the running one is asked again
    by_ids = client.post("/v1/jobs/cancel", json={"ids": ids[1:]}, headers=ALICE).get_json()
    assert by_ids == {"cancelled": 0, "already_final": 3}


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"ids": []},
        {"ids": ["x"]},
        {"ids": ["a" * 32] * 1001},
        {"batch_id": "a b"},
        {"ids": ["a" * 32], "batch_id": "b"},
    ],
)
def test_a_cancel_needs_either_ids_or_a_batch_id(client: FlaskClient, body: dict[str, Any]) -> None:
    response = client.post("/v1/jobs/cancel", json=body, headers=ALICE)
    assert response.status_code == 422, response.get_data(as_text=True)


def test_another_clients_batch_is_not_found_and_not_cancelled(client: FlaskClient) -> None:
    body = accepted(batch(client, [job(1), job(2)]))
    batch_id, ids = body["batch_id"], [e["job_id"] for e in body["jobs"]]
    response = client.get(f"/v1/batches/{batch_id}", headers=BOB)
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "batch_not_found"
    assert client.post("/v1/jobs/cancel", json={"batch_id": batch_id}, headers=BOB).status_code == 404
    assert client.post("/v1/jobs/cancel", json={"ids": ids}, headers=BOB).get_json() == {
        "cancelled": 0,
        "already_final": 0,
    }
    assert client.get(f"/v1/jobs?batch_id={batch_id}", headers=BOB).get_json()["jobs"] == []
    status = client.get(f"/v1/batches/{batch_id}", headers=ALICE).get_json()
    assert status["counts"] == {"queued": 2}
    for unknown in ("nope", "a%00b", "x" * 65):
        assert client.get(f"/v1/batches/{unknown}", headers=ALICE).status_code == 404


def test_a_waiting_job_whose_engine_left_is_failed_when_its_turn_comes(settings: Settings) -> None:
    """The dispatcher that a batch runs may pick a job accepted before its engine was removed: it
    ends ``task_not_installed`` instead of failing the batch."""
    from tests.support.factories import make_job

    app = create_app(settings.with_overrides(dispatch_ahead=100_000))
    roomy = app.test_client()
    try:
        db = app.extensions["aiorch"].db
        retired = {"engine_task": "retired_task", "task": "retired_task", "queue": "gpu.superres"}
        gone = make_job(db, dispatched_at=None, **retired)
        accepted(batch(roomy, [job(1)]))
        with db.session() as session:
            row = session.get(Job, gone)
            assert row is not None and row.status == "failed" and row.error["code"] == "task_not_installed"
    finally:
        app.extensions["aiorch"].db.dispose()
