"""The diffusion tasks' payloads at the API: the schema refuses with a 422 what the engines would
refuse (one set of limits, config/limits.py), inpaint refuses a size it cannot honour, and outpaint
takes the SenseTime seed's align spellings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from app import create_app
from config import Settings, limits
from tests.conftest import KEYS

ALICE = {"X-API-Key": KEYS[0][1]}
IMG = "http://images.example.com/a.png"
MASK = "http://images.example.com/mask.png"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A diffusion model must be installed, or the API answers 501 before looking at the payload.
    from inference.model_store import ModelStore
    from tests.inference.tiny_diffusion import save_tiny_sd

    root = tmp_path_factory.mktemp("models")
    ModelStore(root).add(save_tiny_sd(root / "tiny-sd"), id="tiny-sd")
    return root


@pytest.fixture
def client(settings: Settings, models_dir: Path) -> Iterator[FlaskClient]:
    app = create_app(settings.with_overrides(models_dir=models_dir))
    yield app.test_client()
    app.extensions["aiorch"].db.dispose()


def submit(client: FlaskClient, task: str, payload: dict) -> object:
    return client.post("/v1/jobs", json={"task": task, "payload": payload}, headers=ALICE)


def refused_fields(response) -> dict:
    assert response.status_code == 422, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "invalid_payload"
    return error["details"]["payload"]


@pytest.mark.parametrize(
    ("task", "payload", "field"),
    [
        ("generate", {"prompt": "a cat", "steps": limits.DIFFUSION_MAX_STEPS + 1}, "steps"),
        (
            "generate",
            {"prompt": "a cat", "loras": [{"model": "x"}] * (limits.DIFFUSION_MAX_LORAS + 1)},
            "loras",
        ),
        ("generate", {"prompt": "a cat", "image_url": IMG, "image_strength": 0}, "image_strength"),
        ("generate", {"prompt": "a cat", "samples": limits.DIFFUSION_MAX_SAMPLES + 1}, "samples"),
        ("generate", {"prompt": "a cat", "width": limits.DIFFUSION_MAX_SIDE + 8}, "width"),
        ("inpaint", {"image_url": IMG, "mask_url": MASK, "strength": 0}, "strength"),
        ("inpaint", {"image_url": IMG, "mask_url": MASK, "steps": 150}, "steps"),
        ("outpaint", {"image_url": IMG, "ratio": 2, "steps": 101}, "steps"),
    ],
)
def test_a_value_over_the_engine_limit_is_a_422_naming_the_field(client, task, payload, field) -> None:
    assert field in refused_fields(submit(client, task, payload))


def test_the_limits_at_the_edge_are_accepted(client) -> None:
    payload = {
        "prompt": "a cat",
        "steps": limits.DIFFUSION_MAX_STEPS,
        "loras": [{"model": f"l{i}"} for i in range(limits.DIFFUSION_MAX_LORAS)],
        "image_url": IMG,
        "image_strength": 1.0,
    }
    assert submit(client, "generate", payload).status_code == 202


def test_the_engine_uses_the_same_limits() -> None:
    from inference import diffusion

    assert diffusion.MAX_STEPS == limits.DIFFUSION_MAX_STEPS
    assert diffusion.MAX_LORAS == limits.DIFFUSION_MAX_LORAS
    assert diffusion.MAX_SAMPLES == limits.DIFFUSION_MAX_SAMPLES


@pytest.mark.parametrize("field", ["width", "height"])
def test_inpaint_refuses_width_and_height_naming_the_field(client, field) -> None:
    fields = refused_fields(submit(client, "inpaint", {"image_url": IMG, "mask_url": MASK, field: 64}))
    assert list(fields) == [field]
    assert "input image's size" in fields[field][0]


@pytest.mark.parametrize(
    "align",
    ["topmiddle", "middleleft", "middleright", "bottommiddle", *limits.OUTPAINT_ALIGNS],
)
def test_outpaint_takes_the_senstime_align_spellings_and_the_nine_names(client, align) -> None:
    assert submit(client, "outpaint", {"image_url": IMG, "ratio": 2, "align": align}).status_code == 202


def test_outpaint_refuses_an_unknown_align(client) -> None:
    assert "align" in refused_fields(
        submit(client, "outpaint", {"image_url": IMG, "ratio": 2, "align": "up"})
    )
