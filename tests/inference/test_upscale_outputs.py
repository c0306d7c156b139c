"""What an upscale job's output looks like: capped at AIORCH_MAX_OUTPUT_SIDE, and 16-bit grey
scaled (not clipped) into the 8-bit formats and the watermark."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config import Settings
from inference.base import NullControl
from inference.engines.upscale import run_upscale
from inference.registry import EngineCall
from inference.watermark import add_label
from tasks.storage import encode_image


def ramp16(width: int = 64, height: int = 48) -> Image.Image:
    """16-bit grey rising left to right over the whole 0..65535 range."""
    row = np.linspace(0, 65535, width)
    image = Image.fromarray(np.tile(row, (height, 1)).astype(np.uint16))
    assert image.mode == "I;16"
    return image


def upscale(settings: Settings, image: Image.Image, **payload: object):
    payload = {"scale": 2.0, **payload}
    return run_upscale(EngineCall("upscale", payload, {"image_url": image}, NullControl(), 1, settings))


@pytest.fixture(scope="module")
def sr_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from inference.model_store import ModelStore
    from tests.inference.tiny_vision import TinyCompactNet, save_sr_checkpoint

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    path = save_sr_checkpoint(TinyCompactNet(scale=4), folder / "realesr-general-x4v3.pth", "params")
    ModelStore(folder).add(path, id="x4v3")
    return folder


@pytest.mark.parametrize("model", ["lanczos", "x4v3"])
def test_output_larger_than_the_max_side_is_capped_and_says_so(sr_models: Path, model: str) -> None:
    settings = Settings(models_dir=sr_models, max_output_side=100)
    image = Image.new("RGB", (80, 40), (90, 120, 150))
    out = upscale(settings, image, scale=4.0, model=model).images[0]  # asks 320x160
    assert out.image.size == (100, 50) and out.meta["capped"] is True
    small = upscale(settings, image, scale=1.25, model=model).images[0]
    assert small.image.size == (100, 50) and small.meta["capped"] is False
    roomy = upscale(Settings(models_dir=sr_models), image, scale=4.0, model=model).images[0]
    assert roomy.image.size == (320, 160) and roomy.meta["capped"] is False


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_sixteen_bit_grey_is_scaled_into_eight_bit_formats(fmt: str) -> None:
    image = ramp16()
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(image, fmt))).convert("L")).astype(float)
    expected = np.asarray(image).astype(float) / 257
    # Pillow's own conversion clips every value above 255, turning all but the first column white.
    assert np.abs(decoded - expected).mean() < 3
    assert decoded[:, :8].mean() < 40 and decoded[:, -8:].mean() > 215


def test_sixteen_bit_png_stays_sixteen_bit() -> None:
    image = ramp16()
    decoded = Image.open(io.BytesIO(encode_image(image, "png")))
    assert decoded.mode in ("I;16", "I") and np.array_equal(np.asarray(decoded), np.asarray(image))


def test_watermark_on_sixteen_bit_grey_keeps_its_brightness() -> None:
    image = ramp16(240, 120)
    marked = add_label(image, position="bottomright")
    assert marked.mode == "L" and marked.size == image.size
    top = np.asarray(marked).astype(float)[:40]  # away from the label
    assert np.abs(top - np.asarray(image).astype(float)[:40] / 257).max() <= 1
    assert not np.array_equal(np.asarray(marked)[-30:, -120:], np.asarray(image)[-30:, -120:] // 257)


def test_a_sixteen_bit_upscale_through_lanczos_encodes_as_jpeg_with_a_watermark(sr_models: Path) -> None:
    settings = Settings(models_dir=sr_models)
    out = upscale(settings, ramp16(), model="lanczos").images[0].image
    assert out.mode == "I;16" and out.size == (128, 96)
    jpeg = np.asarray(Image.open(io.BytesIO(encode_image(add_label(out), "jpg"))).convert("L")).astype(float)
    assert jpeg[:30].mean() == pytest.approx(np.asarray(out)[:30].mean() / 257, abs=3)


def test_face_enhance_is_refused_at_the_api_naming_the_field(settings: Settings) -> None:
    from app import create_app
    from tests.conftest import KEYS

    app = create_app(settings)
    try:
        client = app.test_client()
        body = {
            "task": "upscale",
            "payload": {"image_url": "https://example.com/a.png", "face_enhance": True},
        }
        response = client.post("/v1/jobs", json=body, headers={"X-API-Key": KEYS[0][1]})
        assert response.status_code == 422, response.get_json()
        error = response.get_json()["error"]
        assert "face-restoration" in str(error["details"]["payload"]["face_enhance"])
        body["payload"]["face_enhance"] = False
        assert client.post("/v1/jobs", json=body, headers={"X-API-Key": KEYS[0][1]}).status_code == 202
    finally:
        app.extensions["aiorch"].db.dispose()
