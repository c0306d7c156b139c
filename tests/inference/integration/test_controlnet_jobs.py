"""ControlNets on ``generate`` jobs through the API, the cpu and gpu workers: tiny random-weight
ControlNets in the model store, control images made on the worker from a real photo."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from PIL import Image
from skimage import data

from config import Settings
from tests.conftest import KEYS
from tests.support.images import data_uri
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform

ALICE = KEYS[0][1]
# Four steps, so a ControlNet's start-end span (fractions of the steps) covers some and not others.
BASE = {"prompt": "a cat", "width": 64, "height": 64, "steps": 4, "seed": 5, "format": "png"}


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    from inference.model_store import ModelStore
    from tests.inference.tiny_controlnet import save_tiny_controlnet
    from tests.inference.tiny_diffusion import save_tiny_sd

    tmp = tmp_path_factory.mktemp("controlnet")
    models = tmp / "models"
    store = ModelStore(models)
    store.add(save_tiny_sd(models / "tiny-sd"), id="tiny-sd")
    store.add(save_tiny_controlnet(models / "sd-controlnet-canny", seed=1), id="tiny-canny")
    store.add(save_tiny_controlnet(models / "sd-controlnet-lineart", seed=2), id="tiny-lineart")
    settings = platform_settings(base_settings, tmp, broker_url=worker_amqp_url, models_dir=models)
    with running_platform(settings, tmp) as plat:
        yield plat


@pytest.fixture(scope="module")
def photo_uri() -> str:
    # Small enough to stay inline (no asset), large enough for the control image's detail.
    return data_uri(Image.fromarray(data.astronaut()).resize((128, 128), Image.Resampling.LANCZOS))


def run(platform: Platform, payload: dict) -> dict:
    job_id = platform.submit(ALICE, "generate", payload).json()["job_id"]
    job = platform.wait(ALICE, job_id, timeout=180)
    assert job["status"] == "succeeded", job
    return job


def output(job: dict) -> np.ndarray:
    content = requests.get(job["result"]["url"], timeout=10).content
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.int16)


def test_generate_with_one_and_with_two_controlnets_differs_from_the_same_seed_without(
    platform: Platform, photo_uri: str
) -> None:
    plain = run(platform, BASE)
    one = run(platform, {**BASE, "controlnets": [{"type": "canny", "image_url": photo_uri}]})
    two = run(
        platform,
        {
            **BASE,
            "controlnets": [
                {"type": "canny", "image_url": photo_uri},
                {"type": "lineart", "image_url": photo_uri, "scale": 0.8, "start": 0.25, "end": 0.75},
            ],
        },
    )
    images = [output(job) for job in (plain, one, two)]
    assert all(image.shape == (64, 64, 3) for image in images)
    assert np.abs(images[0] - images[1]).mean() > 1
    assert np.abs(images[1] - images[2]).mean() > 1
    meta = two["result"]["meta"]
    assert meta["backend"] == "diffusers:tiny-sd"
    assert [(c["type"], c["model"], c["preprocessor"]) for c in meta["controlnets"]] == [
        ("canny", "tiny-canny", "opencv-canny"),
        ("lineart", "tiny-lineart", "opencv-dog-lines"),
    ]
    assert meta["controlnets"][1]["scale"] == 0.8 and "controlnets" not in plain["result"]["meta"]


def test_a_controlnet_type_with_no_model_installed_fails_the_job_naming_the_field(
    platform: Platform, photo_uri: str
) -> None:
    payload = {
        **BASE,
        "controlnets": [{"type": "canny", "image_url": photo_uri}, {"type": "tile", "image_url": photo_uri}],
    }
    job_id = platform.submit(ALICE, "generate", payload).json()["job_id"]
    job = platform.wait(ALICE, job_id, timeout=120)
    assert job["status"] == "failed" and job["error"]["details"]["field"] == "controlnets[1].type", job


def test_four_controlnets_are_a_422_before_any_job_exists(platform: Platform, photo_uri: str) -> None:
    payload = {**BASE, "controlnets": [{"type": "canny", "image_url": photo_uri}] * 4}
    response = platform.submit(ALICE, "generate", payload)
    assert response.status_code == 422
    assert "controlnets" in response.json()["error"]["details"]["payload"]
