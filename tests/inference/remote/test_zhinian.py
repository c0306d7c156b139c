"""The Zhinian client against a fake that follows seed 003 (keys, idempotency, assets, webhooks)."""

from __future__ import annotations

import io
import time

import pytest
from flask import Flask, request
from PIL import Image

from inference.base import InvalidInput
from inference.remote import (
    InvalidWebhookSignature,
    ProviderAuthError,
    ProviderError,
    ProviderRetryableError,
    RemoteStatus,
    ZhinianClient,
    idempotency_key_for_job,
    verify_webhook_signature,
)
from tests.fakes.common import LiveServer
from tests.fakes.zhinian_fake import ZhinianFake, sign_webhook

WEBHOOK_SECRET = "whsec-zhinian-test"
KEYS = {"partner-a": "key-a", "partner-b": "key-b"}


@pytest.fixture(scope="module")
def server():
    fake = ZhinianFake(api_keys=KEYS, webhook_secret=WEBHOOK_SECRET)
    with fake.running():
        yield fake


@pytest.fixture
def fake(server):
    server.reset()
    return server


@pytest.fixture(params=["bearer", "header"])
def client(request, fake):
    with ZhinianClient(
        base_url=fake.url,
        api_key="key-a",
        auth_scheme=request.param,
        webhook_secret=WEBHOOK_SECRET,
        read_timeout=2,
    ) as c:
        yield c


@pytest.fixture(scope="module")
def receiver():
    """Our side of the webhook: records the raw body and headers of every POST."""
    app = Flask("receiver")
    received: list[tuple[bytes, dict]] = []

    @app.post("/hooks/zhinian")
    def hook():
        received.append((request.get_data(), dict(request.headers)))
        return "", 204

    live = LiveServer(app).start()
    live.received = received
    yield live
    live.stop()


def poll_until_final(client, remote_id, limit=10):
    seen = []
    for _ in range(limit):
        result = client.poll(remote_id)
        seen.append(result.status)
        if result.final:
            return result, seen
    raise AssertionError(f"never final: {seen}")


def key(job_id="0123456789abcdef0123456789abcdef"):
    return idempotency_key_for_job(job_id, "zhinian")


def test_both_auth_styles_reach_succeeded_and_download_the_asset_without_leaking_the_key(client, fake):
    remote_id = client.submit(
        "generate", {"prompt": "产品主图", "width": 1440, "height": 2560}, idempotency_key=key()
    )
    result, seen = poll_until_final(client, remote_id)
    assert seen == [RemoteStatus.QUEUED, RemoteStatus.RUNNING, RemoteStatus.SUCCEEDED]
    (output,) = result.outputs
    assert output.url.endswith(f"/api/v1/assets/{output.meta['asset_id']}/download")
    image = Image.open(io.BytesIO(client.fetch_output(output)))
    assert (image.format, image.size) == ("PNG", (72, 40))
    # The redirect target (storage) got neither credential header; it would have refused them.
    assert not {"Authorization", "X-Zhinian-Api-Key"} & set(fake.storage_requests[-1])


def test_wrong_key_is_refused_as_an_auth_error(fake):
    for scheme in ("bearer", "header"):
        wrong = ZhinianClient(base_url=fake.url, api_key="key-z", auth_scheme=scheme)
        with pytest.raises(ProviderAuthError) as info:
            wrong.submit("generate", {"prompt": "x"}, idempotency_key=key())
        assert info.value.http_status == 401
    assert fake.jobs == {}


def test_the_same_idempotency_key_returns_the_same_remote_job(client, fake):
    payload = {"prompt": "海报", "image_url": "https://e.com/ref.png"}
    first = client.submit("generate", payload, idempotency_key=key())
    again = client.submit("generate", payload, idempotency_key=key())
    assert first == again and len(fake.jobs) == 1
    other = client.submit("generate", payload, idempotency_key=key("f" * 32))
    assert other != first and len(fake.jobs) == 2
    with pytest.raises(ProviderError) as info:
        client.submit("generate", {**payload, "prompt": "changed"}, idempotency_key=key())
    assert (info.value.code, info.value.http_status) == ("idempotency_conflict", 409)


def test_a_submit_retried_after_a_lost_response_does_not_create_a_second_job(fake):
    impatient = ZhinianClient(base_url=fake.url, api_key="key-a", read_timeout=0.3)
    fake.faults.add("slow", on="submit", seconds=0.8)
    with pytest.raises(ProviderRetryableError) as info:
        impatient.submit("generate", {"prompt": "x"}, idempotency_key=key())
    assert info.value.code == "provider_timeout"
    deadline = time.monotonic() + 5
    while not fake.jobs and time.monotonic() < deadline:  # the slow request still completes there
        time.sleep(0.05)
    (created,) = fake.jobs
    assert impatient.submit("generate", {"prompt": "x"}, idempotency_key=key()) == created
    assert len(fake.jobs) == 1


def test_a_submit_without_an_idempotency_key_is_refused_before_any_request(client, fake):
    with pytest.raises(ValueError):
        client.submit("generate", {"prompt": "x"})
    assert fake.requests == []
    assert key("abc") == key("abc") == "aiorch-zhinian-abc"


@pytest.mark.parametrize(
    ("prompt", "status", "code"),
    [
        ("FAIL-JOB", RemoteStatus.FAILED, "remote_failed"),
        ("EXPIRE-JOB", RemoteStatus.EXPIRED, "remote_expired"),
    ],
)
def test_failed_and_expired_jobs_map_to_our_statuses(client, prompt, status, code):
    result, _ = poll_until_final(client, client.submit("generate", {"prompt": prompt}, idempotency_key=key()))
    assert (result.status, result.error_code) == (status, code)
    with pytest.raises(ProviderError):
        result.raise_for_outcome("zhinian")


def test_a_cancelled_job_maps_to_cancelled(client, fake):
    remote_id = client.submit("generate", {"prompt": "x"}, idempotency_key=key())
    fake.cancel(remote_id)
    assert client.poll(remote_id).status is RemoteStatus.CANCELLED


def test_another_clients_job_is_not_found_for_us(client, fake):
    other = ZhinianClient(base_url=fake.url, api_key="key-b")
    theirs = other.submit("generate", {"prompt": "x"}, idempotency_key=key())
    result = client.poll(theirs)
    assert (result.status, result.error_code) == (RemoteStatus.FAILED, "remote_not_found")


def test_rate_limit_server_error_and_malformed_json_are_retryable(client, fake):
    fake.faults.add("rate_limit", on="submit")
    with pytest.raises(ProviderRetryableError) as info:
        client.submit("generate", {"prompt": "x"}, idempotency_key=key())
    assert (info.value.retry_after, info.value.code) == (3.0, "provider_rate_limited")
    remote_id = client.submit("generate", {"prompt": "x"}, idempotency_key=key())
    fake.faults.add("server_error", on="poll")
    with pytest.raises(ProviderRetryableError) as info:
        client.poll(remote_id)
    assert info.value.http_status == 500
    fake.faults.add("malformed", on="poll")
    with pytest.raises(ProviderRetryableError):
        client.poll(remote_id)


def test_signed_webhook_is_verified_and_mapped_and_a_tampered_one_refused(fake, receiver):
    receiver.received.clear()
    client = ZhinianClient(base_url=fake.url, api_key="key-a", webhook_secret=WEBHOOK_SECRET)
    remote_id = client.submit(
        "generate",
        {"prompt": "x"},
        idempotency_key=key(),
        options={"webhook_url": f"{receiver.url}/hooks/zhinian"},
    )
    poll_until_final(client, remote_id)
    ((raw, headers),) = receiver.received
    event, result = client.parse_webhook(raw, headers.get("X-Zhinian-Signature"))
    assert event == "generation.succeeded"
    assert (result.remote_id, result.status, len(result.outputs)) == (remote_id, RemoteStatus.SUCCEEDED, 1)
    Image.open(io.BytesIO(client.fetch_output(result.outputs[0]))).verify()
    tampered = raw.replace(b'"succeeded"', b'"failed"', 1)
    assert tampered != raw
    with pytest.raises(InvalidWebhookSignature):
        client.parse_webhook(tampered, headers["X-Zhinian-Signature"])
    with pytest.raises(InvalidWebhookSignature):
        client.parse_webhook(raw, None)
    with pytest.raises(InvalidWebhookSignature):
        ZhinianClient(base_url=fake.url, api_key="key-a", webhook_secret="other").parse_webhook(
            raw, headers["X-Zhinian-Signature"]
        )


def test_verify_webhook_signature_accepts_only_the_exact_hmac_of_the_raw_body():
    body = b'{"event":"generation.succeeded","job":{"id":"job_1","status":"succeeded"}}'
    good = sign_webhook("s3cret", body)
    assert verify_webhook_signature("s3cret", body, good)
    assert verify_webhook_signature("s3cret", body, good.upper().replace("SHA256=", "sha256="))
    assert not verify_webhook_signature("s3cret", body + b" ", good)
    assert not verify_webhook_signature("s3cret", body, good.replace("sha256=", "sha1="))
    assert not verify_webhook_signature("s3cret", body, good[:-1])
    assert not verify_webhook_signature("", body, good)


def test_tasks_map_onto_capabilities_with_the_seeds_field_names(client, fake):
    client.submit(
        "inpaint",
        {"image_url": "https://e.com/o.png", "mask_url": "https://e.com/m.png", "prompt": "新品上市"},
        idempotency_key=key("1"),
    )
    client.submit(
        "upscale",
        {"image_url": "https://e.com/i.png"},
        idempotency_key=key("2"),
        options={"resolution": "4k"},
    )
    client.submit(
        "ahv_video",
        {
            "prompt": "品牌短视频",
            "duration": 5,
            "ratio": "9:16",
            "resolution": "720p",
            "image_url": "https://e.com/p.png",
        },
        idempotency_key=key("3"),
    )
    bodies = [job["_body"] for job in fake.jobs.values()]
    assert bodies == [
        {
            "capability": "image.inpaint",
            "prompt": "新品上市",
            "imageUrls": ["https://e.com/o.png", "https://e.com/m.png"],
        },
        {"capability": "image.upscale", "imageUrls": ["https://e.com/i.png"], "resolution": "4k"},
        {
            "capability": "video.generate",
            "prompt": "品牌短视频",
            "settings": {"duration": 5, "ratio": "9:16", "resolution": "720p"},
            "materials": [{"type": "image", "url": "https://e.com/p.png", "label": "@图片1"}],
        },
    ]
    fake.requests.clear()
    with pytest.raises(InvalidInput) as info:
        client.submit("ahv_video", {"prompt": "x", "duration": 20}, idempotency_key=key("4"))
    assert info.value.field == "duration" and fake.requests == []
