"""The parameters every diffusion task shares, and the checks that refuse bad ones up front.

``SamplingParams`` is the one parameter type of the four pipelines: the prompt, the negative
prompt, the steps, the guidance scale, the samples and the scheduler, checked once and turned
into the diffusers call's keywords. The limits are the API's own (``config/limits.py``), so what
the API accepts the engine runs. Every check raises ``InvalidInput`` naming the field, before any
model is loaded.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageChops

from config import limits
from inference.base import InvalidInput

# The API's payload schemas check the same numbers (config/limits.py), so what the API accepts
# the engine runs.
MAX_PROMPT_CHARS = limits.DIFFUSION_MAX_PROMPT_CHARS
MAX_SAMPLES = limits.DIFFUSION_MAX_SAMPLES
MAX_STEPS = limits.DIFFUSION_MAX_STEPS
MAX_LORAS = limits.DIFFUSION_MAX_LORAS
MAX_SEED = limits.DIFFUSION_MAX_SEED
MIN_SIDE = limits.DIFFUSION_MIN_SIDE
MAX_INPUT_SIDE = 6000  # the seeds' largest accepted input and output side
MASK_MODES = ("white", "black")

# The scheduler names callers may pass, mapped to diffusers classes and their options. Each run
# builds a fresh scheduler from the model's own scheduler config, so a model's betas and
# prediction type carry over and the shared base pipeline's scheduler is never mutated.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@dataclass(frozen=True)
class SamplingParams:
    """What every diffusion task takes besides its images, checked: ``check`` refuses a bad
    value naming its field, ``seeds`` the seed of each sample, ``pipeline_kwargs`` the call."""

    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    samples: int
    scheduler: str | None

    @classmethod
    def check(
        cls,
        prompt: Any,
        negative_prompt: Any,
        steps: Any,
        cfg_scale: Any,
        samples: Any,
        scheduler: Any,
        *,
        prompt_required: bool = False,
    ) -> SamplingParams:
        text = prompt_text("prompt", prompt, required=prompt_required)
        negative = prompt_text("negative_prompt", negative_prompt)
        steps = integer("steps", steps, 1, MAX_STEPS)
        cfg_scale = number("cfg_scale", cfg_scale, 0.0, limits.DIFFUSION_MAX_CFG_SCALE)
        samples = integer("samples", samples, 1, MAX_SAMPLES)
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise InvalidInput(
                f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}", field="scheduler"
            )
        return cls(text, negative, steps, cfg_scale, samples, scheduler)

    def seeds(self, seed: Any) -> list[int]:
        """One seed per sample: ``seed``, ``seed + 1``, ... (a random start when None), so output
        ``i`` of a run is the same image as a one-sample run with ``seed + i``."""
        if seed is None:
            # The SenseTime seed range: easy to read back and type in to reproduce an output.
            seed = secrets.randbelow(99_999_999)
        seed = integer("seed", seed, 0, MAX_SEED - self.samples + 1)
        return [seed + i for i in range(self.samples)]

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The diffusers pipeline's keywords for these parameters."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt or None,
            "num_inference_steps": self.steps,
            "guidance_scale": self.cfg_scale,
        }


def number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidInput(f"{name} must be a number, got {value!r}", field=name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidInput(f"{name} must be in {interval}, got {value}", field=name)
    return float(value)


def integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer, got {value!r}", field=name)
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be in [{low}, {high}], got {value}", field=name)
    return value


def prompt_text(name: str, value: Any, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string", field=name)
    if required and not value.strip():
        raise InvalidInput(f"{name} must not be empty", field=name)
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"{name} has {len(value)} characters, at most {MAX_PROMPT_CHARS}", field=name)
    return value


def check_effective_steps(name: str, strength: float, steps: int) -> None:
    # img2img and inpaint run only the last ``steps * strength`` steps; zero of them is no run.
    if int(steps * strength) < 1:
        raise InvalidInput(
            f"{name} {strength} with {steps} steps leaves no denoising step; raise {name} or steps",
            field=name,
        )


def side(name: str, value: Any, max_side: int) -> int:
    value = integer(name, value, MIN_SIDE, max_side)
    if value % 8:
        raise InvalidInput(f"{name} must be a multiple of 8, got {value}", field=name)
    return value


def input_image(name: str, image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise InvalidInput(f"{name} must be an image", field=name)
    if min(image.size) < 16 or max(image.size) > MAX_INPUT_SIDE:
        raise InvalidInput(
            f"{name} is {image.width}x{image.height}; each side must be in [16, {MAX_INPUT_SIDE}]", field=name
        )
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.mode == "P":
        # Transparent pixels have no colour to continue: flatten them onto white.
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def image_and_mask(image: Any, mask: Any, mask_mode: Any) -> tuple[Image.Image, Image.Image]:
    """The RGB image and the region to repaint as an L image (255 = repaint, 0 = keep)."""
    image = input_image("image", image)
    if not isinstance(mask, Image.Image):
        raise InvalidInput("mask must be an image", field="mask")
    if mask.size != image.size:
        raise InvalidInput(
            f"mask is {mask.width}x{mask.height} but the image is "
            f"{image.width}x{image.height}; they must be the same size",
            field="mask",
        )
    if mask_mode not in MASK_MODES:
        raise InvalidInput(f"mask_mode must be 'white' or 'black', got {mask_mode!r}", field="mask_mode")
    if "A" in mask.getbands() and np.asarray(mask.getchannel("A")).min() < 255:
        # A transparent-background brush stroke: the painted (opaque) pixels are the region.
        gray = mask.getchannel("A")
        gray = gray if mask_mode == "white" else ImageChops.invert(gray)
    else:
        gray = mask.convert("L")
    region = (
        gray.point(lambda v: 255 if v >= 128 else 0)
        if mask_mode == "white"
        else gray.point(lambda v: 255 if v < 128 else 0)
    )
    if region.getextrema()[1] == 0:
        raise InvalidInput(
            f"the mask marks no region to repaint (mask_mode={mask_mode!r}: "
            f"{'white' if mask_mode == 'white' else 'black'} pixels are repainted)",
            field="mask",
        )
    return image, region


def feather_width(feather: Any, image: Image.Image) -> int:
    if feather is None:
        return max(2, round(min(image.size) / 64))
    return integer("feather", feather, 0, 256)


def round8(value: float) -> int:
    return int(value) // 8 * 8
