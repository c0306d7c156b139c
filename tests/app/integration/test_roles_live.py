"""Roles through the real API, workers, RabbitMQ and Postgres: an admin key (stored in the database,
as ``aiorch keys create NAME --admin`` makes one) reads and cancels another client's running job and
sees it, with its client, in ``/diag/backends``, where a client key gets 404 and sees nothing of it;
no ``/v1/models`` entry shows a path; ``/metrics`` answers the admin key only."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from models.db import Database
from models.keys import KeyRing
from tests.conftest import KEYS
from tests.support.platform import Platform

ALICE = KEYS[0][1]
BOB = KEYS[1][1]


@pytest.fixture(scope="module")
def admin_key(platform: Platform) -> Iterator[str]:
    db = Database(platform.settings)
    _row, key = KeyRing(db).create(f"ops-{uuid.uuid4().hex[:8]}", "roles test", admin=True)
    yield key
    db.dispose()


def get(platform: Platform, path: str, key: str | None) -> requests.Response:
    headers = {"X-API-Key": key} if key else {}
    return requests.get(f"{platform.base_url}{path}", headers=headers, timeout=10)


def active(platform: Platform, key: str) -> list[dict[str, Any]]:
    response = get(platform, "/diag/backends", key)
    assert response.status_code == 200, response.text
    return list(response.json()["workers"])


def test_an_admin_key_reads_and_cancels_another_clients_running_job_and_a_client_key_cannot(
    platform: Platform, admin_key: str
) -> None:
    job_id = platform.submit(ALICE, "debug_sleep", {"seconds": 60}).json()["job_id"]
    running = platform.wait(admin_key, job_id, statuses={"running"})  # read with the admin key
    assert running["job_id"] == job_id

    for response in (
        get(platform, f"/v1/jobs/{job_id}", BOB),
        requests.post(f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers={"X-API-Key": BOB}, timeout=10),
        requests.delete(f"{platform.base_url}/v1/jobs/{job_id}", headers={"X-API-Key": BOB}, timeout=10),
    ):
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
    listed = get(platform, f"/v1/jobs?ids={job_id}", BOB).json()["jobs"]
    assert listed == []
    assert get(platform, f"/v1/jobs?client=alice&ids={job_id}", BOB).status_code == 403
    assert [
        j["job_id"] for j in get(platform, f"/v1/jobs?client=alice&ids={job_id}", admin_key).json()["jobs"]
    ] == [job_id]

    # The workers report the job; the admin sees whose it is, alice her own job, bob nothing of it.
    deadline = time.monotonic() + 15
    workers = active(platform, admin_key)
    while not any(job_id in w["active_jobs"] for w in workers):
        assert time.monotonic() < deadline, workers
        time.sleep(0.5)
        workers = active(platform, admin_key)
    busy = next(w for w in workers if job_id in w["active_jobs"])
    assert busy["active_clients"][job_id] == "alice"
    assert any(job_id in w["active_jobs"] for w in active(platform, ALICE))
    for_bob = active(platform, BOB)
    assert job_id not in str(for_bob) and "alice" not in str(for_bob)
    assert all("active_clients" not in w for w in for_bob)

    cancel = requests.post(
        f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers={"X-API-Key": admin_key}, timeout=10
    )
    assert cancel.status_code == 200, cancel.text
    ended = platform.wait(ALICE, job_id, timeout=30)
    assert ended["status"] == "cancelled"
    assert (
        requests.delete(
            f"{platform.base_url}/v1/jobs/{job_id}", headers={"X-API-Key": admin_key}, timeout=10
        ).status_code
        == 204
    )
    assert get(platform, f"/v1/jobs/{job_id}", ALICE).status_code == 404
    assert get(platform, f"/v1/jobs/{job_id}", admin_key).status_code == 404


def test_stats_count_every_client_for_the_admin_key_only(platform: Platform, admin_key: str) -> None:
    platform.submit(BOB, "debug_sleep", {"seconds": 0}).json()
    assert "by_client" in get(platform, "/stats", admin_key).json()["counts"]
    assert get(platform, "/stats", admin_key).json()["counts"]["by_client"].get("bob", 0) >= 1
    own = get(platform, "/stats", ALICE).json()
    assert "by_client" not in own["counts"] and "bob" not in str(own)


def test_models_and_readiness_show_no_filesystem_path(platform: Platform, admin_key: str) -> None:
    folders = [
        str(platform.settings.var_dir),
        str(platform.settings.models_dir),
        str(platform.settings.storage_dir),
    ]
    for key in (ALICE, admin_key):
        response = get(platform, "/v1/models", key)
        assert response.status_code == 200
        entries = response.json()["data"]
        assert entries and all("path" not in entry for entry in entries)
        assert not any(folder in response.text for folder in folders)
    for path in ("/readyz", "/diag/backends", "/stats"):
        text = get(platform, path, admin_key).text
        assert not any(folder in text for folder in folders), path


def test_metrics_answer_the_admin_key_only(platform: Platform, admin_key: str) -> None:
    assert get(platform, "/metrics", None).status_code == 401
    refused = get(platform, "/metrics", ALICE)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only"
    scraped = get(platform, "/metrics", admin_key)
    assert scraped.status_code == 200 and "aiorch_jobs_finished" in scraped.text
