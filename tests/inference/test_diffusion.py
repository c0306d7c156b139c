"""The diffusion engines on tiny random-weight SD pipelines, loaded through the real loader.

Random weights paint noise, so these tests check what does not depend on a trained model:
sizes, seeds, geometry (which pixels may change and which must not), reuse of the loaded
pipeline, cancellation and input validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference.base import Cancelled, ContentRejected, EngineError, InvalidInput
from inference.diffusion import (
    DiffusionModels,
    ImageGenerator,
    Inpainter,
    ObjectRemover,
    Outpainter,
)
from inference.model_cache import ModelCache
from inference.model_store import ModelStore
from tests.inference.tiny_diffusion import save_tiny_lora, save_tiny_sd, save_tiny_sdxl

FAST = {"steps": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    store.add(save_tiny_sd(root / "tiny-sd"), id="tiny-sd")
    store.add(save_tiny_sd(root / "tiny-inpaint", inpainting=True, seed=3), id="tiny-inpaint")
    lora_file = save_tiny_lora(root / "loras" / "tiny-style")
    # Random tiny LoRAs cannot be told apart by shape: the operator names the base model.
    store.add(lora_file, id="tiny-style", base_model_type="sd15")
    return store


@pytest.fixture(scope="module")
def models(store: ModelStore) -> DiffusionModels:
    return DiffusionModels(store, ModelCache(512 * 2**20), device="cpu")


@pytest.fixture()
def photo() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))


@pytest.fixture()
def box_mask() -> Image.Image:
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (20, 16, 52, 44))
    return mask


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


class RecordingControl:
    """A RunControl that records progress and asks to stop after ``stop_after`` reports."""

    def __init__(self, stop_after: int | None = None):
        self.reports: list[float] = []
        self.stop_after = stop_after

    def progress(self, percent: float) -> None:
        self.reports.append(percent)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.reports) >= self.stop_after


def test_generate_returns_samples_at_the_asked_size_with_consecutive_seeds(models):
    result = ImageGenerator(models)("a photo of a cat", width=64, height=72, seed=5, samples=3, **FAST)
    assert result.backend == "diffusers:tiny-sd"
    assert [o.image.size for o in result.images] == [(64, 72)] * 3
    assert [o.meta["seed"] for o in result.images] == [5, 6, 7]
    assert all(o.meta["model"] == "tiny-sd" for o in result.images)
    assert all((o.meta["width"], o.meta["height"]) == (64, 72) for o in result.images)
    # different seeds, different noise
    assert not np.array_equal(pixels(result.images[0].image), pixels(result.images[1].image))


def test_generate_output_i_is_reproduced_by_a_single_run_with_seed_plus_i(models):
    generate = ImageGenerator(models)
    batch = generate("a red dog", width=64, height=64, seed=40, samples=2, **FAST)
    single = generate("a red dog", width=64, height=64, seed=41, **FAST)
    again = generate("a red dog", width=64, height=64, seed=41, **FAST)
    assert np.array_equal(pixels(single.images[0].image), pixels(again.images[0].image))
    # Batched and single convolutions may round differently on CPU; the images are the same.
    assert np.abs(pixels(batch.images[1].image) - pixels(single.images[0].image)).max() <= 2


def test_generate_without_seed_draws_one_and_records_it(models):
    result = ImageGenerator(models)("a cat", width=64, height=64, samples=2, **FAST)
    first = result.images[0].meta["seed"]
    assert isinstance(first, int) and result.images[1].meta["seed"] == first + 1


def test_img2img_keeps_the_input_size_and_uses_the_image(models, photo):
    generate = ImageGenerator(models)
    a = generate("a cat", image=photo, image_strength=0.5, seed=1, **FAST)
    assert a.images[0].image.size == photo.size
    assert a.images[0].meta["mode"] == "img2img"
    other = Image.fromarray(255 - np.asarray(photo))
    b = generate("a cat", image=other, image_strength=0.5, seed=1, **FAST)
    # at strength 0.5 the input shows through, so a different input gives a different output
    assert np.abs(pixels(a.images[0].image) - pixels(b.images[0].image)).mean() > 10


def test_scheduler_choice_changes_the_sampler(models):
    generate = ImageGenerator(models)
    ddim = generate("a cat", width=64, height=64, seed=2, **FAST)
    euler_a = generate("a cat", width=64, height=64, seed=2, scheduler="euler_a", **FAST)
    assert not np.array_equal(pixels(ddim.images[0].image), pixels(euler_a.images[0].image))


def test_lora_changes_the_output_and_is_off_again_for_the_next_job(models):
    generate = ImageGenerator(models)
    plain = generate("a blue sky", width=64, height=64, seed=9, **FAST)
    styled = generate("a blue sky", width=64, height=64, seed=9, loras=[{"model": "tiny-style"}], **FAST)
    after = generate("a blue sky", width=64, height=64, seed=9, **FAST)
    assert np.abs(pixels(plain.images[0].image) - pixels(styled.images[0].image)).max() > 10
    assert styled.images[0].meta["loras"] == [{"model": "tiny-style", "weight": 1.0}]
    assert np.array_equal(pixels(plain.images[0].image), pixels(after.images[0].image))


def test_inpaint_changes_only_the_masked_pixels(models, photo, box_mask):
    result = Inpainter(models)(photo, box_mask, "a dog", model="tiny-sd", seed=3, **FAST)
    out, src = pixels(result.images[0].image), pixels(photo)
    inside = np.asarray(box_mask) > 0
    assert out.shape == src.shape
    assert np.array_equal(out[~inside], src[~inside])
    assert np.abs(out[inside] - src[inside]).mean() > 10
    assert result.images[0].meta["seed"] == 3


def test_mask_mode_black_is_the_inverted_white_mask(models, photo, box_mask):
    inpaint = Inpainter(models)
    white = inpaint(photo, box_mask, "a dog", model="tiny-sd", seed=4, **FAST)
    black_mask = Image.fromarray(255 - np.asarray(box_mask))
    black = inpaint(photo, black_mask, "a dog", model="tiny-sd", seed=4, mask_mode="black", **FAST)
    assert np.array_equal(pixels(white.images[0].image), pixels(black.images[0].image))


def test_mask_mode_black_repaints_the_black_region_and_keeps_the_white(models, photo, box_mask):
    # The SenseTime convention: black marks the region to repaint.
    black_marks_box = Image.fromarray(255 - np.asarray(box_mask))
    result = Inpainter(models)(
        photo, black_marks_box, "a dog", model="tiny-sd", seed=5, mask_mode="black", **FAST
    )
    out, src = pixels(result.images[0].image), pixels(photo)
    black = np.asarray(black_marks_box) == 0
    assert np.array_equal(out[~black], src[~black])
    assert np.abs(out[black] - src[black]).mean() > 10
    assert result.images[0].meta["mask_mode"] == "black"


def test_remove_object_keeps_every_pixel_outside_the_mask_and_feathers_inside(models, photo):
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (10, 10, 60, 54))
    result = ObjectRemover(models)(photo, mask, seed=11, feather=4, **FAST)
    out, src = pixels(result.images[0].image), pixels(photo)
    inside = np.asarray(mask) > 0
    assert np.array_equal(out[~inside], src[~inside])
    # The edge row of the region is a blend: closer to the input than the region's centre is.
    edge = np.abs(out[10, 15:55] - src[10, 15:55]).mean()
    centre = np.abs(out[32, 15:55] - src[32, 15:55]).mean()
    assert centre > 10 and edge < centre
    assert result.backend == "diffusers:tiny-inpaint"  # dedicated inpainting model preferred


@pytest.mark.parametrize(
    ("align", "offset"),
    [
        ("topleft", (0, 0)),
        ("middle", (20, 16)),
        ("bottomright", (40, 32)),
        ("left", (0, 16)),
        ("top", (20, 0)),
        # the SenseTime seed's spellings
        ("topmiddle", (20, 0)),
        ("middleleft", (0, 16)),
        ("middleright", (40, 16)),
        ("bottommiddle", (20, 32)),
    ],
)
def test_outpaint_keeps_the_original_where_align_puts_it(models, photo, align, offset):
    result = Outpainter(models)(photo, ratio=1.5, align=align, seed=5, model="tiny-sd", **FAST)
    out = result.images[0]
    assert out.image.size == (120, 96)
    assert tuple(out.meta["offset"]) == offset
    x, y = offset
    assert np.array_equal(pixels(out.image)[y : y + 64, x : x + 80], pixels(photo))


def test_outpaint_to_a_given_width_and_height(models, photo):
    result = Outpainter(models)(photo, width=160, height=64, align="right", seed=5, **FAST)
    out = result.images[0].image
    assert out.size == (160, 64)
    assert np.array_equal(pixels(out)[:, 80:], pixels(photo))
    assert np.abs(pixels(out)[:, :80] - pixels(photo)).mean() > 1  # the new area was painted


def test_one_loaded_pipeline_serves_all_four_tasks(store, photo, box_mask):
    models = DiffusionModels(store, ModelCache(512 * 2**20), device="cpu", default_model="tiny-sd")
    ImageGenerator(models)("a cat", width=64, height=64, **FAST)
    ImageGenerator(models)("a cat", image=photo, image_strength=0.5, **FAST)
    Inpainter(models)(photo, box_mask, "a dog", **FAST)
    ObjectRemover(models)(photo, box_mask, **FAST)
    Outpainter(models)(photo, ratio=1.25, **FAST)
    assert models.cache.stats()["loads"] == 1
    [entry] = models.cache.loaded()
    assert entry["id"].startswith("diffusers:tiny-sd#") and entry["id"].endswith(":cpu:float32")
    assert entry["hits"] == 4


def test_inpainting_model_serves_mask_tasks_but_not_generate(models, photo, box_mask):
    result = Inpainter(models)(photo, box_mask, "a dog", model="tiny-inpaint", seed=1, **FAST)
    inside = np.asarray(box_mask) > 0
    assert np.array_equal(pixels(result.images[0].image)[~inside], pixels(photo)[~inside])
    with pytest.raises(InvalidInput) as err:
        ImageGenerator(models)("a cat", model="tiny-inpaint", **FAST)
    assert err.value.field == "model"


def test_least_recently_used_pipeline_is_evicted_under_a_small_budget(store, photo, box_mask):
    probe = DiffusionModels(store, ModelCache(512 * 2**20), device="cpu")
    ImageGenerator(probe)("a cat", model="tiny-sd", width=64, height=64, **FAST)
    one = probe.cache.used_bytes
    # Room for one tiny pipeline, not two.
    models = DiffusionModels(store, ModelCache(int(one * 1.5)), device="cpu")
    ImageGenerator(models)("a cat", model="tiny-sd", width=64, height=64, **FAST)
    Inpainter(models)(photo, box_mask, "a dog", model="tiny-inpaint", **FAST)
    assert [e["id"].split(":")[1].split("#")[0] for e in models.cache.loaded()] == ["tiny-inpaint"]
    assert models.cache.stats()["evictions"] == 1
    assert models.cache.used_bytes <= models.cache.budget_bytes


def test_progress_is_reported_and_rises_to_100(models):
    control = RecordingControl()
    ImageGenerator(models)("a cat", width=64, height=64, steps=3, samples=2, control=control)
    assert control.reports == sorted(control.reports)
    assert control.reports[-1] == 100 and len(control.reports) >= 5


def test_cancel_stops_the_run_within_one_step(models):
    # Stop once the load report and the first step's report are in: step 2 of 50 must not run.
    control = RecordingControl(stop_after=2)
    with pytest.raises(Cancelled):
        ImageGenerator(models)("a cat", width=64, height=64, steps=50, control=control)
    assert len(control.reports) == 2
    # the pipeline is fine for the next job
    assert ImageGenerator(models)("a cat", width=64, height=64, **FAST).images


BAD_GENERATE = [
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"width": 100}, "width"),
    ({"height": 1024}, "height"),  # over 3x the tiny model's 64 px
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"samples": 9}, "samples"),
    ({"cfg_scale": -1}, "cfg_scale"),
    ({"seed": -1}, "seed"),
    ({"scheduler": "warp"}, "scheduler"),
    ({"model": "nope"}, "model"),
    ({"model": "tiny-style"}, "model"),
    ({"loras": [{"model": "nope"}]}, "loras[0].model"),
    ({"loras": [{"model": "tiny-style", "weight": 3}]}, "loras[0].weight"),
    ({"negative_prompt": "n" * 2001}, "negative_prompt"),
]


@pytest.mark.parametrize(("change", "field"), BAD_GENERATE)
def test_bad_generate_input_is_refused_naming_the_field_before_loading(store, change, field):
    models = DiffusionModels(store, ModelCache(512 * 2**20), device="cpu")
    kwargs = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, **change}
    with pytest.raises(InvalidInput) as err:
        ImageGenerator(models)(**kwargs)
    assert err.value.field == field
    assert models.cache.stats()["loads"] == 0


def test_bad_img2img_strength_is_refused(models, photo):
    with pytest.raises(InvalidInput) as err:
        ImageGenerator(models)("a cat", image=photo, image_strength=0.2, steps=2)
    assert err.value.field == "image_strength"  # 2 steps x 0.2 leaves no step to run


def test_bad_mask_inputs_are_refused(models, photo, box_mask):
    inpaint = Inpainter(models)
    cases = [
        ({"mask": box_mask.resize((40, 32))}, "mask"),
        ({"mask": Image.new("L", photo.size, 0)}, "mask"),  # marks nothing in white mode
        ({"mask_mode": "grey"}, "mask_mode"),
        ({"strength": 0}, "strength"),
        ({"strength": 1.5}, "strength"),
    ]
    for change, field in cases:
        kwargs = {"image": photo, "mask": box_mask, "prompt": "a dog", "steps": 2, **change}
        with pytest.raises(InvalidInput) as err:
            inpaint(**kwargs)
        assert err.value.field == field, change
    with pytest.raises(InvalidInput) as err:
        ObjectRemover(models)(photo, Image.new("L", photo.size, 255), mask_mode="black", steps=2)
    assert err.value.field == "mask"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 5.5}, "ratio"),
        ({"ratio": 2, "width": 200}, "ratio"),
        ({"width": 40}, "width"),  # smaller than the image
        ({"width": 80, "height": 64}, "width"),  # not larger at all
        ({"align": "centre-ish"}, "align"),
    ],
)
def test_bad_outpaint_input_is_refused(models, photo, change, field):
    with pytest.raises(InvalidInput) as err:
        Outpainter(models)(photo, steps=2, **change)
    assert err.value.field == field


def test_sdxl_layout_serves_generate_inpaint_and_outpaint_from_one_load(tmp_path, photo, box_mask):
    store = ModelStore(tmp_path)
    entry = store.add(save_tiny_sdxl(tmp_path / "tiny-xl"), id="tiny-xl")
    assert entry.base_model_type == "sdxl"
    models = DiffusionModels(store, ModelCache(512 * 2**20), device="cpu")
    generated = ImageGenerator(models)("a cat", width=64, height=80, seed=3, samples=2, **FAST)
    assert [(o.image.size, o.meta["seed"]) for o in generated.images] == [((64, 80), 3), ((64, 80), 4)]
    painted = Inpainter(models)(photo, box_mask, "a dog", seed=3, **FAST)
    inside = np.asarray(box_mask) > 0
    assert np.array_equal(pixels(painted.images[0].image)[~inside], pixels(photo)[~inside])
    assert Outpainter(models)(photo, ratio=1.25, **FAST).images[0].image.size == (100, 80)
    assert models.cache.stats()["loads"] == 1
    # an SD 1.5 LoRA does not fit an SDXL model
    store.add(save_tiny_lora(tmp_path / "lora"), id="sd15-style", base_model_type="sd15")
    with pytest.raises(InvalidInput) as err:
        ImageGenerator(models)("a cat", loras=[{"model": "sd15-style"}], **FAST)
    assert err.value.field == "loras[0].model"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_in_float16_and_frees_memory_on_eviction(store):
    models = DiffusionModels(store, ModelCache(2**30, device="cuda"), device="cuda")
    assert models.dtype == torch.float16
    result = ImageGenerator(models)("a cat", width=64, height=64, seed=1, samples=2, **FAST)
    assert [o.image.size for o in result.images] == [(64, 64)] * 2
    [entry] = models.cache.loaded()
    assert entry["device"] == "cuda"
    before = torch.cuda.memory_allocated()
    models.cache.clear()
    assert torch.cuda.memory_allocated() < before


def test_models_dir_paths_survive_the_manifest(store: ModelStore):
    # The engine finds the model through the manifest's path, relative to the models dir.
    entry = store.get("tiny-sd")
    assert not Path(entry.path).is_absolute()
    assert (store.resolve_path(entry) / "model_index.json").exists()


def test_generate_reports_its_own_pipeline_timing_per_output(models):
    result = ImageGenerator(models)("a cat", width=64, height=64, steps=3, samples=2, **{})
    for output in result.images:
        timing = output.meta["timing"]
        # one step callback per denoising step of the one batch of two
        assert timing["steps"] == 3 and timing["pipeline_s"] > 0
        assert timing["it_per_s"] == pytest.approx(3 / timing["pipeline_s"], rel=0.01)
        assert timing["peak_device_bytes"] is None  # CPU: no device allocator to ask


def test_out_of_memory_fails_the_call_clearly_empties_the_cache_and_the_next_call_runs(store):
    models = DiffusionModels(store, ModelCache(512 * 2**20), device="cpu")
    generate = ImageGenerator(models)
    generate("a cat", model="tiny-sd", width=64, height=64, **FAST)
    entry, info = models.resolve("tiny-sd", "generate")
    with models.hold(entry, info) as loaded:
        unet = loaded.pipe.unet
    calls: list[int] = []

    def out_of_memory(module, args):
        # The real exception class CUDA raises, from the second UNet step of the run.
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    unet.register_forward_pre_hook(out_of_memory)
    with pytest.raises(EngineError) as err:
        generate("a cat", model="tiny-sd", width=64, height=64, steps=4)
    assert err.value.code == "out_of_memory"
    assert "out of memory" in str(err.value) and "2.00 GiB" in str(err.value)
    # Every loaded model was dropped, so the memory the failed run filled is free again.
    assert models.cache.loaded() == [] and models.cache.used_bytes == 0
    # The next call on the same engine loads a fresh pipeline and succeeds.
    result = generate("a cat", model="tiny-sd", width=64, height=64, seed=1, **FAST)
    assert result.images[0].image.size == (64, 64)
    with models.hold(entry, info) as loaded:
        assert loaded.pipe.unet is not unet
    assert len(calls) == 2


@pytest.fixture(scope="module")
def safety_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("safety-models")
    store = ModelStore(root)
    store.add(save_tiny_sd(root / "flags", safety_checker="flags"), id="checked-flags")
    store.add(save_tiny_sd(root / "passes", safety_checker="passes"), id="checked-passes")
    return store


def test_output_safety_checker_refusal_rejects_naming_the_check(safety_store, photo, box_mask):
    models = DiffusionModels(safety_store, ModelCache(512 * 2**20), device="cpu")
    with pytest.raises(ContentRejected) as err:
        ImageGenerator(models)("a cat", model="checked-flags", width=64, height=64, **FAST)
    assert err.value.code == "output_safety_checker"
    # the checker travels with the pipeline into the mask tasks too (from_pipe shares it)
    with pytest.raises(ContentRejected) as err:
        Inpainter(models)(photo, box_mask, "a dog", model="checked-flags", **FAST)
    assert err.value.code == "output_safety_checker"


def test_an_installed_safety_checker_that_flags_nothing_lets_outputs_through(safety_store):
    models = DiffusionModels(safety_store, ModelCache(512 * 2**20), device="cpu")
    result = ImageGenerator(models)("a cat", model="checked-passes", width=64, height=64, seed=2, **FAST)
    assert np.asarray(result.images[0].image).any()  # not the black image of a flagged output
