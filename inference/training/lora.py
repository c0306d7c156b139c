"""The LoRA training loop: ``train_lora`` trains a LoRA on a Stable Diffusion 1.x/2.x folder.

A run, in order: check the config and the examples; refuse, on the memory estimate, a run that
cannot fit (before any weight is read); check the folder is trainable; prepare the images;
encode them (and the captions) once; add LoRA adapters to the frozen UNet (and text encoder);
resume from the newest checkpoint of the same run, if any; then step: sample latents from the
cached VAE distributions, noise and timesteps from one seeded generator, predict the noise (or
the velocity, or the sample, per the scheduler's ``prediction_type``) and take an AdamW step
on the MSE loss, its gradient clipped to norm 1. After each step the loss is reported through
``control.progress``, a checkpoint is written when due, and a cancelled job stops with
``Cancelled``. The result is written, atomically, as a diffusers-layout LoRA safetensors file.

Determinism: every random draw comes from the seed (the example order, the LoRA initialisation
and the per-step noise are three separate streams), so the same config, inputs and device give
the same LoRA, bit for bit on the CPU; on CUDA, kernels such as atomics-based reductions may
differ in the last bits between runs. A resumed run restores the parameters, the optimizer and
the generator state exactly, so it ends where an uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from inference.base import EngineError, InvalidInput, RunControl, check_stop
from inference.training.checkpoints import (
    Checkpoint,
    load_latest_checkpoint,
    run_fingerprint,
    save_checkpoint,
)
from inference.training.data import (
    NOISE_STREAM,
    TrainingExample,
    batch_indices,
    derived_seed,
    examples_digest,
    prepare_image,
    validate_examples,
)
from inference.training.loading import (
    TEXT_ENCODER_LORA_TARGETS,
    UNET_LORA_TARGETS,
    EncodedExamples,
    add_lora,
    check_trainable,
    encode_examples,
    free_memory,
    load_noise_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    quiet_loading,
    seeded_init,
)
from inference.training.params import (
    LoraTrainingConfig,
    Precision,
    TrainingOutcome,
    estimate_training_bytes,
    resolve_device,
    resolve_precision,
    weight_parameter_counts,
)

log = logging.getLogger("aiorch.training")

# AdamW as the reference script sets it up.
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHT_DECAY = 1e-2
ADAM_EPSILON = 1e-8
MAX_GRAD_NORM = 1.0
FINAL_LOSS_WINDOW = 10


def train_lora(
    base_model_dir: Path,
    examples: list[TrainingExample],
    config: LoraTrainingConfig,
    out_file: Path,
    checkpoint_dir: Path | None,
    device: str,
    control: RunControl,
    memory_limit_bytes: int | None = None,
) -> TrainingOutcome:
    """Train a LoRA on ``base_model_dir`` (a diffusers SD 1.x/2.x folder) and write it to
    ``out_file`` in the diffusers LoRA layout.

    ``checkpoint_dir`` (created if missing) receives a checkpoint every
    ``config.checkpoint_every`` steps and is searched for one of this same run to resume from.
    ``control.progress(percent, {"step", "steps", "loss"})`` is called after every step, and
    ``Cancelled`` raised when ``control.should_stop()``, with ``out_file`` left unwritten.
    ``memory_limit_bytes``: a run whose ``estimate_training_bytes`` exceeds it is refused with
    ``InvalidInput(field="resolution")`` before anything is loaded."""
    started = time.perf_counter()
    base_model_dir = Path(base_model_dir)
    out_file = Path(out_file)
    config.validate()
    validate_examples(examples)
    precision = resolve_precision(config, resolve_device(device))
    if memory_limit_bytes is not None:
        refuse_if_too_large(base_model_dir, config, precision, memory_limit_bytes)
    check_trainable(base_model_dir)
    check_stop(control)

    pixels = [prepare_image(e.image, config.resolution) for e in examples]
    captions = [e.caption for e in examples]
    optimizer_name = "AdamW8bit" if _adamw8bit(precision.device) is not None else "AdamW"
    fingerprint = run_fingerprint(
        config, precision, optimizer_name, base_model_dir, examples_digest(captions, pixels)
    )
    if precision.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(precision.device)

    try:
        outcome = _load_and_train(
            base_model_dir,
            pixels,
            captions,
            config,
            precision,
            control,
            checkpoint_dir,
            fingerprint,
            out_file,
        )
    except torch.OutOfMemoryError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "out of memory"
    else:
        outcome.seconds = round(time.perf_counter() - started, 3)
        log.info(
            "trained LoRA rank %d on %s: %d steps (resumed from %d), final loss %.5f, %.1f s",
            config.rank,
            base_model_dir.name,
            outcome.steps,
            outcome.resumed_from,
            outcome.final_loss,
            outcome.seconds,
        )
        return outcome
    # Freed outside the except block: until it ends, the traceback pins the frames whose tensors
    # filled the card (as the diffusion loader does). The models live only in _load_and_train's
    # frame, so nothing else holds them now.
    free_memory(precision.device)
    raise EngineError(
        f"the device ran out of memory: {reason}; lower the resolution or batch size", code="out_of_memory"
    )


def _load_and_train(
    model_dir: Path,
    pixels: list[Any],
    captions: list[str],
    config: LoraTrainingConfig,
    precision: Precision,
    control: RunControl,
    checkpoint_dir: Path | None,
    fingerprint: str,
    out_file: Path,
) -> TrainingOutcome:
    trainer = LoraTrainer.load(model_dir, pixels, captions, config, precision, control)
    return trainer.run(checkpoint_dir, fingerprint, out_file, control)


def refuse_if_too_large(
    model_dir: Path, config: LoraTrainingConfig, precision: Precision, limit: int
) -> None:
    """``InvalidInput(field="resolution")`` when the run's estimate is over ``limit`` bytes."""
    counts = weight_parameter_counts(model_dir) if model_dir.is_dir() else {}
    needed = estimate_training_bytes(
        counts.get("unet", 0),
        config.resolution,
        config.batch_size,
        precision.dtype_bytes,
        precision.gradient_checkpointing,
        config.rank,
        text_encoder_param_count=counts.get("text_encoder", 0),
        train_text_encoder=config.train_text_encoder,
    )
    if needed > limit:
        raise InvalidInput(
            f"training at {config.resolution} px with batch size {config.batch_size} needs about "
            f"{needed / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB available; "
            "lower the resolution or the batch size",
            field="resolution",
        )


def training_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> Any:
    """What the UNet learns to predict, per the scheduler's ``prediction_type``."""
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {prediction!r}")


@dataclass
class LoraTrainer:
    """The loaded models, the encoded examples and the optimisation state of one run."""

    config: LoraTrainingConfig
    precision: Precision
    scheduler: Any
    unet: Any
    text_encoder: Any | None  # only when trained
    encoded: EncodedExamples
    params: list[tuple[str, torch.nn.Parameter]]  # "unet.<name>" / "text_encoder.<name>"
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator

    @classmethod
    def load(
        cls,
        model_dir: Path,
        pixels: list[Any],
        captions: list[str],
        config: LoraTrainingConfig,
        precision: Precision,
        control: RunControl,
    ) -> LoraTrainer:
        device = precision.device
        quiet_loading()
        scheduler = load_noise_scheduler(model_dir)
        tokenizer = load_tokenizer(model_dir)
        encoded = encode_examples(
            model_dir,
            pixels,
            captions,
            precision,
            tokenizer,
            embed_captions=not config.train_text_encoder,
            control=control,
        )
        check_stop(control)
        unet = load_unet(model_dir, precision.weight_dtype)
        text_encoder = None
        with seeded_init(config.seed):
            params = [("unet." + n, p) for n, p in add_lora(unet, config.rank, UNET_LORA_TARGETS)]
            if config.train_text_encoder:
                # Built on the CPU, like the UNet, so its LoRA starts from the same CPU draws.
                text_encoder = load_text_encoder(model_dir, precision.weight_dtype, torch.device("cpu"))
                params += [
                    ("text_encoder." + n, p)
                    for n, p in add_lora(text_encoder, config.rank, TEXT_ENCODER_LORA_TARGETS)
                ]
        unet.to(device)
        unet.train()  # SD UNets have no dropout: train mode only lets checkpointing engage
        if precision.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            text_encoder.to(device)
            text_encoder.train()
            if precision.gradient_checkpointing:
                text_encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        optimizer, name = make_optimizer([p for _, p in params], config.learning_rate, device)
        # fp16 gradients of small values underflow to zero: scale the loss (bf16 has the range).
        scaler = torch.amp.GradScaler("cuda") if precision.weight_dtype == torch.float16 else None
        generator = torch.Generator(device=device).manual_seed(derived_seed(config.seed, NOISE_STREAM))
        return cls(
            config,
            precision,
            scheduler,
            unet,
            text_encoder,
            encoded,
            params,
            optimizer,
            name,
            scaler,
            generator,
        )

    # -- the loop ----------------------------------------------------------------------------

    def run(
        self, checkpoint_dir: Path | None, fingerprint: str, out_file: Path, control: RunControl
    ) -> TrainingOutcome:
        steps = self.config.steps
        every = self.config.checkpoint_every
        losses: list[float] = []
        resumed_from = 0
        checkpoint = load_latest_checkpoint(checkpoint_dir, fingerprint, max_step=steps)
        if checkpoint is not None:
            try:
                self.restore(checkpoint)
            except (ValueError, KeyError) as exc:
                log.warning(
                    "cannot resume from the step %d checkpoint, starting afresh: %s", checkpoint.step, exc
                )
            else:
                resumed_from = checkpoint.step
                losses = list(checkpoint.losses)
                log.info("resuming LoRA training at step %d of %d", resumed_from, steps)
        for step in range(resumed_from, steps):
            losses.append(self.step(step))
            done = step + 1
            if checkpoint_dir is not None and every and done % every == 0:
                save_checkpoint(checkpoint_dir, self.snapshot(done, losses), fingerprint)
            control.progress(100.0 * done / steps, {"step": done, "steps": steps, "loss": losses[-1]})
            check_stop(control)
        save_lora_file(self.unet, self.text_encoder, out_file)
        window = losses[-FINAL_LOSS_WINDOW:]
        device = self.precision.device
        return TrainingOutcome(
            lora_file=out_file,
            steps=len(losses),
            final_loss=sum(window) / len(window),
            losses=losses,
            resumed_from=resumed_from,
            seconds=0.0,
            peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            device=str(device),
            dtype=self.precision.dtype_name,
            optimizer=self.optimizer_name,
        )

    def step(self, index: int) -> float:
        """Train on batch ``index`` (0-based); return its loss."""
        device = self.precision.device
        enc = self.encoded
        count = enc.latent_mean.shape[0]
        picked = batch_indices(self.config.seed, count, index, self.config.batch_size)
        rows = torch.tensor(picked, device=device)
        mean = enc.latent_mean[rows]
        # The draws, in a fixed order from one generator: latent sample, noise, timesteps.
        sample = mean + enc.latent_std[rows] * torch.randn(
            mean.shape, generator=self.generator, device=device, dtype=mean.dtype
        )
        latents = (sample - enc.shift_factor) * enc.scaling_factor
        noise = torch.randn(latents.shape, generator=self.generator, device=device, dtype=latents.dtype)
        timesteps = torch.randint(
            0,
            self.scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=self.generator,
            device=device,
            dtype=torch.long,
        )
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.scheduler, latents, noise, timesteps)

        self.optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(device_type=device.type, dtype=self.precision.weight_dtype)
            if self.precision.autocast
            else contextlib.nullcontext()
        )
        with autocast:
            if self.text_encoder is not None:
                embeddings = self.text_encoder(enc.input_ids[rows], return_dict=False)[0]
            else:
                assert enc.embeddings is not None
                embeddings = enc.embeddings[rows]
            prediction = self.unet(noisy, timesteps, embeddings, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        trained = [p for _, p in self.params]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(trained, MAX_GRAD_NORM)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, MAX_GRAD_NORM)
            self.optimizer.step()
        return float(loss.detach().item())

    # -- checkpoints -------------------------------------------------------------------------

    def snapshot(self, step: int, losses: list[float]) -> Checkpoint:
        return Checkpoint(
            step=step,
            losses=list(losses),
            lora={name: p.detach().to("cpu", copy=True) for name, p in self.params},
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            rng=self.generator.get_state(),
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``. Everything is checked before anything is changed, so a
        ``ValueError`` leaves the trainer as fresh as it was."""
        names = {name for name, _ in self.params}
        if set(checkpoint.lora) != names:
            raise ValueError("its LoRA parameters are not this run's")
        for name, p in self.params:
            if checkpoint.lora[name].shape != p.shape:
                saved = tuple(checkpoint.lora[name].shape)
                raise ValueError(f"{name} has shape {saved}, not {tuple(p.shape)}")
        if (checkpoint.scaler is None) != (self.scaler is None):
            raise ValueError("it was written with another precision")
        current = self.generator.get_state()
        rng = checkpoint.rng
        if not isinstance(rng, torch.Tensor) or rng.dtype != current.dtype or rng.shape != current.shape:
            raise ValueError("its generator state is not this device's")
        # torch checks the groups and sizes before it replaces any state: the last refusal.
        self.optimizer.load_state_dict(checkpoint.optimizer)
        if self.scaler is not None and checkpoint.scaler is not None:
            self.scaler.load_state_dict(checkpoint.scaler)
        self.generator.set_state(rng)
        with torch.no_grad():
            for name, p in self.params:
                p.copy_(checkpoint.lora[name])


def make_optimizer(
    params: list[torch.nn.Parameter], learning_rate: float, device: torch.device
) -> tuple[torch.optim.Optimizer, str]:
    """bitsandbytes' 8-bit AdamW on CUDA where it imports (a quarter of the optimizer memory),
    else torch's AdamW."""
    adamw8bit = _adamw8bit(device)
    if adamw8bit is not None:
        optimizer = adamw8bit(
            params, lr=learning_rate, betas=ADAM_BETAS, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPSILON
        )
        return optimizer, "AdamW8bit"
    optimizer = torch.optim.AdamW(
        params, lr=learning_rate, betas=ADAM_BETAS, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPSILON
    )
    return optimizer, "AdamW"


def _adamw8bit(device: torch.device) -> Any:
    if device.type != "cuda":
        return None
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001 - a broken CUDA setup raises more than ImportError
        log.debug("bitsandbytes unavailable, using torch AdamW: %s", exc)
        return None
    return bitsandbytes.optim.AdamW8bit


def save_lora_file(unet: Any, text_encoder: Any | None, out_file: Path) -> None:
    """Write the LoRA in the diffusers layout, with its peft config (rank, alpha, targets) in the
    safetensors metadata; via a temporary name in the same folder, so ``out_file`` is complete
    or absent."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(model: Any) -> dict[str, torch.Tensor]:
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    partial = f".{out_file.name}.{os.getpid()}.partial"
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(out_file.parent),
        unet_lora_layers=layers(unet),
        text_encoder_lora_layers=layers(text_encoder) if text_encoder is not None else None,
        weight_name=partial,
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=(
            text_encoder.peft_config["default"].to_dict() if text_encoder is not None else None
        ),
    )
    try:
        os.replace(out_file.parent / partial, out_file)
    except OSError:
        (out_file.parent / partial).unlink(missing_ok=True)
        raise
