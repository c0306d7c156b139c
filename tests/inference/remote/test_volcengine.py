"""The Volcengine client and signer against a fake that follows seed 002 and checks signatures."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from datetime import UTC, datetime

import pytest
import requests
from PIL import Image

from inference.base import ContentRejected, InvalidInput
from inference.remote import (
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderRetryableError,
    RemoteStatus,
    VolcengineClient,
    VolcengineSigner,
)
from inference.remote.base import RemoteRef
from tests.fakes.common import FakeClock, image_bytes
from tests.fakes.volcengine_fake import VolcengineFake

AK, SK = "AKLTtest-access", "c2VjcmV0LXRlc3QtdmFsdWU="
REQ_KEY = "img2img_anime_accelerated_maintain_id"
ROUTE = {"req_key": REQ_KEY, "params": {"face_switch": True, "face_image": "uri://binary_data?index=0"}}


@pytest.fixture(scope="module")
def server():
    fake = VolcengineFake(keys={AK: SK}, req_keys=(REQ_KEY,))
    with fake.running():
        yield fake


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def fake(server, clock):
    server.reset()
    server.clock = clock
    return server


@pytest.fixture
def client(fake, clock):
    with VolcengineClient(base_url=fake.url, access_key=AK, secret_key=SK, clock=clock, read_timeout=2) as c:
        yield c


def poll_until_final(client, remote_id, limit=10):
    seen = []
    for _ in range(limit):
        result = client.poll(remote_id)
        seen.append(result.status)
        if result.final:
            return result, seen
    raise AssertionError(f"never final: {seen}")


def test_canonical_request_and_string_to_sign_follow_volcengines_layout():
    signer = VolcengineSigner("AK", "SK", region="cn-north-1", service="cv")
    signed = signer.sign(
        "POST",
        "https://visual.volcengineapi.com/?Version=2022-08-31&Action=CVSync2AsyncSubmitTask",
        b'{"req_key":"x"}',
        now=datetime(2024, 7, 20, 10, 39, 39, tzinfo=UTC),
    )
    body_hash = hashlib.sha256(b'{"req_key":"x"}').hexdigest()
    assert signed.headers["X-Content-Sha256"] == body_hash
    assert signed.canonical_request == (
        "POST\n/\nAction=CVSync2AsyncSubmitTask&Version=2022-08-31\n"
        "content-type:application/json\nhost:visual.volcengineapi.com\n"
        f"x-content-sha256:{body_hash}\nx-date:20240720T103939Z\n\n"
        f"content-type;host;x-content-sha256;x-date\n{body_hash}"
    )
    assert signed.string_to_sign.startswith("HMAC-SHA256\n20240720T103939Z\n20240720/cn-north-1/cv/request\n")
    assert signed.headers["Authorization"].startswith(
        "HMAC-SHA256 Credential=AK/20240720/cn-north-1/cv/request, "
        "SignedHeaders=content-type;host;x-content-sha256;x-date, Signature="
    )
    assert "SK" not in repr(signer)


def test_submit_poll_to_done_returns_base64_images_as_real_jpegs(client, fake):
    payload = {
        "prompt": "1girl,portrait",
        "image_url": "https://e.com/face.jpg",
        "width": 1000,
        "height": 800,
        "steps": 18,
        "cfg_scale": 4.5,
    }
    remote_id = client.submit("generate", payload, options=ROUTE)
    sent = next(iter(fake.tasks.values()))["body"]
    assert sent == {
        "req_key": REQ_KEY,
        "face_switch": True,
        "face_image": "uri://binary_data?index=0",
        "positive_prompt": "1girl,portrait",
        "seed": -1,
        "step": 18,
        "cfg": 4.5,
        "width": 1000,
        "height": 800,
        "image_urls": ["https://e.com/face.jpg"],
    }
    result, seen = poll_until_final(client, remote_id)
    assert seen == [RemoteStatus.QUEUED, RemoteStatus.RUNNING, RemoteStatus.SUCCEEDED]
    image = Image.open(io.BytesIO(client.fetch_output(result.outputs[0])))
    assert (image.format, image.size) == ("JPEG", (100, 80))
    assert fake.result_bodies[-1] == {"req_key": REQ_KEY, "task_id": next(iter(fake.tasks))}


def test_a_restarted_worker_polls_the_stored_id_with_a_new_client(client, fake, clock):
    remote_id = client.submit("generate", {"prompt": "x"}, options=ROUTE)
    client.close()
    fresh = VolcengineClient(base_url=fake.url, access_key=AK, secret_key=SK, clock=clock)
    result, _ = poll_until_final(fresh, remote_id)
    assert result.status is RemoteStatus.SUCCEEDED


def test_wrong_secret_and_unknown_access_key_are_refused_as_auth_errors(fake, clock):
    wrong_sk = VolcengineClient(base_url=fake.url, access_key=AK, secret_key="wrong", clock=clock)
    with pytest.raises(ProviderAuthError) as info:
        wrong_sk.submit("generate", {"prompt": "x"}, options=ROUTE)
    assert info.value.provider_code == "SignatureDoesNotMatch"
    wrong_ak = VolcengineClient(base_url=fake.url, access_key="AKLTnobody", secret_key=SK, clock=clock)
    with pytest.raises(ProviderAuthError) as info:
        wrong_ak.submit("generate", {"prompt": "x"}, options=ROUTE)
    assert info.value.provider_code == "InvalidAccessKey"
    assert fake.tasks == {}


def test_the_fake_refuses_a_body_changed_after_signing_and_a_stale_date(fake, clock):
    url = f"{fake.url}/?Action=CVSync2AsyncSubmitTask&Version=2022-08-31"
    signer = VolcengineSigner(AK, SK)
    body = json.dumps({"req_key": REQ_KEY}).encode()
    now = datetime.fromtimestamp(clock(), UTC)
    ok = requests.post(url, data=body, headers=signer.sign("POST", url, body, now=now).headers, timeout=5)
    assert ok.json()["code"] == 10000
    headers = signer.sign("POST", url, body, now=now).headers
    headers["X-Content-Sha256"] = hashlib.sha256(b"{}").hexdigest()
    tampered = requests.post(url, data=b"{}", headers=headers, timeout=5)
    assert tampered.status_code == 401
    assert tampered.json()["ResponseMetadata"]["Error"]["Code"] == "SignatureDoesNotMatch"
    old = signer.sign("POST", url, body, now=datetime.fromtimestamp(clock() - 3600, UTC)).headers
    stale = requests.post(url, data=body, headers=old, timeout=5)
    assert stale.json()["ResponseMetadata"]["Error"]["Code"] == "InvalidTimestamp"


def test_text_and_image_risk_at_submit_are_rejected(client):
    with pytest.raises(ProviderRejected) as info:
        client.submit("generate", {"prompt": "BLOCKED text"}, options=ROUTE)
    assert (info.value.provider_code, info.value.http_status) == ("50412", 400)
    assert isinstance(info.value, ContentRejected) and not isinstance(info.value, ProviderRetryableError)
    with pytest.raises(ProviderRejected) as info:
        client.submit("generate", {"prompt": "ok", "image_url": "https://e.com/risky.jpg"}, options=ROUTE)
    assert info.value.provider_code == "50411"


def test_output_risk_at_get_result_polls_to_rejected(client):
    remote_id = client.submit("generate", {"prompt": "NSFW-OUTPUT"}, options=ROUTE)
    result, seen = poll_until_final(client, remote_id)
    assert seen[:2] == [RemoteStatus.QUEUED, RemoteStatus.RUNNING]
    assert (result.status, result.provider_code, result.error_code) == (
        RemoteStatus.REJECTED,
        "50511",
        "content_rejected",
    )


def test_not_found_after_twelve_hours_is_expired_but_earlier_it_is_a_failure(client, clock):
    remote_id = client.submit("generate", {"prompt": "x"}, options=ROUTE)
    assert client.poll(remote_id).status is RemoteStatus.QUEUED
    clock.advance(12 * 3600 + 1)
    result = client.poll(remote_id)
    assert (result.status, result.error_code, result.provider_code) == (
        RemoteStatus.EXPIRED,
        "remote_expired",
        "not_found",
    )
    # A task id the provider never issued, "submitted" just now.
    unknown = str(RemoteRef("1111", {"k": REQ_KEY, "t": str(int(clock()))}))
    result = client.poll(unknown)
    assert (result.status, result.error_code) == (RemoteStatus.FAILED, "remote_not_found")


@pytest.mark.parametrize("position", ["topleft", "bottomright", "middle", "top_left"])
def test_the_payloads_watermark_never_becomes_volcengines_logo(client, fake, position):
    # Our label (any of our positions, text and opacity) is drawn by us on the output; asking
    # Volcengine for its fixed one too would print two labels.
    watermark = {"position": position, "opacity": 0.5, "text": "AI generated"}
    remote_id = client.submit("generate", {"prompt": "x", "watermark": watermark}, options=ROUTE)
    client.poll(remote_id)
    assert "req_json" not in fake.result_bodies[-1]


def test_a_routes_logo_info_option_is_passed_as_seed_002s_req_json(client, fake):
    logo = {"position": 2, "language": 1, "opacity": 0.5}
    remote_id = client.submit("generate", {"prompt": "x"}, options={**ROUTE, "logo_info": logo})
    client.poll(remote_id)
    req_json = json.loads(fake.result_bodies[-1]["req_json"])
    assert req_json == {"logo_info": {"add_logo": True, "position": 2, "language": 1, "opacity": 0.5}}


@pytest.mark.parametrize(
    "logo", [{"position": "top_left"}, {"position": 4}, {"opacity": 2}, {"size": 1}, "yes"]
)
def test_a_logo_info_option_outside_seed_002_is_a_misconfigured_route(client, fake, logo):
    with pytest.raises(ProviderError) as info:
        client.submit("generate", {"prompt": "x"}, options={**ROUTE, "logo_info": logo})
    assert info.value.code == "provider_misconfigured"
    assert fake.requests == []


def test_rate_limit_server_error_timeout_and_malformed_are_retryable(client, fake, clock):
    fake.faults.add("rate_limit", on="submit")
    with pytest.raises(ProviderRetryableError) as info:
        client.submit("generate", {"prompt": "x"}, options=ROUTE)
    assert (info.value.provider_code, info.value.retry_after, info.value.code) == (
        "50429",
        5.0,
        "provider_rate_limited",
    )
    remote_id = client.submit("generate", {"prompt": "x"}, options=ROUTE)
    fake.faults.add("server_error", on="poll")
    with pytest.raises(ProviderRetryableError) as info:
        client.poll(remote_id)
    assert info.value.http_status == 500
    fake.faults.add("malformed", on="poll")
    with pytest.raises(ProviderRetryableError):
        client.poll(remote_id)
    fake.faults.add("slow", on="poll", seconds=1.5)
    impatient = VolcengineClient(
        base_url=fake.url, access_key=AK, secret_key=SK, clock=clock, read_timeout=0.3
    )
    with pytest.raises(ProviderRetryableError) as info:
        impatient.poll(remote_id)
    assert info.value.code == "provider_timeout"
    # The job itself was untouched by the failed polls.
    assert client.poll(remote_id).status is RemoteStatus.QUEUED


def test_data_uri_inputs_go_inline_as_binary_data_base64(client, fake):
    raw = image_bytes(fmt="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    client.submit("generate", {"prompt": "x", "image_url": data_uri}, options=ROUTE)
    sent = next(iter(fake.tasks.values()))["body"]
    assert base64.b64decode(sent["binary_data_base64"][0]) == raw and "image_urls" not in sent


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"prompt": "x", "width": 2000}, "width"),
        (
            {"prompt": "x", "image_url": "data:image/png;base64,AAAA", "target_url": "https://e.com/t.jpg"},
            "image_url",
        ),
        ({"prompt": "x", "image_url": "asset://abc"}, "image_url"),
        ({"prompt": "x", "loras": [{"model": "style", "weight": 1.0}]}, "loras"),
    ],
)
def test_inputs_outside_the_seed_limits_fail_before_any_request(client, fake, payload, field):
    with pytest.raises(InvalidInput) as info:
        client.submit("generate", payload, options=ROUTE)
    assert info.value.field == field
    assert fake.requests == []


def test_a_route_without_req_key_is_a_permanent_error(client):
    with pytest.raises(ProviderError) as info:
        client.submit("generate", {"prompt": "x"}, options={})
    assert info.value.code == "provider_misconfigured"
