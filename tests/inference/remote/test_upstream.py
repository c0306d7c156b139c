"""The upstream aiorch client against a fake that follows seed 000 and the public contract."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from inference.remote import (
    ProviderAuthError,
    ProviderError,
    ProviderRetryableError,
    RemoteStatus,
    UpstreamClient,
    idempotency_key_for_job,
)
from tests.fakes.aiorch_upstream_fake import UpstreamFake

KEY = "key-a-0123456789"


@pytest.fixture(scope="module")
def server():
    fake = UpstreamFake(api_keys={KEY: "client-a", "key-b": "client-b"})
    with fake.running():
        yield fake


@pytest.fixture
def fake(server):
    server.reset()
    return server


@pytest.fixture
def client(fake):
    with UpstreamClient(base_url=fake.url, api_key=KEY, name="upstream-eu", read_timeout=2) as c:
        yield c


def poll_until_final(client, remote_id, limit=10):
    seen = []
    for _ in range(limit):
        result = client.poll(remote_id)
        seen.append(result.status)
        if result.final:
            return result, seen
    raise AssertionError(f"never final: {seen}")


FACESWAP = {"source_url": "https://e.com/face.jpg", "target_url": "https://e.com/body.jpg", "upscale": 1}


def test_submit_poll_to_succeeded_and_download_the_file_without_the_key(client, fake):
    remote_id = client.submit("faceswap", FACESWAP, idempotency_key=idempotency_key_for_job("j1", "upstream"))
    assert fake.jobs[remote_id]["_payload"] == FACESWAP
    result, seen = poll_until_final(client, remote_id)
    assert seen == [RemoteStatus.QUEUED, RemoteStatus.RUNNING, RemoteStatus.SUCCEEDED]
    (output,) = result.outputs
    assert output.meta["backend"] == "UPVN1-1" and output.url.startswith(f"{fake.url}/files/")
    sent = []
    client.session.hooks["response"].append(lambda r, *a, **k: sent.append(r.request.headers))
    image = Image.open(io.BytesIO(client.fetch_output(output)))
    assert (image.format, image.size) == ("PNG", (50, 30))
    assert "X-API-Key" not in sent[-1]


def test_wrong_key_is_refused_as_an_auth_error(fake):
    with pytest.raises(ProviderAuthError) as info:
        UpstreamClient(base_url=fake.url, api_key="nope").submit("faceswap", FACESWAP)
    assert (info.value.http_status, info.value.provider_code) == (401, "unauthorized")
    assert fake.jobs == {}


def test_idempotency_key_returns_the_same_job_and_a_changed_body_conflicts(client, fake):
    key = idempotency_key_for_job("j2", "upstream")
    first = client.submit("faceswap", FACESWAP, idempotency_key=key)
    assert client.submit("faceswap", FACESWAP, idempotency_key=key) == first
    assert len(fake.jobs) == 1
    with pytest.raises(ProviderError) as info:
        client.submit("faceswap", {**FACESWAP, "upscale": 0}, idempotency_key=key)
    assert (info.value.code, info.value.http_status) == ("remote_conflict", 409)


def test_route_alias_and_options_are_sent_as_the_upstream_task(client, fake):
    remote_id = client.submit(
        "generate", {"prompt": "cat"}, options={"task": "gg_image", "priority": 3, "metadata": {"via": "eu"}}
    )
    assert (fake.jobs[remote_id]["task"], fake.jobs[remote_id]["metadata"]) == ("gg_image", {"via": "eu"})


def test_poll_many_uses_batches_of_50_and_fails_ids_the_upstream_no_longer_has(client, fake):
    ids = [client.submit("generate", {"prompt": f"p{i}"}) for i in range(120)]
    results = client.poll_many([*ids, "0" * 32])
    assert fake.batch_sizes == [50, 50, 21]
    assert all(results[i].status is RemoteStatus.QUEUED for i in ids)
    assert (results["0" * 32].status, results["0" * 32].error_code) == (
        RemoteStatus.FAILED,
        "remote_not_found",
    )


def test_a_rejected_upstream_job_is_rejected_here(client):
    result, _ = poll_until_final(client, client.submit("generate", {"prompt": "NSFW please"}))
    assert (result.status, result.error_code, result.provider_code) == (
        RemoteStatus.REJECTED,
        "content_rejected",
        "content_rejected",
    )


def test_json_tasks_return_their_data(client):
    result, _ = poll_until_final(client, client.submit("face_detect", {"image_url": "https://e.com/g.jpg"}))
    assert result.status is RemoteStatus.SUCCEEDED and result.outputs == ()
    assert result.data["faces"] == [{"index": 0, "box": [1, 2, 30, 40]}]


def test_429_and_503_are_retryable_with_retry_after_and_so_are_garbage_and_timeouts(client, fake):
    fake.faults.add("rate_limit", on="submit")
    with pytest.raises(ProviderRetryableError) as info:
        client.submit("generate", {"prompt": "x"})
    assert (info.value.retry_after, info.value.code) == (11.0, "provider_rate_limited")
    remote_id = client.submit("generate", {"prompt": "x"})
    fake.faults.add("server_error", on="poll")
    with pytest.raises(ProviderRetryableError) as info:
        client.poll(remote_id)
    assert (info.value.retry_after, info.value.http_status) == (4.0, 503)
    fake.faults.add("malformed", on="batch")
    with pytest.raises(ProviderRetryableError):
        client.poll_many([remote_id])
    fake.faults.add("slow", on="poll", seconds=1.0)
    impatient = UpstreamClient(base_url=fake.url, api_key=KEY, read_timeout=0.3)
    with pytest.raises(ProviderRetryableError) as info:
        impatient.poll(remote_id)
    assert info.value.code == "provider_timeout"


def test_cancel_stops_a_queued_job_and_is_false_for_a_finished_one(client, fake):
    queued = client.submit("generate", {"prompt": "x"})
    assert client.cancel(queued) is True
    assert client.poll(queued).status is RemoteStatus.CANCELLED
    done = client.submit("generate", {"prompt": "y"})
    poll_until_final(client, done)
    assert client.cancel(done) is False


def test_the_api_key_is_not_in_repr(client):
    assert KEY not in repr(client) and "upstream" in repr(client).lower()
