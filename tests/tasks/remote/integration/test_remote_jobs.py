"""Jobs routed to remote providers, end to end: the real API and workers, the provider fakes in-process.

Each fake follows its seed document and checks auth for real; the platform reaches them through a
routes file, exactly as an operator configures it.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from config import Settings
from inference.remote import SenseTimeClient
from inference.remote.base import RemoteRef
from models.db import Database, utcnow
from models.jobs import Job
from models.jobstore import new_id
from tasks.celery_app import POLL_REMOTE, create_celery, publish
from tasks.remote.submit import submit_to_route
from tasks.runtime import Runtime
from tasks.sweeps import sweep
from tests.conftest import KEYS
from tests.fakes.aiorch_upstream_fake import UpstreamFake
from tests.fakes.common import all_running
from tests.fakes.sensetime_fake import SenseTimeFake
from tests.fakes.volcengine_fake import VolcengineFake
from tests.fakes.zhinian_fake import ZhinianFake, sign_webhook
from tests.support.platform import Platform
from tests.support.platform_fixtures import routed_platform
from tests.support.remote_providers import providers
from tests.support.servers import ImageServer

ALICE = KEYS[0][1]
ST_AK, ST_SK = "st-ak", "st-sk-0123456789abcdef0123456789abcdef"
VOLC_AK, VOLC_SK = "AKLTvolc", "volc-secret-6b1d0f2e9a7c"
REQ_KEY = "img2img_anime_accelerated_maintain_id"
ZN_KEY, ZN_SECRET = "zn-key-3f9a0c2d7e", "zn-webhook-secret-81c4e2"
UP_KEY = "up-key-0d5e7a91b3"
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
    with all_running(found):
        yield found


def routes_document(fakes: dict[str, Any]) -> dict[str, Any]:
    found = providers(fakes)  # "zn" with its webhook secret
    return {
        "poll_interval": 0.3,
        "max_poll_interval": 1,
        "providers": {
            **found,
            # The same fakes under a second name: a short read timeout, and Zhinian with no
            # webhook secret (so only polling can finish its jobs).
            "st_quick": {**found["st"], "read_timeout": 1},
            "zn_poll": {"kind": "zhinian", "base_url": fakes["zn"].url, "api_key": ZN_KEY},
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
            "remove_object": [{"backend": "st_quick", "options": {"model_id": "erase"}}, {"backend": "up"}],
            "inpaint": [{"backend": "zn_poll"}],
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
    with routed_platform(base_settings, worker_amqp_url, tmp, routes_document(fakes)) as plat:
        yield plat


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


# -- helpers for jobs written straight into the database, as a crash or a lost message leaves them


def insert_job(db: Database, **fields: Any) -> str:
    now = utcnow()
    values: dict[str, Any] = {
        "id": new_id(),
        "client_id": "alice",
        "task": "gg_image",
        "engine_task": "generate",
        "queue": "gpu.diffusion",
        "status": "queued",
        "stage": "run",
        "progress": 0,
        "priority": 0,
        "payload": {"prompt": "x"},
        "meta": {},
        "attempts": 0,
        "cancel_requested": False,
        "created_at": now,
        "queued_at": now,
        "updated_at": now,
    }
    values.update(fields)
    if values["status"] == "running" and "stage" not in fields:
        # Running at a provider: polling once its remote id is stored, submitting before.
        values["stage"] = "poll" if values.get("remote_id") else "submit"
    with db.session() as session:
        session.add(Job(**values))
    return str(values["id"])


def submits(fake: Any) -> int:
    return sum(r["endpoint"] == "submit" for r in list(fake.requests))


def st_tasks_with(fakes: dict[str, Any], prompt: str) -> int:
    return sum(t["body"].get("prompt") == prompt for t in list(fakes["st"].tasks.values()))


# -- the sweep is route-aware


def test_the_sweep_resumes_a_silent_remote_job_by_polling_it_never_by_a_local_run(
    platform: Platform, fakes: dict[str, Any], db: Database
) -> None:
    st = fakes["st"]
    with SenseTimeClient(base_url=st.url, access_key=ST_AK, secret_key=ST_SK) as client:
        remote_id = client.submit(
            "generate", {"prompt": "quiet at the provider"}, options={"model_id": "model001"}
        )
        quiet_id = client.submit("generate", {"prompt": "just polled"}, options={"model_id": "model001"})
    # Its poll chain was lost ten minutes ago (the embedded transport loses messages with a worker).
    lost_at = utcnow() - timedelta(minutes=10)
    token = new_id()
    job_id = insert_job(
        db,
        status="running",
        attempts=1,
        claim_token=token,
        backend="st",
        remote_id=remote_id,
        payload={"prompt": "quiet at the provider"},
        created_at=lost_at,
        queued_at=lost_at,
        started_at=lost_at,
        updated_at=lost_at,
    )
    # A remote job polled two minutes ago is only quiet (its polls back off): it is left alone.
    recent = utcnow() - timedelta(minutes=2)
    quiet_token = new_id()
    quiet = insert_job(
        db,
        status="running",
        attempts=1,
        claim_token=quiet_token,
        backend="st",
        remote_id=quiet_id,
        payload={"prompt": "just polled"},
        started_at=recent,
        updated_at=recent,
        next_poll_at=utcnow() + timedelta(minutes=5),
    )
    before = submits(st)
    report = sweep(Runtime(platform.settings), create_celery(platform.settings))
    assert report["recovered"] >= 1
    job = platform.wait(ALICE, job_id, timeout=30)
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "sensetime:st"
    assert job["attempts"] == 1
    assert submits(st) == before, "the sweep submitted the remote job again"
    with db.session() as session:
        left_alone = session.get(Job, quiet)
        assert left_alone is not None and left_alone.claim_token == quiet_token
        assert left_alone.status == "running"


def test_the_sweep_resends_a_lost_remote_submit_to_the_provider_not_to_a_local_engine(
    platform: Platform, fakes: dict[str, Any], db: Database
) -> None:
    settings = platform.settings.with_overrides(republish_after=0.5)
    prepared_at = utcnow() - timedelta(seconds=5)
    prompt = "lost on the way to the provider"
    job_id = insert_job(
        db,
        payload={"prompt": prompt},
        created_at=prepared_at,
        queued_at=prepared_at,
        updated_at=prepared_at,
        dispatched_at=prepared_at,
    )
    report = sweep(Runtime(settings), create_celery(settings))
    assert report["republished"] >= 1
    job = platform.wait(ALICE, job_id, timeout=30)
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "sensetime:st"
    assert st_tasks_with(fakes, prompt) == 1


def test_the_sweep_resumes_a_submit_that_went_silent_before_any_provider_accepted_the_job(
    platform: Platform, fakes: dict[str, Any], db: Database
) -> None:
    # Claimed by a submit whose retry message was lost while every backend was unavailable.
    lost_at = utcnow() - timedelta(minutes=10)
    prompt = "the submit retry was lost"
    job_id = insert_job(
        db,
        status="running",
        attempts=1,
        claim_token=new_id(),
        payload={"prompt": prompt},
        created_at=lost_at,
        queued_at=lost_at,
        started_at=lost_at,
        updated_at=lost_at,
    )
    report = sweep(Runtime(platform.settings), create_celery(platform.settings))
    assert report["recovered"] >= 1
    job = platform.wait(ALICE, job_id, timeout=30)
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "sensetime:st"
    assert job["attempts"] == 1 and st_tasks_with(fakes, prompt) == 1


# -- batched polls


def test_jobs_due_at_the_same_provider_are_looked_up_together_in_batch_calls(
    platform: Platform, fakes: dict[str, Any]
) -> None:
    st = fakes["st"]
    n = 8
    first_request, first_batch = len(st.requests), len(st.batch_sizes)
    ids = []
    for i in range(n):
        response = platform.submit(ALICE, "gg_image", {"prompt": f"batched {i}"})
        assert response.status_code == 202, response.text
        ids.append(response.json()["job_id"])
    jobs = [platform.wait(ALICE, job_id, timeout=60) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * n, jobs
    assert {j["result"]["meta"]["backend"] for j in jobs} == {"sensetime:st"}
    lookups = [r["endpoint"] for r in st.requests[first_request:] if r["endpoint"] in ("poll", "batch")]
    batch_calls = lookups.count("batch")
    assert batch_calls and max(st.batch_sizes[first_batch:]) > 1
    assert batch_calls < n
    # Every job needs three answers (PENDING, RUNNING, SUCCESS): polled one by one, 3 * n calls.
    assert len(lookups) < 3 * n, lookups


# -- providers get our own copies of the inputs


def test_a_data_uri_input_reaches_a_url_fetching_provider_as_our_public_copy(
    platform: Platform, fakes: dict[str, Any], astronaut_png: Path
) -> None:
    st = fakes["st"]
    raw = astronaut_png.read_bytes()
    st.fetch_inputs = True
    fetched_before = len(st.fetched)
    try:
        job = run(
            platform, "upscale", {"image_url": "data:image/png;base64," + base64.b64encode(raw).decode()}
        )
    finally:
        st.fetch_inputs = False
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "sensetime:st"
    [fetched] = st.fetched[fetched_before:]
    assert fetched["url"].startswith(platform.settings.public_url + "/files/")
    assert fetched["status"] == 200
    sent = Image.open(io.BytesIO(fetched["body"])).convert("RGB")
    assert sent.tobytes() == Image.open(astronaut_png).convert("RGB").tobytes()
    # The public copy is withdrawn once the job is over (just after its final write commits: a
    # client that reads the job at once may still find it for a moment).
    deadline = time.monotonic() + 5
    while requests.get(fetched["url"], timeout=5).status_code != 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests.get(fetched["url"], timeout=5).status_code == 404


def test_volcengine_gets_the_checked_input_inline_never_the_clients_url(
    platform: Platform, fakes: dict[str, Any], images: ImageServer, astronaut_png: Path, db: Database
) -> None:
    url = images.url("img/astronaut.png")
    job = run(platform, "cx_image", {"prompt": "a cat", "image_url": url, "width": 1000, "height": 800})
    assert job["status"] == "succeeded", job["error"]
    task_id = wait_for_remote_id(db, job["job_id"]).split("?")[0]
    body = fakes["volc"].tasks[task_id]["body"]
    assert "image_urls" not in body
    [inline] = body["binary_data_base64"]
    assert base64.b64decode(inline) == astronaut_png.read_bytes()


# -- fallback rules


def test_a_content_refusal_ends_rejected_and_never_falls_through_to_the_next_backend(
    platform: Platform, fakes: dict[str, Any]
) -> None:
    upstream_jobs = len(fakes["up"].jobs)
    job = run(platform, "ahv_image", {"prompt": "BLOCKED words"})
    assert job["status"] == "rejected", job
    assert job["error"]["code"] == "content_rejected" and job["result"] is None
    assert len(fakes["up"].jobs) == upstream_jobs, "the refused content was sent to the next backend"


def test_a_timeout_at_the_first_backend_falls_through_to_the_next(
    platform: Platform, fakes: dict[str, Any], images: ImageServer
) -> None:
    # st_quick reads for 1 s; the provider holds the submit for 3 s.
    fakes["st"].faults.add("slow", on="submit", seconds=3)
    image = images.url("img/astronaut.png")
    job = run(platform, "remove_object", {"image_url": image, "mask_url": image})
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "upstream:up"
    assert served_image(platform, job["result"]["url"]).size == (50, 30)


def test_a_submit_cut_off_by_its_soft_time_limit_goes_on_at_the_next_backend(
    platform: Platform, fakes: dict[str, Any], db: Database
) -> None:
    rt = Runtime(platform.settings)
    job_id = insert_job(db, task="ahv_image", payload={"prompt": "cut off at the first backend"})
    claim = rt.store.claim(job_id, redelivered=False, remote=True)  # as submit_remote claims
    job = rt.store.get(job_id)
    assert job is not None
    fakes["st"].faults.add("slow", on="submit", seconds=4)

    def soft_time_limit(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded()  # what Celery raises in a task past its soft limit

    previous = signal.signal(signal.SIGALRM, soft_time_limit)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        submit_to_route(create_celery(platform.settings), rt, job, claim, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # The cut-off submit re-published itself from the next backend; a real worker takes it there.
    done = platform.wait(ALICE, job_id, timeout=30)
    assert done["status"] == "succeeded", done
    assert done["result"]["meta"]["backend"] == "upstream:up"


# -- cancel and expiry


def test_a_cancel_during_the_submit_backoff_ends_the_job_before_another_submit(
    platform: Platform, fakes: dict[str, Any]
) -> None:
    st = fakes["st"]
    st.faults.add("rate_limit", on="submit", times=1000)
    try:
        before = submits(st)
        response = platform.submit(ALICE, "gg_image", {"prompt": "cancelled while waiting"})
        job_id = response.json()["job_id"]
        deadline = time.monotonic() + 20
        while submits(st) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert submits(st) > before, "the job was never submitted"
        cancel = requests.post(
            f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers=platform.headers(ALICE), timeout=10
        )
        assert cancel.status_code == 200 and cancel.json()["status"] == "running"
        job = platform.wait(ALICE, job_id, timeout=15)
        assert job["status"] == "cancelled", job
        tried = submits(st)
        time.sleep(2)  # longer than the longest backoff of this route (1 s)
        assert submits(st) == tried, "the cancelled job was submitted again"
    finally:
        st.faults.clear()


def test_a_volcengine_task_not_found_after_its_12_hour_lifetime_ends_the_job_expired(
    platform: Platform, db: Database
) -> None:
    submitted_at = int(time.time()) - 13 * 3600
    remote_id = str(RemoteRef("7392616336519000001", {"k": REQ_KEY, "t": str(submitted_at)}))
    token = new_id()
    job_id = insert_job(
        db,
        task="cx_image",
        status="running",
        attempts=1,
        claim_token=token,
        backend="volc",
        remote_id=remote_id,
        started_at=utcnow(),
    )
    publish(
        create_celery(platform.settings),
        POLL_REMOTE,
        job_id,
        "cpu",
        task_kwargs={"token": token, "delay": 0.3},
    )
    job = platform.wait(ALICE, job_id, timeout=20)
    assert job["status"] == "expired", job
    assert job["error"]["code"] == "expired"
    assert job["error"]["details"]["provider_code"] == "not_found"


# -- Zhinian without its webhook


def test_a_zhinian_job_finishes_through_polling_alone(
    platform: Platform, fakes: dict[str, Any], images: ImageServer, db: Database
) -> None:
    zn = fakes["zn"]
    webhooks = len(zn.webhooks_sent)
    zn.polls_to_finish = 2
    try:
        image = images.url("img/astronaut.png")
        job = run(platform, "inpaint", {"prompt": "fill the gap", "image_url": image, "mask_url": image})
    finally:
        zn.polls_to_finish = 10**9
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "zhinian:zn_poll"
    assert served_image(platform, job["result"]["url"]).size == (72, 40)
    remote = wait_for_remote_id(db, job["job_id"])
    assert not zn.jobs[remote].get("webhookUrl")
    assert len(zn.webhooks_sent) == webhooks, "a webhook, not polling, finished the job"


# -- last: what every test above logged


def test_provider_secrets_never_appear_in_the_api_or_worker_logs(platform: Platform) -> None:
    logs = "".join(path.read_text(errors="replace") for path in sorted(platform.logs.glob("*.log")))
    assert "submitted to st as" in logs  # the logs do cover the remote work
    for secret in (ST_SK, VOLC_SK, ZN_KEY, ZN_SECRET, UP_KEY):
        assert secret not in logs
