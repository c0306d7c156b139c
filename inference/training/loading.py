"""Loading a diffusers folder for LoRA training and encoding the examples once.

The frozen parts are the real diffusers/transformers classes loaded from the folder, as the
inference engines load them. Since nothing is augmented, the VAE encodes each prepared image
exactly once (its latent distribution, mean and std, is kept and sampled every step like the
reference training script samples it) and the text encoder embeds the captions once when it is
not trained; both are then freed, so the training loop holds only the UNet (and the text encoder
when trained). The VAE, and the text encoder when it only embeds, run in float32 whatever the
run's dtype: they run once, and half-precision VAEs overflow on some images.

LoRA adapters are added with peft, their matrices initialised from the run's seed on the CPU,
whatever the device, and kept in float32 while the frozen weights are in the run's dtype.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.base import EngineError, InvalidInput, RunControl, check_stop
from inference.diffusion.loader import model_info
from inference.training.data import INIT_STREAM, derived_seed, to_model_pixels
from inference.training.params import Precision

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TEXT_BATCH = 16


@dataclass
class EncodedExamples:
    """The examples as the loop consumes them, on the training device."""

    latent_mean: torch.Tensor  # (N, C, h, w) float32: the VAE's latent distribution
    latent_std: torch.Tensor
    embeddings: torch.Tensor | None  # (N, tokens, dim) float32; None when the text encoder trains
    input_ids: torch.Tensor  # (N, tokens) token ids of the captions
    scaling_factor: float
    shift_factor: float


def check_trainable(model_dir: Path) -> None:
    """Refuse a folder this trainer cannot train, from its configs alone."""
    info = model_info(str(model_dir))  # EngineError("model_broken") for an incomplete folder
    if info.base_model_type == "sdxl":
        raise InvalidInput("LoRA training supports SD 1.x and 2.x models, not SDXL", field="model")
    if info.in_channels != 4:
        raise InvalidInput(
            f"LoRA training needs a text-to-image UNet (4 input channels), this one has {info.in_channels}",
            field="model",
        )
    path = model_dir / "scheduler" / "scheduler_config.json"
    try:
        scheduler = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"{model_dir} has no readable scheduler config: {exc}", code="model_broken"
        ) from exc
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise InvalidInput(f"cannot train a model that predicts {prediction!r}", field="model")


def component_variant(folder: Path) -> str | None:
    """``"fp16"`` when the component ships only fp16 variant weight files, as some folders do."""
    names = [p.name for p in folder.glob("*.safetensors")] or [p.name for p in folder.glob("*.bin")]
    return "fp16" if names and all(".fp16." in n for n in names) else None


def quiet_loading() -> None:
    """Loading bars would land in the worker's log on every load, as noise between job lines."""
    import transformers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_noise_scheduler(model_dir: Path) -> Any:
    from diffusers import DDPMScheduler

    # Whatever sampler the folder ships, training adds noise the DDPM way from its config.
    return DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler", local_files_only=True)


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer", local_files_only=True)


def load_text_encoder(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import CLIPTextModel

    encoder: Any = CLIPTextModel.from_pretrained(
        str(model_dir),
        subfolder="text_encoder",
        dtype=dtype,
        local_files_only=True,
        variant=component_variant(model_dir / "text_encoder"),
    )
    encoder.requires_grad_(False)
    encoder.to(device)
    return encoder.eval()


def load_unet(model_dir: Path, dtype: torch.dtype) -> Any:
    """The frozen UNet, on the CPU (adapters are added there, then it moves)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(
        str(model_dir),
        subfolder="unet",
        dtype=dtype,
        local_files_only=True,
        variant=component_variant(model_dir / "unet"),
    )
    unet.requires_grad_(False)
    return unet


def encode_examples(
    model_dir: Path,
    pixels: Sequence[np.ndarray],
    captions: Sequence[str],
    precision: Precision,
    tokenizer: Any,
    *,
    embed_captions: bool,
    control: RunControl,
) -> EncodedExamples:
    """Encode every prepared image with the VAE and, when ``embed_captions``, every caption with
    the text encoder; both models are freed before returning."""
    from diffusers import AutoencoderKL

    device = precision.device
    ids = tokenizer(
        list(captions),
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)

    vae = AutoencoderKL.from_pretrained(
        str(model_dir),
        subfolder="vae",
        dtype=torch.float32,
        local_files_only=True,
        variant=component_variant(model_dir / "vae"),
    )
    vae.requires_grad_(False)
    vae.to(device).eval()
    means: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    with torch.no_grad():
        # One image at a time: the encoder's full-resolution activations are this phase's peak.
        for image in pixels:
            check_stop(control)
            batch = torch.from_numpy(to_model_pixels(image)).unsqueeze(0).to(device)
            dist = vae.encode(batch).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    scaling = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    del vae
    free_memory(device)

    embeddings = None
    if embed_captions:
        encoder = load_text_encoder(model_dir, torch.float32, device)
        chunks: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(ids), TEXT_BATCH):
                check_stop(control)
                chunks.append(encoder(ids[start : start + TEXT_BATCH], return_dict=False)[0].float())
        embeddings = torch.cat(chunks)
        del encoder
        free_memory(device)
    return EncodedExamples(torch.cat(means), torch.cat(stds), embeddings, ids, scaling, shift)


def add_lora(model: Any, rank: int, targets: list[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """Add a trainable LoRA (alpha = rank, gaussian A, zero B) to ``model`` and return its
    parameters by name, cast to float32. Call inside ``seeded_init`` for a seeded start."""
    from diffusers.loaders import PeftAdapterMixin
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    if isinstance(model, PeftAdapterMixin):
        # diffusers' add_adapter also marks the adapter as loaded for the model's LoRA methods.
        model.add_adapter(config)
    else:
        # transformers' add_adapter insists on peft >= 0.22 (unreleased when this was written);
        # peft's own injection is what it wraps, and what diffusers loads text encoder LoRAs with.
        inject_adapter_in_model(config, model)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for _, p in params:
        # The adapter takes the frozen weights' dtype; optimizer updates need float32.
        p.data = p.data.to(torch.float32)
    return params


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Seed the global CPU generator for the LoRA initialisation of run ``seed``, and restore it
    after, so a worker's other users of torch's RNG are not disturbed."""
    state = torch.random.get_rng_state()
    torch.random.default_generator.manual_seed(derived_seed(seed, INIT_STREAM))
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
