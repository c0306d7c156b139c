"""``train_lora`` through the whole platform: the API, a real training worker on its own queue
(``gpu.train``), Postgres and RabbitMQ, a tiny random-weight SD model in the store and real photos.

A trained LoRA is its client's model at once (listed for it, usable in its ``generate``, unknown
to another client); progress carries the step and the loss; a cancel ends the run with nothing
registered; a SIGKILLed trainer resumes from its last checkpoint on the next attempt.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from config import Settings
from inference.model_store import ModelStore
from tests.conftest import KEYS
from tests.inference.tiny_diffusion import save_tiny_sd
from tests.support.images import data_uri
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform

ALICE_ID = KEYS[0][0]
ALICE, BOB = KEYS[0][1], KEYS[1][1]
RESOLUTION = 256


def photo_uri(index: int, side: int = RESOLUTION) -> str:
    from skimage import data

    picture = [data.astronaut, data.chelsea, data.coffee, data.rocket, data.immunohistochemistry][index % 5]()
    return data_uri(Image.fromarray(picture).convert("RGB").resize((side, side), Image.Resampling.LANCZOS))


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("training")
    models = tmp / "models"
    ModelStore(models).add(save_tiny_sd(models / "tiny-sd"), id="tiny-sd")
    settings = platform_settings(
        base_settings, tmp, broker_url=worker_amqp_url, models_dir=models, train_checkpoint_every=4
    )
    with running_platform(settings, tmp) as plat:
        plat.start_worker("train", "gpu.train", 1)
        yield plat


def train(platform: Platform, key: str = ALICE, **payload: Any) -> str:
    body = {
        "images": [photo_uri(i) for i in range(4)],
        "trigger_word": "sks",
        "base_model": "tiny-sd",
        "rank": 4,
        "steps": 6,
        "learning_rate": 1e-3,
        "resolution": RESOLUTION,
        "name": "my style",
        **payload,
    }
    response = platform.submit(key, "train_lora", body)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def model_ids(platform: Platform, key: str) -> set[str]:
    listed = requests.get(
        f"{platform.base_url}/v1/models?type=lora&size=200", headers={"X-API-Key": key}, timeout=10
    )
    return {entry["id"] for entry in listed.json()["data"]}


def generate(platform: Platform, key: str, **payload: Any) -> dict[str, Any]:
    body = {"prompt": "a photo of sks", "model": "tiny-sd", "width": 64, "height": 64, "steps": 2, "seed": 7}
    job_id = platform.submit(key, "generate", {**body, **payload}).json()["job_id"]
    return platform.wait(key, job_id, timeout=120)


def pixels(job: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(requests.get(job["result"]["url"], timeout=10).content)))


def test_a_trained_lora_is_its_clients_model_at_once(platform: Platform) -> None:
    job_id = train(platform)
    job = platform.wait(ALICE, job_id, timeout=300)
    assert job["status"] == "succeeded", job
    result = job["result"]
    model_id = result["model_id"]
    assert model_id == f"lora-{job_id}"
    meta = result["meta"]
    assert meta["backend"] == "peft-lora:tiny-sd" and meta["steps"] == 6 and meta["rank"] == 4
    assert np.isfinite(meta["final_loss"]) and meta["resumed_from"] == 0
    assert job["progress"] == 100
    assert job["progress_detail"]["step"] == 6 and job["progress_detail"]["steps"] == 6
    # The file, in result.files, downloadable: a safetensors of LoRA weights in the diffusers layout.
    (file,) = result["files"]
    assert file["filename"].endswith(".safetensors")
    blob = requests.get(file["url"], timeout=10).content
    from safetensors.torch import load

    weights = load(blob)
    assert weights and all("lora" in name for name in weights)
    assert any(name.startswith("unet.") for name in weights)

    # Alice's model; Bob does not see it.
    assert model_id in model_ids(platform, ALICE) and model_id not in model_ids(platform, BOB)
    # Alice's generate uses it at once, and it changes a seeded output.
    plain = generate(platform, ALICE)
    styled = generate(platform, ALICE, loras=[{"model": model_id, "weight": 1.0}])
    assert plain["status"] == styled["status"] == "succeeded", (plain, styled)
    assert styled["result"]["meta"]["loras"] == [{"model": model_id, "weight": 1.0}]
    assert not np.array_equal(pixels(plain), pixels(styled))
    # Bob naming it gets what a LoRA that does not exist gets.
    theirs = generate(platform, BOB, loras=[{"model": model_id, "weight": 1.0}])
    nobody = generate(platform, BOB, loras=[{"model": "lora-nobody", "weight": 1.0}])
    assert theirs["status"] == nobody["status"] == "failed"
    assert theirs["error"]["message"].replace(model_id, "X") == nobody["error"]["message"].replace(
        "lora-nobody", "X"
    )
    assert theirs["error"]["details"] == nobody["error"]["details"]

    # Deleting the job leaves the model; deleting the model (its owner) removes it.
    key = {"X-API-Key": ALICE}
    assert (
        requests.delete(f"{platform.base_url}/v1/jobs/{job_id}", headers=key, timeout=10).status_code == 204
    )
    assert model_id in model_ids(platform, ALICE)
    assert (
        requests.delete(f"{platform.base_url}/v1/models/{model_id}", headers=key, timeout=10).status_code
        == 204
    )
    assert model_id not in model_ids(platform, ALICE)


def test_a_cancel_stops_the_training_and_registers_nothing(platform: Platform) -> None:
    job_id = train(platform, steps=5000)
    deadline = time.monotonic() + 120
    job = platform.job(ALICE, job_id)
    while (job.get("progress_detail") or {}).get("step", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        job = platform.job(ALICE, job_id)
    assert job["status"] == "running" and job["progress_detail"]["loss"] > 0, job
    cancelled = requests.post(
        f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers={"X-API-Key": ALICE}, timeout=10
    )
    assert cancelled.status_code == 200, cancelled.text
    job = platform.wait(ALICE, job_id, timeout=60)
    assert job["status"] == "cancelled", job
    assert job["progress_detail"]["step"] < 5000
    assert f"lora-{job_id}" not in model_ids(platform, ALICE)
    store = ModelStore(platform.settings.models_dir)
    assert not (store.models_dir / "trained" / f"lora-{job_id}").exists()
    assert not (Path(platform.settings.var_dir) / "training" / job_id).exists()


def test_a_killed_trainer_resumes_from_its_last_checkpoint(platform: Platform) -> None:
    job_id = train(platform, steps=40)
    deadline = time.monotonic() + 120
    job = platform.job(ALICE, job_id)
    while (job.get("progress_detail") or {}).get("step", 0) < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
        job = platform.job(ALICE, job_id)
    assert job["progress_detail"]["step"] >= 10, job
    platform.kill("train")  # SIGKILL: the worker and its pool, mid-training
    platform.start_worker("train", "gpu.train", 1)
    job = platform.wait(ALICE, job_id, timeout=300)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    meta = job["result"]["meta"]
    # Checkpoints every 4 steps: the second attempt went on from the last one before the kill.
    assert meta["resumed_from"] >= 8 and meta["resumed_from"] % 4 == 0, meta
    assert meta["steps"] == 40


def test_an_image_below_the_resolution_fails_the_job_naming_it(platform: Platform) -> None:
    images = [photo_uri(i) for i in range(3)] + [photo_uri(3, side=200)]
    job = platform.wait(ALICE, train(platform, images=images), timeout=120)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "invalid_input" and job["error"]["details"] == {"field": "images[3]"}
    assert "200x200" in job["error"]["message"]
