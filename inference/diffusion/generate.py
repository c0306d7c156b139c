"""``generate``: text to image, or image to image when an image is given; either steered by up to
three ControlNets (``controlnet``)."""

from __future__ import annotations

import contextlib
from typing import Any

from PIL import Image

from inference.base import EngineResult, NullControl, RunControl
from inference.diffusion.controlnet import ControlNets, check_controlnets, controlnet_call
from inference.diffusion.loader import ModelInfo
from inference.diffusion.params import (
    MIN_SIDE,
    SamplingParams,
    check_effective_steps,
    input_image,
    integer,
    number,
    round8,
    side,
)
from inference.diffusion.pipeline import DiffusionPipeline


class ImageGenerator(DiffusionPipeline):
    """``generate``: text to image, or image to image when ``image`` is given."""

    task = "generate"

    def __call__(
        self,
        prompt: str,
        *,
        model: str | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int = 30,
        cfg_scale: float = 7.0,
        seed: int | None = None,
        samples: int = 1,
        scheduler: str | None = None,
        loras: list[dict[str, Any]] | None = None,
        image: Image.Image | None = None,
        image_strength: float = 0.6,
        controlnets: list[dict[str, Any]] | None = None,
        control: RunControl | None = None,
        client: str | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        params = SamplingParams.check(
            prompt, negative_prompt, steps, cfg_scale, samples, scheduler, prompt_required=True
        )
        # Each ControlNet: {"type", "image" (decoded), "model", "scale", "start", "end", "preprocessed"}.
        requests = check_controlnets(controlnets)
        entry, info = self.models.resolve(model, self.task, client)
        if image is not None:
            image = input_image("image", image)
            width, height = img2img_size(image, width, height, info)
            strength = number("image_strength", image_strength, 0.0, 1.0, low_open=True)
            check_effective_steps("image_strength", strength, params.steps)
        elif requests and (width is None or height is None):
            # The output takes the first control image's shape, which a ControlNet maps onto it.
            width, height = img2img_size(requests[0].image, width, height, info)
        else:
            width = side("width", info.native_side if width is None else width, info.max_side)
            height = side("height", info.native_side if height is None else height, info.max_side)
        seeds = params.seeds(seed)
        base_type = entry.base_model_type or info.base_model_type
        lora_list = self.models.resolve_loras(loras, base_type, client)
        controlnet_models = ControlNets(self.models)
        controls = controlnet_models.resolve(requests, entry, base_type, client)
        call = params.pipeline_kwargs()
        if image is not None:
            # The img2img pipelines take their size from the image, not from width/height.
            kind = "img2img"
            call["image"] = image.resize((width, height), Image.Resampling.LANCZOS)
            call["strength"] = strength
        else:
            kind = "text2img"
            call.update(width=width, height=height)
        with contextlib.ExitStack() as held:
            modules: dict[str, Any] = {}
            if controls:
                control_images = controlnet_models.control_images(controls, (width, height))
                call.update(controlnet_call(controls, control_images, kind))
                modules["controlnet"] = held.enter_context(controlnet_models.hold(controls))
            images = self.models.run(
                entry,
                info,
                kind,
                call,
                pixels=width * height,
                seeds=seeds,
                scheduler=scheduler,
                loras=lora_list,
                control=control,
                modules=modules,
            )
        control.progress(100)
        meta: dict[str, Any] = {"mode": kind, "steps": params.steps, "cfg_scale": params.cfg_scale}
        if lora_list:
            meta["loras"] = [{"model": x.entry.id, "weight": x.weight} for x in lora_list]
        if controls:
            meta["controlnets"] = [c.meta() for c in controls]
        return self._result(entry, images, seeds, **meta)


def img2img_size(image: Image.Image, width: Any, height: Any, info: ModelInfo) -> tuple[int, int]:
    if width is None and height is None:
        scale = min(1.0, info.max_side / max(image.size))
        width, height = (
            max(MIN_SIDE, round8(image.width * scale)),
            max(MIN_SIDE, round8(image.height * scale)),
        )
    elif width is None:
        width = max(MIN_SIDE, round8(integer("height", height, 1, 10**6) * image.width / image.height))
    elif height is None:
        height = max(MIN_SIDE, round8(integer("width", width, 1, 10**6) * image.height / image.width))
    return side("width", width, info.max_side), side("height", height, info.max_side)
