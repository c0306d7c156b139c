"""The ``demo_invert`` payload. In the product this file would be ``tasks/payloads/demo.py``."""

from __future__ import annotations

from marshmallow import fields, validate

from tasks.payloads import BasePayload, InputRef, payload_for


@payload_for("demo_invert")
class DemoInvertPayload(BasePayload):
    image_url = InputRef(required=True)
    amount = fields.Float(load_default=1.0, validate=validate.Range(min=0.0, max=1.0))
