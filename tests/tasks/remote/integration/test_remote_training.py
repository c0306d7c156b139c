"""``train_lora`` routed to SenseTime's LoRA training, end to end: the real API and workers, a
SenseTime fake that follows seed 001 section 10 (and downloads the images it is sent, as the real
service does).

A module of its own: its platform runs workers under the same names as the default one, so the two
cannot run at once.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from aiorch.watch import parse_events
from config import Settings
from inference.remote.base import RemoteRef
from models.db import Database
from tests.conftest import KEYS
from tests.fakes.common import all_running, image_bytes
from tests.fakes.sensetime_fake import NO_HUMAN_MESSAGE, SenseTimeFake
from tests.support.platform import Platform
from tests.support.platform_fixtures import routed_platform
from tests.support.remote_providers import providers
from tests.tasks.remote.integration.test_remote_jobs import submits, wait_for_remote_id

ALICE = KEYS[0][1]
ST_AK, ST_SK = "st-ak", "st-sk-0123456789abcdef0123456789abcdef"
# Four distinct pictures, inline: the provider must get our public copies of them.
IMAGES = [
    "data:image/png;base64," + base64.b64encode(image_bytes(size=(96, 96), seed=i)).decode() for i in range(4)
]
TRAIN = {"images": IMAGES, "trigger_word": "zxq style", "base_model": "model001", "name": "zxq"}


@pytest.fixture(scope="module")
def sensetime() -> Iterator[SenseTimeFake]:
    fake = SenseTimeFake(keys={ST_AK: ST_SK}, clock=time.time)  # type: ignore[arg-type]
    with all_running({"st": fake}):
        yield fake


@pytest.fixture
def st(sensetime: SenseTimeFake) -> SenseTimeFake:
    sensetime.reset()
    sensetime.fetch_inputs = True
    return sensetime


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings,
    worker_amqp_url: str,
    sensetime: SenseTimeFake,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Platform]:
    routes = {
        "poll_interval": 0.3,
        "max_poll_interval": 1,
        "providers": providers({"st": sensetime}),
        "routes": {"train_lora": [{"backend": "st", "options": {"main_object": "Human"}}]},
    }
    with routed_platform(base_settings, worker_amqp_url, tmp_path_factory.mktemp("training"), routes) as plat:
        yield plat


@pytest.fixture(scope="module")
def db(platform: Platform) -> Iterator[Database]:
    database = Database(platform.settings)
    yield database
    database.dispose()


def submit(platform: Platform, payload: dict[str, Any]) -> str:
    response = platform.submit(ALICE, "train_lora", payload)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def changes(platform: Platform, job_id: str) -> list[dict[str, Any]]:
    """Every job object the job's log holds (its stream resumed from the start), once it is final."""
    response = requests.get(
        f"{platform.base_url}/v1/jobs/{job_id}/events",
        headers={**platform.headers(ALICE), "Last-Event-ID": "0"},
        stream=True,
        timeout=(5, 30),
    )
    assert response.status_code == 200, response.text
    return [json.loads(event.data) for event in parse_events(response.iter_content(chunk_size=None))]


def task_of(db: Database, job_id: str) -> str:
    return RemoteRef.parse(wait_for_remote_id(db, job_id)).id


def test_train_lora_at_sensetime_reports_its_progress_and_ends_with_the_providers_lora_id(
    platform: Platform, st: SenseTimeFake, db: Database
) -> None:
    job_id = submit(platform, TRAIN)
    job = platform.wait(ALICE, job_id, timeout=45)
    assert job["status"] == "succeeded", job
    task_id = task_of(db, job_id)
    result = job["result"]
    # The LoRA stays at SenseTime: its id there, and no model of our store (nor a file).
    assert result["provider_model_id"] == f"lora-{task_id}"
    assert "model_id" not in result and "files" not in result
    assert result["meta"]["backend"] == "sensetime:st" and job["progress"] == 100
    # The training_progress of each poll moved the job's progress, with the fraction beside it.
    running = [j for j in changes(platform, job_id) if j["status"] == "running" and j["progress"] > 0]
    assert [j["progress"] for j in running] == [25, 50, 75], running
    assert [j["progress_detail"] for j in running] == [{"training_progress": f} for f in (0.25, 0.5, 0.75)]
    # SenseTime got seed 001's training request, with our checked copies of the images, which it
    # downloaded itself.
    body = st.tasks[task_id]["body"]
    assert body["base_model_id"] == "model001" and body["trigger_word"] == "zxq style"
    assert body["model_name"] == "zxq" and body["main_object"] == "Human"
    assert len(body["images"]) == 4
    assert all(url.startswith(platform.settings.public_url + "/files/") for url in body["images"])
    assert [f["status"] for f in st.fetched] == [200] * 4


def test_cancelling_a_training_that_waits_at_sensetime_cancels_it_there(
    platform: Platform, st: SenseTimeFake, db: Database
) -> None:
    st.lora_pending_polls = 10**6  # it waits in SenseTime's queue until cancelled
    job_id = submit(platform, TRAIN)
    task_id = task_of(db, job_id)
    cancel = requests.post(
        f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers=platform.headers(ALICE), timeout=10
    )
    assert cancel.status_code == 200 and cancel.json()["status"] == "running"
    job = platform.wait(ALICE, job_id, timeout=15)
    assert job["status"] == "cancelled", job
    assert st.cancels == [{"task_id": task_id, "state": "PENDING", "success": True}]
    assert st.tasks[task_id]["state"] == "CANCELLED"


def test_cancelling_a_running_training_ends_the_job_though_sensetime_goes_on(
    platform: Platform, st: SenseTimeFake, db: Database
) -> None:
    st.lora_running_polls = 10**6  # it trains until the end of time
    job_id = submit(platform, TRAIN)
    task_id = task_of(db, job_id)
    platform.wait(ALICE, job_id, timeout=15, statuses={"running"})
    deadline = time.monotonic() + 15
    while platform.job(ALICE, job_id)["progress"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    requests.post(f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers=platform.headers(ALICE), timeout=10)
    job = platform.wait(ALICE, job_id, timeout=15)
    assert job["status"] == "cancelled", job
    # The cancel reached /v1/lora/cancel; the seed cancels only a waiting training, so SenseTime
    # said no, and our job is cancelled all the same (nobody waits for that LoRA any more).
    assert st.cancels == [{"task_id": task_id, "state": "RUNNING", "success": False}]


def test_a_training_that_fails_at_sensetime_fails_the_job_with_the_providers_reason(
    platform: Platform, st: SenseTimeFake
) -> None:
    job_id = submit(platform, {**TRAIN, "trigger_word": "NO-HUMAN landscape"})
    job = platform.wait(ALICE, job_id, timeout=30)
    assert job["status"] == "failed", job
    error = job["error"]
    assert error["code"] == "remote_failed"
    assert error["message"] == f"SenseTime's LoRA training failed: {NO_HUMAN_MESSAGE}"
    assert error["details"] == {"provider": "st", "provider_code": "FAILED"}
    assert job["result"] is None


def test_a_field_sensetime_cannot_express_fails_the_job_by_name_before_anything_is_sent(
    platform: Platform, st: SenseTimeFake
) -> None:
    job_id = submit(platform, {**TRAIN, "steps": 3000})
    job = platform.wait(ALICE, job_id, timeout=30)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "invalid_input"
    assert job["error"]["details"] == {"field": "steps"} and "steps" in job["error"]["message"]
    assert submits(st) == 0
