"""The ``upscale`` payload (seed 000)."""

from __future__ import annotations

from marshmallow import fields, validate

from tasks.payloads.base import BasePayload, InputRef, model_field, payload_for, unit


@payload_for("upscale")
class UpscalePayload(BasePayload):
    image_url = InputRef(required=True)
    scale = fields.Float(load_default=2.0, validate=validate.Range(min=1.0, max=4.0, min_inclusive=False))
    model = model_field()
    sharpen = unit(load_default=0.0)
    # No face-restoration engine (GFPGAN, CodeFormer) can be installed in the model store yet, so
    # the request is refused here with a 422 rather than queued to fail on the GPU queue. When one
    # can, this becomes a check of the store, as tasks/model_registry.has_model_for does.
    face_enhance = fields.Boolean(
        load_default=False,
        validate=validate.Equal(
            False, error="face_enhance needs a face-restoration model (GFPGAN, CodeFormer); none is installed"
        ),
    )
