"""What a LoRA training run is asked to do, how it will run, and what it will cost in memory.

``LoraTrainingConfig`` is the request, checked up front with precise ``InvalidInput`` errors.
``resolve_precision`` turns it and a device into the settings the loop uses (weights dtype,
autocast, gradient checkpointing). ``estimate_training_bytes`` is the conservative memory figure
a run is refused on before any weight is loaded; ``weight_parameter_counts`` feeds it from the
model folder's safetensors headers, reading no tensor data.

Nothing here loads a model, so a refusal costs milliseconds.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from inference.base import EngineError, InvalidInput
from inference.model_files import ModelStoreError, safetensors_header

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
MAX_RANK = 256
MIN_RESOLUTION = 64
# The VAE halves the image three times, so a latent pixel is 8x8 image pixels.
VAE_FACTOR = 8

# -- memory model (see estimate_training_bytes) ----------------------------------------------------
# SD 1.5's UNet: the model the activation figures below were measured on.
REFERENCE_UNET_PARAMS = 860_000_000
# Activation memory kept for the backward pass, per latent pixel, per sample and per byte of the
# compute dtype, for an SD 1.5-sized UNet without gradient checkpointing. SD 1.5 LoRA training at
# 512 px, batch 1, fp16 peaks at roughly 6-7 GiB of which ~1.7 GiB are weights: 8 GiB of
# activations over 4096 latent pixels and 2 bytes leaves a margin on top of that.
ACTIVATION_BYTES_PER_LATENT_PIXEL = 2**20
# Gradient checkpointing keeps only the block inputs and recomputes the rest in the backward pass.
CHECKPOINTED_ACTIVATION_FRACTION = 0.3
# LoRA parameters per unit of rank as a fraction of the model's parameters: 2.3e-4 for SD 1.5's
# UNet on to_q/to_k/to_v/to_out.0 (199k per rank), 6e-4 for CLIP-L on its four projections.
UNET_LORA_FRACTION_PER_RANK = 3e-4
TEXT_LORA_FRACTION_PER_RANK = 8e-4
# fp32 weight, its gradient and AdamW's two moments (8-bit Adam needs less: still counted at this).
BYTES_PER_TRAINED_PARAM = 16
# cuBLAS/cuDNN workspaces, the allocator's rounding and fragmentation, the latents and embeddings.
WORKSPACE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class LoraTrainingConfig:
    """One LoRA training run. Alpha equals ``rank``, so the LoRA applies at scale 1."""

    rank: int = 16
    steps: int = 1000
    learning_rate: float = 1e-4
    resolution: int = 512
    seed: int = 0
    batch_size: int = 1
    train_text_encoder: bool = False  # LoRA on the CLIP text encoder's attention too
    checkpoint_every: int = 100  # steps; 0 = never
    gradient_checkpointing: bool | None = None  # None: on for CUDA, off for CPU
    mixed_precision: str = "auto"  # "auto": bf16 where CUDA supports it, else fp16; "no" on CPU

    def validate(self) -> None:
        """Raise ``InvalidInput`` naming the first field that cannot run."""
        _integer("rank", self.rank, 1, MAX_RANK)
        _integer("steps", self.steps, 1, None)
        _integer("batch_size", self.batch_size, 1, None)
        _integer("checkpoint_every", self.checkpoint_every, 0, None)
        _integer("seed", self.seed, 0, 2**63 - 1)
        _integer("resolution", self.resolution, MIN_RESOLUTION, None)
        if self.resolution % VAE_FACTOR:
            raise InvalidInput(
                f"resolution must be a multiple of {VAE_FACTOR}, got {self.resolution}", field="resolution"
            )
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise InvalidInput(f"learning_rate must be a positive number, got {lr!r}", field="learning_rate")
        if not isinstance(self.train_text_encoder, bool):
            raise InvalidInput("train_text_encoder must be true or false", field="train_text_encoder")
        if self.gradient_checkpointing is not None and not isinstance(self.gradient_checkpointing, bool):
            raise InvalidInput(
                "gradient_checkpointing must be true, false or null", field="gradient_checkpointing"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise InvalidInput(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}",
                field="mixed_precision",
            )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class TrainingOutcome:
    """What a finished run produced and what it cost."""

    lora_file: Path  # diffusers LoRA layout, loadable by pipe.load_lora_weights(dir, weight_name=...)
    steps: int  # total steps done (== config.steps when finished)
    final_loss: float  # mean loss over the last min(10, steps) steps
    losses: list[float]  # loss per step
    resumed_from: int  # step the run resumed from (0 = fresh)
    seconds: float
    peak_memory_bytes: int | None  # torch.cuda.max_memory_allocated on CUDA, None on CPU
    device: str
    dtype: str  # weights dtype of the frozen parts, e.g. "float16"
    optimizer: str  # "AdamW" or "AdamW8bit"


@dataclass(frozen=True)
class Precision:
    """How a run computes: where, with which frozen-weights dtype, and whether it checkpoints."""

    device: torch.device
    weight_dtype: torch.dtype  # frozen UNet and text encoder; the LoRA parameters stay float32
    gradient_checkpointing: bool

    @property
    def autocast(self) -> bool:
        return self.weight_dtype != torch.float32

    @property
    def dtype_name(self) -> str:
        return str(self.weight_dtype).removeprefix("torch.")

    @property
    def dtype_bytes(self) -> int:
        return torch.finfo(self.weight_dtype).bits // 8


def resolve_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineError(f"unknown device {device!r}: {exc}", code="device_unavailable") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise EngineError(f"LoRA training runs on cpu or cuda, not {device!r}", code="device_unavailable")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} asked for, but CUDA is unavailable", code="device_unavailable")
    return resolved


def resolve_precision(config: LoraTrainingConfig, device: torch.device) -> Precision:
    """The dtype and checkpointing a config gets on ``device`` (config already validated)."""
    cuda = device.type == "cuda"
    mode = config.mixed_precision
    if mode == "auto":
        mode = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if not cuda and mode != "no":
        # Half precision on CPU is slow and misses kernels: the diffusion engines refuse it too.
        raise InvalidInput(
            f"mixed_precision {config.mixed_precision!r} needs CUDA; use 'no' or 'auto' on the CPU",
            field="mixed_precision",
        )
    if mode == "bf16" and not torch.cuda.is_bf16_supported():
        raise InvalidInput("this GPU does not support bf16; use 'fp16' or 'auto'", field="mixed_precision")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    checkpointing = cuda if config.gradient_checkpointing is None else config.gradient_checkpointing
    return Precision(device, dtype, checkpointing)


def estimate_training_bytes(
    unet_param_count: int,
    resolution: int,
    batch_size: int,
    dtype_bytes: int,
    gradient_checkpointing: bool,
    rank: int,
    *,
    text_encoder_param_count: int = 0,
    train_text_encoder: bool = False,
) -> int:
    """A conservative estimate of the peak memory of a LoRA training run, in bytes.

    The sum of:

    - the frozen UNet's weights, ``unet_param_count * dtype_bytes``; the text encoder's too when
      it is trained (otherwise it only embeds the captions once and is freed, like the VAE);
    - the LoRA parameters, ``rank * fraction * params`` (the fractions are measured on SD 1.5
      and CLIP-L, rounded up), each with ``BYTES_PER_TRAINED_PARAM`` for its fp32 value,
      gradient and two Adam moments;
    - the activations kept for the backward pass: ``(resolution / 8)^2`` latent pixels times
      ``batch_size`` times ``dtype_bytes`` times ``ACTIVATION_BYTES_PER_LATENT_PIXEL``, scaled
      by the UNet's size relative to SD 1.5's but never below it (a model whose size is
      unknown, 0, is costed as SD 1.5), and by ``CHECKPOINTED_ACTIVATION_FRACTION`` with
      gradient checkpointing;
    - ``WORKSPACE_BYTES`` for workspaces and fragmentation.

    The VAE's one-off encoding pass and a CUDA context (outside torch's allocator) are not
    counted: the first is smaller than a training step, the second is not the process's to give.
    """
    latent_pixels = (resolution / VAE_FACTOR) ** 2
    weights = unet_param_count * dtype_bytes
    lora_params = rank * UNET_LORA_FRACTION_PER_RANK * unet_param_count
    if train_text_encoder:
        weights += text_encoder_param_count * dtype_bytes
        lora_params += rank * TEXT_LORA_FRACTION_PER_RANK * text_encoder_param_count
    scale = max(unet_param_count, REFERENCE_UNET_PARAMS) / REFERENCE_UNET_PARAMS
    activations = latent_pixels * batch_size * dtype_bytes * ACTIVATION_BYTES_PER_LATENT_PIXEL * scale
    if gradient_checkpointing:
        activations *= CHECKPOINTED_ACTIVATION_FRACTION
    return int(weights + lora_params * BYTES_PER_TRAINED_PARAM + activations + WORKSPACE_BYTES)


def weight_parameter_counts(model_dir: Path) -> dict[str, int]:
    """Parameters of each component folder's safetensors weights ("unet", "text_encoder"), from
    the file headers alone. A component whose weights cannot be read counts 0: the estimate then
    assumes an SD 1.5-sized model, and the loader reports the broken folder after it."""
    counts: dict[str, int] = {}
    for component in ("unet", "text_encoder"):
        files = sorted((model_dir / component).glob("*.safetensors"))
        # The plain files when there are any (variant files carry an infix, model.fp16.safetensors;
        # shards do not), else the variant ones: either way one copy of the weights is counted.
        files = [f for f in files if "." not in f.stem] or files
        total = 0
        for file in files:
            try:
                header = safetensors_header(file)
            except (OSError, ValueError, struct.error, ModelStoreError):
                total = 0
                break
            total += sum(math.prod(info["shape"]) for info in header.values())
        counts[component] = total
    return counts


def _integer(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer, got {value!r}", field=name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidInput(f"{name} must be {bound}, got {value}", field=name)
