"""The ``scan_objects`` payload."""

from __future__ import annotations

from marshmallow import fields, validate

from config import limits
from tasks.payloads.base import BasePayload, InputRef, model_field, payload_for, unit


@payload_for("scan_objects")
class ScanObjectsPayload(BasePayload):
    image_url = InputRef(required=True)
    min_score = unit(load_default=0.3)
    # The engine builds its detector with this many detections per image (config/limits.py).
    max_objects = fields.Integer(load_default=50, validate=validate.Range(min=1, max=limits.SCAN_MAX_OBJECTS))
    model = model_field()
