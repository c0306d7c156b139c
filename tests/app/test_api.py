"""The API through Flask's test client, on the run's real Postgres and RabbitMQ (unit vhost)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from app import create_app
from config import Settings
from tests.conftest import KEYS

ALICE = {"X-API-Key": KEYS[0][1]}
BOB = {"Authorization": f"Bearer {KEYS[1][1]}"}
IMG = "http://images.example.com/a.png"


@pytest.fixture
def client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["aiorch"].db.dispose()


def submit(client: FlaskClient, body: dict, headers: dict | None = None, **kw) -> object:
    return client.post("/v1/jobs", json=body, headers=headers or ALICE, **kw)


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    error = response.get_json()["error"]
    assert set(error) <= {"code", "message", "details"} and error["message"]
    if code:
        assert error["code"] == code
    return error


def test_create_returns_202_with_a_queued_job_object(client: FlaskClient) -> None:
    response = submit(
        client,
        {
            "task": "upscale",
            "payload": {"image_url": IMG, "scale": 2},
            "webhook_url": "https://hooks.example.com/x",
            "metadata": {"order": 7},
        },
    )
    assert response.status_code == 202
    job = response.get_json()
    assert len(job["job_id"]) == 32 and int(job["job_id"], 16) >= 0
    assert job["status"] == "queued" and job["ok"] is False and job["progress"] == 0
    assert job["created_at"].endswith("+00:00") and "." in job["created_at"]
    assert isinstance(job["created_at_ms"], int) and job["queued_at_ms"] == job["created_at_ms"]
    assert job["predict_time"] > 0 and job["eta_utc"] > job["queued_at"]
    assert job["metadata"] == {"order": 7} and job["webhook_url"] == "https://hooks.example.com/x"
    assert job["reused"] is False
    fetched = client.get(f"/v1/jobs/{job['job_id']}", headers=ALICE).get_json()
    assert fetched["job_id"] == job["job_id"] and fetched["status"] == "queued"


@pytest.mark.parametrize(
    "headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}]
)
def test_missing_or_wrong_key_is_401(client: FlaskClient, headers: dict) -> None:
    assert_error(client.get("/v1/jobs", headers=headers), 401, "unauthorized")


def test_bearer_and_x_api_key_both_work_and_clients_are_isolated(client: FlaskClient) -> None:
    job_id = submit(client, {"task": "upscale", "payload": {"image_url": IMG}}).get_json()["job_id"]
    assert_error(client.get(f"/v1/jobs/{job_id}", headers=BOB), 404, "job_not_found")
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=BOB), 404)
    assert_error(client.delete(f"/v1/jobs/{job_id}", headers=BOB), 404)
    assert client.get(f"/v1/jobs/{job_id}", headers=ALICE).status_code == 200
    assert all(j["job_id"] != job_id for j in client.get("/v1/jobs", headers=BOB).get_json()["jobs"])


def test_database_keys_authenticate_and_revoked_keys_do_not(client: FlaskClient) -> None:
    ring = client.application.extensions["aiorch"].keyring
    row, key = ring.create("carol")
    assert client.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 200
    ring.revoke(row.id)
    assert_error(client.get("/v1/jobs", headers={"X-API-Key": key}), 401)


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"task": "paint_my_house", "payload": {}}, 422, "unknown_task", "task"),
        ({"task": "generate", "payload": {"prompt": "a cat"}}, 501, "task_not_installed", "task"),
        ({"payload": {}}, 422, "validation_error", "task"),
        ({"task": "upscale", "payload": {}}, 422, "invalid_payload", "payload"),
        ({"task": "upscale", "payload": {"image_url": IMG, "scale": 5}}, 422, "invalid_payload", "payload"),
        ({"task": "upscale", "payload": {"image_url": IMG, "scale": 1}}, 422, "invalid_payload", "payload"),
        ({"task": "upscale", "payload": {"image_url": "ftp://x/a.png"}}, 422, "invalid_payload", "payload"),
        ({"task": "upscale", "payload": {"image_url": IMG, "bogus": 1}}, 422, "invalid_payload", "payload"),
        (
            {"task": "upscale", "payload": {"image_url": IMG, "format": "gif"}},
            422,
            "invalid_payload",
            "payload",
        ),
        (
            {"task": "upscale", "payload": {"image_url": IMG}, "webhook_url": "not a url"},
            422,
            "validation_error",
            "webhook_url",
        ),
        (
            {"task": "upscale", "payload": {"image_url": IMG}, "priority": 12},
            422,
            "validation_error",
            "priority",
        ),
        (
            {"task": "upscale", "payload": {"image_url": IMG}, "surprise": 1},
            422,
            "validation_error",
            "surprise",
        ),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(
    client: FlaskClient, body: dict, status: int, code: str, field: str
) -> None:
    error = assert_error(submit(client, body), status, code)
    assert field in error["details"]


def test_payload_field_errors_name_the_payload_field(client: FlaskClient) -> None:
    error = assert_error(submit(client, {"task": "upscale", "payload": {"image_url": IMG, "scale": 9}}), 422)
    assert "scale" in error["details"]["payload"]


def test_non_json_body_is_400_json(client: FlaskClient) -> None:
    response = client.post(
        "/v1/jobs", data="{not json", headers={**ALICE, "Content-Type": "application/json"}
    )
    assert_error(response, 400)


def test_private_targets_are_refused_when_not_allowed(settings: Settings) -> None:
    app = create_app(settings.with_overrides(allow_private_networks=()))
    client = app.test_client()
    for url in (
        "http://127.0.0.1/a.png",
        "http://10.1.2.3/a.png",
        "http://169.254.169.254/latest",
        "http://localhost:8000/x",
        "http://[::1]/a.png",
    ):
        error = assert_error(submit(client, {"task": "upscale", "payload": {"image_url": url}}), 422)
        assert "image_url" in error["details"]["payload"]
    error = assert_error(
        submit(
            client,
            {"task": "upscale", "payload": {"image_url": IMG}, "webhook_url": "http://192.168.1.1/hook"},
        ),
        422,
    )
    assert "webhook_url" in error["details"]


def test_idempotency_key_reuses_the_job_or_conflicts(client: FlaskClient) -> None:
    body = {"task": "upscale", "payload": {"image_url": IMG, "scale": 2}}
    headers = {**ALICE, "Idempotency-Key": "order-42"}
    first = submit(client, body, headers)
    again = submit(client, body, headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.get_json()["job_id"] == first.get_json()["job_id"] and again.get_json()["reused"] is True
    assert_error(
        submit(client, {**body, "payload": {"image_url": IMG, "scale": 3}}, headers),
        409,
        "idempotency_key_reused",
    )
    # Keys are per client: bob's same key is a different job.
    bob = submit(client, body, {**BOB, "Idempotency-Key": "order-42"})
    assert bob.status_code == 202 and bob.get_json()["job_id"] != first.get_json()["job_id"]


def test_list_filters_pagination_and_batch_lookup(client: FlaskClient) -> None:
    ring = client.application.extensions["aiorch"].keyring
    _, key = ring.create("dave")
    dave = {"X-API-Key": key}
    ids = [
        submit(client, {"task": "upscale", "payload": {"image_url": IMG}}, dave).get_json()["job_id"]
        for _ in range(5)
    ]
    page = client.get("/v1/jobs?limit=2", headers=dave).get_json()
    assert [j["job_id"] for j in page["jobs"]] == ids[::-1][:2] and page["have_next"] is True
    older = client.get(
        "/v1/jobs", query_string={"limit": 10, "before": page["jobs"][-1]["created_at"]}, headers=dave
    ).get_json()
    assert [j["job_id"] for j in older["jobs"]] == ids[::-1][2:] and older["have_next"] is False
    assert len(client.get("/v1/jobs?status=queued&task=upscale", headers=dave).get_json()["jobs"]) == 5
    assert client.get("/v1/jobs?status=succeeded", headers=dave).get_json()["jobs"] == []
    batch = client.get(f"/v1/jobs?ids={ids[0]},{ids[3]}", headers=dave).get_json()
    assert {j["job_id"] for j in batch["jobs"]} == {ids[0], ids[3]}


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "task=bogus",
        "limit=0",
        "limit=201",
        "before=yesterday",
        "ids=" + ",".join(["a" * 32] * 51),
        "ids=xyz",
    ],
)
def test_list_rejects_bad_filters(client: FlaskClient, query: str) -> None:
    assert client.get(f"/v1/jobs?{query}", headers=ALICE).status_code in (400, 422)


def test_cancel_queued_job_is_immediate_and_finished_job_is_409(client: FlaskClient) -> None:
    job_id = submit(client, {"task": "upscale", "payload": {"image_url": IMG}}).get_json()["job_id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=ALICE)
    assert response.status_code == 200
    job = response.get_json()
    assert (
        job["status"] == "cancelled"
        and job["finished_at"] is not None
        and job["error"]["code"] == "cancelled"
    )
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=ALICE), 409, "job_finished")


def test_delete_both_spellings(client: FlaskClient) -> None:
    for path in ("/v1/jobs/", "/tasks/"):
        job_id = submit(client, {"task": "upscale", "payload": {"image_url": IMG}}).get_json()["job_id"]
        assert client.delete(path + job_id, headers=ALICE).status_code == 204
        assert_error(client.get(f"/v1/jobs/{job_id}", headers=ALICE), 404)


def test_flask_404_and_405_use_the_error_shape(client: FlaskClient) -> None:
    assert_error(client.get("/nowhere", headers=ALICE), 404, "not_found")
    assert_error(client.put("/v1/jobs", headers=ALICE), 405, "method_not_allowed")
    assert_error(client.get("/files/../../etc/passwd"), 404)


def test_openapi_and_docs_are_public(client: FlaskClient) -> None:
    spec = client.get("/v1/openapi.json").get_json()
    assert "/v1/jobs" in spec["paths"] and "/v1/jobs/{job_id}/cancel" in spec["paths"]
    assert spec["paths"]["/v1/jobs"]["post"]["summary"] == "Create a job"
    assert client.get("/v1/docs").status_code == 200


def test_health_and_readiness(client: FlaskClient, settings: Settings) -> None:
    assert client.get("/healthz").get_json() == {"ok": True}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"] == {"database": "ok", "broker": "ok"}
    down = create_app(settings.with_overrides(broker_url="amqp://guest:guest@127.0.0.1:1//")).test_client()
    response = down.get("/readyz")
    # The verdict per dependency, never the driver's exception class.
    assert assert_error(response, 503, "not_ready")["details"] == {"database": "ok", "broker": "unreachable"}
    assert response.headers["Retry-After"]


def test_the_api_never_imports_torch() -> None:
    code = (
        "import sys; from app import create_app; from app.cli import main; import tasks.celery_app; "
        "import tasks.prepare, tasks.run, tasks.sweeps, tasks.remote.poll; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_api_process_loads_neither_numpy_nor_the_engines_and_the_cli_not_even_flask() -> None:
    # What every gunicorn process of the API carries; the master runs `app.cli` only. The API reads
    # the engines' declarations (inference/engines/, through the task catalog), never their code.
    code = (
        "import sys; import app.cli; assert not {'flask', 'sqlalchemy', 'celery'} & set(sys.modules), 'cli'; "
        "from app import create_app; from config import Settings; "
        "create_app(Settings.from_env({'AIORCH_VAR_DIR': sys.argv[1]})); "
        "loaded = {m.split('.')[0] for m in sys.modules}; "
        "assert not {'numpy', 'torch', 'cv2', 'onnxruntime'} & loaded, loaded; "
        # The provider clients (requests, cryptography, jwt: ~16 MB) only where a route names one.
        "assert not {'requests', 'cryptography', 'jwt'} & loaded, loaded; "
        # The S3 client (boto3, ~25 MB) only where AIORCH_STORAGE_URL names a bucket.
        "assert not {'boto3', 'botocore'} & loaded, loaded; "
        "engines = {'inference.diffusion', 'inference.superres', 'inference.lanczos', "
        "'inference.background', 'inference.detection', 'inference.faceswap', 'inference.watermark'}; "
        "assert 'inference.engines' in sys.modules and not engines & set(sys.modules), sorted(sys.modules)"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as var:
        subprocess.run([sys.executable, "-c", code, var], check=True, timeout=60)


def test_database_down_is_503_with_retry_after_not_a_500(settings: Settings) -> None:
    # Port 1 on loopback refuses at once: the state of a Postgres that is down or restarting.
    down = settings.with_overrides(database_url="postgresql://postgres@127.0.0.1:1/aiorch")
    app = create_app(down)
    client = app.test_client()
    for response in (
        client.get("/v1/jobs", headers=ALICE),
        submit(client, {"task": "upscale", "payload": {"image_url": IMG}}),
        client.get("/v1/jobs", headers={"X-API-Key": "a-key-only-the-database-could-know"}),
    ):
        assert_error(response, 503, "database_unavailable")
        assert response.headers["Retry-After"] == "5"
    app.extensions["aiorch"].db.dispose()


def test_capabilities_count_a_task_served_by_a_remote_route_as_installed(
    settings: Settings, tmp_path
) -> None:
    import json

    routes = tmp_path / "routes.json"
    routes.write_text(
        json.dumps(
            {
                "providers": {
                    "zn": {"kind": "zhinian", "base_url": "https://zn.example.com", "api_key": "k"}
                },
                "routes": {"gg_image": [{"backend": "zn"}]},
            }
        )
    )
    for routed, expected in ((None, False), (routes, True)):
        app = create_app(settings.with_overrides(routes_file=routed))
        caps = {
            t["task"]: t for t in app.test_client().get("/v1/capabilities", headers=ALICE).get_json()["tasks"]
        }
        app.extensions["aiorch"].db.dispose()
        assert caps["gg_image"]["installed"] is expected
        assert caps["cx_image"]["installed"] is False  # no route for it
        assert "prompt" in {p["name"] for p in caps["gg_image"]["parameters"]}  # generate's payload
        assert caps["upscale"]["installed"] is True  # the weight-free Lanczos engine


@pytest.mark.parametrize(
    ("limit", "code"),
    [({"rate_limit_per_minute": 3}, "rate_limited"), ({"max_queued_per_client": 3}, "too_many_queued_jobs")],
)
def test_a_client_over_its_admission_limit_gets_429_with_retry_after_and_others_do_not(
    settings: Settings, limit: dict, code: str
) -> None:
    from models.jobs import Job
    from models.jobstore import new_id

    app = create_app(settings.with_overrides(**limit))
    client = app.test_client()
    db = app.extensions["aiorch"].db
    with db.session() as session:  # a fresh client of its own, so earlier tests' jobs don't count
        session.query(Job).filter(Job.client_id == "bob").delete()
    body = {"task": "upscale", "payload": {"image_url": IMG}}
    replay = {**BOB, "Idempotency-Key": new_id()}
    statuses = [submit(client, body, replay).status_code] + [
        submit(client, body, BOB).status_code for _ in "ab"
    ]
    assert statuses == [202, 202, 202]
    refused = submit(client, body, BOB)
    assert_error(refused, 429, code)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # A replay of a job already accepted creates nothing, so the limit does not refuse it.
    again = submit(client, body, replay)
    assert again.status_code == 200 and again.get_json()["reused"] is True
    db.dispose()


def test_a_body_over_the_size_cap_is_413_in_the_error_shape(client: FlaskClient, settings: Settings) -> None:
    huge = (
        b'{"task":"upscale","payload":{"image_url":"data:image/png;base64,'
        + b"A" * (settings.max_input_bytes * 2 + 1024)
        + b'"}}'
    )
    response = client.post("/v1/jobs", data=huge, headers={**ALICE, "Content-Type": "application/json"})
    assert_error(response, 413)


def test_json_sent_without_a_json_content_type_is_still_read_as_json(client: FlaskClient) -> None:
    body = b'{"task":"upscale","payload":{"image_url":"http://images.example.com/a.png"}}'
    for content_type in (None, "application/x-www-form-urlencoded"):  # curl -d's default
        headers = {**ALICE, **({"Content-Type": content_type} if content_type else {})}
        response = client.post("/v1/jobs", data=body, headers=headers)
        assert response.status_code == 202, response.get_data(as_text=True)
    assert_error(client.post("/v1/jobs", data=b"task=upscale", headers=ALICE), 422)
