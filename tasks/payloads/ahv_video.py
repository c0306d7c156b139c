"""The ``ahv_video`` payload: a task served only through a remote provider route."""

from __future__ import annotations

from marshmallow import fields, validate

from tasks.payloads.base import BasePayload, InputRef, payload_for

VIDEO_ASPECT_RATIOS = ("16:9", "9:16", "1:1")
VIDEO_RESOLUTIONS = ("480p", "720p", "1080p")


@payload_for("ahv_video")
class AhvVideoPayload(BasePayload):
    """ahv_video (seed 000's "Video Gen (Veo 3.1 T2V/I2V)"): text-to-video, or image-to-video
    from ``image_url``. Served only by a remote provider route; the output is an MP4, so the
    image-only ``watermark`` is not taken and ``format`` can only be ``mp4``."""

    class Meta(BasePayload.Meta):
        exclude = ("watermark",)

    format = fields.String(validate=validate.OneOf(("mp4",)))
    prompt = fields.String(required=True, validate=validate.Length(min=1, max=2000))
    negative_prompt = fields.String(validate=validate.Length(max=2000))
    image_url = InputRef(metadata={"description": "Image-to-video: the first frame's picture"})
    duration = fields.Integer(
        validate=validate.Range(min=1, max=20),
        metadata={"description": "Seconds (a provider may take a narrower range: Zhinian 4-15)"},
    )
    aspect_ratio = fields.String(validate=validate.OneOf(VIDEO_ASPECT_RATIOS))
    resolution = fields.String(validate=validate.OneOf(VIDEO_RESOLUTIONS))
    seed = fields.Integer(validate=validate.Range(min=0, max=2**32 - 1))
