"""What every payload schema shares: input references, the common image fields, and the table
of schemas by task that ``@payload_for`` fills.

Parameter names follow the seeds: seed 000 for faceswap and upscale, the SenseTime seed (001) and
the Zhinian seed (003) for generation, inpainting and outpainting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from config.styles import StylePreset
from tasks.outbound import UrlPolicy, refused_host_reason

DEFAULT_MAX_FACES = 8  # AIORCH_MAX_FACES when no settings are given (config.Settings.max_faces)

IMAGE_FORMATS = ("jpg", "png", "webp")
WATERMARK_POSITIONS = ("topleft", "topright", "bottomleft", "bottomright", "bottom", "top", "middle")

# task name -> its payload schema, filled by ``@payload_for`` as the payload modules load.
SCHEMAS: dict[str, type[Schema]] = {}

S = TypeVar("S", bound=type[Schema])


def payload_for(*tasks: str) -> Callable[[S], S]:
    """Class decorator: this schema is the payload of ``tasks`` (the catalog pairs it with the
    engine that declares the task). A task takes one schema; a second is refused."""

    def register(schema: S) -> S:
        for task in tasks:
            if SCHEMAS.get(task, schema) is not schema:
                raise ValueError(f"task {task!r} already has a payload schema: {SCHEMAS[task].__name__}")
            SCHEMAS[task] = schema
        return schema

    return register


def schema_for(task: str) -> type[Schema]:
    """The payload schema of ``task``; ``LookupError`` naming the missing piece when it has none."""
    try:
        return SCHEMAS[task]
    except KeyError:
        raise LookupError(
            f"task {task!r} has no payload schema: add one in tasks/payloads/ with @payload_for({task!r})"
        ) from None


# The forms of an input, as the OpenAPI document states them (a pattern a client can check before
# sending); ``InputRef`` itself is the rule, and refuses more (hosts the guard refuses, say).
HTTP_URL = r"https?://[^\s/?#\x00-\x1f\x7f]+([/?#][^\s\x00-\x1f\x7f]*)?"
HTTP_URL_PATTERN = f"^{HTTP_URL}$"
INPUT_PATTERN = f"^({HTTP_URL}|data:[^,]*;base64,[A-Za-z0-9+/=\\s]*|asset://[0-9a-f]{{32}})$"


class InputRef(fields.String):
    """An input image: an http(s) URL, a ``data:`` URI, or ``asset://<id>``.

    Hosts the schema's ``url_policy`` refuses without a DNS look-up (IP literals in any spelling,
    ``localhost`` names) are refused here; names that resolve to refused addresses are caught
    when the worker fetches them, with the same policy (``tasks/outbound.py``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The accepted forms, in the OpenAPI document, for clients generated from it.
        metadata = {"pattern": INPUT_PATTERN, **(kwargs.pop("metadata", None) or {})}
        super().__init__(*args, metadata=metadata, **kwargs)

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


class VideoRef(InputRef):
    """An input video, referenced like an image (fetched on the cpu queue, under the video limits)."""


# The key of the input inside each object of a list of objects (generate's
# ``controlnets[].image_url``): the one nested place an input may sit.
NESTED_INPUT = "image_url"


class InputObject(fields.Nested):
    """An object of a list field that holds an input under ``NESTED_INPUT`` (one ControlNet of
    ``controlnets``). Its ``InputRef`` checks hosts with the payload's ``url_policy``, which the
    nested schema would not otherwise see."""

    @property
    def schema(self) -> Schema:
        schema = super().schema
        policy = getattr(self.root, "url_policy", None)
        if isinstance(policy, UrlPolicy):
            schema.url_policy = policy  # type: ignore[attr-defined]  # read by InputRef.url_policy
        return schema


def input_fields(schema: type[Schema]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The fields of ``schema`` that hold inputs (an ``InputRef``, a list of them, or a list of
    ``InputObject``s), and those of them that hold a video, in declaration order."""
    inputs, videos = [], []
    for name, field in schema().fields.items():
        ref = field.inner if isinstance(field, fields.List) else field
        if isinstance(ref, InputObject):
            ref = ref.schema.fields[NESTED_INPUT]
        if isinstance(ref, InputRef):
            inputs.append(name)
            if isinstance(ref, VideoRef):
                videos.append(name)
    return tuple(inputs), tuple(videos)


def input_refs(field: str, value: Any) -> list[tuple[str, Any]]:
    """``(label, reference)`` of each input the payload's ``field`` holds in ``value``: one
    reference, a list of them, or a list of objects each holding one under ``NESTED_INPUT``. The
    label names it for errors (``image_url``, ``source_urls[1]``, ``controlnets[0].image_url``)."""
    if not isinstance(value, list):
        return [(field, value)]
    return [
        (f"{field}[{i}].{NESTED_INPUT}", item.get(NESTED_INPUT))
        if isinstance(item, dict)
        else (f"{field}[{i}]", item)
        for i, item in enumerate(value)
    ]


def replace_input(value: Any, index: int | None, ref: Any) -> Any:
    """``value`` (what ``input_refs`` read) with its input at ``index`` (None: the one) replaced by
    ``ref``; a new value, ``value`` itself is left as it was."""
    if index is None:
        return ref
    items = list(value)
    item = items[index]
    items[index] = {**item, NESTED_INPUT: ref} if isinstance(item, dict) else ref
    return items


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
        styles: tuple[StylePreset, ...] = (),
        **kwargs: Any,
    ):
        # AIORCH_STYLES_FILE's presets, which stylize's ``style`` takes besides the built-in ones:
        # set before the fields bind, since they read it then.
        self.styles = styles
        super().__init__(*args, **kwargs)
        # Which URL hosts InputRef fields accept: the settings' SSRF guard (tasks/outbound.py).
        self.url_policy = url_policy
        # AIORCH_MAX_FACES: the face tasks' limit, a setting, so the schema is told it.
        self.face_limit = max_faces


def unit(**kw: Any) -> fields.Float:
    """A number in [0, 1]."""
    return fields.Float(validate=validate.Range(min=0.0, max=1.0), **kw)


class ModelRef(fields.String):
    """The id of a model in the store that must be one of ``types`` and serve ``task``: checked at
    the API against the store as the client sees it (``app.jobs.checked_spec``), so a wrong one is
    a 422 naming the field, and again by the engine."""

    def __init__(self, *args: Any, types: tuple[str, ...], task: str, **kwargs: Any) -> None:
        metadata = {"x-model-types": list(types), **(kwargs.pop("metadata", None) or {})}
        super().__init__(*args, validate=validate.Length(min=1, max=128), metadata=metadata, **kwargs)
        self.types = types
        self.task = task

    def names_model(self, value: str) -> bool:
        """Whether ``value`` names a model of the store (a subclass may take other names too)."""
        return True

    def explain(self, problem: str) -> str:
        """The 422's sentence for ``problem`` (what ``model_problem`` found wrong with the id)."""
        return problem


def model_refs(schema: Schema, payload: dict[str, Any]) -> list[tuple[str, str, ModelRef]]:
    """``(field, model id, its ModelRef)`` of each ``ModelRef`` the loaded ``payload`` fills."""
    return [
        (name, payload[name], field)
        for name, field in schema.fields.items()
        if isinstance(field, ModelRef) and payload.get(name) and field.names_model(payload[name])
    ]


class NeedsModel(fields.Field):
    """What ``ModelSwitch`` and ``ModelText`` share: set, the field needs an installed model of one
    of ``types`` serving ``task``, and ``missing`` is the 422's reason when there is none. Listed
    before the marshmallow field it extends, so that field's constructor takes the rest."""

    def __init__(self, *args: Any, types: tuple[str, ...], task: str, missing: str, **kwargs: Any) -> None:
        metadata = {"x-model-types": list(types), **(kwargs.pop("metadata", None) or {})}
        super().__init__(*args, metadata=metadata, **kwargs)
        self.types = types
        self.task = task
        self.missing = missing


class ModelSwitch(NeedsModel, fields.Boolean):
    """A switch that, when on, needs an installed model of one of ``types`` serving ``task``
    (``face_enhance`` needs a face restorer): checked at the API against the store
    (``app.jobs.checked_spec``), so asking for it with none installed is a 422 naming the field
    (``missing`` says why), and again by the engine."""


class ModelText(NeedsModel, fields.String):
    """A text field that, when given, needs an installed model of one of ``types`` serving
    ``task`` (``remove_object``'s ``prompt`` needs an object detector): checked at the API like a
    ``ModelSwitch``, so giving it with none installed is a 422 naming the field (``missing``)."""


def face_enhance_field(task: str) -> ModelSwitch:
    """``face_enhance`` (``upscale``, ``faceswap``, ``faceswap_multi``): restore the faces with the
    best installed face restorer (GFPGAN, RestoreFormer); a 422 naming the field when none is."""
    return ModelSwitch(
        load_default=False,
        types=("face_restorer",),
        task=task,
        missing="needs a face-restoration model (GFPGAN, RestoreFormer or CodeFormer), and none is installed",
        metadata={"description": "Restore the faces with the installed face-restoration model"},
    )


def face_fidelity_field() -> fields.Float:
    """``face_fidelity``: CodeFormer's fidelity weight w for ``face_enhance`` (GFPGAN and
    RestoreFormer have none and ignore it)."""
    return fields.Float(
        validate=validate.Range(min=0.0, max=1.0),
        metadata={
            "description": "CodeFormer's fidelity weight: 0 favours a clean face, 1 the input's "
            "identity (default 0.5); other face restorers ignore it"
        },
    )


def model_switches(schema: Schema, payload: dict[str, Any]) -> list[tuple[str, ModelSwitch | ModelText]]:
    """``(field, the field)`` of each ``ModelSwitch`` the loaded ``payload`` turns on and each
    ``ModelText`` it fills."""
    return [
        (name, field)
        for name, field in schema.fields.items()
        if isinstance(field, ModelSwitch | ModelText) and payload.get(name)
    ]


def model_field() -> fields.String:
    """``model``: the id of an installed model (the engine checks that it serves the task)."""
    return fields.String(validate=validate.Length(min=1, max=128))
