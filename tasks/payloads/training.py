"""The ``train_lora`` payload (contract v1.1; seed 001's LoRA training): a client's images and how
to describe them, the base model from the store, and the training's size."""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from tasks.payloads.base import BasePayload, InputRef, ModelRef, payload_for

MIN_IMAGES, MAX_IMAGES = 4, 200
RESOLUTIONS = (256, 1024)  # the side the images are trained at, a multiple of 64 in between


@payload_for("train_lora")
class TrainLoraPayload(BasePayload):
    images = fields.List(InputRef(), required=True, validate=validate.Length(min=MIN_IMAGES, max=MAX_IMAGES))
    # One caption per image, or one trigger word that every caption is made of ("a photo of <w>").
    captions = fields.List(fields.String(validate=validate.Length(min=1, max=500)))
    trigger_word = fields.String(validate=validate.Length(min=1, max=64))
    base_model = ModelRef(types=("diffusers",), task="train_lora", required=True)
    rank = fields.Integer(load_default=16, validate=validate.Range(min=4, max=128))
    steps = fields.Integer(load_default=1000, validate=validate.Range(min=1, max=10000))
    learning_rate = fields.Float(load_default=1e-4, validate=validate.Range(min=1e-6, max=1e-2))
    resolution = fields.Integer(
        load_default=512,
        validate=validate.OneOf(
            range(RESOLUTIONS[0], RESOLUTIONS[1] + 1, 64), error="must be a multiple of 64 from 256 to 1024"
        ),
    )
    name = fields.String(validate=validate.Length(min=1, max=128))
    seed = fields.Integer(load_default=0, validate=validate.Range(min=0, max=2**32 - 1))
    train_text_encoder = fields.Boolean(load_default=False)

    @validates_schema
    def _captions_or_trigger(self, data: dict[str, Any], **_: Any) -> None:
        captions, images = data.get("captions"), data.get("images") or []
        if captions is None and not data.get("trigger_word"):
            raise ValidationError("give captions (one per image) or a trigger_word", field_name="captions")
        if captions is not None and len(captions) != len(images):
            raise ValidationError(
                f"one caption per image: {len(captions)} captions for {len(images)} images",
                field_name="captions",
            )
