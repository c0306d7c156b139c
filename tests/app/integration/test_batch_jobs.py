"""A batch through the real API, RabbitMQ, Celery workers and Postgres: one POST, one confirmed
publish of all its messages, every job run to the end, the batch's status read back."""

from __future__ import annotations

import base64
import io
import time

import requests
from PIL import Image

from tests.conftest import KEYS
from tests.support.platform import Platform

ALICE = KEYS[0][1]
BOB = KEYS[1][1]


def tiny_png(seed: int) -> str:
    image = Image.new("RGB", (16, 16), ((seed * 37) % 256, (seed * 91) % 256, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_batch_of_tiny_upscale_jobs_all_succeed_and_the_batch_says_so(platform: Platform) -> None:
    jobs = [
        {"task": "upscale", "payload": {"image_url": tiny_png(n), "scale": 2}, "metadata": {"n": n}}
        for n in range(20)
    ]
    jobs.insert(5, {"task": "upscale", "payload": {"scale": 2}})  # refused alone: no image_url
    response = requests.post(
        f"{platform.base_url}/v1/jobs/batch", json={"jobs": jobs}, headers=platform.headers(ALICE), timeout=30
    )
    assert response.status_code == 200, response.text
    body = response.json()
    batch_id, entries = body["batch_id"], body["jobs"]
    assert entries[5]["error"]["code"] == "invalid_payload"
    created = [entry for entry in entries if "job_id" in entry]
    assert [entry["metadata"]["n"] for entry in created] == list(range(20))

    finished = [platform.wait(ALICE, entry["job_id"], timeout=60) for entry in created]
    assert [job["status"] for job in finished] == ["succeeded"] * 20, [j["error"] for j in finished]
    assert all(job["result"]["meta"]["width"] == 32 and job["batch_id"] == batch_id for job in finished)

    status: dict = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the status reads the same rows; no lag expected
        status = requests.get(
            f"{platform.base_url}/v1/batches/{batch_id}", headers=platform.headers(ALICE), timeout=10
        ).json()
        if status.get("progress") == 100:
            break
        time.sleep(0.1)
    assert status["total"] == 20 and status["counts"] == {"succeeded": 20}
    assert status["progress"] == 100 and status["eta_utc"] is None
    listed = requests.get(
        f"{platform.base_url}/v1/jobs?batch_id={batch_id}&limit=200",
        headers=platform.headers(ALICE),
        timeout=10,
    ).json()["jobs"]
    assert {job["job_id"] for job in listed} == {entry["job_id"] for entry in created}
    other = requests.get(
        f"{platform.base_url}/v1/batches/{batch_id}", headers=platform.headers(BOB), timeout=10
    )
    assert other.status_code == 404
