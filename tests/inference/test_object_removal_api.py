"""``remove_object`` by prompt needs an object detector (issue 16): with none installed, the API
refuses the job at ``POST /v1/jobs`` (a 422 naming ``prompt``, as ``face_enhance`` without a face
restorer), instead of accepting a job that can only fail; a mask still works, and installing a
detector makes the prompt accepted.

The store holds a random LaMa (so ``remove_object`` itself is installed) and, later, a random
SSDlite detector with its label map, both added through the store's own ``add``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from config import Settings
from inference.model_store import ModelStore
from tests.conftest import KEYS
from tests.inference.tiny_removal import save_firing_detector, save_random_lama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def post(settings: Settings, payload: dict) -> tuple[int, dict]:
    from app import create_app

    app = create_app(settings)
    try:
        response = app.test_client().post(
            "/v1/jobs",
            json={"task": "remove_object", "payload": {"image_url": "https://example.com/a.png", **payload}},
            headers={"X-API-Key": KEYS[0][1]},
        )
        return response.status_code, response.get_json()
    finally:
        app.extensions["aiorch"].db.dispose()


def test_remove_object_by_prompt_without_a_detector_is_a_422_naming_prompt_until_one_is_installed(
    settings: Settings, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path)
    store.add(save_random_lama(tmp_path / "big-lama.ckpt"), id="big-lama")
    settings = settings.with_overrides(models_dir=tmp_path)

    status, body = post(settings, {"prompt": "the dog"})
    assert status == 422, body
    assert body["error"]["code"] == "invalid_payload"
    (problem,) = body["error"]["details"]["payload"]["prompt"]
    assert "object detector" in problem and "mask_url" in problem
    # A mask needs no detector.
    status, body = post(settings, {"mask_url": "https://example.com/m.png"})
    assert status == 202, body

    store.add(save_firing_detector(tmp_path / "det.pth", ["person", "dog"], "dog"), id="det")
    status, body = post(settings, {"prompt": "the dog"})
    assert status == 202, body
