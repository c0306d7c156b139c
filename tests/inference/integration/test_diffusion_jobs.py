"""Diffusion tasks through jobs, on a tiny random-weight SD model installed in the model store."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from PIL import Image

from config import Settings
from tests.conftest import KEYS
from tests.support.images import data_uri
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform

ALICE = KEYS[0][1]
H = {"X-API-Key": ALICE}


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    from inference.model_store import ModelStore
    from tests.inference.tiny_diffusion import save_tiny_sd

    tmp = tmp_path_factory.mktemp("diffusion")
    models = tmp / "models"
    models.mkdir()
    settings = platform_settings(
        base_settings,
        tmp,
        broker_url=worker_amqp_url,
        models_dir=models,
        prompt_blocklist=("forbidden thing",),
    )
    with running_platform(settings, tmp) as plat:
        # The first diffusion model is installed while the API and the workers already run.
        AT_START["generate_installed"] = _generate_installed(plat)
        ModelStore(models).add(save_tiny_sd(models / "tiny-sd"), id="tiny-sd")
        yield plat


AT_START: dict[str, bool] = {}


def _generate_installed(platform: Platform) -> bool:
    caps = requests.get(f"{platform.base_url}/v1/capabilities", headers=H, timeout=10).json()["tasks"]
    return next(t for t in caps if t["task"] == "generate")["installed"]


def test_diffusion_models_added_while_the_platform_runs_are_used_without_restart(platform: Platform) -> None:
    from inference.model_store import ModelStore
    from tests.inference.tiny_diffusion import save_tiny_sd

    assert AT_START["generate_installed"] is False
    assert _generate_installed(platform) is True
    first = platform.submit(ALICE, "generate", {"prompt": "a cat", "width": 64, "height": 64, "steps": 2})
    job = platform.wait(ALICE, first.json()["job_id"], timeout=120)
    assert job["status"] == "succeeded" and job["result"]["meta"]["backend"] == "diffusers:tiny-sd", job

    # A second model, added after the worker has loaded the first one and keeps it warm.
    models = platform.settings.models_dir
    ModelStore(models).add(save_tiny_sd(models / "tiny-sd-b", seed=5), id="tiny-sd-b")
    listed = requests.get(f"{platform.base_url}/v1/models?type=diffusers", headers=H, timeout=10).json()
    assert {m["id"] for m in listed["data"]} >= {"tiny-sd", "tiny-sd-b"}
    second = platform.submit(
        ALICE, "generate", {"prompt": "a cat", "model": "tiny-sd-b", "width": 64, "height": 64, "steps": 2}
    )
    job = platform.wait(ALICE, second.json()["job_id"], timeout=120)
    assert job["status"] == "succeeded" and job["result"]["meta"]["backend"] == "diffusers:tiny-sd-b", job


def test_an_output_refused_by_the_models_safety_checker_ends_the_job_rejected(platform: Platform) -> None:
    from inference.model_store import ModelStore
    from tests.inference.tiny_diffusion import save_tiny_sd

    store = ModelStore(platform.settings.models_dir)
    store.add(save_tiny_sd(store.models_dir / "checked", safety_checker="flags"), id="checked-flags")
    try:
        job_id = platform.submit(
            ALICE,
            "generate",
            {"prompt": "a cat", "model": "checked-flags", "width": 64, "height": 64, "steps": 2},
        ).json()["job_id"]
        job = platform.wait(ALICE, job_id, timeout=120)
    finally:
        # The other tests let the platform pick its default model, which must not be this one.
        store.remove("checked-flags")
    assert job["status"] == "rejected", job
    assert job["error"]["code"] == "output_safety_checker" and job["result"] is None


def fetch(url: str) -> Image.Image:
    return Image.open(io.BytesIO(requests.get(url, timeout=10).content)).convert("RGB")


def test_generate_records_a_seed_per_sample_and_names_the_model(platform: Platform) -> None:
    job_id = platform.submit(
        ALICE,
        "generate",
        {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 42, "samples": 2},
    ).json()["job_id"]
    job = platform.wait(ALICE, job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["result"]["meta"]["backend"] == "diffusers:tiny-sd"
    files = job["result"]["files"]
    assert [f["meta"]["seed"] for f in files] == [42, 43]
    assert all(fetch(f["url"]).size == (64, 64) for f in files)


def test_seed_000_alias_and_blocking_endpoint_run_generate(platform: Platform) -> None:
    response = requests.post(
        f"{platform.base_url}/ahv/image",
        headers=H,
        timeout=60,
        json={"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 7},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["task"] == "ahv_image" and job["status"] == "succeeded"


def test_outpaint_keeps_the_original_pixels_where_align_puts_them(platform: Platform) -> None:
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    job_id = platform.submit(
        ALICE,
        "outpaint",
        {
            "image_url": data_uri(original),
            "width": 128,
            "height": 64,
            "align": "left",
            "steps": 2,
            "format": "png",
        },
    ).json()["job_id"]
    job = platform.wait(ALICE, job_id, timeout=120)
    assert job["status"] == "succeeded", job
    out = np.asarray(fetch(job["result"]["url"]))
    assert out.shape == (64, 128, 3)
    assert np.array_equal(out[:, :64], np.asarray(original))


def test_remove_object_and_inpaint_leave_pixels_outside_the_mask_identical(platform: Platform) -> None:
    rng = np.random.default_rng(1)
    original = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for task, extra in (("remove_object", {}), ("inpaint", {"prompt": "grass", "steps": 2})):
        job_id = platform.submit(
            ALICE,
            task,
            {"image_url": data_uri(original), "mask_url": data_uri(mask), "format": "png", **extra},
        ).json()["job_id"]
        job = platform.wait(ALICE, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        out = np.asarray(fetch(job["result"]["url"]))
        outside = np.asarray(mask) == 0
        assert np.array_equal(out[outside], np.asarray(original)[outside]), task


def test_unknown_model_fails_clearly(platform: Platform) -> None:
    job_id = platform.submit(ALICE, "generate", {"prompt": "x", "model": "nope", "steps": 2}).json()["job_id"]
    job = platform.wait(ALICE, job_id, timeout=60)
    assert job["status"] == "failed" and job["error"]["details"]["field"] == "model"


def test_a_blocked_prompt_is_rejected_naming_the_check(platform: Platform) -> None:
    job_id = platform.submit(
        ALICE, "generate", {"prompt": "A Forbidden Thing at dusk", "steps": 2, "width": 64, "height": 64}
    ).json()["job_id"]
    job = platform.wait(ALICE, job_id, timeout=60)
    assert job["status"] == "rejected" and job["error"]["code"] == "prompt_blocked"
    fine = platform.submit(
        ALICE, "generate", {"prompt": "forbidden things", "steps": 2, "width": 64, "height": 64}
    ).json()["job_id"]
    assert platform.wait(ALICE, fine, timeout=60)["status"] == "succeeded"


def test_cancel_stops_a_running_generation_within_a_step(platform: Platform) -> None:
    import time

    job_id = platform.submit(
        ALICE, "generate", {"prompt": "slow", "steps": 100, "width": 128, "height": 128, "samples": 8}
    ).json()["job_id"]
    deadline = time.monotonic() + 120  # a cold worker imports torch and loads the model first
    while time.monotonic() < deadline:
        job = platform.job(ALICE, job_id)
        if (job["status"] == "running" and job["progress"] > 0) or job["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert job["status"] == "running", job
    cancelled_at = time.monotonic()
    assert (
        requests.post(f"{platform.base_url}/v1/jobs/{job_id}/cancel", headers=H, timeout=5).status_code == 200
    )
    job = platform.wait(ALICE, job_id, timeout=30)
    assert job["status"] == "cancelled" and job["progress"] < 100
    assert time.monotonic() - cancelled_at < 10  # one step is milliseconds; the rest is polling slack
