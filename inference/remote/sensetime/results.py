"""SenseTime results: a poll answer (one of the seed's three shapes) as a ``RemoteResult``.

Image families report ``PENDING``/``RUNNING``/``SUCCESS``/``FAILED``; face swap and face detection
report ``state`` 0 (running) / 1 (done). A per-image ``error_code`` "Sensitive" is the only
content verdict, and it ends the job ``rejected``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from inference.remote.base import ProviderRetryableError, RemoteOutput, RemoteResult, RemoteStatus
from inference.remote.sensetime.training import lora_result

# Per-image error_code "Sensitive" is the only content verdict in result bodies.
_SENSITIVE = "Sensitive"


def to_result(remote_id: str, shape: str, body: Mapping[str, Any]) -> RemoteResult:
    """The poll answer ``body`` of a job of a family of this ``shape`` (images, faceswap, detect,
    lora)."""
    if shape == "lora":
        return lora_result(remote_id, body)
    if shape == "faceswap":
        return _faceswap_result(remote_id, body)
    if shape == "detect":
        return _detect_result(remote_id, body)
    return _images_result(remote_id, body)


def _images_result(remote_id: str, body: Mapping[str, Any]) -> RemoteResult:
    state = str(body.get("state") or "").upper()
    message = body.get("state_message") or body.get("state_msg") or None
    images = [img for img in body.get("images") or [] if isinstance(img, Mapping)]
    outputs = tuple(
        _image_output(img)
        for img in images
        if not img.get("error_code") and (img.get("raw") or img.get("small"))
    )
    codes = [str(img["error_code"]) for img in images if img.get("error_code")]
    raw = dict(body)
    if state == "PENDING":
        return RemoteResult(remote_id, RemoteStatus.QUEUED, raw=raw)
    if state == "RUNNING":
        return RemoteResult(remote_id, RemoteStatus.RUNNING, raw=raw)
    # "DONE" appears in the seed's LoRA batch example as a synonym of SUCCESS.
    if state in ("SUCCESS", "DONE") and outputs:
        return RemoteResult(remote_id, RemoteStatus.SUCCEEDED, outputs=outputs, raw=raw)
    if state in ("SUCCESS", "DONE", "FAILED"):
        if _SENSITIVE in codes:
            return RemoteResult(
                remote_id,
                RemoteStatus.REJECTED,
                error_code="content_rejected",
                provider_code=_SENSITIVE,
                error_message=message or "SenseTime flagged the output as sensitive",
                raw=raw,
            )
        return RemoteResult(
            remote_id,
            RemoteStatus.FAILED,
            error_code="remote_failed",
            provider_code=codes[0] if codes else state,
            error_message=message or "the remote job failed",
            raw=raw,
        )
    # An unknown state is treated as still running: the poller's deadline ends it if it never
    # moves, which is safer than failing a job on a status word added after the seed.
    return RemoteResult(remote_id, RemoteStatus.RUNNING, raw=raw)


def _image_output(img: Mapping[str, Any]) -> RemoteOutput:
    source = str(img.get("raw") or img.get("small"))
    meta = {key: img[key] for key in ("index", "seed") if key in img}
    if source.startswith("data:"):
        # get_type=base64 answers carry Data URL images instead of links.
        try:
            return RemoteOutput(data=base64.b64decode(source.split(",", 1)[1], validate=True), meta=meta)
        except (IndexError, binascii.Error) as exc:
            raise ProviderRetryableError(
                "an inline image is not valid base64", provider="sensetime", code="provider_bad_response"
            ) from exc
    return RemoteOutput(url=source, meta=meta)


def _faceswap_result(remote_id: str, body: Mapping[str, Any]) -> RemoteResult:
    found = body.get("task")
    task: Mapping[str, Any] = found if isinstance(found, Mapping) else body
    raw = dict(body)
    if as_int(task.get("state")) != 1:
        return RemoteResult(remote_id, RemoteStatus.RUNNING, raw=raw)
    url = task.get("img_raw_url") or task.get("img_url")
    if not url:
        return RemoteResult(
            remote_id,
            RemoteStatus.FAILED,
            error_code="remote_failed",
            error_message="face swap finished without an image",
            raw=raw,
        )
    return RemoteResult(remote_id, RemoteStatus.SUCCEEDED, outputs=(RemoteOutput(url=str(url)),), raw=raw)


def _detect_result(remote_id: str, body: Mapping[str, Any]) -> RemoteResult:
    raw = dict(body)
    if as_int(body.get("state")) != 1:
        return RemoteResult(remote_id, RemoteStatus.RUNNING, raw=raw)
    faces = [
        {"index": face.get("index"), "box": face.get("coords")}
        for face in body.get("faces") or []
        if isinstance(face, Mapping)
    ]
    return RemoteResult(remote_id, RemoteStatus.SUCCEEDED, data={"faces": faces}, raw=raw)


def not_found(remote_id: str) -> RemoteResult:
    """The result of a job SenseTime answers 404 for."""
    return RemoteResult(
        remote_id,
        RemoteStatus.FAILED,
        error_code="remote_not_found",
        error_message="SenseTime does not know this task",
        provider_code="404",
    )


def as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
