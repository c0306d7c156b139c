"""SenseTime LoRA training (seed 001, section 10): ``train_lora`` as a ``/v1/lora/train`` body, and a
``/v1/lora/result`` answer as a ``RemoteResult``.

The seed's training takes a base model id, the images (URLs it downloads itself, at most 1000), a
trigger word, a model name and description, the ``main_object`` the LoRA learns (``Human`` or
``Style``) and a ``task_type`` (``NORMAL`` or ``VIP``), and nothing else. Every other field of our
payload (captions, rank, steps, learning rate, resolution, seed, text-encoder training) is refused
when given, naming the field, rather than dropped: a client who asked for 3000 steps must not get
whatever SenseTime chooses and believe it got what it asked for.

A result reports ``PENDING``/``RUNNING``/``SUCCESS``/``FAILED`` (``DONE`` in the seed's batch
example) and ``training_progress`` from 0 to 1, which becomes our progress (0-100) and the job's
``progress_detail``. The trained LoRA stays at SenseTime (the seed has no download): success carries
its ``lora_id`` as the result's ``provider_model_id``, a model of SenseTime's that a route to
SenseTime can name, not one of our model store (``model_id`` is left out).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inference.base import InvalidInput
from inference.remote.base import RemoteResult, RemoteStatus, require

# The seed's limits ("总共不能超过1000张不重复的图片", "长度不超过64/1024/256个字符").
MAX_IMAGES = 1000
MAX_NAME = 64
MAX_DESCRIPTION = 1024
MAX_TRIGGER_WORD = 256
MAIN_OBJECTS = ("Human", "Style")
TASK_TYPES = ("NORMAL", "VIP")
# Our payload's fields the seed's request cannot carry: refused when present.
NOT_EXPRESSIBLE = {
    "captions": "SenseTime takes no captions; give a trigger_word instead",
    "rank": "SenseTime chooses the LoRA rank itself",
    "steps": "SenseTime chooses the number of training steps itself",
    "learning_rate": "SenseTime chooses the learning rate itself",
    "resolution": "SenseTime chooses the training resolution itself",
    "seed": "SenseTime's training takes no seed",
    "train_text_encoder": "SenseTime's training has no text-encoder switch",
}
_SUCCESS = ("SUCCESS", "DONE")
# Not in the seed's enum, but what a task cancelled at the provider plausibly reports.
_CANCELLED = ("CANCELLED", "CANCELED")


def build_train_lora(payload: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/v1/lora/train`` body of a ``train_lora`` payload; ``InvalidInput`` naming the field
    for anything the seed cannot express or its limits refuse, before any request is sent.

    ``options`` (the route's): ``base_models`` maps our base model ids onto SenseTime's (without
    it, ``base_model`` is SenseTime's id as it is); ``description``, ``main_object`` and
    ``task_type`` are SenseTime-only fields sent as they are.
    """
    for name, why in NOT_EXPRESSIBLE.items():
        if payload.get(name) is not None:
            raise InvalidInput(f"'{name}' cannot be sent to SenseTime's LoRA training: {why}", field=name)
    body: dict[str, Any] = {"base_model_id": _base_model_id(payload, options), "images": _image_urls(payload)}
    trigger_word = payload.get("trigger_word")
    if trigger_word:
        body["trigger_word"] = _text(trigger_word, "trigger_word", MAX_TRIGGER_WORD)
    if payload.get("name"):
        body["model_name"] = _text(payload["name"], "name", MAX_NAME)
    if options.get("description"):
        body["description"] = _text(options["description"], "description", MAX_DESCRIPTION)
    for name, allowed in (("main_object", MAIN_OBJECTS), ("task_type", TASK_TYPES)):
        if options.get(name) is not None:
            if options[name] not in allowed:
                raise InvalidInput(f"'{name}' must be one of {', '.join(allowed)}", field=name)
            body[name] = options[name]
    return body


def _base_model_id(payload: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    base = str(require(payload, "base_model"))
    mapping = options.get("base_models")
    if mapping is None:
        return base
    if not isinstance(mapping, Mapping) or not mapping.get(base):
        known = ", ".join(sorted(mapping)) if isinstance(mapping, Mapping) else ""
        raise InvalidInput(
            f"the SenseTime route trains on no base model {base!r} (it maps: {known or 'none'})",
            field="base_model",
        )
    return str(mapping[base])


def _image_urls(payload: Mapping[str, Any]) -> list[str]:
    # SenseTime downloads the images itself: the submit task has turned every input (data: URI,
    # asset://) into a public URL of our checked copy by now.
    images = require(payload, "images")
    if not isinstance(images, list) or not all(
        isinstance(url, str) and url.startswith(("http://", "https://")) for url in images
    ):
        raise InvalidInput("'images' must be public http(s) URLs for SenseTime", field="images")
    if len(set(images)) > MAX_IMAGES:
        raise InvalidInput(f"SenseTime trains on at most {MAX_IMAGES} distinct images", field="images")
    return list(images)


def _text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInput(f"'{name}' must be text of at most {limit} characters for SenseTime", field=name)
    return value


def lora_result(remote_id: str, body: Mapping[str, Any]) -> RemoteResult:
    """A ``/v1/lora/result`` (or ``/results`` item) answer as a ``RemoteResult``."""
    state = str(body.get("state") or "").upper()
    # The seed's table says state_message, its example state_msg: either is read.
    message = body.get("state_message") or body.get("state_msg") or None
    raw = dict(body)
    fraction = _fraction(body.get("training_progress"))
    detail = {"training_progress": fraction} if fraction is not None else None
    if state == "PENDING":
        return RemoteResult(remote_id, RemoteStatus.QUEUED, progress=0.0, progress_detail=detail, raw=raw)
    if state in _SUCCESS:
        lora_id = body.get("lora_id")
        if not lora_id:
            return RemoteResult(
                remote_id,
                RemoteStatus.FAILED,
                error_code="remote_failed",
                error_message="SenseTime finished the LoRA training without a lora_id",
                provider_code=state,
                raw=raw,
            )
        data = {"provider_model_id": str(lora_id)}
        return RemoteResult(remote_id, RemoteStatus.SUCCEEDED, data=data, progress=100.0, raw=raw)
    if state == "FAILED":
        reason = f": {message}" if message else ""
        return RemoteResult(
            remote_id,
            RemoteStatus.FAILED,
            error_code="remote_failed",
            error_message=f"SenseTime's LoRA training failed{reason}",
            provider_code=state,
            raw=raw,
        )
    if state in _CANCELLED:
        return RemoteResult(
            remote_id,
            RemoteStatus.CANCELLED,
            error_code="remote_cancelled",
            error_message=message or "SenseTime cancelled the LoRA training",
            provider_code=state,
            raw=raw,
        )
    # RUNNING, or a state word added after the seed: still training (the route's deadline ends a
    # training that never moves on).
    progress = None if fraction is None else fraction * 100
    return RemoteResult(remote_id, RemoteStatus.RUNNING, progress=progress, progress_detail=detail, raw=raw)


def _fraction(value: Any) -> float | None:
    """``training_progress`` as a fraction in [0, 1] (0 not started, 1 done); None when absent."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if number != number:  # NaN
        return None
    return round(min(1.0, max(0.0, number)), 4)
