"""Output encoding (``tasks.storage.encode_image``) with the settings chosen by ``bench/encode.py``:
PNG, at its fast compression level, stays lossless in every mode a job can produce; JPEG keeps
full-resolution chroma; WebP stays close to the original."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
from skimage import data

from tasks.storage import encode_image


def photo() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((256, 256), Image.Resampling.LANCZOS)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_png_output_decodes_to_the_same_pixels(mode: str) -> None:
    image = photo().convert(mode)
    decoded = Image.open(io.BytesIO(encode_image(image, "png")))
    assert decoded.format == "PNG" and decoded.mode == mode
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_jpeg_output_keeps_full_resolution_chroma() -> None:
    decoded = Image.open(io.BytesIO(encode_image(photo(), "jpg")))
    assert isinstance(decoded, JpegImagePlugin.JpegImageFile)
    assert JpegImagePlugin.get_sampling(decoded) == 0  # 4:4:4


def test_webp_output_is_close_to_the_original_and_smaller_than_png() -> None:
    image = photo()
    webp = encode_image(image, "webp")
    decoded = np.asarray(Image.open(io.BytesIO(webp)).convert("RGB")).astype(float)
    mse = np.mean((decoded - np.asarray(image).astype(float)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 35  # dB
    assert len(webp) < len(encode_image(image, "png")) / 3
