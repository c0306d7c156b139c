"""Webhooks, blocking endpoints and the operators' endpoints against a real worker fleet."""

from __future__ import annotations

import ast
import base64
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from app.management.backends import DIAG_CACHE_SECONDS
from config import Settings
from tasks.celery_app import DELIVER, FINISH, create_celery, publish
from tasks.runtime import Runtime
from tasks.sweeps import sweep
from tests.conftest import KEYS
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform
from tests.support.servers import ImageServer, Received, WebhookReceiver
from tests.support.worker_events import worker_events

ALICE = KEYS[0][1]
BOB = KEYS[1][1]
H = {"X-API-Key": ALICE}
# /metrics answers admin keys only (AIORCH_ADMIN_KEYS; AIORCH_METRICS_PUBLIC is off here).
ADMIN = ("ops", "ops-admin-key-0123456789")
# The operator's master: each client's first secret derives from it; no client ever sees it.
SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
SEED_FIELDS = [
    "event",
    "event_id",
    "ts",
    "job_id",
    "task",
    "status",
    "progress",
    "ok",
    "created_at",
    "created_at_ms",
    "queued_at",
    "queued_at_ms",
    "started_at",
    "started_at_ms",
    "finished_at",
    "finished_at_ms",
    "duration",
    "predict_time",
    "eta_utc",
    "result",
    "error",
    "predictTime",
]


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("ops")
    settings = platform_settings(
        base_settings,
        tmp,
        broker_url=worker_amqp_url,
        webhook_secret=SECRET,
        webhook_timeout=1.0,
        webhook_retry_base=0.5,
        sync_timeout=3.0,
        admin_keys=(ADMIN,),
    )
    with running_platform(settings, tmp) as plat:
        yield plat


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    rec = WebhookReceiver().start()
    yield rec
    rec.stop()


def client_secret(platform: Platform, key: str) -> str:
    """The caller's signing secret, as a client configures its receiver with it."""
    response = requests.get(f"{platform.base_url}/v1/webhooks/secret", headers={"X-API-Key": key}, timeout=5)
    assert response.status_code == 200, response.text
    assert SECRET[6:] not in response.text
    return str(response.json()["secret"])


def verifies(secret: str, hit: Received) -> bool:
    try:
        Webhook(secret).verify(hit.body, {k.lower(): v for k, v in hit.headers.items()})
    except WebhookVerificationError:
        return False
    return True


def deliveries(platform: Platform, job_id: str) -> list[dict]:
    return requests.get(f"{platform.base_url}/v1/jobs/{job_id}/deliveries", headers=H, timeout=5).json()[
        "deliveries"
    ]


def test_finished_webhook_has_the_seed_body_and_a_standard_signature(
    platform: Platform, images: ImageServer, receiver: WebhookReceiver
) -> None:
    job_id = platform.submit(
        ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}, webhook_url=receiver.url
    ).json()["job_id"]
    job = platform.wait(ALICE, job_id)
    [hit] = receiver.wait_for(1)
    secret = client_secret(platform, ALICE)
    payload = Webhook(secret).verify(hit.body, {k.lower(): v for k, v in hit.headers.items()})
    assert list(payload)[: len(SEED_FIELDS) - 1] == SEED_FIELDS[:-1] and "predictTime" in payload
    assert payload["event"] == "job.finished" and len(payload["event_id"]) == 32
    assert hit.headers["webhook-id"] == payload["event_id"]
    assert payload["predictTime"] == payload["predict_time"] == job["predict_time"]
    for name in ("job_id", "status", "result", "finished_at", "duration", "ok"):
        assert payload[name] == job[name]
    tampered = hit.body.replace(b"succeeded", b"failed")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, {k.lower(): v for k, v in hit.headers.items()})


# -- a signing secret per client -------------------------------------------------------------------


def test_each_client_verifies_its_own_webhooks_and_another_clients_forgery_fails(
    platform: Platform, images: ImageServer, receiver: WebhookReceiver
) -> None:
    alice, bob = client_secret(platform, ALICE), client_secret(platform, BOB)
    assert len({alice, bob, SECRET}) == 3
    url = images.url("img/astronaut.png")
    hers = platform.submit(ALICE, "upscale", {"image_url": url}, webhook_url=receiver.url).json()["job_id"]
    # Bob points his own job's webhook at alice's receiver: the platform signs it, but with
    # bob's secret, which alice's receiver does not hold.
    his = platform.submit(BOB, "upscale", {"image_url": url}, webhook_url=receiver.url).json()["job_id"]
    hits = {hit.json()["job_id"]: hit for hit in receiver.wait_for(2)}
    assert verifies(alice, hits[hers]) and not verifies(alice, hits[his])
    assert verifies(bob, hits[his]) and not verifies(bob, hits[hers])
    assert not any(verifies(SECRET, hit) for hit in hits.values())  # the master signs nothing


def test_after_a_rotation_a_delivery_carries_both_signatures(
    platform: Platform, images: ImageServer, receiver: WebhookReceiver
) -> None:
    old = client_secret(platform, BOB)
    rotated = requests.post(
        f"{platform.base_url}/v1/webhooks/secret/rotate", headers={"X-API-Key": BOB}, timeout=5
    )
    assert rotated.status_code == 200 and SECRET[6:] not in rotated.text
    new = rotated.json()["secret"]
    assert new != old and client_secret(platform, BOB) == new
    platform.submit(BOB, "upscale", {"image_url": images.url("img/astronaut.png")}, webhook_url=receiver.url)
    [hit] = receiver.wait_for(1)
    assert len(hit.headers["webhook-signature"].split(" ")) == 2  # v1,<new> v1,<old>
    assert verifies(new, hit) and verifies(old, hit)
    assert not verifies(client_secret(platform, ALICE), hit)


@contextlib.contextmanager
def flower_view(settings: Settings) -> Iterator[list[dict[str, Any]]]:
    """The task events the workers send, as Flower receives and shows them (``args`` and
    ``kwargs`` are the messages' ``argsrepr`` and ``kwargsrepr``)."""
    events: list[dict[str, Any]] = []

    def keep(event: dict[str, Any]) -> None:
        if event.get("type") == "task-received":
            events.append(event)

    with worker_events(create_celery(settings), keep):
        yield events


def test_webhook_task_messages_show_flower_ids_only_never_bodies_or_urls(
    platform: Platform, images: ImageServer
) -> None:
    failing = WebhookReceiver(plan=lambda n: 500 if n <= 2 else 204).start()
    try:
        with flower_view(platform.settings) as events:
            job_id = platform.submit(
                ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}, webhook_url=failing.url
            ).json()["job_id"]
            job = platform.wait(ALICE, job_id)
            failing.wait_for(3, timeout=30)
            requests.post(f"{platform.base_url}/v1/jobs/{job_id}/deliveries/redeliver", headers=H, timeout=5)
            failing.wait_for(4)
            time.sleep(1.0)  # the last task-received event trails its delivery
        shown = [e for e in events if e.get("name") == DELIVER and job_id in e["args"]]
        # Two retries and the redelivery (the first attempt runs inside the finish task).
        assert len(shown) >= 3
        body = failing.received[0].body.decode()
        for event in shown:
            assert ast.literal_eval(event["args"]) == [job_id]
            kwargs = ast.literal_eval(event["kwargs"])
            assert set(kwargs) <= {"event_id", "attempt", "manual", "deferrals"}
            assert kwargs["event_id"] == failing.received[0].headers["webhook-id"]
            for leak in (failing.url, job["result"]["url"], body, "job.finished"):
                assert leak not in repr(event)
    finally:
        failing.stop()


def test_failing_receiver_is_retried_with_the_same_id_and_every_attempt_logged(
    platform: Platform, images: ImageServer
) -> None:
    receiver = WebhookReceiver(plan=lambda n: 500 if n <= 2 else 204).start()
    try:
        job_id = platform.submit(
            ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}, webhook_url=receiver.url
        ).json()["job_id"]
        hits = receiver.wait_for(3, timeout=30)
        assert len({h.headers["webhook-id"] for h in hits}) == 1
        assert len({h.body for h in hits}) == 1  # the same event, byte for byte
        time.sleep(0.5)
        log = deliveries(platform, job_id)
        assert [(d["attempt"], d["status_code"], d["ok"]) for d in log] == [
            (1, 500, False),
            (2, 500, False),
            (3, 204, True),
        ]
        assert all(d["duration_ms"] is not None for d in log)
        # Redeliver sends the same event again.
        again = requests.post(
            f"{platform.base_url}/v1/jobs/{job_id}/deliveries/redeliver", headers=H, timeout=5
        )
        assert again.status_code == 202 and again.json()["event_id"] == hits[0].headers["webhook-id"]
        assert receiver.wait_for(4)[-1].headers["webhook-id"] == hits[0].headers["webhook-id"]
    finally:
        receiver.stop()


def test_a_hanging_receiver_times_out_and_does_not_hold_up_gpu_work(
    platform: Platform, images: ImageServer
) -> None:
    receiver = WebhookReceiver(plan=lambda n: "hang" if n == 1 else 200, hang_seconds=5).start()
    try:
        first = platform.submit(
            ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}, webhook_url=receiver.url
        ).json()["job_id"]
        platform.wait(ALICE, first)
        started = time.monotonic()
        other = platform.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}).json()[
            "job_id"
        ]
        assert platform.wait(ALICE, other)["status"] == "succeeded"
        assert time.monotonic() - started < 5
        receiver.wait_for(2, timeout=20)
        time.sleep(0.3)
        log = deliveries(platform, first)
        assert log[0]["ok"] is False and "timed out" in log[0]["error"].lower()
        assert log[-1]["ok"] is True
    finally:
        receiver.stop()


def test_a_dead_receiver_does_not_delay_another_clients_webhook(
    platform: Platform, images: ImageServer
) -> None:
    # Twelve of alice's jobs point at a receiver that never answers in time (1 s timeout, two cpu
    # slots): sent one by one, their attempts alone would hold the cpu queue for six seconds or
    # more. The per-receiver circuit breaker stops that after a couple of timeouts.
    dead = WebhookReceiver(plan=lambda n: "hang", hang_seconds=20).start()
    healthy = WebhookReceiver().start()
    try:
        url = images.url("img/astronaut.png")
        hung = [
            platform.submit(ALICE, "upscale", {"image_url": url}, webhook_url=dead.url).json()["job_id"]
            for _ in range(12)
        ]
        for job_id in hung:
            platform.wait(ALICE, job_id)
        bob = platform.submit(KEYS[1][1], "upscale", {"image_url": url}, webhook_url=healthy.url).json()
        [hit] = healthy.wait_for(1, timeout=30)
        delay = hit.at - hit.json()["finished_at_ms"] / 1000
        assert hit.json()["job_id"] == bob["job_id"]
        assert delay < 3.5, f"bob's webhook waited {delay:.1f}s behind a dead receiver"
        assert len(dead.received) < 12  # most of alice's events are held back, not sent
        time.sleep(0.3)
        log = deliveries(platform, hung[0]) + deliveries(platform, hung[-1])
        assert all(not d["ok"] for d in log)
    finally:
        dead.stop()
        healthy.stop()


def test_a_resent_finish_keeps_its_webhook_id_and_is_not_delivered_twice(
    platform: Platform, images: ImageServer, receiver: WebhookReceiver
) -> None:
    job_id = platform.submit(
        ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}, webhook_url=receiver.url
    ).json()["job_id"]
    platform.wait(ALICE, job_id)
    [hit] = receiver.wait_for(1)
    # The same finish message again, as after a redelivery of an unacked finish_job.
    publish(create_celery(platform.settings), FINISH, job_id, "cpu")
    time.sleep(2.0)
    assert len(receiver.received) == 1
    again = requests.post(f"{platform.base_url}/v1/jobs/{job_id}/deliveries/redeliver", headers=H, timeout=5)
    resent = receiver.wait_for(2)[-1]
    assert resent.headers["webhook-id"] == hit.headers["webhook-id"] == again.json()["event_id"]


def test_progress_events_only_when_asked(platform: Platform, receiver: WebhookReceiver) -> None:
    platform.submit(
        ALICE,
        "debug_sleep",
        {"seconds": 1.6},
        webhook_url=receiver.url,
        webhook_events=["job.started", "job.progress"],
    )
    hits = receiver.wait_for(3, timeout=20)
    deadline = time.monotonic() + 10
    while hits[-1].json()["event"] != "job.finished" and time.monotonic() < deadline:
        time.sleep(0.1)
        hits = list(receiver.received)
    events = [h.json()["event"] for h in hits]
    assert events[0] == "job.started" and events[-1] == "job.finished" and "job.progress" in events
    stamps = [h.json()["ts"] for h in hits if h.json()["event"] == "job.progress"]
    assert len(stamps) <= 5  # at most one per 500 ms over ~1.6 s

    plain = WebhookReceiver().start()
    try:
        platform.submit(ALICE, "debug_sleep", {"seconds": 0.8}, webhook_url=plain.url)
        plain.wait_for(1, timeout=20)
        time.sleep(0.5)
        assert [h.json()["event"] for h in plain.received] == ["job.finished"]
    finally:
        plain.stop()


def test_blocking_endpoint_returns_the_final_job(platform: Platform, images: ImageServer) -> None:
    response = requests.post(
        f"{platform.base_url}/upscale",
        json={"image_url": images.url("img/astronaut.png"), "scale": 2},
        headers=H,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded" and job["result"]["meta"]["width"] == 192


def test_blocking_endpoint_times_out_with_504_and_the_job_goes_on(
    platform: Platform, images: ImageServer
) -> None:
    started = time.monotonic()
    response = requests.post(
        f"{platform.base_url}/upscale", json={"image_url": images.url("slow/big.png")}, headers=H, timeout=30
    )
    assert response.status_code == 504
    assert 2.5 < time.monotonic() - started < 10
    job_id = response.json()["error"]["details"]["job_id"]
    assert platform.job(ALICE, job_id)["status"] in ("queued", "running")
    requests.post(f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers=H, timeout=5)


def test_a_job_deleted_while_its_blocking_request_waits_answers_404_at_once(
    platform: Platform, images: ImageServer
) -> None:

    answers: list[requests.Response] = []
    waiting = threading.Thread(
        target=lambda: answers.append(
            requests.post(
                f"{platform.base_url}/upscale",
                json={"image_url": images.url("slow/big.png")},
                headers=H,
                timeout=30,
            )
        )
    )
    waiting.start()
    deadline = time.monotonic() + 10
    job_id = None
    while job_id is None and time.monotonic() < deadline:
        listed = requests.get(f"{platform.base_url}/v1/jobs?limit=1", headers=H, timeout=5).json()["jobs"]
        if listed and listed[0]["status"] in ("queued", "running") and listed[0]["metadata"].get("blocking"):
            job_id = listed[0]["job_id"]
        time.sleep(0.05)
    assert job_id is not None
    deleted = time.monotonic()
    assert requests.delete(f"{platform.base_url}/v1/jobs/{job_id}", headers=H, timeout=5).status_code == 204
    waiting.join(timeout=10)
    assert answers and answers[0].status_code == 404, answers and answers[0].text
    assert answers[0].json()["error"]["code"] == "job_not_found"
    assert time.monotonic() - deleted < 1.5  # woken by the delete, not by the sync timeout (3 s)


def test_blocking_endpoints_for_missing_engines_say_which_task(platform: Platform) -> None:
    response = requests.post(
        f"{platform.base_url}/ahv/image", json={"prompt": "a cat"}, headers=H, timeout=10
    )
    assert response.status_code == 501
    assert "ahv_image" in response.json()["error"]["message"]
    assert requests.post(f"{platform.base_url}/upscale", json={}, headers=H, timeout=10).status_code == 422
    assert requests.post(f"{platform.base_url}/upscale", json={}, timeout=10).status_code == 401


def test_stats_and_backends_see_the_real_workers(platform: Platform, images: ImageServer) -> None:
    platform.wait(
        ALICE,
        platform.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}).json()["job_id"],
    )
    stats = requests.get(f"{platform.base_url}/stats", headers=H, timeout=10).json()
    assert stats["counts"]["by_status"]["succeeded"] >= 1 and stats["recent"]
    assert set(stats["queues"]) >= {"cpu", "gpu.superres"} and all(
        isinstance(v, int) for v in stats["queues"].values()
    )
    sleeper = platform.submit(ALICE, "debug_sleep", {"seconds": 4}).json()["job_id"]
    platform.wait(ALICE, sleeper, statuses={"running"})
    time.sleep(DIAG_CACHE_SECONDS)  # let an earlier test's cached answer age out
    asked = time.time()
    diag = requests.get(f"{platform.base_url}/diag/backends", headers=H, timeout=10).json()
    cached_started = time.monotonic()
    cached = requests.get(f"{platform.base_url}/diag/backends", headers=H, timeout=10).json()
    assert cached["checked_at"] == diag["checked_at"] and time.monotonic() - cached_started < 0.5
    by_name = {w["name"]: w for w in diag["workers"]}
    assert set(by_name) == {"cpu@test", "gpu@test"}
    busy = [w for w in diag["workers"] if sleeper in w["active_jobs"]]
    assert len(busy) == 1 and busy[0]["busy"] >= 1
    assert all(abs(w["last_heartbeat"] - asked) < 5 for w in diag["workers"])
    assert by_name["cpu@test"]["queues"] == ["cpu"] and by_name["cpu@test"]["concurrency"] == 2
    assert "gpu.superres" in by_name["gpu@test"]["queues"] and by_name["gpu@test"]["concurrency"] == 1
    assert by_name["gpu@test"]["last_heartbeat"] is not None
    assert by_name["gpu@test"]["devices"] and by_name["gpu@test"]["devices"][0]["device"] == "cpu"


def scrape(platform: Platform) -> dict[str, Any]:
    response = requests.get(f"{platform.base_url}/metrics", headers={"X-API-Key": ADMIN[1]}, timeout=10)
    assert response.status_code == 200, response.text
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    """One sample's value, 0 where the series does not exist yet."""
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return 0.0


def test_metrics_count_jobs_through_the_workers_and_deleting_them_lowers_nothing(
    platform: Platform, images: ImageServer, receiver: WebhookReceiver
) -> None:
    def figures() -> tuple[float, ...]:
        families = scrape(platform)
        return (
            sample(
                families,
                "aiorch_jobs_finished",
                "aiorch_jobs_finished_total",
                task="upscale",
                status="succeeded",
            ),
            sample(
                families, "aiorch_job_duration_seconds", "aiorch_job_duration_seconds_count", task="upscale"
            ),
            sample(families, "aiorch_webhook_attempts", "aiorch_webhook_attempts_total", outcome="success"),
        )

    assert requests.get(f"{platform.base_url}/metrics", timeout=10).status_code == 401
    assert requests.get(f"{platform.base_url}/metrics", headers=H, timeout=10).status_code == 403
    before = figures()
    job_id = platform.submit(
        ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}, webhook_url=receiver.url
    ).json()["job_id"]
    platform.wait(ALICE, job_id)
    receiver.wait_for(1)
    deadline = time.monotonic() + 10  # the attempt is counted as its delivery row commits
    while (after := figures()) != (
        before[0] + 1,
        before[1] + 1,
        before[2] + 1,
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after == (before[0] + 1, before[1] + 1, before[2] + 1)
    families = scrape(platform)
    assert {
        "aiorch_jobs",
        "aiorch_jobs_finished",
        "aiorch_job_duration_seconds",
        "aiorch_job_predict_time_seconds",
        "aiorch_job_queue_wait_seconds",
        "aiorch_webhook_attempts",
        "aiorch_queue_depth",
    } <= set(families)
    assert families["aiorch_jobs_finished"].type == "counter"
    assert all(s.labels["status"] in ("queued", "running") for s in families["aiorch_jobs"].samples)
    buckets = [
        s
        for s in families["aiorch_job_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["task"] == "upscale"
    ]
    assert buckets[-1].labels["le"] == "+Inf" and float(buckets[-1].value) >= 1
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)  # cumulative
    assert "600.0" in {b.labels["le"] for b in buckets}  # buckets reach GPU-scale minutes
    # Counters never go down: deleting the job (its row, events and deliveries) leaves them.
    assert requests.delete(f"{platform.base_url}/v1/jobs/{job_id}", headers=H, timeout=10).status_code == 204
    assert figures() == after


def test_capabilities_and_models(platform: Platform) -> None:
    caps = requests.get(f"{platform.base_url}/v1/capabilities", headers=H, timeout=10).json()["tasks"]
    upscale = next(t for t in caps if t["task"] == "upscale")
    assert upscale["installed"] is True and upscale["queue"] == "gpu.superres"
    assert {p["name"] for p in upscale["parameters"]} >= {"image_url", "scale", "format", "watermark"}
    assert any(t["task"] == "generate" for t in caps)
    models = requests.get(f"{platform.base_url}/v1/models?size=1&offset=0", headers=H, timeout=10).json()
    assert isinstance(models["data"], list) and isinstance(models["have_next"], bool)
    assert any(
        m["id"] == "lanczos"
        for m in requests.get(f"{platform.base_url}/v1/models", headers=H, timeout=10).json()["data"]
    )


def test_retention_sweep_deletes_expired_outputs(platform: Platform, images: ImageServer) -> None:
    job = platform.wait(
        ALICE,
        platform.submit(ALICE, "upscale", {"image_url": images.url("img/astronaut.png")}).json()["job_id"],
    )
    assert job["expires_at"] is not None and job["expires_at"] > job["finished_at"]
    assert requests.get(job["result"]["url"], timeout=5).status_code == 200
    runtime = Runtime(platform.settings)
    from sqlalchemy import update

    from models.db import utcnow
    from models.jobs import StoredFile

    with runtime.db.session() as session:  # as if the retention period had passed
        session.execute(
            update(StoredFile).where(StoredFile.job_id == job["job_id"]).values(expires_at=utcnow())
        )
    report = sweep(runtime, create_celery(platform.settings))
    assert report["files_removed"] >= 1
    assert requests.get(job["result"]["url"], timeout=5).status_code == 404


def test_worker_logs_are_json_lines_carrying_the_job(platform: Platform, images: ImageServer) -> None:
    import json

    job_id = platform.submit(ALICE, "upscale", {"image_url": images.url("text")}).json()["job_id"]
    assert platform.wait(ALICE, job_id)["status"] == "failed"
    time.sleep(0.3)
    # The whole log, not ``platform.log``'s tail: other jobs' lines may follow this one's.
    text = (platform.logs / "cpu.log").read_text(errors="replace")
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("job_id") == job_id]
    assert mine, "no log line carries the job id"
    assert all(line["task"] == "upscale" and line["worker"] == "cpu@test" for line in mine)
    assert {"ts", "level", "logger", "msg"} <= set(mine[0])


def test_flower_shows_the_rabbitmq_workers_behind_basic_auth(platform: Platform) -> None:
    import signal
    import subprocess
    import sys

    from tests.support.platform import ROOT, free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks.worker:celery",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
            "--basic-auth=ops:secret-pw",
        ],
        cwd=ROOT,
        env=platform._env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/workers?refresh=1"
        deadline = time.monotonic() + 60
        workers: dict = {}
        while time.monotonic() < deadline and len(workers) < 2:
            try:
                assert requests.get(url, timeout=5).status_code == 401
                workers = requests.get(url, auth=("ops", "secret-pw"), timeout=10).json()
            except requests.ConnectionError:
                pass
            time.sleep(1)
        assert set(workers) == {"cpu@test", "gpu@test"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
