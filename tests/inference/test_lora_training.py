"""LoRA training on a tiny random-weight SD pipeline, on the CPU, with real photos.

Random weights cannot learn a style, so these tests check what does not depend on a trained
model: the LoRA moves and lowers the loss on a fixed batch, the file loads into a real pipeline
and changes its output, cancellation, resumption (to the bit), determinism, progress, the
up-front memory refusal and the pieces (image preparation, batch order, checkpoints).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from skimage import data

from inference.base import Cancelled, InvalidInput
from inference.training import (
    LoraTrainingConfig,
    TrainingExample,
    TrainingOutcome,
    estimate_training_bytes,
    train_lora,
)
from inference.training.checkpoints import Checkpoint, load_latest_checkpoint, save_checkpoint
from inference.training.data import batch_indices, prepare_image, to_model_pixels
from inference.training.loading import UNET_LORA_TARGETS, add_lora, load_unet, seeded_init
from inference.training.lora import training_target
from tests.inference.tiny_diffusion import save_tiny_sd

CONFIG = LoraTrainingConfig(rank=4, steps=6, resolution=64, learning_rate=1e-3, checkpoint_every=0)


class Recorder:
    """A RunControl that records every progress call and stops once ``stop_at`` steps are done."""

    def __init__(self, stop_at: int | None = None):
        self.calls: list[tuple[float, dict[str, Any] | None]] = []
        self.stop_at = stop_at

    def progress(self, percent: float, detail: dict[str, Any] | None = None) -> None:
        self.calls.append((percent, detail))

    def should_stop(self) -> bool:
        done = self.calls[-1][1]["step"] if self.calls and self.calls[-1][1] else 0
        return self.stop_at is not None and done >= self.stop_at

    @property
    def steps(self) -> list[int]:
        return [detail["step"] for _, detail in self.calls if detail]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def examples() -> list[TrainingExample]:
    return [
        TrainingExample(Image.fromarray(data.chelsea()), "a photo of a cat"),
        TrainingExample(Image.fromarray(data.astronaut()), "a photo of a red sky"),
        TrainingExample(Image.fromarray(data.coffee()).convert("RGBA"), "a blue sea"),
    ]


@pytest.fixture(scope="module")
def reference(
    model_dir: Path, examples: list[TrainingExample], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingOutcome, Recorder]:
    """An uninterrupted run of CONFIG, which the other runs are compared with."""
    control = Recorder()
    out = tmp_path_factory.mktemp("reference") / "lora.safetensors"
    # A generous limit: the estimate is computed from the folder's real headers and passes.
    outcome = train_lora(model_dir, examples, CONFIG, out, None, "cpu", control, memory_limit_bytes=2**34)
    return outcome, control


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_lora(a: Path, b: Path) -> None:
    first, second = tensors(a), tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def fixed_batch_loss(pipe: Any, image: Image.Image, caption: str) -> float:
    """The denoising loss of one image at five fixed timesteps with fixed noise."""
    generator = torch.Generator().manual_seed(123)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        pixels = torch.from_numpy(to_model_pixels(prepare_image(image, 64)))[None]
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            [caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        embeddings = pipe.text_encoder(ids)[0]
        losses = []
        for t in (50, 250, 500, 750, 950):
            noise = torch.randn(latents.shape, generator=generator)
            timestep = torch.tensor([t])
            noisy = scheduler.add_noise(latents, noise, timestep)
            losses.append(F.mse_loss(pipe.unet(noisy, timestep, embeddings).sample, noise).item())
    return float(np.mean(losses))


def load_pipe(model_dir: Path) -> Any:
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any) -> np.ndarray:
    out = pipe(
        "a photo of a cat",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    )
    return np.asarray(out.images[0])


# -- training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainingExample]:
    """A LoRA fitted hard (high learning rate) to one photo."""
    example = TrainingExample(Image.fromarray(data.chelsea()), "a photo of a cat")
    out = tmp_path_factory.mktemp("fitted") / "cat.safetensors"
    config = replace(CONFIG, steps=40, learning_rate=3e-2)
    train_lora(model_dir, [example], config, out, None, "cpu", Recorder())
    return out, example


def test_training_moves_the_lora_away_from_its_initial_weights(model_dir: Path, fitted: tuple) -> None:
    out, _ = fitted
    unet = load_unet(model_dir, torch.float32)
    with seeded_init(CONFIG.seed):
        add_lora(unet, CONFIG.rank, UNET_LORA_TARGETS)
    initial = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    trained = tensors(out)
    assert {"unet." + k for k in initial} == set(trained)
    for key, start in initial.items():
        # Gaussian init: A ("down") random, B ("up") zero; training moves both.
        assert not torch.equal(trained["unet." + key], start), key
    assert all(trained["unet." + k].abs().max() > 0 for k in initial if "lora.up" in k)


def test_training_lowers_the_loss_on_a_fixed_batch(model_dir: Path, fitted: tuple) -> None:
    out, example = fitted
    pipe = load_pipe(model_dir)
    before = fixed_batch_loss(pipe, example.image, example.caption)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    after = fixed_batch_loss(pipe, example.image, example.caption)
    assert after < before - 0.05, (before, after)


def test_saved_lora_loads_in_the_pipeline_and_changes_a_seeded_generation(
    model_dir: Path, fitted: tuple
) -> None:
    out, _ = fitted
    pipe = load_pipe(model_dir)
    plain = generate(pipe)
    assert np.array_equal(plain, generate(pipe))  # the comparison below is not seed noise
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    assert np.abs(generate(pipe) - plain).max() > 1e-3
    with safe_open(str(out), framework="pt") as fh:
        metadata = fh.metadata()
    # The peft config travels in the file, so a loader need not guess rank and alpha.
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (4, 4)


def test_text_encoder_lora_is_saved_and_loads(
    model_dir: Path, examples: list[TrainingExample], tmp_path: Path
) -> None:
    out = tmp_path / "with-text.safetensors"
    config = replace(CONFIG, steps=2, train_text_encoder=True, learning_rate=1e-2)
    outcome = train_lora(model_dir, examples[:1], config, out, None, "cpu", Recorder())
    assert outcome.steps == 2
    keys = set(tensors(out))
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    pipe = load_pipe(model_dir)
    plain = generate(pipe)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    assert "default_0" in pipe.text_encoder.peft_config
    assert np.abs(generate(pipe) - plain).max() > 0


# -- control -----------------------------------------------------------------------------------


def test_progress_is_reported_after_every_step_with_step_steps_and_loss(reference: tuple) -> None:
    outcome, control = reference
    assert outcome.steps == CONFIG.steps and len(outcome.losses) == CONFIG.steps
    assert len(control.calls) == CONFIG.steps
    for i, (percent, detail) in enumerate(control.calls, start=1):
        assert detail == {"step": i, "steps": CONFIG.steps, "loss": outcome.losses[i - 1]}
        assert percent == pytest.approx(100 * i / CONFIG.steps)
    assert outcome.final_loss == pytest.approx(np.mean(outcome.losses))
    assert (outcome.resumed_from, outcome.device, outcome.dtype, outcome.optimizer) == (
        0,
        "cpu",
        "float32",
        "AdamW",
    )
    assert outcome.peak_memory_bytes is None and outcome.seconds > 0


def test_cancel_raises_cancelled_and_writes_no_lora(
    model_dir: Path, examples: list[TrainingExample], tmp_path: Path
) -> None:
    out = tmp_path / "lora.safetensors"
    control = Recorder(stop_at=3)
    with pytest.raises(Cancelled):
        train_lora(model_dir, examples, CONFIG, out, None, "cpu", control)
    assert control.steps == [1, 2, 3]
    assert list(tmp_path.iterdir()) == []


# -- determinism and resumption ----------------------------------------------------------------


def test_same_seed_gives_the_same_lora_and_another_seed_another(
    model_dir: Path, examples: list[TrainingExample], reference: tuple, tmp_path: Path
) -> None:
    again = train_lora(model_dir, examples, CONFIG, tmp_path / "again.safetensors", None, "cpu", Recorder())
    assert_same_lora(reference[0].lora_file, again.lora_file)
    assert again.losses == reference[0].losses
    other = train_lora(
        model_dir, examples, replace(CONFIG, seed=1), tmp_path / "other.safetensors", None, "cpu", Recorder()
    )
    first, second = tensors(reference[0].lora_file), tensors(other.lora_file)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_gradient_checkpointing_computes_the_same_lora(
    model_dir: Path, examples: list[TrainingExample], reference: tuple, tmp_path: Path
) -> None:
    config = replace(CONFIG, gradient_checkpointing=True)
    out = train_lora(model_dir, examples, config, tmp_path / "gc.safetensors", None, "cpu", Recorder())
    # Recomputing the forward pass on the CPU repeats the same arithmetic, so this is exact.
    assert_same_lora(reference[0].lora_file, out.lora_file)


def test_resume_continues_the_count_and_ends_equal_to_an_uninterrupted_run(
    model_dir: Path, examples: list[TrainingExample], reference: tuple, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    out = tmp_path / "lora.safetensors"
    every3 = replace(CONFIG, checkpoint_every=3)
    # Another run (seed 1) leaves its step-3 checkpoint in the same folder.
    with pytest.raises(Cancelled):
        train_lora(model_dir, examples, replace(every3, seed=1), out, checkpoints, "cpu", Recorder(stop_at=4))
    foreign = {p.name for p in checkpoints.iterdir()}
    assert len(foreign) == 1

    # This run ignores it (it starts at step 1), checkpoints at 3 and is cancelled at 4.
    first = Recorder(stop_at=4)
    with pytest.raises(Cancelled):
        train_lora(model_dir, examples, every3, out, checkpoints, "cpu", first)
    assert first.steps == [1, 2, 3, 4]
    assert not out.exists()

    # Started again (checkpointing every step now: not part of the run's identity), it resumes
    # at 3, runs 4 to 6 and ends where the uninterrupted run ended, to the bit.
    second = Recorder()
    every1 = replace(CONFIG, checkpoint_every=1)
    outcome = train_lora(model_dir, examples, every1, out, checkpoints, "cpu", second)
    assert outcome.resumed_from == 3
    assert second.steps == [4, 5, 6]
    assert outcome.steps == CONFIG.steps
    assert outcome.losses == reference[0].losses
    assert_same_lora(reference[0].lora_file, out)
    # Only this run's newest two checkpoints are kept; the other run's is not this run's to delete.
    own = sorted(p.name for p in checkpoints.iterdir() if p.name not in foreign)
    assert [name.split("-")[1] for name in own] == ["00000005", "00000006"]
    assert foreign <= {p.name for p in checkpoints.iterdir()}


def test_a_corrupt_or_partial_checkpoint_is_skipped_for_an_older_one(tmp_path: Path) -> None:
    def checkpoint(step: int) -> Checkpoint:
        return Checkpoint(
            step=step,
            losses=[1.0] * step,
            lora={"unet.w": torch.full((2, 2), float(step))},
            optimizer={"state": {}, "param_groups": []},
            scaler=None,
            rng=torch.Generator().manual_seed(step).get_state(),
        )

    fingerprint = "f" * 64
    save_checkpoint(tmp_path, checkpoint(2), fingerprint)
    newest = save_checkpoint(tmp_path, checkpoint(4), fingerprint)
    (newest / "state.pt").write_bytes(b"truncated")
    (tmp_path / f".tmp-step-00000006-{fingerprint[:12]}-x").mkdir()  # a crash mid-write
    loaded = load_latest_checkpoint(tmp_path, fingerprint, max_step=10)
    assert loaded is not None and loaded.step == 2
    assert torch.equal(loaded.lora["unet.w"], torch.full((2, 2), 2.0))
    assert load_latest_checkpoint(tmp_path, "e" * 64, max_step=10) is None
    assert load_latest_checkpoint(tmp_path, fingerprint, max_step=1) is None


# -- refusals ----------------------------------------------------------------------------------


def test_a_run_that_cannot_fit_is_refused_on_resolution_before_loading(
    examples: list[TrainingExample], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"  # nothing to load: the refusal must come first
    with pytest.raises(InvalidInput) as err:
        train_lora(
            missing,
            examples,
            replace(CONFIG, resolution=512),
            tmp_path / "lora.safetensors",
            None,
            "cpu",
            Recorder(),
            memory_limit_bytes=2**30,
        )
    assert err.value.field == "resolution"
    assert not (tmp_path / "lora.safetensors").exists()


def test_estimate_grows_with_resolution_and_batch_and_shrinks_with_checkpointing() -> None:
    sd15 = 860_000_000

    def estimate(resolution: int = 512, batch: int = 1, checkpointing: bool = False) -> int:
        return estimate_training_bytes(sd15, resolution, batch, 2, checkpointing, 16)

    # SD 1.5 at 512 px in fp16 is known to train in 6-8 GiB: the estimate is above, not absurdly.
    assert 8 * 2**30 < estimate() < 16 * 2**30
    assert estimate(768) > estimate() and estimate(batch=2) > estimate()
    assert estimate(checkpointing=True) < estimate()
    # An unknown model (0 parameters) is costed as an SD 1.5-sized one, not as nothing.
    assert estimate_training_bytes(0, 512, 1, 2, False, 16) > 4 * 2**30


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"resolution": 100}, "resolution"),
        ({"steps": 0}, "steps"),
        ({"rank": 0}, "rank"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"mixed_precision": "fp16"}, "mixed_precision"),  # half precision needs CUDA
    ],
)
def test_config_is_refused_with_the_field_named(
    change: dict[str, Any], field: str, examples: list[TrainingExample], tmp_path: Path
) -> None:
    config = replace(CONFIG, **change)
    with pytest.raises(InvalidInput) as err:
        train_lora(tmp_path / "none", examples, config, tmp_path / "x.safetensors", None, "cpu", Recorder())
    assert err.value.field == field


def test_no_examples_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as err:
        train_lora(tmp_path, [], CONFIG, tmp_path / "x.safetensors", None, "cpu", Recorder())
    assert err.value.field == "examples"


# -- pieces ------------------------------------------------------------------------------------


def test_images_become_centre_cropped_rgb_squares_of_the_resolution() -> None:
    wide = Image.fromarray(data.coffee())  # 600 x 400
    pixels = prepare_image(wide, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    # A transparent image is flattened onto white, not onto the colour under its alpha.
    clear = Image.new("RGBA", (30, 90), (0, 0, 0, 0))
    assert (prepare_image(clear, 64) == 255).all()
    assert prepare_image(Image.fromarray(data.camera()), 64).shape == (64, 64, 3)  # greyscale


def test_batches_visit_every_example_once_per_pass_in_a_seeded_order() -> None:
    passes = [sum((batch_indices(0, 5, step, 1) for step in range(p * 5, p * 5 + 5)), []) for p in range(3)]
    assert all(sorted(order) == [0, 1, 2, 3, 4] for order in passes)
    assert len({tuple(order) for order in passes}) > 1  # reshuffled each pass
    assert batch_indices(0, 5, 7, 1) == batch_indices(0, 5, 7, 1)
    other_seed = [batch_indices(1, 5, s, 1)[0] for s in range(5)]
    assert other_seed != passes[0]
    # A batch larger than the set straddles passes and still holds each example once per pass.
    assert sorted(batch_indices(0, 3, 0, 6)) == [0, 0, 1, 1, 2, 2]


def test_v_prediction_models_learn_the_velocity() -> None:
    scheduler: Any = DDPMScheduler(prediction_type="v_prediction")
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    assert torch.equal(
        training_target(scheduler, latents, noise, t), scheduler.get_velocity(latents, noise, t)
    )
    assert training_target(DDPMScheduler(), latents, noise, t) is noise
