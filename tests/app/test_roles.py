"""Roles (contract v1.1) through Flask's test client, on the run's real Postgres and RabbitMQ (unit
vhost): an admin key reads, lists, cancels and deletes any client's job and sees every client in
``/stats`` and ``/diag/backends``; a client key sees nothing of other clients anywhere; no response
shows a filesystem path; ``/metrics`` answers admin keys only unless ``AIORCH_METRICS_PUBLIC=1``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from flask.testing import FlaskClient

from app import create_app
from app.management.backends import as_seen_by
from config import Settings
from config.settings import SettingsError
from inference.base import EngineError
from models.db import Database
from models.keys import Caller, KeyRing
from tasks.failures import failure_of
from tests.conftest import KEYS

ALICE = {"X-API-Key": KEYS[0][1]}
BOB = {"Authorization": f"Bearer {KEYS[1][1]}"}
OPS_KEY = "ops-admin-key-0123456789"
OPS = {"X-API-Key": OPS_KEY}
IMG = "http://images.example.com/a.png"


def make_client(settings: Settings) -> FlaskClient:
    return create_app(settings).test_client()


@pytest.fixture
def admin_settings(settings: Settings) -> Settings:
    return settings.with_overrides(admin_keys=(("ops", OPS_KEY),))


@pytest.fixture
def client(admin_settings: Settings) -> Iterator[FlaskClient]:
    test_client = make_client(admin_settings)
    yield test_client
    test_client.application.extensions["aiorch"].db.dispose()


def submit(client: FlaskClient, headers: dict[str, str], **extra: Any) -> str:
    response = client.post(
        "/v1/jobs", json={"task": "upscale", "payload": {"image_url": IMG}, **extra}, headers=headers
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    return str(response.get_json()["job_id"])


def new_client(client: FlaskClient, admin: bool = False) -> tuple[str, dict[str, str]]:
    """A client of its own (and its key), so lists and counts see only this test's jobs."""
    name = f"c{uuid.uuid4().hex[:12]}"
    _, key = client.application.extensions["aiorch"].keyring.create(name, admin=admin)
    return name, {"X-API-Key": key}


def error_code(response: Any, status: int) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    return str(response.get_json()["error"]["code"])


# -- jobs -----------------------------------------------------------------------------------------


def test_an_admin_key_reads_cancels_and_deletes_another_clients_job_a_client_key_gets_404(
    client: FlaskClient,
) -> None:
    job_id = submit(client, ALICE)
    for attempt in (
        client.get(f"/v1/jobs/{job_id}", headers=BOB),
        client.post(f"/v1/jobs/{job_id}/cancel", headers=BOB),
        client.delete(f"/v1/jobs/{job_id}", headers=BOB),
        client.get(f"/v1/jobs/{job_id}/deliveries", headers=BOB),
    ):
        assert error_code(attempt, 404) == "job_not_found"
    assert client.get(f"/v1/jobs/{job_id}", headers=ALICE).get_json()["status"] == "queued"

    read = client.get(f"/v1/jobs/{job_id}", headers=OPS)
    assert read.status_code == 200 and read.get_json()["job_id"] == job_id
    assert client.get(f"/v1/jobs/{job_id}/deliveries", headers=OPS).get_json() == {"deliveries": []}
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=OPS)
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job_id}", headers=ALICE).get_json()["status"] == "cancelled"
    assert client.delete(f"/v1/jobs/{job_id}", headers=OPS).status_code == 204
    assert error_code(client.get(f"/v1/jobs/{job_id}", headers=ALICE), 404) == "job_not_found"


def test_an_admin_gets_404_for_a_job_that_does_not_exist(client: FlaskClient) -> None:
    missing = uuid.uuid4().hex
    assert error_code(client.get(f"/v1/jobs/{missing}", headers=OPS), 404) == "job_not_found"
    assert error_code(client.post(f"/v1/jobs/{missing}/cancel", headers=OPS), 404) == "job_not_found"
    assert error_code(client.delete(f"/v1/jobs/{missing}", headers=OPS), 404) == "job_not_found"


def test_an_admin_lists_every_clients_jobs_or_one_clients_with_the_client_filter(client: FlaskClient) -> None:
    carol, carol_key = new_client(client)
    dave, dave_key = new_client(client)
    carols = {submit(client, carol_key) for _ in range(2)}
    daves = {submit(client, dave_key)}

    def listed(query: str, headers: dict[str, str] = OPS) -> set[str]:
        response = client.get(f"/v1/jobs?{query}", headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)
        # Read with the stdlib: every client's jobs include other tests' deliberately deep metadata,
        # which the app's own (request) parser would refuse.
        return {job["job_id"] for job in json.loads(response.get_data())["jobs"]}

    assert listed(f"client={carol}") == carols
    assert listed(f"client={dave}") == daves
    # Without ?client=, every client's jobs (newest first: this test's are the latest).
    assert listed("limit=200") >= carols | daves
    ids = ",".join([*carols, *daves])
    assert listed(f"ids={ids}") == carols | daves
    assert listed(f"ids={ids}&client={dave}") == daves
    assert listed("client=nobody-has-this-name") == set()


def test_a_client_key_lists_only_its_own_jobs_and_may_not_name_another_client(client: FlaskClient) -> None:
    carol, carol_key = new_client(client)
    dave, dave_key = new_client(client)
    carols = {submit(client, carol_key)}
    daves = {submit(client, dave_key)}
    ids = ",".join([*carols, *daves])
    mine = client.get(f"/v1/jobs?ids={ids}", headers=carol_key).get_json()["jobs"]
    assert {job["job_id"] for job in mine} == carols
    own = client.get(f"/v1/jobs?client={carol}", headers=carol_key)
    assert own.status_code == 200 and {job["job_id"] for job in own.get_json()["jobs"]} == carols
    refused = client.get(f"/v1/jobs?client={dave}", headers=carol_key)
    assert error_code(refused, 403) == "admin_only"
    assert "client" in refused.get_json()["error"]["details"]


def test_an_admin_cancels_another_clients_jobs_by_ids_and_by_batch_a_client_cancels_none(
    client: FlaskClient,
) -> None:
    _, carol_key = new_client(client)
    loose = [submit(client, carol_key) for _ in range(2)]
    batch = client.post(
        "/v1/jobs/batch",
        json={"jobs": [{"task": "upscale", "payload": {"image_url": IMG}} for _ in range(3)]},
        headers=carol_key,
    ).get_json()
    batch_id = batch["batch_id"]

    by_bob = client.post("/v1/jobs/cancel", json={"ids": loose}, headers=BOB).get_json()
    assert by_bob == {"cancelled": 0, "already_final": 0}
    by_bob_batch = client.post("/v1/jobs/cancel", json={"batch_id": batch_id}, headers=BOB)
    assert error_code(by_bob_batch, 404) == "batch_not_found"
    assert error_code(client.get(f"/v1/batches/{batch_id}", headers=BOB), 404) == "batch_not_found"

    assert client.get(f"/v1/batches/{batch_id}", headers=OPS).get_json()["counts"] == {"queued": 3}
    by_ops = client.post("/v1/jobs/cancel", json={"ids": loose}, headers=OPS).get_json()
    assert by_ops == {"cancelled": 2, "already_final": 0}
    whole = client.post("/v1/jobs/cancel", json={"batch_id": batch_id}, headers=OPS).get_json()
    assert whole == {"cancelled": 3, "already_final": 0}
    statuses = {client.get(f"/v1/jobs/{job_id}", headers=carol_key).get_json()["status"] for job_id in loose}
    assert statuses == {"cancelled"}
    assert client.get(f"/v1/batches/{batch_id}", headers=carol_key).get_json()["counts"] == {"cancelled": 3}


def test_an_admin_key_acts_for_its_own_client_when_it_submits(client: FlaskClient) -> None:
    ops_client, ops_key = new_client(client, admin=True)
    job_id = submit(client, ops_key)
    listed = client.get(f"/v1/jobs?client={ops_client}", headers=ops_key).get_json()["jobs"]
    assert [job["job_id"] for job in listed] == [job_id]
    assert error_code(client.get(f"/v1/jobs/{job_id}", headers=BOB), 404) == "job_not_found"


# -- operators' views -----------------------------------------------------------------------------


def test_stats_show_a_client_only_its_own_jobs_and_an_admin_every_client(client: FlaskClient) -> None:
    carol, carol_key = new_client(client)
    dave, dave_key = new_client(client)
    carols = {submit(client, carol_key) for _ in range(2)}
    submit(client, dave_key)

    own = client.get("/stats", headers=carol_key).get_json()
    assert {job["job_id"] for job in own["recent"]} == carols
    assert own["counts"]["total"] == 2 and own["counts"]["by_status"] == {"queued": 2}
    assert "by_client" not in own["counts"] and dave not in str(own)

    every = json.loads(client.get("/stats", headers=OPS).get_data())  # as above: other tests' deep metadata
    by_client = every["counts"]["by_client"]
    assert by_client[carol] == 2 and by_client[dave] == 1
    assert every["counts"]["total"] == sum(by_client.values())
    assert len(every["recent"]) >= 3


def test_diag_backends_show_a_client_its_own_running_jobs_and_an_admin_all_with_their_client(
    client: FlaskClient, db: Database
) -> None:
    carol, carol_key = new_client(client)
    dave, dave_key = new_client(client)
    carols, daves = submit(client, carol_key), submit(client, dave_key)
    # The workers' answer as collect_backends caches it: every client's job ids, and a non-job
    # task's argument (a list) beside them.
    diag = {
        "workers": [
            {"name": "gpu@h", "busy": 3, "active_jobs": [carols, daves, ["not", "a", "job"]]},
            {"name": "cpu@h", "busy": 0, "active_jobs": []},
        ],
        "checked_at": time.time(),
    }
    for_carol = as_seen_by(diag, db, carol)
    assert for_carol["workers"][0]["active_jobs"] == [carols] and for_carol["workers"][0]["busy"] == 3
    assert daves not in str(for_carol) and dave not in str(for_carol)
    assert "active_clients" not in for_carol["workers"][0]
    for_admin = as_seen_by(diag, db, None)
    assert for_admin["workers"][0]["active_jobs"] == diag["workers"][0]["active_jobs"]
    assert for_admin["workers"][0]["active_clients"] == {carols: carol, daves: dave}
    assert diag["workers"][0]["active_jobs"] == [carols, daves, ["not", "a", "job"]]  # the cache is kept
    # Through the endpoint: no worker answers on the unit vhost, and it still takes a key.
    assert client.get("/diag/backends").status_code == 401
    assert client.get("/diag/backends", headers=carol_key).get_json()["workers"] == []


def test_metrics_answer_an_admin_key_only(client: FlaskClient) -> None:
    assert error_code(client.get("/metrics"), 401) == "unauthorized"
    assert error_code(client.get("/metrics", headers=ALICE), 403) == "admin_only"
    scraped = client.get("/metrics", headers=OPS)
    assert scraped.status_code == 200 and scraped.mimetype == "text/plain"
    assert b"aiorch_jobs_finished" in scraped.data


def test_metrics_are_public_with_metrics_public(admin_settings: Settings) -> None:
    public = make_client(admin_settings.with_overrides(metrics_public=True))
    try:
        scraped = public.get("/metrics")
        assert scraped.status_code == 200 and b"aiorch_queue_depth" in scraped.data
        assert public.get("/metrics", headers=ALICE).status_code == 200
        assert public.get("/stats").status_code == 401  # only /metrics opens
    finally:
        public.application.extensions["aiorch"].db.dispose()


def test_the_spec_says_metrics_needs_a_key_and_documents_the_403(client: FlaskClient) -> None:
    operation = client.get("/v1/openapi.json").get_json()["paths"]["/metrics"]["get"]
    assert operation.get("security") != []
    assert {"401", "403"} <= set(operation["responses"])
    listing = client.get("/v1/openapi.json").get_json()["paths"]["/v1/jobs"]["get"]
    assert "client" in {parameter["name"] for parameter in listing["parameters"]}
    assert "403" in listing["responses"]


# -- keys -----------------------------------------------------------------------------------------


def test_admin_keys_come_from_settings_and_the_database_and_a_jwt_has_its_keys_role(
    admin_settings: Settings, db: Database
) -> None:
    ring = KeyRing(db, admin_settings.api_keys, admin_settings.admin_keys)
    assert ring.caller_for(OPS_KEY) == Caller("ops", admin=True)
    assert ring.caller_for(KEYS[0][1]) == Caller("alice", admin=False)
    assert ring.client_for(OPS_KEY) == "ops"
    row, key = ring.create("ops-db", jwt_auth=True, admin=True)
    assert ring.caller_for(key) == Caller("ops-db", admin=True)
    token = jwt.encode(
        {"iss": row.access_key, "exp": int(time.time()) + 600}, str(row.secret_key), algorithm="HS256"
    )
    assert ring.caller_for(token) == Caller("ops-db", admin=True)
    plain, plain_key = ring.create("plain-db", jwt_auth=True)
    assert ring.caller_for(plain_key) == Caller("plain-db", admin=False)
    plain_token = jwt.encode(
        {"iss": plain.access_key, "exp": int(time.time()) + 600}, str(plain.secret_key), algorithm="HS256"
    )
    assert ring.caller_for(plain_token) == Caller("plain-db", admin=False)
    assert ring.revoke(row.id) and ring.caller_for(key) is None


def test_admin_keys_and_metrics_public_are_read_from_the_environment() -> None:
    env = {"AIORCH_API_KEYS": "a:key-a", "AIORCH_ADMIN_KEYS": " ops:key-ops , ops2:key-ops2 "}
    settings = Settings.from_env(env)
    assert settings.admin_keys == (("ops", "key-ops"), ("ops2", "key-ops2"))
    assert settings.metrics_public is False
    assert Settings.from_env({**env, "AIORCH_METRICS_PUBLIC": "1"}).metrics_public is True
    with pytest.raises(SettingsError, match="AIORCH_ADMIN_KEYS entry 1 must look like client:key"):
        Settings.from_env({"AIORCH_ADMIN_KEYS": "just-a-key"})
    with pytest.raises(SettingsError, match="AIORCH_ADMIN_KEYS entry 2 is also a key of AIORCH_API_KEYS"):
        Settings.from_env({"AIORCH_API_KEYS": "a:shared", "AIORCH_ADMIN_KEYS": "x:other,ops:shared"})
    with pytest.raises(SettingsError, match="AIORCH_METRICS_PUBLIC"):
        Settings.from_env({"AIORCH_METRICS_PUBLIC": "maybe"})


# -- no filesystem paths --------------------------------------------------------------------------


@pytest.fixture
def sr_weights(tmp_path: Path) -> Path:
    import torch

    from tests.inference.tiny_vision import TinyRRDBNet, save_sr_checkpoint

    torch.manual_seed(0)
    (tmp_path / "weights").mkdir()
    return save_sr_checkpoint(TinyRRDBNet(scale=2), tmp_path / "weights" / "RealESRGAN_x2plus.pth")


def test_models_show_no_path_of_the_model_store_or_of_a_file_outside_it(
    admin_settings: Settings, tmp_path: Path, sr_weights: Path
) -> None:
    from tasks.model_registry import add_model

    models = admin_settings.with_overrides(models_dir=tmp_path / "models")
    inside = models.models_dir / "sr" / "inside.pth"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(sr_weights.read_bytes())
    add_model(models, str(inside), "inside", None)  # stored relative to the store
    add_model(models, str(sr_weights), "outside", None)  # stored absolute
    test_client = make_client(models)
    try:
        for headers in (ALICE, OPS):
            response = test_client.get("/v1/models", headers=headers)
            entries = {entry["id"]: entry for entry in response.get_json()["data"]}
            assert {"inside", "outside", "lanczos"} <= set(entries)
            assert all("path" not in entry for entry in entries.values())
            text = response.get_data(as_text=True)
            for shown in (str(tmp_path), "RealESRGAN_x2plus.pth", "sr/inside.pth"):
                assert shown not in text, shown
            assert entries["outside"]["tasks"] == ["upscale"] and entries["outside"]["size_bytes"] > 0
    finally:
        test_client.application.extensions["aiorch"].db.dispose()


def test_an_engine_error_naming_a_file_shows_its_name_never_its_folders() -> None:
    missing = EngineError(
        "super-resolution model file not found: /srv/aiorch/models/sr/x4.pth", code="model_not_found"
    )
    failure = failure_of(missing)
    assert failure.message == "super-resolution model file not found: x4.pth"
    onnx = EngineError("cannot load a.onnx: Load model from /tmp/m/a.onnx failed", code="model_invalid")
    assert "/tmp" not in failure_of(onnx).message
    # URLs and fractions in an engine's sentence are left alone.
    kept = "could not read http://images.example.com/a/b.png at 1/2 scale"
    assert failure_of(EngineError(kept)).message == kept


def test_readyz_and_errors_show_no_path(client: FlaskClient, admin_settings: Settings) -> None:
    folders = (str(admin_settings.var_dir), str(admin_settings.storage_dir), str(admin_settings.models_dir))
    answers = [
        client.get("/readyz"),
        client.get("/v1/jobs/" + "f" * 32, headers=ALICE),
        client.get("/files/nope.png"),
        client.post("/v1/jobs", json={"task": "upscale", "payload": {"model": "x"}}, headers=ALICE),
        client.get("/stats", headers=OPS),
    ]
    for response in answers:
        text = response.get_data(as_text=True)
        assert not any(folder in text for folder in folders), text[:300]
