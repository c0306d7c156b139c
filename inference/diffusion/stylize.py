"""``stylize``: redraw an image in a style (a named preset or a LoRA) with img2img."""

from __future__ import annotations

from typing import Any

from PIL import Image

from inference.base import EngineResult, InvalidInput, NullControl, RunControl
from inference.diffusion.generate import img2img_size
from inference.diffusion.loader import Lora
from inference.diffusion.params import SamplingParams, check_effective_steps, input_image, number
from inference.diffusion.pipeline import DiffusionPipeline
from inference.styles import BUILTIN_STYLES, LORA_STYLE_STRENGTH, StylePreset


class Stylizer(DiffusionPipeline):
    """``stylize``: img2img from ``image`` in ``style``, output at the input's size.

    ``style`` is a preset name (``inference.styles``: its prompt template wraps ``prompt``, its
    negative prompt and strength are the defaults, its LoRA if it has one is applied) or the id
    of a LoRA the client sees (applied at weight 1; the prompt is the payload's own).
    """

    task = "stylize"

    def __call__(
        self,
        image: Image.Image,
        style: str,
        *,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        strength: float | None = None,
        model: str | None = None,
        steps: int = 30,
        cfg_scale: float = 7.0,
        seed: int | None = None,
        samples: int = 1,
        scheduler: str | None = None,
        presets: dict[str, StylePreset] | None = None,
        control: RunControl | None = None,
        client: str | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        presets = BUILTIN_STYLES if presets is None else presets
        if not isinstance(style, str) or not style:
            raise InvalidInput("style must be a preset name or a LoRA id", field="style")
        preset = presets.get(style)
        if preset is not None:
            text = preset.compose(prompt)
            negative = preset.negative_prompt if negative_prompt is None else negative_prompt
            default_strength = preset.strength
            loras = [{"model": preset.lora, "weight": preset.lora_weight}] if preset.lora else []
        else:
            text, negative, default_strength = prompt or "", negative_prompt, LORA_STYLE_STRENGTH
            loras = [{"model": style, "weight": 1.0}]
        params = SamplingParams.check(text, negative, steps, cfg_scale, samples, scheduler)
        strength = number(
            "strength", default_strength if strength is None else strength, 0.0, 1.0, low_open=True
        )
        check_effective_steps("strength", strength, params.steps)
        image = input_image("image", image)
        entry, info = self.models.resolve(model, self.task, client)
        width, height = img2img_size(image, None, None, info)
        seeds = params.seeds(seed)
        lora_list = self._style_loras(loras, entry.base_model_type or info.base_model_type, client, presets)
        call = {
            **params.pipeline_kwargs(),
            "image": image.resize((width, height), Image.Resampling.LANCZOS),
            "strength": strength,
        }
        results = self.models.run(
            entry,
            info,
            "img2img",
            call,
            pixels=width * height,
            seeds=seeds,
            scheduler=scheduler,
            loras=lora_list,
            control=control,
        )
        # The model paints at a multiple of 8 within its size range; the client gets its picture
        # back at the size it sent.
        images = [
            out if out.size == image.size else out.resize(image.size, Image.Resampling.LANCZOS)
            for out in (result.convert("RGB") for result in results)
        ]
        control.progress(100)
        meta: dict[str, Any] = {"style": style, "strength": strength, "steps": params.steps}
        if lora_list:
            meta["loras"] = [{"model": x.entry.id, "weight": x.weight} for x in lora_list]
        return self._result(entry, images, seeds, **meta)

    def _style_loras(
        self, loras: list[dict[str, Any]], base_model_type: str, client: str | None, presets: dict[str, Any]
    ) -> list[Lora]:
        try:
            return self.models.resolve_loras(loras, base_model_type, client)
        except InvalidInput as exc:
            # The payload named a style, not a LoRA list: the problem is its ``style``. An unknown
            # LoRA reads as an unknown style, the same for another client's LoRA as for none.
            if str(exc).startswith("unknown lora"):
                names = ", ".join(presets) or "none"
                message = (
                    f"unknown style {loras[0]['model']!r}: neither a preset ({names}) nor a LoRA of yours"
                )
                raise InvalidInput(message, field="style") from None
            raise InvalidInput(str(exc), field="style") from exc
