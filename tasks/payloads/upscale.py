"""The ``upscale`` payload (seed 000)."""

from __future__ import annotations

from marshmallow import fields, validate

from tasks.payloads.base import (
    BasePayload,
    InputRef,
    face_enhance_field,
    face_fidelity_field,
    model_field,
    payload_for,
    unit,
)


@payload_for("upscale")
class UpscalePayload(BasePayload):
    image_url = InputRef(required=True)
    scale = fields.Float(load_default=2.0, validate=validate.Range(min=1.0, max=4.0, min_inclusive=False))
    model = model_field()
    sharpen = unit(load_default=0.0)
    face_enhance = face_enhance_field("upscale")
    face_fidelity = face_fidelity_field()

