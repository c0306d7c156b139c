"""One shape per object at the API: the OpenAPI document describes exactly what the views send
(the job object, an asset, a delivery attempt), and every error's ``details`` is an object that
names what was wrong, in words that show no internal class. Through Flask's test client on the
run's Postgres and RabbitMQ (unit vhost), like tests/app/test_api.py."""

from __future__ import annotations

import io
import re
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from marshmallow import Schema

from app import create_app
from app.assets import AssetSchema, asset_object
from app.jobs import delivery_object
from app.schemas import DeliverySchema, JobSchema
from config import Settings
from models.db import utcnow
from models.jobs import Job, StoredFile, WebhookDelivery
from models.public import job_object
from tasks.inputs import Fetcher, InputProblem, TransientFetchError
from tests.conftest import KEYS

ALICE = {"X-API-Key": KEYS[0][1]}
IMG = "http://images.example.com/a.png"
# Only ``POST /v1/jobs`` (and the blocking endpoints' replays) say whether a job was reused, and
# (only when its priority was lowered to the client's max_priority) what it asked for.
CREATE_ONLY = {"reused", "requested_priority"}


@pytest.fixture
def client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["aiorch"].db.dispose()


@pytest.fixture
def spec(client: FlaskClient) -> dict[str, Any]:
    return client.get("/v1/openapi.json").get_json()


def documented(spec: dict[str, Any], name: str) -> set[str]:
    return set(spec["components"]["schemas"][name]["properties"])


def finished_job() -> Job:
    """A job with every column that feeds the job object set (a finished, delivered one)."""
    now = utcnow()
    return Job(
        id="a" * 32,
        client_id="alice",
        task="upscale",
        engine_task="upscale",
        queue="gpu.superres",
        status="succeeded",
        stage="done",
        progress=100,
        priority=3,
        payload={"image_url": IMG},
        meta={"order": 7},
        webhook_url="https://hooks.example.com/x",
        result={"ok": True, "status": "succeeded", "url": "u", "filename": "f", "meta": {}},
        error=None,
        attempts=1,
        predict_time=2.5,
        created_at=now,
        queued_at=now,
        started_at=now + timedelta(seconds=1),
        finished_at=now + timedelta(seconds=3),
        updated_at=now,
        expires_at=now + timedelta(days=1),
    )


def assert_same_shape(schema: Schema, documented_fields: set[str], built: dict[str, Any]) -> None:
    assert set(built) == documented_fields, (
        f"documented only: {sorted(documented_fields - set(built))}; "
        f"sent only: {sorted(set(built) - documented_fields)}"
    )
    # The types agree too: what the view sends loads through the schema that documents it.
    assert schema.validate(built) == {}


def test_the_openapi_job_schema_has_exactly_the_fields_of_the_job_object(spec: dict[str, Any]) -> None:
    assert_same_shape(JobSchema(), documented(spec, "Job") - CREATE_ONLY, job_object(finished_job()))
    assert documented(spec, "Job") >= CREATE_ONLY


def test_the_openapi_asset_schema_has_exactly_the_fields_of_an_asset(spec: dict[str, Any]) -> None:
    row = StoredFile(
        name="n" * 32 + ".png",
        asset_id="b" * 32,
        kind="upload",
        client_id="alice",
        filename="cat.png",
        content_type="image/png",
        size=10,
        width=4,
        height=3,
        created_at=utcnow(),
        expires_at=utcnow(),
    )
    assert_same_shape(AssetSchema(), documented(spec, "Asset"), asset_object(row))


def test_the_openapi_delivery_schema_has_exactly_the_fields_of_a_delivery(spec: dict[str, Any]) -> None:
    row = WebhookDelivery(
        id=1,
        job_id="a" * 32,
        event_id="c" * 32,
        event="job.finished",
        attempt=2,
        url="https://hooks.example.com/x",
        status_code=500,
        error="HTTP 500",
        duration_ms=12.5,
        ok=False,
        created_at=utcnow(),
        next_retry_at=utcnow(),
    )
    assert_same_shape(DeliverySchema(), documented(spec, "Delivery"), delivery_object(row))


def refs_of(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs_of(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs_of(value)


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}/cancel", "post"),
        ("/upscale", "post"),
        ("/stats", "get"),
    ],
)
def test_every_response_that_carries_jobs_documents_the_one_job_schema(
    spec: dict[str, Any], path: str, method: str
) -> None:
    success = {k: v for k, v in spec["paths"][path][method]["responses"].items() if k.startswith("2")}
    refs = set(refs_of(success))
    for ref in list(refs):  # one level of wrapping: a list, or /stats' overview
        refs |= set(refs_of(spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]))
    assert "#/components/schemas/Job" in refs, success


def test_every_job_the_api_sends_has_the_documented_fields(client: FlaskClient, spec: dict[str, Any]) -> None:
    fields = documented(spec, "Job")
    created = client.post("/v1/jobs", json={"task": "upscale", "payload": {"image_url": IMG}}, headers=ALICE)
    # requested_priority only when the priority asked for was lowered (tests/app/test_client_limits.py).
    assert created.status_code == 202 and set(created.get_json()) == fields - {"requested_priority"}
    job_id = created.get_json()["job_id"]
    sent = [
        client.get(f"/v1/jobs/{job_id}", headers=ALICE).get_json(),
        *client.get(f"/v1/jobs?ids={job_id}", headers=ALICE).get_json()["jobs"],
        *client.get("/stats", headers=ALICE).get_json()["recent"][:1],
        client.post(f"/v1/jobs/{job_id}/cancel", headers=ALICE).get_json(),
    ]
    assert len(sent) == 4
    for job in sent:
        assert set(job) == fields - CREATE_ONLY


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert isinstance(error["details"], dict), error
    return error


def post_raw(client: FlaskClient, path: str, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return client.post(
        path, data=body, headers={**ALICE, "Content-Type": "application/json", **(headers or {})}
    )


@pytest.mark.parametrize("path", ["/v1/jobs", "/upscale", "/v1/assets"])
@pytest.mark.parametrize(
    "body", [b"{not json", b"[]", b'"upscale"', b"null", b"[" * 40 + b"]" * 40], ids=repr
)
def test_a_body_that_is_no_json_object_answers_details_naming_the_body(
    client: FlaskClient, path: str, body: bytes
) -> None:
    response = post_raw(client, path, body)
    assert response.status_code in (400, 422), response.get_data(as_text=True)
    error = error_of(response, response.status_code)
    assert set(error["details"]) == {"body"} and all(isinstance(m, str) for m in error["details"]["body"])


def test_a_malformed_json_body_is_a_400_whose_details_is_an_object(client: FlaskClient) -> None:
    # webargs says ``{"json": ["Invalid JSON body."]}``: a list once its location is dropped.
    error = error_of(post_raw(client, "/v1/jobs", b"{not json"), 400)
    assert error["details"] == {"body": ["Invalid JSON body."]}


@pytest.mark.parametrize(
    ("request_args", "status", "field"),
    [
        ({"method": "GET", "path": "/v1/jobs?status=bogus"}, 422, "status"),
        ({"method": "GET", "path": "/v1/jobs?surprise=1"}, 422, "surprise"),
        ({"method": "GET", "path": "/v1/models?size=0"}, 422, "size"),
        ({"method": "GET", "path": "/v1/assets?limit=0"}, 422, "limit"),
        ({"method": "POST", "path": "/v1/jobs", "json": {"payload": {}}}, 422, "task"),
        ({"method": "POST", "path": "/v1/jobs", "json": {"task": "upscale", "payload": []}}, 422, "payload"),
        ({"method": "POST", "path": "/v1/assets", "json": {"url": "ftp://x/a.png"}}, 422, "url"),
        (
            {
                "method": "POST",
                "path": "/v1/jobs",
                "json": {"task": "upscale", "payload": {"image_url": IMG}},
                "headers": {"Idempotency-Key": "k" * 300},
            },
            400,
            "Idempotency-Key",
        ),
    ],
)
def test_every_input_error_names_its_field_in_an_object(
    client: FlaskClient, request_args: dict[str, Any], status: int, field: str
) -> None:
    args = dict(request_args)
    args["headers"] = {**ALICE, **args.get("headers", {})}
    error = error_of(client.open(**args), status)
    assert field in error["details"], error


# A class's repr (``_PinnedHTTPConnection(host=...)``, ``RemoteDisconnected('...')``), an object's
# address, the ssl module's C source line, errno numbers: what only this process would understand.
INTERNAL = re.compile(
    r"\b_?[A-Z][A-Za-z]*[a-z][A-Z][A-Za-z]*\(|\w*(Error|Exception)\(|object at 0x|_ssl\.c|Errno"
)


def serve(answer: bytes | None) -> int:
    """A loopback TCP server that answers every connection with ``answer`` and closes it, or, for
    None, closes at once without a word; the port."""
    server = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                if answer is not None:
                    conn.sendall(answer)

    threading.Thread(target=run, daemon=True).start()
    return server.getsockname()[1]


def test_network_failures_are_described_without_internal_class_names(settings: Settings) -> None:
    fetcher = Fetcher(settings.with_overrides(fetch_timeout=2.0))
    refused = "http://127.0.0.1:1/a.png"  # nothing listens on port 1
    short = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    urls = {
        refused: "refused",
        "https://127.0.0.1:1/a.png": "refused",
        f"http://127.0.0.1:{serve(None)}/a.png": "closed",
        f"http://127.0.0.1:{short}/a.png": "ended",
        f"https://127.0.0.1:{short}/a.png": "TLS",  # a plain HTTP server spoken to over TLS
    }
    for url, says in urls.items():
        with pytest.raises((InputProblem, TransientFetchError)) as caught:
            fetcher.load(url, "image_url")
        message = str(caught.value)
        assert says in message and not INTERNAL.search(message), message


def test_an_unreachable_url_answers_an_error_without_internal_class_names(client: FlaskClient) -> None:
    response = client.post("/v1/assets", json={"url": "http://127.0.0.1:1/a.png"}, headers=ALICE)
    error = error_of(response, 422)
    assert error["code"] == "input_unreachable" and "url" in error["details"]
    assert "refused" in error["message"] and not INTERNAL.search(error["message"]), error


def test_an_upload_with_a_part_of_no_readable_name_is_a_422_naming_it(client: FlaskClient) -> None:
    # werkzeug reads a part name with a line break in it as None (this was a 500).
    data = {"\n": "x", "file": (io.BytesIO(b"not an image"), "a.png")}
    response = client.post("/v1/assets", data=data, headers=ALICE, content_type="multipart/form-data")
    assert error_of(response, 422)["details"] == {
        "(unnamed part)": ["unknown field; send images as parts named file"]
    }
