"""remove_object with LaMa: a random-weight LaMa checkpoint, detected at ``models add``, loaded
through spandrel, run in one forward pass; and the engine's choice between LaMa and diffusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from config import Settings
from inference.base import EngineError, InvalidInput, NullControl
from inference.engines.object_removal import choose_remover, run_remove_object
from inference.lama import LamaEraser
from inference.model_store import ModelStore
from inference.registry import EngineCall
from tests.inference.tiny_removal import save_firing_detector, save_random_lama

PHOTO = Image.fromarray(data.astronaut()).resize((128, 96), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def lama_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_lama(tmp_path_factory.mktemp("lama") / "big-lama.ckpt")


@pytest.fixture(scope="module")
def eraser(lama_file: Path) -> LamaEraser:
    return LamaEraser(lama_file, model_id="lama-test")


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_a_lama_checkpoint_is_detected_as_a_lama_model_for_remove_object(
    lama_file: Path, tmp_path: Path
) -> None:
    entry = ModelStore(tmp_path).add(lama_file, id="big-lama")
    assert entry.type == "lama" and entry.tasks == ("remove_object",)


def test_a_torchscript_archive_with_lamas_weights_is_detected_too(tmp_path: Path) -> None:
    # IOPaint ships LaMa as TorchScript (big-lama.pt), which torch.load(weights_only) refuses;
    # this archive carries LaMa's key names without its size.
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn_l = torch.nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn_l(x)

    class Generator(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Identity(), Block())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Generator()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    path = tmp_path / "big-lama.pt"
    torch.jit.script(Wrapper()).save(str(path))
    assert ModelStore(tmp_path).add(path).type == "lama"


def test_one_forward_pass_changes_the_masked_region_and_no_pixel_outside_it(eraser: LamaEraser) -> None:
    mask = box_mask(PHOTO.size, (40, 30, 80, 70))
    result = eraser(PHOTO, mask)
    assert result.backend == "lama:lama-test" and len(result.images) == 1
    out, src = np.asarray(result.images[0].image), np.asarray(PHOTO)
    inside = np.asarray(mask) > 0
    assert out.shape == src.shape
    assert np.array_equal(out[~inside], src[~inside])
    assert (out[inside] != src[inside]).any(axis=-1).mean() > 0.5
    assert result.images[0].meta["work_size"] == [128, 96]


def test_black_marks_the_region_with_mask_mode_black(eraser: LamaEraser) -> None:
    white = box_mask(PHOTO.size, (40, 30, 80, 70))
    black = Image.eval(white, lambda v: 255 - v)
    same = eraser(PHOTO, white).images[0].image
    assert np.array_equal(
        np.asarray(eraser(PHOTO, black, mask_mode="black").images[0].image), np.asarray(same)
    )


def test_a_large_image_is_erased_on_a_scaled_crop_around_the_region(lama_file: Path) -> None:
    photo = Image.fromarray(data.astronaut()).resize((200, 160))
    small = LamaEraser(lama_file, crop_trigger=100, crop_margin=16, max_side=48)
    mask = box_mask(photo.size, (120, 100, 150, 130))
    result = small(photo, mask, feather=2)
    work = result.images[0].meta["work_size"]
    assert max(work) == 48  # the crop (region + feather + 16 px margin) scaled down to max_side
    out, src = np.asarray(result.images[0].image), np.asarray(photo)
    inside = np.asarray(mask) > 0
    assert np.array_equal(out[~inside], src[~inside]) and (out[inside] != src[inside]).any()


def test_a_file_that_holds_another_model_is_refused_as_not_lama(tmp_path: Path) -> None:
    from tests.inference.tiny_vision import TinyCompactNet, save_sr_checkpoint

    path = save_sr_checkpoint(TinyCompactNet(), tmp_path / "x4.pth", key="params")
    with pytest.raises(EngineError, match="not LaMa") as refused:
        LamaEraser(path)
    assert refused.value.code == "invalid_model"


# -- the engine: prompt -> detector -> mask -> LaMa, and which remover runs ----------------------


@pytest.fixture(scope="module")
def lama_store(tmp_path_factory: pytest.TempPathFactory, lama_file: Path) -> Path:
    models = tmp_path_factory.mktemp("removal-models")
    store = ModelStore(models)
    store.add(lama_file, id="big-lama")
    store.add(
        save_firing_detector(models / "det.pth", ["person", "dog"], "dog", (0.25, 0.25, 0.5, 0.75)), id="det"
    )
    return models


def call(models: Path, **payload: object) -> EngineCall:
    defaults = {"mask_mode": "white", "min_score": 0.3, "grow": 0.1, "samples": 1}
    return EngineCall(
        "remove_object",
        {**defaults, **payload},
        {"image_url": PHOTO},
        NullControl(),
        1,
        Settings(models_dir=models),
        owner="alice",
    )


def test_a_prompt_erases_the_detected_object_with_lama(lama_store: Path) -> None:
    result = run_remove_object(call(lama_store, prompt="the dog"))
    assert result.backend == "lama:big-lama"
    meta = result.images[0].meta
    assert meta["prompt"] == "the dog" and [o["label"] for o in meta["removed"]] == ["dog"]
    box = meta["removed"][0]["box"]
    assert (box["x1"], box["y1"], box["x2"], box["y2"]) == (32, 24, 64, 72)
    out, src = np.asarray(result.images[0].image), np.asarray(PHOTO)
    grown = np.zeros(src.shape[:2], dtype=bool)
    grown[19:77, 27:69] = True  # the box grown by 0.1 * 48 = 5 px on every side
    assert np.array_equal(out[~grown], src[~grown]) and (out[grown] != src[grown]).any()


def test_a_prompt_for_an_object_not_in_the_picture_is_nothing_to_remove(lama_store: Path) -> None:
    with pytest.raises(InvalidInput) as refused:
        run_remove_object(call(lama_store, prompt="the person"))
    assert refused.value.code == "nothing_to_remove" and refused.value.field == "prompt"
    assert "found: dog" in str(refused.value)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"fill_prompt": "grass"}, "fill_prompt"),
        ({"samples": 3}, "samples"),
        ({"model": "big-lama", "fill_prompt": "grass"}, "fill_prompt"),
    ],
)
def test_what_only_diffusion_does_is_refused_naming_the_field_when_only_lama_is_installed(
    lama_store: Path, payload: dict, field: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        choose_remover(call(lama_store, prompt="the dog", **payload))
    assert refused.value.field == field


def test_lama_is_the_default_remover_and_diffusion_takes_prompts_and_samples(
    lama_file: Path, tmp_path: Path
) -> None:
    from tests.inference.tiny_diffusion import save_tiny_sd

    models = tmp_path / "models"
    store = ModelStore(models)
    store.add(lama_file, id="big-lama")
    store.add(save_tiny_sd(models / "tiny-sd"), id="tiny-sd")
    chosen = choose_remover(call(models))
    assert chosen is not None and chosen.id == "big-lama"
    assert choose_remover(call(models, fill_prompt="grass")) is None
    assert choose_remover(call(models, samples=2)) is None
    assert choose_remover(call(models, model="tiny-sd")) is None
    store.remove("big-lama")
    assert choose_remover(call(models)) is None
    store.remove("tiny-sd")
    with pytest.raises(EngineError) as none:
        choose_remover(call(models))
    assert none.value.code == "model_not_installed"


def test_removing_by_prompt_without_a_detector_fails_clearly_naming_the_prompt(
    lama_file: Path, tmp_path: Path
) -> None:
    ModelStore(tmp_path).add(lama_file, id="big-lama")
    with pytest.raises(InvalidInput) as refused:
        run_remove_object(call(tmp_path, prompt="the dog"))
    assert refused.value.code == "detector_not_installed" and refused.value.field == "prompt"
    assert "send mask_url instead" in str(refused.value)
