"""The SenseTime client against a fake that follows seed 001 (JWT auth checked for real)."""

from __future__ import annotations

import base64
import io
import json
import socket
import time

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
    SenseTimeClient,
)
from tests.fakes.common import FakeClock
from tests.fakes.sensetime_fake import SenseTimeFake

AK, SK = "test-ak", "test-sk-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def server():
    fake = SenseTimeFake(keys={AK: SK})
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
    with SenseTimeClient(base_url=fake.url, access_key=AK, secret_key=SK, clock=clock, read_timeout=2) as c:
        yield c


def poll_until_final(client, remote_id, limit=10):
    seen = []
    for _ in range(limit):
        result = client.poll(remote_id)
        seen.append(result.status)
        if result.final:
            return result, seen
    raise AssertionError(f"never final: {seen}")


def decode_claims(token):
    head, payload, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(head))), json.loads(base64.urlsafe_b64decode(pad(payload)))


GENERATE = {
    "prompt": "a red fox",
    "negative_prompt": "blurry",
    "samples": 2,
    "width": 768,
    "height": 1024,
    "steps": 30,
    "cfg_scale": 7.5,
    "seed": 42,
    "format": "png",
}


def test_jwt_is_hs256_with_iss_exp_nbf_and_accepted(client, fake, clock):
    client.submit("generate", GENERATE, options={"model_id": "model001"})
    head, claims = decode_claims(fake.tokens[-1])
    assert head == {"alg": "HS256", "typ": "JWT"}
    assert claims["iss"] == AK
    assert claims["exp"] == int(clock()) + 1800
    assert claims["nbf"] == int(clock()) - 5


def test_wrong_secret_key_is_refused_as_a_permanent_auth_error(fake, clock):
    bad = SenseTimeClient(
        base_url=fake.url,
        access_key=AK,
        secret_key="not-the-sk-0123456789abcdef0123456789abcdef",
        clock=clock,
    )
    with pytest.raises(ProviderAuthError) as info:
        bad.submit("generate", GENERATE, options={"model_id": "model001"})
    assert info.value.provider_code == "16"
    assert not isinstance(info.value, ProviderRetryableError)
    # One retry with a fresh token, then the refusal is believed.
    assert len(fake.requests) == 2


def test_token_is_reminted_before_it_expires(client, fake, clock):
    first = client.token()
    clock.advance(1700)
    assert client.token() == first
    clock.advance(60)  # 1760 s: inside the 60 s margin before exp
    second = client.token()
    assert second != first
    assert decode_claims(second)[1]["exp"] == int(clock()) + 1800
    client.submit("generate", GENERATE, options={"model_id": "model001"})
    assert fake.tokens[-1] == second


def test_token_expired_at_the_provider_is_refused(fake, clock):
    # The client's clock lags the provider's by two hours, so every token it mints is expired there.
    behind = SenseTimeClient(base_url=fake.url, access_key=AK, secret_key=SK, clock=lambda: clock() - 7200)
    with pytest.raises(ProviderAuthError):
        behind.submit("generate", GENERATE, options={"model_id": "model001"})


def test_generate_polls_queued_running_succeeded_and_downloads_real_pngs(client, fake):
    remote_id = client.submit(
        "generate",
        {**GENERATE, "image_url": "https://example.com/in.png", "image_strength": 0.4},
        options={"model_id": "model001"},
    )
    sent = next(iter(fake.tasks.values()))["body"]
    assert sent == {
        "model_id": "model001",
        "prompt": "a red fox",
        "neg_prompt": "blurry",
        "samples": 2,
        "width": 768,
        "height": 1024,
        "steps": 30,
        "cfg_scale": 7.5,
        "seed": 42,
        "format": "PNG",
        "img_url": "https://example.com/in.png",
        "image_strength": 0.4,
    }
    result, seen = poll_until_final(client, remote_id)
    assert seen == [RemoteStatus.QUEUED, RemoteStatus.RUNNING, RemoteStatus.SUCCEEDED]
    assert len(result.outputs) == 2
    for output in result.outputs:
        image = Image.open(io.BytesIO(client.fetch_output(output)))
        assert (image.format, image.size) == ("PNG", (64, 48))


def test_output_download_sends_no_token_and_is_capped(client, fake):
    remote_id = client.submit("generate", GENERATE, options={"model_id": "model001"})
    result, _ = poll_until_final(client, remote_id)
    sent = []
    client.session.hooks["response"].append(lambda r, *a, **k: sent.append(r.request.headers))
    client.fetch_output(result.outputs[0])
    assert "Authorization" not in sent[-1]
    with pytest.raises(ProviderError) as info:
        client.fetch_output(result.outputs[0], max_bytes=100)
    assert info.value.code == "output_too_large"


def test_faceswap_maps_to_face_imggen_and_returns_the_raw_image(client, fake):
    payload = {"source_url": "https://example.com/face.jpg", "target_url": "https://example.com/body.jpg"}
    remote_id = client.submit("faceswap", payload, options={"model_id": "faceswap_v1", "dino_scale": 0.3})
    sent = next(iter(fake.tasks.values()))["body"]
    assert sent == {
        "model_id": "faceswap_v1",
        "base_img": {"url": "https://example.com/body.jpg"},
        "faces": [{"url": "https://example.com/face.jpg", "index": 0, "base_index": 0}],
        "dino_scale": 0.3,
    }
    result, seen = poll_until_final(client, remote_id)
    assert seen[-1] is RemoteStatus.SUCCEEDED and seen[0] is RemoteStatus.RUNNING
    image = Image.open(io.BytesIO(client.fetch_output(result.outputs[0])))
    assert (image.format, image.size) == ("JPEG", (64, 48))


def test_faceswap_multi_maps_indexes_and_refuses_a_fifth_face_before_any_request(client, fake):
    payload = {
        "source_urls": ["https://e.com/a.jpg", "https://e.com/b.jpg"],
        "target_url": "https://e.com/g.jpg",
        "swap_faces_index": [0, 1],
        "target_faces_index": [2, 0],
    }
    client.submit("faceswap_multi", payload, options={"model_id": "faceswap_v1"})
    faces = next(iter(fake.tasks.values()))["body"]["faces"]
    assert faces == [
        {"url": "https://e.com/a.jpg", "index": 0, "base_index": 2},
        {"url": "https://e.com/b.jpg", "index": 1, "base_index": 0},
    ]
    fake.requests.clear()
    with pytest.raises(InvalidInput) as info:
        client.submit(
            "faceswap_multi",
            {**payload, "swap_faces_index": [0] * 5, "target_faces_index": [0, 1, 2, 3, 4]},
            options={"model_id": "faceswap_v1"},
        )
    assert info.value.field == "target_faces_index"
    assert fake.requests == []


def test_face_detect_returns_faces_as_data(client):
    remote_id = client.submit("face_detect", {"image_url": "https://e.com/g.jpg"})
    result, _ = poll_until_final(client, remote_id)
    assert result.status is RemoteStatus.SUCCEEDED and result.outputs == ()
    assert [face["index"] for face in result.data["faces"]] == [0, 1]
    assert result.data["faces"][0]["box"] == {"x1": 10, "y1": 12, "x2": 40, "y2": 44}


@pytest.mark.parametrize(
    ("task", "payload", "path", "expected"),
    [
        (
            "remove_object",
            {"image_url": "https://e.com/i.jpg", "mask_url": "https://e.com/m.png"},
            "erase",
            {"img_url": "https://e.com/i.jpg", "mask_img_url": "https://e.com/m.png"},
        ),
        (
            "outpaint",
            {"image_url": "https://e.com/i.jpg", "ratio": 2.0, "align": "top"},
            "outpaint",
            {"img_url": "https://e.com/i.jpg", "outpaint_ratio": 2.0, "align_position": "topmiddle"},
        ),
        (
            "inpaint",
            {
                "image_url": "https://e.com/i.jpg",
                "mask_url": "https://e.com/m.png",
                "prompt": "sky",
                "strength": 0.5,
            },
            "inpaint",
            {
                "img_url": "https://e.com/i.jpg",
                "mask_img_url": "https://e.com/m.png",
                "prompt": "sky",
                "repaint_strength": 0.5,
            },
        ),
        (
            "upscale",
            {"image_url": "https://e.com/i.jpg", "scale": 2},
            "sup_res",
            {"img_url": "https://e.com/i.jpg", "hd_ratio": 2},
        ),
        (
            "remove_background",
            {"image_url": "https://e.com/i.jpg"},
            "split",
            {"img_url": "https://e.com/i.jpg", "format": "PNG"},
        ),
    ],
)
def test_each_task_goes_to_its_seed_endpoint_and_completes(client, fake, task, payload, path, expected):
    remote_id = client.submit(task, payload, options={"model_id": "m1"})
    assert fake.requests[-1]["path"].startswith(f"/v1/{path}/")
    assert next(iter(fake.tasks.values()))["body"] == {"model_id": "m1", **expected}
    result, _ = poll_until_final(client, remote_id)
    assert result.status is RemoteStatus.SUCCEEDED
    Image.open(io.BytesIO(client.fetch_output(result.outputs[0]))).verify()


def test_poll_many_splits_120_ids_into_calls_of_50(client, fake):
    ids = [client.submit("generate", {"prompt": f"p{i}"}, options={"model_id": "m1"}) for i in range(120)]
    swap = client.submit(
        "faceswap",
        {"source_url": "https://e.com/a.jpg", "target_url": "https://e.com/b.jpg"},
        options={"model_id": "faceswap_v1"},
    )
    results = client.poll_many([*ids, swap])
    assert fake.batch_sizes == [50, 50, 20]
    assert set(results) == {*ids, swap}
    assert all(results[i].status is RemoteStatus.QUEUED for i in ids)
    # Face swap has no batch endpoint in the seed: it is polled on its own.
    assert results[swap].status is RemoteStatus.RUNNING
    again = client.poll_many(ids)
    assert all(r.status is RemoteStatus.RUNNING for r in again.values())


def test_poll_many_polls_an_id_left_out_of_the_batch_alone_and_fails_it(client, fake):
    known = client.submit("generate", {"prompt": "x"}, options={"model_id": "m1"})
    unknown = "st-does-not-exist?f=imgenstd"
    results = client.poll_many([known, unknown])
    assert results[known].status is RemoteStatus.QUEUED
    assert results[unknown].status is RemoteStatus.FAILED
    assert results[unknown].error_code == "remote_not_found"


def test_rate_limit_is_retryable_with_the_providers_retry_after(client, fake):
    fake.faults.add("rate_limit", on="submit", retry_after=7)
    with pytest.raises(ProviderRetryableError) as info:
        client.submit("generate", GENERATE, options={"model_id": "m1"})
    assert (info.value.retry_after, info.value.provider_code, info.value.code) == (
        7.0,
        "8",
        "provider_rate_limited",
    )
    fake.faults.add("rate_limit", on="poll")
    remote_id = client.submit("generate", GENERATE, options={"model_id": "m1"})
    with pytest.raises(ProviderRetryableError) as info:
        client.poll(remote_id)
    assert info.value.retry_after == 10.0  # the default wait for code 8 without a header


def test_server_error_timeout_malformed_and_unreachable_are_retryable(client, fake, clock):
    fake.faults.add("server_error", on="submit")
    with pytest.raises(ProviderRetryableError) as info:
        client.submit("generate", GENERATE, options={"model_id": "m1"})
    assert info.value.http_status == 500
    fake.faults.add("malformed", on="submit")
    with pytest.raises(ProviderRetryableError, match="malformed"):
        client.submit("generate", GENERATE, options={"model_id": "m1"})
    fake.faults.add("slow", on="submit", seconds=1.5)
    impatient = SenseTimeClient(
        base_url=fake.url, access_key=AK, secret_key=SK, clock=clock, read_timeout=0.3
    )
    with pytest.raises(ProviderRetryableError) as info:
        impatient.submit("generate", GENERATE, options={"model_id": "m1"})
    assert info.value.code == "provider_timeout"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    nowhere = SenseTimeClient(base_url=f"http://127.0.0.1:{closed_port}", access_key=AK, secret_key=SK)
    with pytest.raises(ProviderRetryableError) as info:
        nowhere.submit("generate", GENERATE, options={"model_id": "m1"})
    assert info.value.code == "provider_unreachable"


def test_sensitive_prompt_is_rejected_at_submit_and_never_retryable(client):
    with pytest.raises(ProviderRejected) as info:
        client.submit("generate", {**GENERATE, "prompt": "BLOCKED words"}, options={"model_id": "m1"})
    assert info.value.provider_code == "18"
    assert isinstance(info.value, ContentRejected)
    assert not isinstance(info.value, ProviderRetryableError)


def test_sensitive_output_polls_to_rejected(client):
    remote_id = client.submit("generate", {**GENERATE, "prompt": "NSFW-OUTPUT"}, options={"model_id": "m1"})
    result, _ = poll_until_final(client, remote_id)
    assert (result.status, result.error_code, result.provider_code) == (
        RemoteStatus.REJECTED,
        "content_rejected",
        "Sensitive",
    )
    with pytest.raises(ProviderRejected):
        result.raise_for_outcome("sensetime")


def test_model_listing_pages_by_size_and_offset_until_have_next_is_false(client, fake):
    models = list(client.list_models("imgenstd"))
    assert [m["id"] for m in models] == [f"model{i:03d}" for i in range(230)]
    assert fake.model_pages == [(100, 0), (100, 100), (100, 200)]
    page = client.list_models_page("imgenstd", size=7, offset=228)
    assert [m["id"] for m in page.data] == ["model228", "model229"] and page.have_next is False
    loras = list(client.list_models("imgenstd", page_size=50, mtp="LORA"))
    assert len(loras) == 77 and all(m["model_type"] == "LORA" for m in loras)
    with pytest.raises(ValueError):
        client.list_models_page("imgenstd", size=101)


@pytest.mark.parametrize(
    ("task", "payload", "field"),
    [
        ("generate", {"prompt": "x"}, "model"),
        ("generate", {"prompt": "x", "model": "m", "samples": 9}, "samples"),
        ("generate", {"prompt": "x", "model": "m", "width": 100}, "width"),
        ("generate", {"prompt": "x", "model": "m", "image_url": "data:image/png;base64,AAAA"}, "image_url"),
        ("upscale", {"image_url": "https://e.com/i.jpg", "model": "m", "scale": 4}, "scale"),
        ("outpaint", {"image_url": "https://e.com/i.jpg", "model": "m", "align": "diagonal"}, "align"),
        ("faceswap", {"target_url": "https://e.com/t.jpg", "model": "m"}, "source_url"),
        ("stylize_video", {}, "task"),
    ],
)
def test_inputs_outside_the_seed_limits_fail_before_any_request(client, fake, task, payload, field):
    with pytest.raises(InvalidInput) as info:
        client.submit(task, payload)
    assert info.value.field == field
    assert fake.requests == []


def test_credentials_never_show_in_repr_or_errors(fake, clock):
    secret = "super-secret-sk-value-0123456789abcdef0123"
    bad = SenseTimeClient(base_url=fake.url, access_key=AK, secret_key=secret, clock=clock)
    assert secret not in repr(bad) and AK not in repr(bad)
    assert secret not in repr(vars(bad))
    with pytest.raises(ProviderAuthError) as info:
        bad.submit("generate", GENERATE, options={"model_id": "m1"})
    assert secret not in str(info.value) and secret not in repr(info.value.args)


def test_the_fake_refuses_a_hand_made_token_with_a_wrong_signature(fake):
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
    claims = base64.urlsafe_b64encode(json.dumps({"iss": AK, "exp": 2**31}).encode()).rstrip(b"=").decode()
    token = f"{header}.{claims}.{base64.urlsafe_b64encode(b'x' * 32).rstrip(b'=').decode()}"
    answer = requests.get(
        f"{fake.url}/v1/imgenstd/models", headers={"Authorization": f"Bearer {token}"}, timeout=5
    )
    assert answer.status_code == 401 and answer.json()["error"]["code"] == 16


def test_a_time_budget_cuts_the_configured_timeouts_so_a_slow_backend_fits_the_submit_limit(
    client, fake
):
    # read_timeout is 2 s; the caller has 0.4 s left of its task's time limit.
    fake.faults.add("slow", on="submit", seconds=1.5)
    started = time.monotonic()
    with pytest.raises(ProviderRetryableError) as info, client.time_budget(0.4):
        client.submit("generate", GENERATE, options={"model_id": "m1"})
    assert info.value.code == "provider_timeout"
    assert time.monotonic() - started < 1.2
    # With the budget spent nothing is sent at all; outside it the configured timeouts apply again.
    sent = len(fake.requests)
    with pytest.raises(ProviderRetryableError), client.time_budget(0):
        client.submit("generate", GENERATE, options={"model_id": "m1"})
    assert len(fake.requests) == sent
    assert client.submit("generate", GENERATE, options={"model_id": "m1"})
