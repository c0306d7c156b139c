"""stylize, remove_object by prompt and with LaMa, samples on remove_object and inpaint, and free
outpaint, through the real API and workers, on tiny random-weight models installed in the model
store (a diffusers SD pipeline, a client's LoRA, an operator's LoRA, a random LaMa, a detector set
to find one dog) and a real photo. The operator's styles file (``AIORCH_STYLES_FILE``) adds a
preset with that LoRA and replaces the built-in ``sketch``.

The platform runs as production does: its own database on the run's Postgres, its own vhost on
RabbitMQ, the SSRF guard on.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from skimage import data

from config import Settings
from inference.styles import BUILTIN_STYLES
from tests.conftest import KEYS
from tests.support.images import data_uri
from tests.support.platform import Platform
from tests.support.platform_fixtures import platform_settings, running_platform

ALICE, BOB = KEYS[0][1], KEYS[1][1]
PHOTO = Image.fromarray(data.astronaut()).resize((96, 64), Image.Resampling.LANCZOS)
# Where the detector finds its dog, as fractions of the image: (24, 16)-(48, 48) in PHOTO.
DOG_BOX = (0.25, 0.25, 0.5, 0.75)
STYLES = {
    "noir": {
        "prompt": "film noir photograph of {prompt}",
        "description": "Film noir",
        "strength": 0.5,
        "lora": "house-style",
        "lora_weight": 0.8,
    },
    "sketch": {"prompt": "charcoal sketch of {prompt}", "description": "Charcoal"},
}


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    from inference.model_store import ModelStore
    from tests.inference.tiny_diffusion import save_tiny_lora, save_tiny_sd
    from tests.inference.tiny_removal import save_firing_detector, save_random_lama

    tmp = tmp_path_factory.mktemp("stylize-removal")
    models = tmp / "models"
    store = ModelStore(models)
    store.add(save_tiny_sd(models / "tiny-sd"), id="tiny-sd")
    lora = save_tiny_lora(models / "loras" / "alice-style")
    store.add(lora, id="alice-style", base_model_type="sd15", owner="alice")
    store.add(
        save_tiny_lora(models / "loras" / "house-style", seed=2), id="house-style", base_model_type="sd15"
    )
    store.add(save_random_lama(models / "big-lama.ckpt"), id="big-lama")
    store.add(save_firing_detector(models / "det.pth", ["person", "dog"], "dog", DOG_BOX), id="det")
    styles = tmp / "styles.json"
    styles.write_text(json.dumps(STYLES))
    settings = platform_settings(
        base_settings, tmp, broker_url=worker_amqp_url, models_dir=models, styles_file=styles
    )
    with running_platform(settings, tmp) as plat:
        yield plat


def run(platform: Platform, task: str, payload: dict[str, Any], key: str = ALICE) -> dict[str, Any]:
    created = platform.submit(key, task, payload)
    assert created.status_code == 202, created.text
    # A cold worker imports torch and loads each model first.
    return platform.wait(key, created.json()["job_id"], timeout=240)


def fetch(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(requests.get(url, timeout=10).content)).convert("RGB"))


def refused(platform: Platform, task: str, payload: dict[str, Any], key: str = ALICE) -> dict[str, Any]:
    response = platform.submit(key, task, payload)
    assert response.status_code == 422, response.text
    return response.json()["error"]["details"]["payload"]


def test_capabilities_list_stylize_with_its_presets_and_the_new_parameters(platform: Platform) -> None:
    tasks = requests.get(
        f"{platform.base_url}/v1/capabilities", headers={"X-API-Key": ALICE}, timeout=10
    ).json()
    by_name = {t["task"]: t for t in tasks["tasks"]}
    stylize = by_name["stylize"]
    assert stylize["installed"] and stylize["queue"] == "gpu.diffusion"
    style = next(p for p in stylize["parameters"] if p["name"] == "style")
    # The operator's presets after the built-ins; a same-named one replaces its built-in in place.
    assert style["required"] and [p["name"] for p in style["presets"]] == [*BUILTIN_STYLES, "noir"]
    described = {p["name"]: p for p in style["presets"]}
    assert described["sketch"]["description"] == "Charcoal"
    assert described["noir"] == {
        "name": "noir",
        "description": "Film noir",
        "strength": 0.5,
        "lora": "house-style",
    }
    assert {"prompt", "fill_prompt", "samples", "mask_url"} <= {
        p["name"] for p in by_name["remove_object"]["parameters"]
    }
    assert {"left", "right", "top", "bottom"} <= {p["name"] for p in by_name["outpaint"]["parameters"]}


def test_stylize_with_a_preset_keeps_the_pictures_size(platform: Platform) -> None:
    job = run(
        platform,
        "stylize",
        {"image_url": data_uri(PHOTO), "style": "anime", "prompt": "an astronaut", "steps": 4, "seed": 5},
    )
    assert job["status"] == "succeeded", job
    meta = job["result"]["meta"]
    assert meta["backend"] == "diffusers:tiny-sd" and meta["style"] == "anime" and meta["seed"] == 5
    assert fetch(job["result"]["url"]).shape == (64, 96, 3)


def test_stylize_with_an_operators_file_preset_applies_its_lora_for_any_client(platform: Platform) -> None:
    job = run(
        platform,
        "stylize",
        {"image_url": data_uri(PHOTO), "style": "noir", "prompt": "an astronaut", "steps": 4, "seed": 3},
        key=BOB,
    )
    assert job["status"] == "succeeded", job
    meta = job["result"]["meta"]
    assert meta["style"] == "noir" and meta["strength"] == 0.5
    assert meta["loras"] == [{"model": "house-style", "weight": 0.8}]
    assert fetch(job["result"]["url"]).shape == (64, 96, 3)
    # A name that is neither a preset of the file nor of the built-ins, nor a LoRA: a 422.
    assert "style" in refused(platform, "stylize", {"image_url": data_uri(PHOTO), "style": "noire"})


def test_stylize_with_a_lora_id_is_for_the_loras_owner_only(platform: Platform) -> None:
    payload = {"image_url": data_uri(PHOTO), "style": "alice-style", "steps": 4, "seed": 1, "samples": 2}
    job = run(platform, "stylize", payload)
    assert job["status"] == "succeeded", job
    files = job["result"]["files"]
    assert [f["meta"]["seed"] for f in files] == [1, 2]
    assert files[0]["meta"]["loras"] == [{"model": "alice-style", "weight": 1.0}]
    # Another client's LoRA is an unknown style, refused at POST like one that does not exist.
    assert "unknown style" in refused(platform, "stylize", payload, key=BOB)["style"][0]
    assert refused(platform, "stylize", {**payload, "style": "no-such-style"}, key=BOB) == refused(
        platform, "stylize", payload, key=BOB
    )


def test_remove_object_by_prompt_erases_the_detected_dog_with_lama(platform: Platform) -> None:
    job = run(platform, "remove_object", {"image_url": data_uri(PHOTO), "prompt": "the dog", "format": "png"})
    assert job["status"] == "succeeded", job
    meta = job["result"]["meta"]
    assert meta["backend"] == "lama:big-lama"
    assert [o["label"] for o in meta["removed"]] == ["dog"]
    assert meta["removed"][0]["box"] == {"x1": 24, "y1": 16, "x2": 48, "y2": 48}
    out, src = fetch(job["result"]["url"]), np.asarray(PHOTO)
    grown = np.zeros(src.shape[:2], dtype=bool)
    grown[12:52, 20:52] = True  # the box grown by 4 px (0.1 x 32 px is 3, under the 4 px minimum)
    assert np.array_equal(out[~grown], src[~grown])
    assert (out[grown] != src[grown]).any()


def test_remove_object_by_prompt_for_what_is_not_there_fails_as_nothing_to_remove(platform: Platform) -> None:
    job = run(platform, "remove_object", {"image_url": data_uri(PHOTO), "prompt": "the person"})
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "nothing_to_remove" and job["error"]["details"]["field"] == "prompt"
    assert "found: dog" in job["error"]["message"]


def test_samples_3_on_remove_object_and_inpaint_give_3_files_with_seeds(platform: Platform) -> None:
    mask = Image.new("L", PHOTO.size, 0)
    mask.paste(255, (30, 20, 60, 44))
    common = {
        "image_url": data_uri(PHOTO),
        "mask_url": data_uri(mask),
        "samples": 3,
        "seed": 7,
        "format": "png",
    }
    for task, extra in (("remove_object", {}), ("inpaint", {"prompt": "grass", "steps": 2})):
        job = run(platform, task, {**common, **extra})
        assert job["status"] == "succeeded", job
        files = job["result"]["files"]
        assert job["result"]["meta"]["backend"] == "diffusers:tiny-sd", task  # samples: not LaMa
        assert [f["meta"]["seed"] for f in files] == [7, 8, 9], task
        outside = np.asarray(mask) == 0
        for file in files:
            assert np.array_equal(fetch(file["url"])[outside], np.asarray(PHOTO)[outside]), task


def test_free_outpaint_adds_the_pixels_asked_for(platform: Platform) -> None:
    payload = {
        "image_url": data_uri(PHOTO),
        "left": 16,
        "right": 8,
        "bottom": 20,
        "steps": 2,
        "format": "png",
    }
    job = run(platform, "outpaint", payload)
    assert job["status"] == "succeeded", job
    out = fetch(job["result"]["url"])
    assert out.shape == (64 + 20, 96 + 16 + 8, 3)
    assert np.array_equal(out[0:64, 16:112], np.asarray(PHOTO))


@pytest.mark.parametrize(
    ("task", "payload", "field"),
    [
        ("stylize", {"style": "no-such-style"}, "style"),
        ("stylize", {}, "style"),
        ("outpaint", {"left": -8}, "left"),
        ("outpaint", {"left": 0, "bottom": 0}, "left"),
        ("outpaint", {"top": 8, "ratio": 1.5}, "ratio"),
        ("remove_object", {}, "mask_url"),
        ("remove_object", {"prompt": "the dog", "samples": 0}, "samples"),
        ("remove_object", {"prompt": "the dog", "samples": 9}, "samples"),
        ("inpaint", {"mask_url": "https://e.com/m.png", "prompt": "x", "samples": 9}, "samples"),
        ("inpaint", {"mask_url": "https://e.com/m.png", "prompt": "x", "samples": 0}, "samples"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    platform: Platform, task: str, payload: dict, field: str
) -> None:
    details = refused(platform, task, {"image_url": "https://e.com/i.png", **payload})
    assert field in details, details
