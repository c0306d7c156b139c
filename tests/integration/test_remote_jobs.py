"""Jobs routed to remote providers, end to end: the real API and workers, the provider fakes in-process.

Each fake follows its seed document and checks auth for real; the platform reaches them through a
routes file, exactly as an operator configures it.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from config import Settings
from models.db import Database
from tests.conftest import KEYS
from tests.fakes.aiorch_upstream_fake import UpstreamFake
from tests.fakes.sensetime_fake import SenseTimeFake
from tests.fakes.volcengine_fake import VolcengineFake
from tests.fakes.zhinian_fake import ZhinianFake, sign_webhook
from tests.integration.conftest import platform_settings
from tests.support.platform import Platform
from tests.support.servers import ImageServer

pytestmark = pytest.mark.integration
ALICE = KEYS[0][1]
ST_AK, ST_SK = "st-ak", "st-sk-0123456789abcdef0123456789abcdef"
VOLC_AK, VOLC_SK = "AKLTvolc", "volc-secret"
REQ_KEY = "img2img_anime_accelerated_maintain_id"
ZN_KEY, ZN_SECRET = "zn-key", "zn-webhook-secret"
UP_KEY = "up-key"
WEBHOOK = "/v1/providers/zhinian/webhook"


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    # The fakes check token lifetimes and request dates against their clock: a live one here.
    found: dict[str, Any] = {
        "st": SenseTimeFake(keys={ST_AK: ST_SK}, clock=time.time),  # type: ignore[arg-type]
        "volc": VolcengineFake(keys={VOLC_AK: VOLC_SK}, req_keys=(REQ_KEY,), clock=time.time),  # type: ignore[arg-type]
        "zn": ZhinianFake(api_keys={"aiorch": ZN_KEY}, webhook_secret=ZN_SECRET, clock=time.time),  # type: ignore[arg-type]
        "up": UpstreamFake(api_keys={UP_KEY: "aiorch"}, clock=time.time),  # type: ignore[arg-type]
        "slow": UpstreamFake(api_keys={UP_KEY: "aiorch"}, clock=time.time),  # type: ignore[arg-type]
    }
    # "slow" never finishes a job; "zn" finishes only when a test says so (then it sends the webhook).
    found["slow"].polls_to_finish = 10**9
    found["zn"].polls_to_finish = 10**9
    with contextlib.ExitStack() as stack:
        for fake in found.values():
            stack.enter_context(fake.running())
        yield found


def routes_document(fakes: dict[str, Any]) -> dict[str, Any]:
    return {
        "poll_interval": 0.3,
        "max_poll_interval": 1,
        "providers": {
            "st": {
                "kind": "sensetime",
                "base_url": fakes["st"].url,
                "access_key": ST_AK,
                "secret_key": ST_SK,
            },
            "volc": {
                "kind": "volcengine",
                "base_url": fakes["volc"].url,
                "access_key": VOLC_AK,
                "secret_key": VOLC_SK,
            },
            "zn": {
                "kind": "zhinian",
                "base_url": fakes["zn"].url,
                "api_key": ZN_KEY,
                "webhook_secret": ZN_SECRET,
            },
            "up": {"kind": "upstream", "base_url": fakes["up"].url, "api_key": UP_KEY},
            "slow": {"kind": "upstream", "base_url": fakes["slow"].url, "api_key": UP_KEY},
        },
        "routes": {
            "gg_image": [{"backend": "st", "task": "generate", "options": {"model_id": "model001"}}],
            "cx_image": [{"backend": "volc", "task": "generate", "options": {"req_key": REQ_KEY}}],
            "ahv_image": [
                {"backend": "st", "options": {"model_id": "model001"}},
                {"backend": "up", "task": "generate"},
            ],
            "upscale": [{"backend": "st", "options": {"model_id": "sr"}}, {"backend": "local"}],
            # The regular poll comes late, so only the webhook can finish these jobs in time.
            "generate": {"backends": [{"backend": "zn"}], "poll_interval": 60, "max_poll_interval": 60},
            "outpaint": {"backends": [{"backend": "slow"}], "timeout": 2},
            "remove_background": [{"backend": "slow"}],
        },
    }


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings,
    worker_amqp_url: str,
    fakes: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("remote")
    routes = tmp / "routes.json"
    routes.write_text(json.dumps(routes_document(fakes)))
    plat = Platform(
        platform_settings(base_settings, tmp, broker_url=worker_amqp_url, routes_file=routes), tmp / "logs"
    )
    try:
        plat.start_api()
        plat.start_workers()
        yield plat
    finally:
        plat.stop()


@pytest.fixture(scope="module")
def db(platform: Platform) -> Iterator[Database]:
    database = Database(platform.settings)
    yield database
    database.dispose()


def run(platform: Platform, task: str, payload: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    response = platform.submit(ALICE, task, payload)
    assert response.status_code == 202, response.text
    return platform.wait(ALICE, response.json()["job_id"], timeout=timeout)


def wait_for_remote_id(db: Database, job_id: str, timeout: float = 20) -> str:
    from models.jobs import Job

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as session:
            job = session.get(Job, job_id)
            if job is not None and job.remote_id:
                return job.remote_id
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} was never submitted to a provider")


def served_image(platform: Platform, url: str) -> Image.Image:
    assert url.startswith(platform.base_url + "/files/"), url
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def test_gg_image_routed_to_sensetime_succeeds_with_our_own_file_url(
    platform: Platform, fakes: dict[str, Any], db: Database
) -> None:
    job = run(platform, "gg_image", {"prompt": "a red fox, gg"})
    assert job["status"] == "succeeded", job
    assert job["task"] == "gg_image" and job["attempts"] == 1
    meta = job["result"]["meta"]
    assert meta["backend"] == "sensetime:st" and meta["seed"] == 1000
    assert served_image(platform, job["result"]["url"]).size == (meta["width"], meta["height"]) == (64, 48)
    task_id = wait_for_remote_id(db, job["job_id"]).split("?")[0]
    assert fakes["st"].tasks[task_id]["body"]["prompt"] == "a red fox, gg"


def test_volcengine_base64_result_is_stored_and_a_risk_code_is_rejected(platform: Platform) -> None:
    done = run(platform, "cx_image", {"prompt": "a cat", "width": 1000, "height": 800})
    assert done["status"] == "succeeded", done
    assert done["result"]["meta"]["backend"] == "volcengine:volc"
    assert served_image(platform, done["result"]["url"]).size == (100, 80)

    refused = run(platform, "cx_image", {"prompt": "BLOCKED words"})
    assert refused["status"] == "rejected", refused
    assert refused["error"]["code"] == "content_rejected" and refused["result"] is None


def test_an_unavailable_first_provider_falls_through_to_the_next_backend(
    platform: Platform, fakes: dict[str, Any], images: ImageServer
) -> None:
    submits_before = sum(r["endpoint"] == "submit" for r in fakes["st"].requests)
    fakes["st"].faults.add("server_error", on="submit")
    upstream = run(platform, "ahv_image", {"prompt": "a lighthouse"})
    assert upstream["status"] == "succeeded", upstream
    assert upstream["result"]["meta"]["backend"] == "upstream:up"
    assert served_image(platform, upstream["result"]["url"]).size == (50, 30)

    # A rate limit falls through to "local": the same job runs on the GPU queue's engine.
    fakes["st"].faults.add("rate_limit", on="submit")
    local = run(platform, "upscale", {"image_url": images.url("img/astronaut.png"), "scale": 2})
    assert local["status"] == "succeeded", local
    assert local["result"]["meta"]["backend"] == "lanczos"
    assert served_image(platform, local["result"]["url"]).size == (192, 192)
    assert sum(r["endpoint"] == "submit" for r in fakes["st"].requests) == submits_before + 2


def test_a_provider_that_never_finishes_fails_the_job_at_its_deadline(
    platform: Platform, fakes: dict[str, Any], images: ImageServer, db: Database
) -> None:
    started = time.monotonic()
    job = run(platform, "outpaint", {"image_url": images.url("img/astronaut.png"), "ratio": 1.5})
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "provider_timeout"
    assert 2 <= time.monotonic() - started < 15
    # The abandoned remote job was cancelled at the provider, which supports it.
    remote = wait_for_remote_id(db, job["job_id"])
    assert fakes["slow"].jobs[remote]["status"] == "cancelled"


def test_cancelling_a_job_running_at_a_provider_cancels_it_there_too(
    platform: Platform, fakes: dict[str, Any], images: ImageServer, db: Database
) -> None:
    response = platform.submit(ALICE, "remove_background", {"image_url": images.url("img/astronaut.png")})
    job_id = response.json()["job_id"]
    remote = wait_for_remote_id(db, job_id)
    cancel = requests.post(
        f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers=platform.headers(ALICE), timeout=10
    )
    assert cancel.status_code == 200 and cancel.json()["status"] == "running"
    job = platform.wait(ALICE, job_id, timeout=15)
    assert job["status"] == "cancelled", job
    assert fakes["slow"].jobs[remote]["status"] == "cancelled"


def test_a_signed_zhinian_webhook_finishes_the_job_and_a_bad_signature_is_401(
    platform: Platform, fakes: dict[str, Any], db: Database
) -> None:
    zn = fakes["zn"]
    response = platform.submit(ALICE, "generate", {"prompt": "a quiet harbour"})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    remote = wait_for_remote_id(db, job_id)
    assert zn.jobs[remote]["webhookUrl"] == platform.settings.public_url + WEBHOOK

    url = platform.base_url + WEBHOOK
    forged = json.dumps(
        {"event": "generation.succeeded", "job": {"id": remote, "status": "succeeded"}}
    ).encode()
    bad = requests.post(url, data=forged, headers={"X-Zhinian-Signature": "sha256=" + "0" * 64}, timeout=5)
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_signature"
    unsigned = requests.post(url, data=forged, timeout=5)
    assert unsigned.status_code == 401
    assert platform.job(ALICE, job_id)["status"] == "running"

    with zn.lock:
        zn._finish(zn.jobs[remote], "succeeded")  # the fake signs and POSTs its webhook to us
    assert zn.webhooks_sent[-1]["url"] == platform.settings.public_url + WEBHOOK
    job = platform.wait(ALICE, job_id, timeout=15)
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "zhinian:zn"
    assert served_image(platform, job["result"]["url"]).size == (72, 40)

    # A genuine event for a job that is no longer running is acknowledged and changes nothing.
    raw = zn.webhooks_sent[-1]["body"]
    again = requests.post(
        url, data=raw, headers={"X-Zhinian-Signature": sign_webhook(ZN_SECRET, raw)}, timeout=5
    )
    assert again.status_code == 200 and again.json() == {"status": "ignored"}


def test_a_worker_killed_between_submit_and_poll_finishes_the_job_after_restart(
    platform: Platform, fakes: dict[str, Any], db: Database
) -> None:
    st = fakes["st"]
    st.polls_to_finish = 6
    try:
        response = platform.submit(ALICE, "gg_image", {"prompt": "survives a crash"})
        job_id = response.json()["job_id"]
        wait_for_remote_id(db, job_id)
        platform.kill("cpu")
        assert platform.job(ALICE, job_id)["status"] == "running"
        platform.start_worker("cpu", "cpu", 2)
        job = platform.wait(ALICE, job_id, timeout=45)
    finally:
        st.polls_to_finish = 2
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1
    submitted = [t for t in st.tasks.values() if t["body"].get("prompt") == "survives a crash"]
    assert len(submitted) == 1, "the restarted worker submitted the job a second time"
