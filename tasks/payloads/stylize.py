"""The ``stylize`` payload: an image, a style (a preset name or a LoRA id) and the img2img knobs."""

from __future__ import annotations

from typing import Any

from marshmallow import fields, validate

from inference.styles import style_presets
from tasks.payloads.base import InputRef, ModelRef, payload_for
from tasks.payloads.diffusion import GenerateKnobs


class StyleRef(ModelRef):
    """``style``: a preset of ``inference.styles`` or of the operator's ``AIORCH_STYLES_FILE``
    (listed with the field in ``GET /v1/capabilities``), or the id of a LoRA the client sees,
    checked at the API against the store as that client sees it (``app.jobs.checked_spec``):
    neither is a 422 naming ``style``."""

    def __init__(self, **kwargs: Any) -> None:
        self.presets = style_presets()
        metadata = {
            "description": "a preset name (see presets) or the id of one of your LoRAs",
            "x-presets": [preset.describe() for preset in self.presets.values()],
        }
        # A LoRA that serves generate (every LoRA does) styles an image through img2img.
        super().__init__(types=("lora",), task="generate", metadata=metadata, **kwargs)

    def _bind_to_schema(self, field_name: str, parent: Any) -> None:
        super()._bind_to_schema(field_name, parent)
        # The presets of the schema's settings: the built-in ones with the styles file's over them.
        self.presets = style_presets(getattr(self.root, "styles", ()))
        self.metadata = {**self.metadata, "x-presets": [p.describe() for p in self.presets.values()]}

    def names_model(self, value: str) -> bool:
        return value not in self.presets

    def explain(self, problem: str) -> str:
        if problem.startswith("unknown model"):
            names = ", ".join(self.presets)
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
