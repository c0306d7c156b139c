"""SenseTime LoRA training (seed 001 section 10): ``train_lora`` mapped onto ``/v1/lora/train``, its
results and progress, and its cancel, against the fake that follows the seed."""

from __future__ import annotations

import pytest

from inference.base import InvalidInput
from inference.remote import ProviderError, RemoteStatus, SenseTimeClient
from inference.remote.base import RemoteRef
from inference.remote.sensetime.training import build_train_lora, lora_result
from tests.fakes.common import FakeClock
from tests.fakes.sensetime_fake import NO_HUMAN_MESSAGE, SenseTimeFake

AK, SK = "test-ak", "test-sk-0123456789abcdef0123456789abcdef"
IMAGES = [f"https://files.example/in{i}.png" for i in range(4)]
TRAIN = {"images": IMAGES, "trigger_word": "zxq person", "base_model": "model001", "name": "My LoRA"}


@pytest.fixture(scope="module")
def server():
    fake = SenseTimeFake(keys={AK: SK})
    with fake.running():
        yield fake


@pytest.fixture
def fake(server):
    server.reset()
    server.clock = FakeClock()
    return server


@pytest.fixture
def client(fake):
    with SenseTimeClient(base_url=fake.url, access_key=AK, secret_key=SK, clock=fake.clock) as c:
        yield c


def sent(fake: SenseTimeFake, remote_id: str) -> dict:
    return fake.tasks[RemoteRef.parse(remote_id).id]["body"]


def polls(client: SenseTimeClient, remote_id: str, limit: int = 10) -> list:
    seen = []
    for _ in range(limit):
        seen.append(client.poll(remote_id))
        if seen[-1].final:
            return seen
    raise AssertionError(f"never final: {[r.status for r in seen]}")


# -- the request


def test_train_lora_maps_our_payload_onto_the_seeds_train_request(client, fake):
    options = {"description": "a person", "main_object": "Human", "task_type": "VIP"}
    remote_id = client.submit("train_lora", TRAIN, options=options)
    assert fake.requests[-1]["path"] == "/v1/lora/train"
    assert sent(fake, remote_id) == {
        "base_model_id": "model001",
        "images": IMAGES,
        "trigger_word": "zxq person",
        "model_name": "My LoRA",
        "description": "a person",
        "main_object": "Human",
        "task_type": "VIP",
    }
    assert RemoteRef.parse(remote_id).context == {"f": "lora"}


def test_a_routes_base_models_map_our_ids_onto_sensetimes_and_refuse_others_by_field(client, fake):
    options = {"base_models": {"sd15": "model001"}}
    remote_id = client.submit("train_lora", {**TRAIN, "base_model": "sd15"}, options=options)
    assert sent(fake, remote_id)["base_model_id"] == "model001"
    before = len(fake.requests)
    with pytest.raises(InvalidInput) as info:
        client.submit("train_lora", {**TRAIN, "base_model": "sdxl"}, options=options)
    assert info.value.field == "base_model" and "sd15" in str(info.value)
    assert len(fake.requests) == before


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"captions": ["a", "b", "c", "d"]}, "captions"),
        ({"rank": 16}, "rank"),
        ({"steps": 3000}, "steps"),
        ({"learning_rate": 1e-4}, "learning_rate"),
        ({"resolution": 768}, "resolution"),
        ({"seed": 7}, "seed"),
        ({"train_text_encoder": False}, "train_text_encoder"),
    ],
)
def test_what_the_seed_cannot_express_is_refused_naming_the_field_before_any_request(
    client, fake, extra, field
):
    with pytest.raises(InvalidInput) as info:
        client.submit("train_lora", {**TRAIN, **extra})
    assert info.value.field == field and field in str(info.value)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("payload", "options", "field"),
    [
        ({**TRAIN, "images": [*IMAGES[:3], "data:image/png;base64,AAAA"]}, {}, "images"),
        ({**TRAIN, "images": []}, {}, "images"),
        ({k: v for k, v in TRAIN.items() if k != "base_model"}, {}, "base_model"),
        ({**TRAIN, "name": "n" * 65}, {}, "name"),
        (TRAIN, {"main_object": "Cat"}, "main_object"),
        (TRAIN, {"task_type": "URGENT"}, "task_type"),
        (TRAIN, {"description": "d" * 1025}, "description"),
    ],
)
def test_inputs_outside_the_seeds_training_limits_fail_before_any_request(
    client, fake, payload, options, field
):
    with pytest.raises(InvalidInput) as info:
        client.submit("train_lora", payload, options=options)
    assert info.value.field == field
    assert fake.requests == []


def test_the_mapping_is_pure_and_sends_no_optional_field_it_was_not_given():
    body = build_train_lora({"images": IMAGES, "base_model": "b1", "trigger_word": "w"}, {})
    assert body == {"base_model_id": "b1", "images": IMAGES, "trigger_word": "w"}


def test_an_unknown_base_model_is_a_permanent_provider_error(client, fake):
    with pytest.raises(ProviderError) as info:
        client.submit("train_lora", {**TRAIN, "base_model": "no-such-model"})
    assert info.value.provider_code == "5"


# -- results and progress


def test_training_polls_queued_then_running_with_rising_progress_then_the_lora_id(client, fake):
    remote_id = client.submit("train_lora", TRAIN)
    seen = polls(client, remote_id)
    assert [r.status for r in seen] == [
        RemoteStatus.QUEUED,
        RemoteStatus.RUNNING,
        RemoteStatus.RUNNING,
        RemoteStatus.RUNNING,
        RemoteStatus.SUCCEEDED,
    ]
    assert [r.progress for r in seen[:4]] == [0.0, 25.0, 50.0, 75.0]
    assert [r.progress_detail for r in seen[:4]] == [{"training_progress": f} for f in (0, 0.25, 0.5, 0.75)]
    done = seen[-1]
    task_id = RemoteRef.parse(remote_id).id
    # The LoRA stays at SenseTime: no output to download, its id for the job's result.
    assert done.outputs == () and done.data == {"provider_model_id": f"lora-{task_id}"}
    assert fake.requests[-1]["path"] == f"/v1/lora/result/{task_id}"


def test_a_failed_training_is_a_failed_result_with_the_providers_reason(client, fake):
    remote_id = client.submit("train_lora", {**TRAIN, "trigger_word": "NO-HUMAN landscape"})
    done = polls(client, remote_id)[-1]
    assert done.status is RemoteStatus.FAILED and done.error_code == "remote_failed"
    assert done.error_message == f"SenseTime's LoRA training failed: {NO_HUMAN_MESSAGE}"
    assert done.provider_code == "FAILED"


def test_trainings_are_polled_together_through_the_lora_batch_endpoint(client, fake):
    ids = [client.submit("train_lora", TRAIN) for _ in range(3)]
    results = client.poll_many(ids)
    assert fake.batch_sizes == [3] and fake.requests[-1]["path"] == "/v1/lora/results"
    assert {r.status for r in results.values()} == {RemoteStatus.QUEUED}
    again = client.poll_many(ids)
    assert all(r.status is RemoteStatus.RUNNING and r.progress == 25.0 for r in again.values())


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        # The seed's batch example says DONE for a finished training.
        ({"state": "DONE", "lora_id": "L1", "training_progress": 1}, RemoteStatus.SUCCEEDED, None),
        ({"state": "SUCCESS", "lora_id": "", "training_progress": 1}, RemoteStatus.FAILED, None),
        ({"state": "RUNNING", "training_progress": 1.7}, RemoteStatus.RUNNING, 100.0),
        ({"state": "RUNNING", "training_progress": "0.3"}, RemoteStatus.RUNNING, 30.0),
        ({"state": "RUNNING"}, RemoteStatus.RUNNING, None),
        ({"state": "TRAINING", "training_progress": 0.5}, RemoteStatus.RUNNING, 50.0),
        ({"state": "CANCELLED"}, RemoteStatus.CANCELLED, None),
    ],
)
def test_every_training_state_maps_onto_ours(body, status, expected):
    result = lora_result("t1?f=lora", body)
    assert result.status is status
    if status is RemoteStatus.RUNNING:
        assert result.progress == expected
    if status is RemoteStatus.SUCCEEDED:
        assert result.data == {"provider_model_id": "L1"}


def test_the_failure_reason_is_read_from_state_message_or_state_msg():
    for key in ("state_message", "state_msg"):
        result = lora_result("t1?f=lora", {"state": "FAILED", key: "no faces"})
        assert result.error_message == "SenseTime's LoRA training failed: no faces"


# -- cancel


def test_a_waiting_training_is_cancelled_at_sensetime(client, fake):
    remote_id = client.submit("train_lora", TRAIN)
    assert client.cancel(remote_id) is True
    task_id = RemoteRef.parse(remote_id).id
    assert fake.requests[-1]["path"] == "/v1/lora/cancel"
    assert fake.cancels == [{"task_id": task_id, "state": "PENDING", "success": True}]
    assert client.poll(remote_id).status is RemoteStatus.CANCELLED


def test_a_running_training_cannot_be_cancelled_and_says_so(client, fake):
    remote_id = client.submit("train_lora", TRAIN)
    client.poll(remote_id)
    client.poll(remote_id)  # RUNNING now
    assert client.cancel(remote_id) is False
    assert fake.cancels[-1]["success"] is False
    assert client.poll(remote_id).status is RemoteStatus.RUNNING


def test_capabilities_without_a_cancel_send_nothing(client, fake):
    remote_id = client.submit("generate", {"prompt": "x"}, options={"model_id": "model001"})
    before = len(fake.requests)
    assert client.cancel(remote_id) is False
    assert len(fake.requests) == before


# -- using a trained LoRA


def test_generate_takes_loras_in_the_contracts_model_and_weight_form(client, fake):
    loras = [{"model": "lora-abc", "weight": 0.8}, {"model_id": "lora-def"}]
    remote_id = client.submit("generate", {"prompt": "x", "loras": loras}, options={"model_id": "model001"})
    assert sent(fake, remote_id)["lora_configs"] == [
        {"model_id": "lora-abc", "merge_weight": 0.8},
        {"model_id": "lora-def"},
    ]
