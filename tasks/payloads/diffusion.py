"""The diffusion payloads: ``generate``, ``inpaint``, ``outpaint`` (``remove_object``'s and
``stylize``'s are in modules of their own).

The limits are the engines' own (config/limits.py), so the API refuses what they would refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, pre_load, validate, validates_schema

from config import limits
from tasks.payloads.base import BasePayload, InputObject, InputRef, model_field, payload_for, unit


def _strength() -> fields.Float:
    # (0, 1]: a strength of 0 runs no denoising step at all (the engines refuse it too).
    return fields.Float(validate=validate.Range(min=0.0, max=1.0, min_inclusive=False))


class LoraSchema(Schema):
    """One LoRA of ``loras``: a model id (ours, or the provider's where the route maps it) and its
    weight, in the engines' range. Each backend translates it (SenseTime: ``lora_configs``)."""

    class Meta:
        unknown = RAISE

    model = fields.String(required=True, validate=validate.Length(min=1, max=128))
    weight = fields.Float(
        validate=validate.Range(min=0.0, max=limits.DIFFUSION_MAX_LORA_WEIGHT, min_inclusive=False)
    )


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
    loras = fields.List(fields.Nested(LoraSchema), validate=validate.Length(max=limits.DIFFUSION_MAX_LORAS))

    @validates_schema
    def _multiples_of_8(self, data: dict[str, Any], **_: Any) -> None:
        for name in ("width", "height"):
            if name in data and data[name] % 8:
                raise ValidationError("must be a multiple of 8", field_name=name)


class ControlNetSchema(Schema):
    """One ControlNet of ``generate``: its type, the image its control image is made from (or is,
    with ``preprocessed``), its weight and the part of the denoising it steers (``start``-``end``,
    fractions of the steps). ``model``: an installed ControlNet's id; by default the one of that
    type for the job's base model."""

    class Meta:
        unknown = RAISE

    type = fields.String(required=True, validate=validate.OneOf(limits.CONTROLNET_TYPES))
    image_url = InputRef(required=True)
    model = model_field()
    scale = fields.Float(
        load_default=1.0, validate=validate.Range(min=0.0, max=limits.DIFFUSION_MAX_CONTROLNET_SCALE)
    )
    start = unit(load_default=0.0)
    end = unit(load_default=1.0)
    preprocessed = fields.Boolean(load_default=False)

    @validates_schema
    def _start_before_end(self, data: dict[str, Any], **_: Any) -> None:
        if "start" in data and "end" in data and data["start"] >= data["end"]:
            raise ValidationError(f"must be below end ({data['end']:g})", field_name="start")


def missing_annotators(payload: dict[str, Any], installed: Callable[[], set[str]]) -> dict[str, Any]:
    """The 422 details (nested as marshmallow nests them) of each ControlNet whose control image
    an annotator model must make (``depth``, ``openpose`` unless ``preprocessed``) when
    ``installed()`` (what the installed annotators make; read only when one is needed) lacks it."""
    needed = {
        index: item["type"]
        for index, item in enumerate(payload.get("controlnets") or ())
        if item["type"] in limits.CONTROLNET_ANNOTATED_TYPES and not item.get("preprocessed")
    }
    if not needed:
        return {}
    kinds = installed()
    message = "the {} annotator is not installed; send a {} image with preprocessed: true"
    missing = {
        index: {"type": [message.format(kind, kind)]} for index, kind in needed.items() if kind not in kinds
    }
    return {"controlnets": missing} if missing else {}


@payload_for("generate")
class GeneratePayload(GenerateKnobs):
    prompt = fields.String(
        required=True, validate=validate.Length(min=1, max=limits.DIFFUSION_MAX_PROMPT_CHARS)
    )
    image_url = InputRef()
    image_strength = _strength()
    controlnets = fields.List(
        InputObject(ControlNetSchema), validate=validate.Length(max=limits.DIFFUSION_MAX_CONTROLNETS)
    )


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


@payload_for("outpaint")
class OutpaintPayload(GenerateKnobs):
    image_url = InputRef(required=True)
    ratio = fields.Float(validate=validate.Range(min=1.0, max=5.0, min_inclusive=False))
    align = fields.String(
        load_default="middle",
        validate=validate.OneOf((*limits.OUTPAINT_ALIGNS, *limits.OUTPAINT_ALIGN_ALIASES)),
    )
    # Free extension: pixels added on each side; the output is the input plus them.
    left = fields.Integer(validate=validate.Range(min=0, max=limits.OUTPAINT_MAX_EXTEND))
    right = fields.Integer(validate=validate.Range(min=0, max=limits.OUTPAINT_MAX_EXTEND))
    top = fields.Integer(validate=validate.Range(min=0, max=limits.OUTPAINT_MAX_EXTEND))
    bottom = fields.Integer(validate=validate.Range(min=0, max=limits.OUTPAINT_MAX_EXTEND))

    @validates_schema
    def _ratio_or_size(self, data: dict[str, Any], **_: Any) -> None:
        sides = [name for name in limits.OUTPAINT_SIDES if name in data]
        if sides:
            for other in ("ratio", "width", "height"):
                if other in data:
                    message = "give ratio, width/height or left/right/top/bottom, not several"
                    raise ValidationError(message, field_name=other)
            if not any(data[name] for name in sides):
                message = "at least one side must extend the image by a pixel or more"
                raise ValidationError({name: [message] for name in sides})
            return
        if "ratio" not in data and not ("width" in data and "height" in data):
            message = "give either ratio, both width and height, or left/right/top/bottom"
            raise ValidationError(message, field_name="ratio")
