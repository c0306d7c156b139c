"""stylize, free outpaint and samples of the diffusion remover, on tiny random-weight SD pipelines
loaded through the real loader, with a real photo (random weights paint noise: these tests check
sizes, seeds, which pixels may change, and the refusals)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from inference.base import InvalidInput
from inference.diffusion import DiffusionModels, ObjectRemover, Outpainter
from inference.diffusion.stylize import Stylizer
from inference.model_cache import ModelCache
from inference.model_store import ModelStore
from inference.styles import BUILTIN_STYLES
from tests.inference.tiny_diffusion import save_tiny_lora, save_tiny_sd

FAST = {"steps": 4}
PHOTO = Image.fromarray(data.astronaut()).resize((80, 64), Image.Resampling.LANCZOS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> DiffusionModels:
    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    store.add(save_tiny_sd(root / "tiny-sd"), id="tiny-sd")
    store.add(
        save_tiny_lora(root / "loras" / "alice-style"),
        id="alice-style",
        base_model_type="sd15",
        owner="alice",
    )
    return DiffusionModels(store, ModelCache(512 * 2**20), device="cpu")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_a_style_preset_wraps_the_prompt_and_keeps_the_pictures_size(models: DiffusionModels) -> None:
    result = Stylizer(models)(PHOTO, "watercolor", prompt="an astronaut", seed=3, samples=2, **FAST)
    assert result.backend == "diffusers:tiny-sd"
    assert [o.meta["seed"] for o in result.images] == [3, 4]
    assert all(o.image.size == PHOTO.size for o in result.images)
    meta = result.images[0].meta
    assert meta["style"] == "watercolor" and meta["strength"] == BUILTIN_STYLES["watercolor"].strength
    assert (
        BUILTIN_STYLES["watercolor"].compose("an astronaut").startswith("watercolor painting of an astronaut")
    )
    # Another preset is another prompt: another picture from the same seed.
    sketch = Stylizer(models)(PHOTO, "sketch", prompt="an astronaut", seed=3, **FAST)
    assert not np.array_equal(pixels(sketch.images[0].image), pixels(result.images[0].image))


def test_a_lora_id_styles_with_that_lora_for_its_owner_only(models: DiffusionModels) -> None:
    styled = Stylizer(models)(PHOTO, "alice-style", seed=1, client="alice", **FAST)
    assert styled.images[0].meta["loras"] == [{"model": "alice-style", "weight": 1.0}]
    assert styled.images[0].meta["strength"] == 0.6
    with pytest.raises(InvalidInput) as refused:
        Stylizer(models)(PHOTO, "alice-style", seed=1, client="bob", **FAST)
    assert refused.value.field == "style" and "unknown style 'alice-style'" in str(refused.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"style": "no-such-style"}, "style"),
        ({"style": ""}, "style"),
        ({"strength": 0.0}, "strength"),
        ({"strength": 0.1, "steps": 2}, "strength"),  # no denoising step left
        ({"samples": 9}, "samples"),
    ],
)
def test_bad_stylize_input_is_refused_naming_the_field(
    models: DiffusionModels, change: dict, field: str
) -> None:
    kwargs = {"style": "anime", **FAST, **change}
    with pytest.raises(InvalidInput) as refused:
        Stylizer(models)(PHOTO, kwargs.pop("style"), client="alice", **kwargs)
    assert refused.value.field == field


@pytest.mark.parametrize(
    ("sides", "size", "offset"),
    [
        ({"left": 16, "right": 8, "bottom": 24}, (104, 88), (16, 0)),
        ({"top": 5}, (80, 69), (0, 5)),  # any pixel count: the model paints at a multiple of 8
    ],
)
def test_free_outpaint_adds_the_pixels_asked_for_around_the_untouched_original(
    models: DiffusionModels, sides: dict, size: tuple, offset: tuple
) -> None:
    result = Outpainter(models)(PHOTO, seed=2, **sides, **FAST)
    out = result.images[0].image
    assert out.size == size and result.images[0].meta["offset"] == list(offset)
    x, y = offset
    assert np.array_equal(pixels(out)[y : y + 64, x : x + 80], pixels(PHOTO))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"left": -8}, "left"),
        ({"left": 0, "top": 0}, "left"),
        ({"left": 8, "ratio": 1.5}, "ratio"),
        ({"right": 6000}, "right"),
        ({"top": 8, "bottom": 5990}, "bottom"),
    ],
)
def test_bad_free_outpaint_input_is_refused_naming_the_field(
    models: DiffusionModels, change: dict, field: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        Outpainter(models)(PHOTO, **change, **FAST)
    assert refused.value.field == field


def test_the_diffusion_remover_makes_samples_with_consecutive_seeds(models: DiffusionModels) -> None:
    mask = Image.new("L", PHOTO.size, 0)
    mask.paste(255, (20, 16, 52, 44))
    result = ObjectRemover(models)(PHOTO, mask, seed=10, samples=3, **FAST)
    assert [o.meta["seed"] for o in result.images] == [10, 11, 12]
    outside = np.asarray(mask) == 0
    for output in result.images:
        assert np.array_equal(pixels(output.image)[outside], pixels(PHOTO)[outside])
    assert not np.array_equal(pixels(result.images[0].image), pixels(result.images[1].image))


def test_a_text_to_image_model_serves_stylize_and_an_inpainting_model_does_not(tmp_path: Path) -> None:
    # An inpainting model (9-channel UNet) cannot run img2img.
    store = ModelStore(tmp_path)
    assert "stylize" in store.add(save_tiny_sd(tmp_path / "sd"), id="sd").tasks
    assert "stylize" not in store.add(save_tiny_sd(tmp_path / "inp", inpainting=True), id="inp").tasks
