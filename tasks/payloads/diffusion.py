"""The diffusion payloads: ``generate``, ``inpaint``, ``remove_object``, ``outpaint``.

The limits are the engines' own (config/limits.py), so the API refuses what they would refuse.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, pre_load, validate, validates_schema

from config import limits
from tasks.payloads.base import BasePayload, InputRef, model_field, payload_for


def _strength() -> fields.Float:
    # (0, 1]: a strength of 0 runs no denoising step at all (the engines refuse it too).
    return fields.Float(validate=validate.Range(min=0.0, max=1.0, min_inclusive=False))


class GenerateKnobs(BasePayload):
    # The engines' own limits (config/limits.py), so the API refuses what they would refuse.
    prompt = fields.String(validate=validate.Length(max=limits.DIFFUSION_MAX_PROMPT_CHARS))
    negative_prompt = fields.String(validate=validate.Length(max=limits.DIFFUSION_MAX_PROMPT_CHARS))
    width = fields.Integer(
        validate=[validate.Range(min=limits.DIFFUSION_MIN_SIDE, max=limits.DIFFUSION_MAX_SIDE)]
    )
    height = fields.Integer(
        validate=[validate.Range(min=limits.DIFFUSION_MIN_SIDE, max=limits.DIFFUSION_MAX_SIDE)]
    )
    steps = fields.Integer(validate=validate.Range(min=1, max=limits.DIFFUSION_MAX_STEPS))
    cfg_scale = fields.Float(validate=validate.Range(min=0.0, max=limits.DIFFUSION_MAX_CFG_SCALE))
    seed = fields.Integer(validate=validate.Range(min=0, max=limits.DIFFUSION_MAX_SEED))
    samples = fields.Integer(load_default=1, validate=validate.Range(min=1, max=limits.DIFFUSION_MAX_SAMPLES))
    scheduler = fields.String(validate=validate.Length(max=64))
    model = model_field()
    loras = fields.List(fields.Dict(), validate=validate.Length(max=limits.DIFFUSION_MAX_LORAS))

    @validates_schema
    def _multiples_of_8(self, data: dict[str, Any], **_: Any) -> None:
        for name in ("width", "height"):
            if name in data and data[name] % 8:
                raise ValidationError("must be a multiple of 8", field_name=name)


@payload_for("generate")
class GeneratePayload(GenerateKnobs):
    prompt = fields.String(
        required=True, validate=validate.Length(min=1, max=limits.DIFFUSION_MAX_PROMPT_CHARS)
    )
    image_url = InputRef()
    image_strength = _strength()


@payload_for("inpaint")
class InpaintPayload(GenerateKnobs):
    class Meta(GenerateKnobs.Meta):
        # The output has the input's size: width/height are no fields of inpaint (capabilities
        # do not list them), and a payload giving them gets a 422 naming them (_no_size).
        exclude = ("width", "height")

    @pre_load
    def _no_size(self, data: Any, **_: Any) -> Any:
        if isinstance(data, dict):
            given = [name for name in ("width", "height") if name in data]
            if given:
                message = "inpaint keeps the input image's size; width/height are not taken"
                raise ValidationError({name: [message] for name in given})
        return data

    image_url = InputRef(required=True)
    mask_url = InputRef(required=True)
    mask_mode = fields.String(load_default="white", validate=validate.OneOf(("white", "black")))
    strength = _strength()


@payload_for("remove_object")
class RemoveObjectPayload(BasePayload):
    image_url = InputRef(required=True)
    mask_url = InputRef(required=True)
    mask_mode = fields.String(load_default="white", validate=validate.OneOf(("white", "black")))
    model = model_field()


@payload_for("outpaint")
class OutpaintPayload(GenerateKnobs):
    image_url = InputRef(required=True)
    ratio = fields.Float(validate=validate.Range(min=1.0, max=5.0, min_inclusive=False))
    align = fields.String(
        load_default="middle",
        validate=validate.OneOf((*limits.OUTPAINT_ALIGNS, *limits.OUTPAINT_ALIGN_ALIASES)),
    )

    @validates_schema
    def _ratio_or_size(self, data: dict[str, Any], **_: Any) -> None:
        if "ratio" not in data and not ("width" in data and "height" in data):
            raise ValidationError("give either ratio or both width and height", field_name="ratio")
