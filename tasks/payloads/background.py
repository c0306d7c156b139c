"""The ``remove_background`` payload."""

from __future__ import annotations

from marshmallow import fields

from tasks.payloads.base import BasePayload, InputRef, model_field, payload_for


@payload_for("remove_background")
class RemoveBackgroundPayload(BasePayload):
    image_url = InputRef(required=True)
    return_mask = fields.Boolean(load_default=False)
    model = model_field()
