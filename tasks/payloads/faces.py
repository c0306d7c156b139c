"""The face payloads: ``face_detect``, ``faceswap``, ``faceswap_multi`` and ``faceswap_video`` (seed 000)."""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from tasks.payloads.base import (
    BasePayload,
    InputRef,
    VideoRef,
    face_enhance_field,
    face_fidelity_field,
    payload_for,
    unit,
)

FACE_INDEX_ORDER = (
    "Face indices run left to right, then top to bottom (faces whose centres lie within half a "
    "face width of each other form one column, read top to bottom), counted on the image shrunk "
    "to max_side: face_detect and faceswap_multi with the same max_side number faces alike."
)


def _max_side() -> fields.Integer:
    return fields.Integer(
        load_default=1080,
        validate=validate.Range(min=64, max=8192),
        metadata={"description": "The image is shrunk so its longest side is at most this (never enlarged)"},
    )


def _upscale() -> fields.Integer:
    return fields.Integer(
        load_default=1,
        validate=validate.OneOf((0, 1)),
        metadata={"description": "1: restore detail on the swapped faces with the best installed SR model"},
    )


@payload_for("face_detect")
class FaceDetectPayload(BasePayload):
    image_url = InputRef(required=True, metadata={"description": FACE_INDEX_ORDER})
    max_side = _max_side()


@payload_for("faceswap")
class FaceswapPayload(BasePayload):
    source_url = InputRef(required=True)
    target_url = InputRef(required=True)
    upscale = _upscale()
    face_enhance = face_enhance_field("faceswap")
    face_fidelity = face_fidelity_field()
    max_side = _max_side()
    sharpen = unit(load_default=0.0)
    max_faces = fields.Integer(
        load_default=0,
        validate=validate.Range(min=0),
        metadata={"description": "0: every face of the target; n: the n largest (at most AIORCH_MAX_FACES)"},
    )

    @validates_schema
    def _face_limit(self, data: dict[str, Any], **_: Any) -> None:
        # Refused, not capped: a client asking for 12 faces must learn it gets at most 8.
        if data.get("max_faces", 0) > self.face_limit:
            raise ValidationError(
                f"must be at most {self.face_limit} (AIORCH_MAX_FACES)", field_name="max_faces"
            )


@payload_for("faceswap_multi")
class FaceswapMultiPayload(BasePayload):
    source_urls = fields.List(InputRef(), required=True, validate=validate.Length(min=1))
    target_url = InputRef(required=True)
    swap_faces_index = fields.List(
        fields.Integer(validate=validate.Range(min=0)),
        metadata={"description": "Which face of each source to take. " + FACE_INDEX_ORDER},
    )
    target_faces_index = fields.List(
        fields.Integer(validate=validate.Range(min=0)),
        metadata={"description": "Which target face each source face replaces. " + FACE_INDEX_ORDER},
    )
    upscale = _upscale()
    face_enhance = face_enhance_field("faceswap_multi")
    face_fidelity = face_fidelity_field()
    sharpen = unit(load_default=0.0)
    max_side = _max_side()

    @validates_schema
    def _lengths(self, data: dict[str, Any], **_: Any) -> None:
        count = len(data.get("source_urls", []))
        if count > self.face_limit:
            raise ValidationError(
                f"at most {self.face_limit} faces can be swapped at once (AIORCH_MAX_FACES)",
                field_name="source_urls",
            )
        for name in ("swap_faces_index", "target_faces_index"):
            if name in data and len(data[name]) != count:
                raise ValidationError(f"must have one entry per source_urls item ({count})", field_name=name)


@payload_for("faceswap_video")
class FaceswapVideoPayload(BasePayload):
    """faceswap_video: faceswap's or faceswap_multi's mapping applied to every frame of a video.

    The output is an MP4 (H.264, the audio kept), so the image fields ``format`` and
    ``watermark`` are not taken (a 422 naming them, not silently ignored).
    """

    class Meta(BasePayload.Meta):
        exclude = ("format", "watermark")

    source_url = InputRef()
    source_urls = fields.List(InputRef(), validate=validate.Length(min=1))
    target_url = VideoRef(required=True, metadata={"description": "The video (MP4, MOV, MKV/WebM or AVI)"})
    swap_faces_index = fields.List(fields.Integer(validate=validate.Range(min=0)))
    target_faces_index = fields.List(
        fields.Integer(validate=validate.Range(min=0)),
        metadata={"description": "Which face of each frame each source replaces. " + FACE_INDEX_ORDER},
    )
    upscale = _upscale()
    max_side = _max_side()
    sharpen = unit(load_default=0.0)
    max_faces = fields.Integer(load_default=0, validate=validate.Range(min=0))

    @validates_schema
    def _sources(self, data: dict[str, Any], **_: Any) -> None:
        if ("source_url" in data) == ("source_urls" in data):
            raise ValidationError("give either source_url or source_urls", field_name="source_url")
        if data.get("max_faces", 0) > self.face_limit:
            raise ValidationError(
                f"must be at most {self.face_limit} (AIORCH_MAX_FACES)", field_name="max_faces"
            )
        count = len(data.get("source_urls", []))
        if count > self.face_limit:
            raise ValidationError(
                f"at most {self.face_limit} faces can be swapped at once (AIORCH_MAX_FACES)",
                field_name="source_urls",
            )
        for name in ("swap_faces_index", "target_faces_index"):
            if name in data and len(data[name]) != count:
                raise ValidationError(f"must have one entry per source_urls item ({count})", field_name=name)
