"""The ``stylize`` payload: an image, a style (a preset name or a LoRA id) and the img2img knobs."""

from __future__ import annotations

from typing import Any

from marshmallow import fields, validate

from inference.styles import BUILTIN_STYLES
from tasks.payloads.base import InputRef, ModelRef, payload_for
from tasks.payloads.diffusion import GenerateKnobs


class StyleRef(ModelRef):
    """``style``: a preset of ``inference.styles`` (listed with the field in ``GET
    /v1/capabilities``), or the id of a LoRA the client sees, checked at the API against the
    store as that client sees it (``app.jobs.checked_spec``): neither is a 422 naming ``style``."""

    def __init__(self, **kwargs: Any) -> None:
        metadata = {
            "description": "a preset name (see presets) or the id of one of your LoRAs",
            "x-presets": [preset.describe() for preset in BUILTIN_STYLES.values()],
        }
        # A LoRA that serves generate (every LoRA does) styles an image through img2img.
        super().__init__(types=("lora",), task="generate", metadata=metadata, **kwargs)

    def names_model(self, value: str) -> bool:
        return value not in BUILTIN_STYLES

    def explain(self, problem: str) -> str:
        if problem.startswith("unknown model"):
            names = ", ".join(BUILTIN_STYLES)
            return f"unknown style: neither a preset ({names}) nor a LoRA of yours"
        return problem


@payload_for("stylize")
class StylizePayload(GenerateKnobs):
    class Meta(GenerateKnobs.Meta):
        # The output has the input's size, and the style is the one LoRA.
        exclude = ("width", "height", "loras")

    image_url = InputRef(required=True)
    style = StyleRef(required=True)
    # (0, 1]; default: the preset's own (a LoRA style's is 0.6).
    strength = fields.Float(validate=validate.Range(min=0.0, max=1.0, min_inclusive=False))
