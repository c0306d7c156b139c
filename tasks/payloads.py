"""Payload schemas per task, shared by the API (to refuse bad input with a 422) and the workers
(which validate again, since a job row may come from an older API or another instance).

Parameter names follow the seeds: seed 000 for faceswap and upscale, the SenseTime seed (001) and
the Zhinian seed (003) for generation, inpainting and outpainting.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, pre_load, validate, validates_schema

from config import limits
from tasks.outbound import UrlPolicy, refused_host_reason

DEFAULT_MAX_FACES = 8  # AIORCH_MAX_FACES when no settings are given (config.Settings.max_faces)

IMAGE_FORMATS = ("jpg", "png", "webp")
ALIGNS = limits.OUTPAINT_ALIGNS
WATERMARK_POSITIONS = ("topleft", "topright", "bottomleft", "bottomright", "bottom", "top", "middle")
# The most objects scan_objects returns; the worker builds its detector with this many
# detections per image (tasks/engines.py), so the API and the engine agree on the limit.
MAX_OBJECTS = 300


class InputRef(fields.String):
    """An input image: an http(s) URL, a ``data:`` URI, or ``asset://<id>``.

    Hosts the schema's ``url_policy`` refuses without a DNS look-up (IP literals in any spelling,
    ``localhost`` names) are refused here; names that resolve to refused addresses are caught
    when the worker fetches them, with the same policy (``tasks/outbound.py``).
    """

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if text.startswith("data:"):
            if ";base64," not in text[:100]:
                raise ValidationError("data: URIs must be base64 encoded (data:<type>;base64,...)")
            return text
        if text.startswith("asset://"):
            if not text[len("asset://") :].strip():
                raise ValidationError("asset:// needs an asset id")
            return text
        try:
            parts = urlsplit(text)
            host = parts.hostname
        except ValueError:  # a broken [IPv6] literal
            raise ValidationError("must be an http(s) URL, a data: URI or asset://<id>") from None
        if parts.scheme not in ("http", "https") or not host:
            raise ValidationError("must be an http(s) URL, a data: URI or asset://<id>")
        reason = refused_host_reason(host, self.url_policy())
        if reason is not None:
            raise ValidationError(f"refused: the host {reason}")
        return text

    def url_policy(self) -> UrlPolicy:
        # The root schema carries the settings' policy; a schema built without one guards.
        policy = getattr(self.root, "url_policy", None)
        return policy if isinstance(policy, UrlPolicy) else UrlPolicy()


class WatermarkSchema(Schema):
    class Meta:
        unknown = RAISE

    text = fields.String(load_default="AI generated", validate=validate.Length(min=1, max=64))
    position = fields.String(load_default="bottomright", validate=validate.OneOf(WATERMARK_POSITIONS))
    opacity = fields.Float(load_default=0.6, validate=validate.Range(min=0.05, max=1.0))


class BasePayload(Schema):
    """Fields every image task takes."""

    class Meta:
        unknown = RAISE

    format = fields.String(validate=validate.OneOf(IMAGE_FORMATS))
    watermark = fields.Nested(WatermarkSchema, allow_none=True)

    def __init__(
        self,
        *args: Any,
        url_policy: UrlPolicy = UrlPolicy(),
        max_faces: int = DEFAULT_MAX_FACES,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        # Which URL hosts InputRef fields accept: the settings' SSRF guard (tasks/outbound.py).
        self.url_policy = url_policy
        # AIORCH_MAX_FACES: the face tasks' limit, a setting, so the schema is told it.
        self.face_limit = max_faces


def _unit(**kw: Any) -> fields.Float:
    return fields.Float(validate=validate.Range(min=0.0, max=1.0), **kw)


class UpscalePayload(BasePayload):
    image_url = InputRef(required=True)
    scale = fields.Float(load_default=2.0, validate=validate.Range(min=1.0, max=4.0, min_inclusive=False))
    model = fields.String(validate=validate.Length(min=1, max=128))
    sharpen = _unit(load_default=0.0)
    # No face-restoration engine (GFPGAN, CodeFormer) can be installed in the model store yet, so
    # the request is refused here with a 422 rather than queued to fail on the GPU queue. When one
    # can, this becomes a check of the store, as tasks/model_registry.has_model_for does.
    face_enhance = fields.Boolean(
        load_default=False,
        validate=validate.Equal(
            False, error="face_enhance needs a face-restoration model (GFPGAN, CodeFormer); none is installed"
        ),
    )


def _strength() -> fields.Float:
    # (0, 1]: a strength of 0 runs no denoising step at all (the engines refuse it too).
    return fields.Float(validate=validate.Range(min=0.0, max=1.0, min_inclusive=False))


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
    model = fields.String(validate=validate.Length(min=1, max=128))
    loras = fields.List(fields.Dict(), validate=validate.Length(max=limits.DIFFUSION_MAX_LORAS))

    @validates_schema
    def _multiples_of_8(self, data: dict[str, Any], **_: Any) -> None:
        for name in ("width", "height"):
            if name in data and data[name] % 8:
                raise ValidationError("must be a multiple of 8", field_name=name)


class GeneratePayload(GenerateKnobs):
    prompt = fields.String(
        required=True, validate=validate.Length(min=1, max=limits.DIFFUSION_MAX_PROMPT_CHARS)
    )
    image_url = InputRef()
    image_strength = _strength()


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


class RemoveObjectPayload(BasePayload):
    image_url = InputRef(required=True)
    mask_url = InputRef(required=True)
    mask_mode = fields.String(load_default="white", validate=validate.OneOf(("white", "black")))
    model = fields.String(validate=validate.Length(min=1, max=128))


class OutpaintPayload(GenerateKnobs):
    image_url = InputRef(required=True)
    ratio = fields.Float(validate=validate.Range(min=1.0, max=5.0, min_inclusive=False))
    align = fields.String(
        load_default="middle",
        validate=validate.OneOf((*limits.OUTPAINT_ALIGNS, *limits.OUTPAINT_ALIGN_ALIASES)),
    )

    @validates_schema
    def _ratio_or_size(self, data: dict[str, Any], **_: Any) -> None:
        if "ratio" not in data and not ("width" in data and "height" in data):
            raise ValidationError("give either ratio or both width and height", field_name="ratio")


class RemoveBackgroundPayload(BasePayload):
    image_url = InputRef(required=True)
    return_mask = fields.Boolean(load_default=False)
    model = fields.String(validate=validate.Length(min=1, max=128))


class ScanObjectsPayload(BasePayload):
    image_url = InputRef(required=True)
    min_score = _unit(load_default=0.3)
    max_objects = fields.Integer(load_default=50, validate=validate.Range(min=1, max=MAX_OBJECTS))
    model = fields.String(validate=validate.Length(min=1, max=128))


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


class FaceDetectPayload(BasePayload):
    image_url = InputRef(required=True, metadata={"description": FACE_INDEX_ORDER})
    max_side = _max_side()


class FaceswapPayload(BasePayload):
    source_url = InputRef(required=True)
    target_url = InputRef(required=True)
    upscale = _upscale()
    max_side = _max_side()
    sharpen = _unit(load_default=0.0)
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
    sharpen = _unit(load_default=0.0)
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


class FaceswapVideoPayload(BasePayload):
    """faceswap_video: faceswap's or faceswap_multi's mapping applied to every frame of a video.

    The output is an MP4 (H.264, the audio kept), so the image fields ``format`` and
    ``watermark`` are not taken (a 422 naming them, not silently ignored).
    """

    class Meta(BasePayload.Meta):
        exclude = ("format", "watermark")

    source_url = InputRef()
    source_urls = fields.List(InputRef(), validate=validate.Length(min=1))
    target_url = InputRef(required=True, metadata={"description": "The video (MP4, MOV, MKV/WebM or AVI)"})
    swap_faces_index = fields.List(fields.Integer(validate=validate.Range(min=0)))
    target_faces_index = fields.List(
        fields.Integer(validate=validate.Range(min=0)),
        metadata={"description": "Which face of each frame each source replaces. " + FACE_INDEX_ORDER},
    )
    upscale = _upscale()
    max_side = _max_side()
    sharpen = _unit(load_default=0.0)
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


VIDEO_ASPECT_RATIOS = ("16:9", "9:16", "1:1")
VIDEO_RESOLUTIONS = ("480p", "720p", "1080p")


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


class DebugSleepPayload(Schema):
    """The diagnostic task (only with AIORCH_DEBUG_TASKS): sleeps, reporting progress, and can
    kill its own worker process, which is how the fault tests exercise redelivery."""

    class Meta:
        unknown = RAISE

    seconds = fields.Float(load_default=1.0, validate=validate.Range(min=0.0, max=600.0))
    crash = fields.String(load_default="never", validate=validate.OneOf(("never", "always", "first")))

    def __init__(self, *args: Any, url_policy: UrlPolicy = UrlPolicy(), max_faces: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
