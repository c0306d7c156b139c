"""``generate``'s ``controlnets`` at the API: a 422 naming the field for what the engine would
refuse, each ControlNet's ``image_url`` an input like any other (its host checked by the same
guard, a large ``data:`` image stored as an asset), and the input plumbing's view of it."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image
from werkzeug.test import TestResponse

from app import create_app
from config import Settings, limits
from tasks import catalog, payloads
from tests.conftest import KEYS

ALICE = {"X-API-Key": KEYS[0][1]}
IMG = "http://images.example.com/pose.png"


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


def submit(client: FlaskClient, controlnets: list) -> TestResponse:
    payload = {"prompt": "a dancer", "controlnets": controlnets}
    return client.post("/v1/jobs", json={"task": "generate", "payload": payload}, headers=ALICE)


def refused(response) -> dict:
    assert response.status_code == 422, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "invalid_payload"
    return error["details"]["payload"]


def test_more_than_three_controlnets_is_a_422_naming_controlnets(client) -> None:
    four = [{"type": "canny", "image_url": IMG}] * (limits.DIFFUSION_MAX_CONTROLNETS + 1)
    assert "controlnets" in refused(submit(client, four))


def test_an_unknown_controlnet_type_is_a_422_naming_that_controlnets_type(client) -> None:
    details = refused(
        submit(client, [{"type": "canny", "image_url": IMG}, {"type": "scribble", "image_url": IMG}])
    )
    assert list(details["controlnets"]) == ["1"] and "type" in details["controlnets"]["1"]


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"type": "canny", "image_url": IMG, "start": 0.5, "end": 0.5}, "start"),
        ({"type": "canny", "image_url": IMG, "start": 0.9, "end": 0.2}, "start"),
        ({"type": "canny", "image_url": IMG, "scale": 2.5}, "scale"),
        ({"type": "canny"}, "image_url"),
        ({"type": "canny", "image_url": "http://10.1.2.3/pose.png"}, "image_url"),
        ({"type": "canny", "image_url": IMG, "weight": 1}, "weight"),
    ],
)
def test_a_bad_controlnet_field_is_a_422_naming_it(client, item, field) -> None:
    assert field in refused(submit(client, [item]))["controlnets"]["0"]


def test_a_controlnet_image_host_is_judged_by_the_settings_own_guard(client) -> None:
    # The test settings let 127.0.0.0/8 through (AIORCH_ALLOW_PRIVATE_NETWORKS); 10.x stays refused
    # (above): the nested input sees the payload's policy, not a default one.
    assert submit(client, [{"type": "canny", "image_url": "http://127.0.0.1:9/p.png"}]).status_code == 202


def test_three_controlnets_at_their_limits_are_accepted(client) -> None:
    three = [
        {"type": "canny", "image_url": IMG, "scale": 0, "start": 0, "end": 1},
        {
            "type": "depth",
            "image_url": IMG,
            "scale": limits.DIFFUSION_MAX_CONTROLNET_SCALE,
            "preprocessed": True,
        },
        {"type": "openpose", "image_url": IMG, "start": 0.99, "end": 1, "preprocessed": True},
    ]
    assert submit(client, three).status_code == 202


@pytest.mark.parametrize("kind", ["depth", "openpose"])
def test_a_control_image_needing_an_uninstalled_annotator_is_a_422_naming_its_type(client, kind) -> None:
    details = refused(submit(client, [{"type": "canny", "image_url": IMG}, {"type": kind, "image_url": IMG}]))
    assert list(details["controlnets"]) == ["1"]
    (message,) = details["controlnets"]["1"]["type"]
    assert f"{kind} annotator is not installed" in message and "preprocessed" in message
    # Sent ready-made, it needs no annotator.
    ready = {"type": kind, "image_url": IMG, "preprocessed": True}
    assert submit(client, [ready]).status_code == 202


@pytest.fixture(scope="module")
def models_dir_with_openpose(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    from inference.model_store import ModelStore
    from tests.inference.tiny_openpose import save_random_body_pose_model

    root = tmp_path_factory.mktemp("models-openpose")
    store = ModelStore(root)
    store.add(models_dir / "tiny-sd", id="tiny-sd")
    store.add(save_random_body_pose_model(root / "body_pose_model.pth"), id="body-pose")
    return root


def test_openpose_is_accepted_once_its_annotator_is_installed_and_depth_still_is_not(
    settings: Settings, models_dir_with_openpose: Path
) -> None:
    app = create_app(settings.with_overrides(models_dir=models_dir_with_openpose))
    try:
        client = app.test_client()
        assert submit(client, [{"type": "openpose", "image_url": IMG}]).status_code == 202
        details = refused(submit(client, [{"type": "depth", "image_url": IMG}]))
        assert list(details["controlnets"]) == ["0"]
    finally:
        app.extensions["aiorch"].db.dispose()


def test_a_large_data_image_in_a_controlnet_is_stored_as_an_asset(client, settings: Settings) -> None:
    from app.assets import DATA_INLINE_LIMIT

    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert len(uri) > DATA_INLINE_LIMIT
    response = submit(client, [{"type": "canny", "image_url": IMG}, {"type": "tile", "image_url": uri}])
    assert response.status_code == 202, response.get_data(as_text=True)
    from models.jobs import Job

    db = client.application.extensions["aiorch"].db
    with db.session() as session:
        stored = session.get(Job, response.get_json()["job_id"]).payload["controlnets"]
    assert stored[0]["image_url"] == IMG and stored[0]["type"] == "canny"
    assert stored[1]["image_url"].startswith("asset://") and stored[1]["type"] == "tile"


def test_each_controlnet_image_is_an_input_of_generate() -> None:
    spec = catalog.TASKS["generate"]
    assert "controlnets" in spec.inputs
    value = [{"type": "canny", "image_url": IMG}, {"type": "tile", "image_url": "asset://" + "a" * 32}]
    assert payloads.input_refs("controlnets", value) == [
        ("controlnets[0].image_url", IMG),
        ("controlnets[1].image_url", "asset://" + "a" * 32),
    ]
    replaced = payloads.replace_input(value, 0, "https://copy.example.com/x.png")
    assert replaced[0] == {"type": "canny", "image_url": "https://copy.example.com/x.png"}
    assert value[0]["image_url"] == IMG  # the payload it came from is left as it was
    # An http(s) image is fetched on the cpu queue; data: and asset:// ones need no network.
    assert catalog.fetch_free(spec, {"prompt": "x", "controlnets": value}) is False
    assert catalog.fetch_free(spec, {"prompt": "x", "controlnets": value[1:]}) is True
