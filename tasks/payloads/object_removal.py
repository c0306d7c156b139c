"""The ``remove_object`` payload: the region to erase as a mask, or named by a prompt."""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from config import limits
from tasks.payloads.base import BasePayload, InputRef, ModelText, model_field, payload_for, unit


@payload_for("remove_object")
class RemoveObjectPayload(BasePayload):
    """``mask_url`` marks the region (``mask_mode``), or ``prompt`` names what to remove ("the
    dog"): the installed object detector finds it and its boxes, grown by ``grow``, are the mask.

    Which remover runs: LaMa (one forward pass) when a LaMa model is installed and the payload
    asks for nothing only a diffusion model can do (no ``fill_prompt``, one sample), else the
    diffusion remover, which repaints the region following ``fill_prompt`` when one is given.
    ``model`` names either kind.
    """

    image_url = InputRef(required=True)
    mask_url = InputRef()
    mask_mode = fields.String(load_default="white", validate=validate.OneOf(("white", "black")))
    # Refused at the API when no detector is installed (the engine says the same, later).
    prompt = ModelText(
        types=("detector",),
        task="scan_objects",
        missing="removing by prompt needs an object detector, and none is installed; send mask_url instead",
        validate=validate.Length(min=1, max=200),
        metadata={"description": "what to remove (e.g. 'the dog'), instead of mask_url"},
    )
    # The detector's score a match needs, and the margin around its boxes (times the box's size).
    min_score = unit(load_default=0.3)
    grow = fields.Float(load_default=0.1, validate=validate.Range(min=0.0, max=1.0))
    fill_prompt = fields.String(
        validate=validate.Length(min=1, max=limits.DIFFUSION_MAX_PROMPT_CHARS),
        metadata={"description": "what to paint in its place (runs the diffusion remover)"},
    )
    samples = fields.Integer(load_default=1, validate=validate.Range(min=1, max=limits.DIFFUSION_MAX_SAMPLES))
    seed = fields.Integer(validate=validate.Range(min=0, max=limits.DIFFUSION_MAX_SEED))
    model = model_field()

    @validates_schema
    def _mask_or_prompt(self, data: dict[str, Any], **_: Any) -> None:
        if "mask_url" in data and "prompt" in data:
            raise ValidationError("give mask_url or prompt, not both", field_name="prompt")
        if "mask_url" not in data and "prompt" not in data:
            message = "give mask_url (the region to erase) or prompt (what to remove)"
            raise ValidationError({"mask_url": [message], "prompt": [message]})
