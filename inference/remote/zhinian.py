"""Zhinian AIGC open API client (seed 003).

``POST /api/v1/jobs`` with a ``capability`` creates a queued job; ``GET /api/v1/jobs/<id>`` reports
``queued``/``running``/``succeeded``/``failed``/``expired``/``cancelled``; a succeeded job lists
``outputAssetIds``, downloaded from ``/api/v1/assets/<id>/download`` (which may redirect to
storage). Auth is ``Authorization: Bearer <key>`` or ``X-Zhinian-Api-Key: <key>``. Every create
carries an ``Idempotency-Key``: same key and body return the existing job (``reused``), so a submit
retried after a crash never makes a second remote job. Errors are ``{"error": "<sentence>"}``.

Finished jobs can also be pushed to us as webhooks signed ``X-Zhinian-Signature: sha256=<hex>``,
the HMAC-SHA256 of the raw body; ``parse_webhook`` verifies and maps one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import requests

from inference.base import InvalidInput
from inference.remote.base import (
    HttpClient,
    InvalidWebhookSignature,
    ProviderAuthError,
    ProviderError,
    ProviderErrorContext,
    ProviderRetryableError,
    RemoteOutput,
    RemoteRef,
    RemoteResult,
    RemoteStatus,
    Secret,
    require,
)
from inference.remote.limits import (
    Bound,
    check_bounds,
    refuse_controlnets,
    refuse_loras,
    refuse_not_taken,
)

PROVIDER = "Zhinian"
SIGNATURE_HEADER = "X-Zhinian-Signature"
_STATUSES = {
    "queued": RemoteStatus.QUEUED,
    "running": RemoteStatus.RUNNING,
    "succeeded": RemoteStatus.SUCCEEDED,
    "failed": RemoteStatus.FAILED,
    "expired": RemoteStatus.EXPIRED,
    "cancelled": RemoteStatus.CANCELLED,
}
# Our task names onto the seed's capabilities; a route may name another in options["capability"].
CAPABILITIES = {
    "generate": "image.generate",
    "inpaint": "image.inpaint",
    "upscale": "image.upscale",
    "ahv_video": "video.generate",
    "generate_video": "video.generate",
}
# Seed 003's video limits.
_VIDEO_RATIOS = {"16:9", "4:3", "1:1", "3:4", "9:16", "21:9", "adaptive"}
_VIDEO_RESOLUTIONS = {"480p", "720p", "1080p"}
# Fields a route may pass through unchanged for image.generate (engine-specific knobs in the seed).
_GENERATE_OPTIONS = ("scale", "quality", "force_single")
# Our payload's ranges per capability: sides up to 8192 px, seed 003's video "duration 4~15".
BOUNDS: dict[str, tuple[Bound, ...]] = {
    "image.generate": (Bound("width", 1, 8192), Bound("height", 1, 8192)),
    "video.generate": (Bound("duration", 4, 15),),
}
# Fields of ours that seed 003's capabilities have no counterpart for (its image bodies are a
# prompt, the sides and image URLs; its video settings ratio, duration and resolution), and why.
_KNOBS = {
    "negative_prompt": "its jobs take a prompt only",
    "steps": "its engines pick their own steps",
    "cfg_scale": "its engines take the route's 'scale'/'quality', not a cfg_scale",
    "seed": "its jobs take no seed",
    "samples": "it makes one image per job",
    "scheduler": "it has no sampler choice",
    "model": "the route's capability is the model",
}
NOT_TAKEN: dict[str, dict[str, str]] = {
    "image.generate": {**_KNOBS, "image_strength": "its reference images take no strength"},
    "image.inpaint": {**_KNOBS, "strength": "its inpaint takes no strength"},
    "image.upscale": {
        "scale": "its upscale makes the route's 'resolution' (seed 003: \"4k\"), not a scale factor",
        "model": "the route's capability is the model",
        "sharpen": "it has no sharpening",
        "face_enhance": "it has no face restoration",
    },
    "video.generate": {
        "negative_prompt": "its videos take a prompt only",
        "seed": "its videos take no seed",
    },
}


class ZhinianClient(HttpClient):
    """Submit, poll and download Zhinian jobs; verify its webhooks."""

    name = "zhinian"
    max_batch = 1  # the list endpoint filters by status and time, not by ids
    makes_video = True  # capability video.generate

    @staticmethod
    def check_limits(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        check_limits(task, payload, options)

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        auth_scheme: str = "bearer",
        webhook_secret: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(base_url, **kwargs)
        if auth_scheme not in ("bearer", "header"):
            raise ValueError("auth_scheme is 'bearer' (Authorization) or 'header' (X-Zhinian-Api-Key)")
        self._api_key = Secret(api_key)
        self.auth_scheme = auth_scheme
        self._webhook_secret = Secret(webhook_secret) if webhook_secret else None

    def _auth_headers(self) -> dict[str, str]:
        if self.auth_scheme == "bearer":
            return {"Authorization": f"Bearer {self._api_key.reveal()}"}
        return {"X-Zhinian-Api-Key": self._api_key.reveal()}

    def _call(
        self, method: str, path: str, *, json_body: Any = None, headers: Mapping[str, str] | None = None
    ) -> Any:
        response = self._send(
            method, self.base_url + path, json=json_body, headers={**self._auth_headers(), **(headers or {})}
        )
        if response.status_code < 400:
            return self._json(response)
        self._raise_error(response)

    def _raise_error(self, response: requests.Response) -> None:
        status = response.status_code
        try:
            message = str(response.json().get("error") or f"HTTP {status}")
        except (ValueError, AttributeError):
            message = f"HTTP {status}"
        kwargs: ProviderErrorContext = {"provider": self.name, "provider_code": status, "http_status": status}
        if status == 401 or status == 403:
            raise ProviderAuthError(message, **kwargs)
        if status == 429 or status >= 500:
            # The seed lists 500 for server errors (and a broken worker token): transient from
            # our side, so a route can fall through to the next backend.
            raise self._retryable_http(
                response, message, code="provider_rate_limited" if status == 429 else "provider_unavailable"
            )
        if status == 409:
            raise ProviderError(message, code="idempotency_conflict", **kwargs)
        if status == 404:
            raise ProviderError(message, code="remote_not_found", **kwargs)
        raise ProviderError(message, code="invalid_input" if status == 400 else "provider_error", **kwargs)

    # -- submit -----------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> str:
        """Create the job; returns Zhinian's job id (the remote id to store).

        ``idempotency_key`` should be ``idempotency_key_for_job(job_id, "zhinian")``: the same key
        and body return the job already created, so retrying this call is always safe.
        ``options``: ``capability`` (override), ``webhook_url`` (our endpoint for its webhooks),
        and the seed's per-engine fields ``scale``/``quality``/``force_single``/``resolution``.
        """
        if not idempotency_key:
            # Without a key a retried submit can start a second paid job; refuse rather than risk it.
            raise ValueError("Zhinian submits need an idempotency_key derived from our job id")
        check_limits(task, payload, options or {})
        body = build_request(task, payload, options or {})
        answer = self._call(
            "POST", "/api/v1/jobs", json_body=body, headers={"Idempotency-Key": idempotency_key}
        )
        job = answer.get("job") if isinstance(answer, Mapping) else None
        if not isinstance(job, Mapping) or not job.get("id"):
            raise ProviderRetryableError(
                "create answered without job.id", provider=self.name, code="provider_bad_response"
            )
        return str(RemoteRef(str(job["id"])))

    # -- poll -------------------------------------------------------------------------------

    def poll(self, remote_id: str) -> RemoteResult:
        job_id = RemoteRef.parse(remote_id).id
        try:
            answer = self._call("GET", f"/api/v1/jobs/{quote(job_id, safe='')}")
        except ProviderError as exc:
            # 404 is "no such job, or not this client's": the job is gone for us, not a crash.
            if exc.code != "remote_not_found":
                raise
            return RemoteResult(
                remote_id,
                RemoteStatus.FAILED,
                error_code="remote_not_found",
                provider_code="404",
                error_message=str(exc.args[0]),
            )
        job = answer.get("job", answer) if isinstance(answer, Mapping) else None
        if not isinstance(job, Mapping):
            raise ProviderRetryableError(
                "job answer is not an object", provider=self.name, code="provider_bad_response"
            )
        return self.job_result(remote_id, job)

    def job_result(self, remote_id: str, job: Mapping[str, Any]) -> RemoteResult:
        """A Zhinian job object (from a poll or a webhook) as a ``RemoteResult``."""
        status = _STATUSES.get(str(job.get("status")))
        raw = dict(job)
        if status is None:
            # An unknown status word keeps the job running; the poller's deadline bounds the wait.
            return RemoteResult(remote_id, RemoteStatus.RUNNING, raw=raw)
        if status is RemoteStatus.SUCCEEDED:
            outputs = tuple(
                RemoteOutput(
                    url=f"{self.base_url}/api/v1/assets/{quote(str(asset_id), safe='')}/download",
                    authenticated=True,
                    meta={"asset_id": str(asset_id)},
                )
                for asset_id in job.get("outputAssetIds") or []
            )
            if not outputs:
                return RemoteResult(
                    remote_id,
                    RemoteStatus.FAILED,
                    error_code="remote_failed",
                    error_message="the job succeeded without output assets",
                    raw=raw,
                )
            return RemoteResult(remote_id, status, outputs=outputs, raw=raw)
        if status.final:
            error = job.get("error")
            message = error.get("message") if isinstance(error, Mapping) else error
            return RemoteResult(
                remote_id,
                status,
                error_code=f"remote_{status.value}",
                provider_code=str(job.get("status")),
                error_message=str(message or f"the remote job is {status.value}"),
                raw=raw,
            )
        return RemoteResult(remote_id, status, progress=_progress(job), raw=raw)

    # -- extras -----------------------------------------------------------------------------

    def capabilities(self) -> Any:
        """``GET /api/v1/capabilities``: what this deployment can run (step 2 of the seed's flow)."""
        return self._call("GET", "/api/v1/capabilities")

    def parse_webhook(self, raw_body: bytes, signature: str | None) -> tuple[str, RemoteResult]:
        """Verify a webhook's signature and return its ``(event, result)``.

        Raises ``InvalidWebhookSignature`` for a missing or wrong signature, and ``ValueError`` for a
        body that is not a Zhinian event; the endpoint answers both with a 4xx and keeps polling.
        """
        if self._webhook_secret is None:
            # An unsigned webhook endpoint would let anyone finish our jobs; polling still works.
            raise InvalidWebhookSignature("no webhook secret configured for Zhinian")
        if not verify_webhook_signature(self._webhook_secret.reveal(), raw_body, signature):
            raise InvalidWebhookSignature("X-Zhinian-Signature does not match the body")
        try:
            event = json.loads(raw_body)
        except ValueError as exc:
            raise ValueError("webhook body is not JSON") from exc
        job = event.get("job") if isinstance(event, Mapping) else None
        if not isinstance(job, Mapping) or not job.get("id"):
            raise ValueError("webhook body has no job.id")
        return str(event.get("event") or ""), self.job_result(str(RemoteRef(str(job["id"]))), job)


def verify_webhook_signature(secret: str, raw_body: bytes, signature: str | None) -> bool:
    """True when ``signature`` is ``sha256=<hex HMAC-SHA256 of raw_body keyed by secret>``.

    The raw bytes are what was signed: re-serialised JSON would not match. The comparison is
    constant-time so the signature cannot be guessed byte by byte.
    """
    if not secret or not signature:
        return False
    scheme, _, received = signature.strip().partition("=")
    if scheme.lower() != "sha256" or not received:
        return False
    expected = hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, received.strip().lower())


# ------------------------------------------------------------------------------ request build


def build_request(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Our task and payload as a Zhinian create body (camelCase names per seed 003)."""
    capability = _capability(task, options)
    body: dict[str, Any] = {"capability": capability}
    if capability == "image.generate":
        body["prompt"] = require(payload, "prompt")
        for side in ("width", "height"):
            if payload.get(side) is not None:
                body[side] = int(payload[side])
        if payload.get("image_url"):
            body["imageUrls"] = [_url(payload, "image_url")]
        for name in _GENERATE_OPTIONS:
            if name in options:
                body[name] = options[name]
    elif capability == "image.inpaint":
        body["prompt"] = require(payload, "prompt")
        # The seed's example: imageUrls = [original, mask].
        body["imageUrls"] = [_url(payload, "image_url"), _url(payload, "mask_url")]
    elif capability == "image.upscale":
        body["imageUrls"] = [_url(payload, "image_url")]
        resolution = payload.get("resolution") or options.get("resolution")
        if resolution:
            body["resolution"] = str(resolution)
    elif capability == "video.generate":
        body["prompt"] = require(payload, "prompt")
        body["settings"] = _video_settings(payload)
        if payload.get("image_url"):
            body["materials"] = [{"type": "image", "url": _url(payload, "image_url"), "label": "@图片1"}]
    else:
        raise InvalidInput(f"unknown Zhinian capability {capability!r}", field="task")
    if options.get("webhook_url"):
        body["webhookUrl"] = str(options["webhook_url"])
    return body


def check_limits(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """What seed 003 cannot take, refused naming our field before any request: a task it has no
    capability for, values outside its ranges, and fields its capability cannot express."""
    capability = _capability(task, options)
    # Seed 003's image.generate has no LoRA field, nor a ControlNet one.
    refuse_loras(PROVIDER, payload)
    refuse_controlnets(PROVIDER, payload)
    check_bounds(PROVIDER, payload, BOUNDS.get(capability, ()))
    if capability == "video.generate":
        ratio = payload.get("aspect_ratio", payload.get("ratio"))
        if ratio is not None and str(ratio) not in _VIDEO_RATIOS:
            field = "aspect_ratio" if "aspect_ratio" in payload else "ratio"
            raise InvalidInput(f"{PROVIDER} takes '{field}' in {sorted(_VIDEO_RATIOS)}", field=field)
        resolution = payload.get("resolution")
        if resolution is not None and str(resolution) not in _VIDEO_RESOLUTIONS:
            message = f"{PROVIDER} takes 'resolution' in {sorted(_VIDEO_RESOLUTIONS)}"
            raise InvalidInput(message, field="resolution")
    refuse_not_taken(PROVIDER, task, payload, NOT_TAKEN.get(capability, {}))


def _capability(task: str, options: Mapping[str, Any]) -> str:
    capability = options.get("capability") or CAPABILITIES.get(task)
    if capability is None:
        raise InvalidInput(f"{PROVIDER} serves no task {task!r}", field="task")
    if capability not in NOT_TAKEN:
        raise InvalidInput(f"unknown {PROVIDER} capability {capability!r}", field="task")
    return str(capability)


def _video_settings(payload: Mapping[str, Any]) -> dict[str, Any]:
    # Every value is in range by here: ``check_limits``, which submit calls first.
    settings: dict[str, Any] = {}
    if payload.get("duration") is not None:
        settings["duration"] = int(payload["duration"])
    # ``aspect_ratio`` is ahv_video's name for the seed's ``ratio``.
    ratio = payload.get("aspect_ratio", payload.get("ratio"))
    if ratio is not None:
        settings["ratio"] = str(ratio)
    if payload.get("resolution") is not None:
        settings["resolution"] = str(payload["resolution"])
    return settings


def _url(payload: Mapping[str, Any], name: str) -> str:
    value = require(payload, name)
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise InvalidInput(f"'{name}' must be a public http(s) URL for Zhinian", field=name)
    return value


def _progress(job: Mapping[str, Any]) -> float | None:
    value = job.get("progress")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
