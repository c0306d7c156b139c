"""``inpaint`` (repaint the masked region from a prompt) and ``remove_object`` (fill it from its
surroundings, no prompt needed): both repaint a region and keep every other pixel."""

from __future__ import annotations

from typing import Any

from PIL import Image

from inference.base import EngineResult, NullControl, RunControl
from inference.diffusion.params import (
    SamplingParams,
    check_effective_steps,
    feather_width,
    image_and_mask,
    number,
)
from inference.diffusion.pipeline import DiffusionPipeline, masked_repaint

REMOVE_PROMPT = "clean empty background, seamless, natural continuation of the surroundings"
REMOVE_NEGATIVE = "object, person, animal, text, watermark, logo, frame, artifacts, blurry"


class Inpainter(DiffusionPipeline):
    """``inpaint``: repaint the masked region of ``image`` following ``prompt``.

    ``mask_mode`` "white" (the default, diffusers' convention) repaints where the mask is white;
    "black" (the SenseTime seed's convention) repaints where it is black.
    """

    task = "inpaint"

    def __call__(
        self,
        image: Image.Image,
        mask: Image.Image,
        prompt: str = "",
        *,
        mask_mode: str = "white",
        strength: float = 1.0,
        model: str | None = None,
        negative_prompt: str | None = None,
        steps: int = 30,
        cfg_scale: float = 7.0,
        seed: int | None = None,
        samples: int = 1,
        scheduler: str | None = None,
        loras: list[dict[str, Any]] | None = None,
        feather: int | None = None,
        control: RunControl | None = None,
        client: str | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        params = SamplingParams.check(prompt, negative_prompt, steps, cfg_scale, samples, scheduler)
        strength = number("strength", strength, 0.0, 1.0, low_open=True)
        check_effective_steps("strength", strength, params.steps)
        image, region = image_and_mask(image, mask, mask_mode)
        feather = feather_width(feather, image)
        entry, info = self.models.resolve(model, self.task, client)
        seeds = params.seeds(seed)
        lora_list = self.models.resolve_loras(loras, entry.base_model_type or info.base_model_type, client)
        images = masked_repaint(
            self.models,
            entry,
            info,
            image,
            region,
            feather,
            seeds,
            control,
            {**params.pipeline_kwargs(), "strength": strength},
            scheduler=scheduler,
            loras=lora_list,
        )
        control.progress(100)
        return self._result(entry, images, seeds, mask_mode=mask_mode, strength=strength)


class ObjectRemover(DiffusionPipeline):
    """``remove_object``: fill the masked region from its surroundings; no prompt needed.

    The fill blends into the image through a mask feathered *inward*: pixels outside the mask
    are the input's own, unchanged, and the fill fades in over ``feather`` pixels inside it.
    """

    task = "remove_object"

    def __call__(
        self,
        image: Image.Image,
        mask: Image.Image,
        *,
        mask_mode: str = "white",
        model: str | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        steps: int = 30,
        cfg_scale: float = 5.0,
        seed: int | None = None,
        samples: int = 1,
        scheduler: str | None = None,
        feather: int | None = None,
        control: RunControl | None = None,
        client: str | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        params = SamplingParams.check(
            REMOVE_PROMPT if prompt is None else prompt,
            REMOVE_NEGATIVE if negative_prompt is None else negative_prompt,
            steps,
            cfg_scale,
            samples,
            scheduler,
        )
        image, region = image_and_mask(image, mask, mask_mode)
        feather = feather_width(feather, image)
        entry, info = self.models.resolve(model, self.task, client)
        seeds = params.seeds(seed)
        images = masked_repaint(
            self.models,
            entry,
            info,
            image,
            region,
            feather,
            seeds,
            control,
            {**params.pipeline_kwargs(), "strength": 1.0},
            scheduler=scheduler,
            loras=[],
        )
        control.progress(100)
        return self._result(entry, images, seeds, mask_mode=mask_mode)
