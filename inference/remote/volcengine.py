"""Volcengine visual API client (seed 002): ``CVSync2AsyncSubmitTask`` / ``CVSync2AsyncGetResult``.

Both actions are ``POST https://visual.volcengineapi.com/?Action=...&Version=2022-08-31`` with a
JSON body naming the algorithm by ``req_key``. Which ``req_key`` (and which fixed algorithm
switches) serves a task is route configuration, passed in ``options``.

Requests carry Volcengine's HMAC-SHA256 signature. It is not in the seed; it follows Volcengine's
published signing documentation (its "签名机制" pages), which is AWS SigV4 with these differences:
the algorithm word is ``HMAC-SHA256``, the date header is ``X-Date``, the body hash travels in
``X-Content-Sha256``, the credential scope is ``<yyyymmdd>/<region>/<service>/request`` and the
signing key chain starts from the bare secret key (no prefix): date, region, service, "request".
The visual API signs with region ``cn-north-1`` and service ``cv``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import requests

from inference.base import InvalidInput
from inference.remote.base import (
    HttpClient,
    ProviderAuthError,
    ProviderError,
    ProviderErrorContext,
    ProviderRejected,
    ProviderRetryableError,
    RemoteOutput,
    RemoteRef,
    RemoteResult,
    RemoteStatus,
    Secret,
)
from inference.remote.limits import (
    Bound,
    check_bounds,
    refuse_controlnets,
    refuse_loras,
    refuse_not_taken,
)
from inference.styles import BUILTIN_STYLES

PROVIDER = "Volcengine"
DEFAULT_BASE_URL = "https://visual.volcengineapi.com"
VERSION = "2022-08-31"
SUBMIT_ACTION = "CVSync2AsyncSubmitTask"
RESULT_ACTION = "CVSync2AsyncGetResult"
ALGORITHM = "HMAC-SHA256"
SUCCESS = 10000
# "not_found:任务未找到,可能原因是无此任务或任务已过期(12小时)": after 12 hours a missing task is an
# expired one; earlier it was never there (or was lost), which is a failure, not an expiry.
TASK_LIFETIME_S = 12 * 3600

# Seed 002's business error codes for content-risk refusals, all HTTP 400.
RISK_CODES = {
    50411: "input image refused by the risk check",
    50511: "output image refused by the risk check",
    50412: "input text refused by the risk check",
    50512: "output text refused by the risk check",
    50413: "input text blocked (NER, IP or blocklist)",
}
# Volcengine visual's common codes (its "通用返回字段及错误码" page, referenced by the seed): QPS and
# concurrency limits, and internal errors, all worth a later retry.
RATE_LIMIT_CODES = {50429, 50430}
INTERNAL_CODES = {50500, 50501}
RATE_LIMIT_WAIT_S = 5.0
# Gateway-level errors arrive as ResponseMetadata.Error.Code strings rather than numbers.
_AUTH_GATEWAY_CODES = {
    "SignatureDoesNotMatch",
    "InvalidAccessKey",
    "InvalidCredential",
    "InvalidAuthorization",
    "MissingAuthenticationToken",
    "MissingSignature",
    "InvalidTimestamp",
    "AccessDenied",
}
_RETRY_GATEWAY_CODES = {"FlowLimitExceeded", "RequestLimitExceeded", "InternalError", "ServiceUnavailable"}

# Our payload's image inputs, in the order they become image_urls / binary_data_base64 entries;
# a route's ``params`` may point at them as "uri://binary_data?index=N".
IMAGE_FIELDS = ("image_url", "source_url", "target_url", "mask_url")
# Seed 002's limits on our payload: "取值范围[600-1500]" for both generated sides; ``step`` (our
# ``steps``) has only a default (18) there, and this client has always taken 1-200.
SIDES = (Bound("width", 600, 1500), Bound("height", 600, 1500))
BOUNDS = (*SIDES, Bound("steps", 1, 200))
# Fields of ours that seed 002's body has no counterpart for, whatever the route's req_key: the body
# carries a prompt, seed, step, cfg, the sides and the images, and nothing else of the payload.
NOT_TAKEN = {
    "negative_prompt": "its body has only a positive_prompt",
    "samples": "it makes one image per task",
    "model": "the route's req_key is the model",
    "scheduler": "it has no sampler choice",
    "image_strength": "its img2img takes no strength",
    "strength": "its img2img takes no strength",
    **{name: "it has no outpaint geometry" for name in ("ratio", "left", "right", "top", "bottom")},
    "scale": "it has no upscale factor",
    "sharpen": "it has no sharpening",
    "face_enhance": "it has no face restoration",
}


# ------------------------------------------------------------------------------------ signer


@dataclass(frozen=True)
class SignedRequest:
    headers: dict[str, str]
    canonical_request: str
    string_to_sign: str


class VolcengineSigner:
    """Volcengine's HMAC-SHA256 request signature (header form)."""

    def __init__(self, access_key: str, secret_key: str, *, region: str = "cn-north-1", service: str = "cv"):
        self._access_key = Secret(access_key)
        self._secret_key = Secret(secret_key)
        self.region = region
        self.service = service

    def __repr__(self) -> str:
        return f"VolcengineSigner(region={self.region!r}, service={self.service!r})"

    def sign(
        self,
        method: str,
        url: str,
        body: bytes,
        *,
        now: datetime,
        content_type: str = "application/json",
    ) -> SignedRequest:
        """Headers to send with this exact request (method, URL with query, body)."""
        parts = urlsplit(url)
        x_date = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        short_date = x_date[:8]
        body_hash = hashlib.sha256(body).hexdigest()
        # Host is signed as it goes on the wire: requests sends the netloc, port included.
        headers = {
            "Content-Type": content_type,
            "Host": parts.netloc,
            "X-Content-Sha256": body_hash,
            "X-Date": x_date,
        }
        lowered = sorted((name.lower(), " ".join(value.split())) for name, value in headers.items())
        signed_headers = ";".join(name for name, _ in lowered)
        canonical_request = "\n".join(
            [
                method.upper(),
                _rfc3986(parts.path or "/", safe="/"),
                canonical_query(parts.query),
                "".join(f"{name}:{value}\n" for name, value in lowered),
                signed_headers,
                body_hash,
            ]
        )
        scope = f"{short_date}/{self.region}/{self.service}/request"
        string_to_sign = "\n".join(
            [ALGORITHM, x_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
        )
        key = self._secret_key.reveal().encode()
        for part in (short_date, self.region, self.service, "request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        headers["Authorization"] = (
            f"{ALGORITHM} Credential={self._access_key.reveal()}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}"
        )
        return SignedRequest(headers, canonical_request, string_to_sign)


def canonical_query(query: str) -> str:
    """Parameters RFC 3986-encoded, sorted by name (values of one name keep their order)."""
    pairs = parse_qsl(query, keep_blank_values=True)
    pairs.sort(key=lambda pair: pair[0])
    return "&".join(f"{_rfc3986(name)}={_rfc3986(value)}" for name, value in pairs)


def _rfc3986(value: str, safe: str = "") -> str:
    return quote(value, safe="-_.~" + safe)


# ------------------------------------------------------------------------------------ client


class VolcengineClient(HttpClient):
    """Submit and poll Volcengine visual async tasks; images come back inline as base64."""

    name = "volcengine"
    max_batch = 1  # CVSync2AsyncGetResult takes one task_id

    @staticmethod
    def check_limits(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        check_limits(task, payload, options)

    def __init__(
        self,
        *,
        base_url: str,
        access_key: str,
        secret_key: str,
        region: str = "cn-north-1",
        service: str = "cv",
        version: str = VERSION,
        **kwargs: Any,
    ):
        super().__init__(base_url, **kwargs)
        self.signer = VolcengineSigner(access_key, secret_key, region=region, service=service)
        self.version = version

    def _action(self, action: str, body: Mapping[str, Any]) -> tuple[requests.Response, dict]:
        url = f"{self.base_url}/?Action={action}&Version={self.version}"
        raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        signed = self.signer.sign("POST", url, raw, now=datetime.fromtimestamp(self.clock(), UTC))
        response = self._send("POST", url, data=raw, headers=signed.headers)
        answer = self._json(response)
        if not isinstance(answer, dict):
            raise ProviderRetryableError(
                "the answer is not a JSON object", provider=self.name, code="provider_bad_response"
            )
        self._raise_gateway_error(response, answer)
        return response, answer

    def _raise_gateway_error(self, response: requests.Response, answer: Mapping[str, Any]) -> None:
        meta = answer.get("ResponseMetadata")
        error = meta.get("Error") if isinstance(meta, Mapping) else None
        if not isinstance(error, Mapping):
            if response.status_code >= 500 and "code" not in answer:
                raise self._retryable_http(response, f"HTTP {response.status_code}")
            return
        code = str(error.get("Code") or "")
        message = str(error.get("Message") or code or "gateway error")
        kwargs: ProviderErrorContext = {
            "provider": self.name,
            "provider_code": code,
            "http_status": response.status_code,
        }
        if code in _AUTH_GATEWAY_CODES or response.status_code in (401, 403):
            raise ProviderAuthError(message, **kwargs)
        if code in _RETRY_GATEWAY_CODES or response.status_code >= 500 or response.status_code == 429:
            raise self._retryable_http(
                response,
                message,
                code="provider_unavailable",
                provider_code=code,
                default_wait=RATE_LIMIT_WAIT_S if "Limit" in code else None,
            )
        raise ProviderError(message, **kwargs)

    def _raise_business_error(self, response: requests.Response, answer: Mapping[str, Any]) -> None:
        """Raise for a non-10000 ``code`` that is not about the job's content."""
        code = _int(answer.get("code"))
        message = str(answer.get("message") or f"error code {code}")
        if code in RATE_LIMIT_CODES:
            raise self._retryable_http(
                response,
                message,
                code="provider_rate_limited",
                provider_code=code,
                default_wait=RATE_LIMIT_WAIT_S,
            )
        if code in INTERNAL_CODES or (code is None and response.status_code >= 500):
            raise self._retryable_http(response, message, code="provider_unavailable", provider_code=code)

    # -- submit -----------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> str:
        """Start the route's ``req_key`` algorithm on our payload; returns the remote id to store.

        ``options``: ``req_key`` (required), ``params`` (fixed algorithm fields merged into the
        body, e.g. ``face_switch`` and ``face_image: "uri://binary_data?index=0"``). Volcengine has no
        idempotency key, so a submit retried after a lost response may start a second task.
        """
        options = options or {}
        req_key = options.get("req_key")
        if not req_key:
            raise ProviderError(
                "the route gives no req_key for Volcengine", provider=self.name, code="provider_misconfigured"
            )
        check_limits(task, payload, options)
        body = build_request(str(req_key), stylized(payload) if task == "stylize" else payload, options)
        logo = logo_info(options.get("logo_info"))
        response, answer = self._action(SUBMIT_ACTION, body)
        code = _int(answer.get("code"))
        if code in RISK_CODES:
            raise ProviderRejected(
                str(answer.get("message") or RISK_CODES[code]),
                provider=self.name,
                provider_code=code,
                http_status=response.status_code,
            )
        if code != SUCCESS:
            self._raise_business_error(response, answer)
            raise ProviderError(
                str(answer.get("message") or f"error code {code}"),
                provider=self.name,
                provider_code=code,
                http_status=response.status_code,
                code="invalid_input" if response.status_code == 400 else "provider_error",
            )
        found = answer.get("data")
        data: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        task_id = data.get("task_id")
        if not task_id:
            raise ProviderRetryableError(
                "submit answered without a task_id", provider=self.name, code="provider_bad_response"
            )
        # The watermark is asked for at result time (req_json.logo_info), and expiry needs the
        # submit time: both ride in the remote id so a restarted worker still has them.
        context = {"k": str(req_key), "t": str(int(self.clock()))}
        if logo:
            context["logo"] = json.dumps(logo, separators=(",", ":"), sort_keys=True)
        return str(RemoteRef(str(task_id), context))

    # -- poll -------------------------------------------------------------------------------

    def poll(self, remote_id: str) -> RemoteResult:
        ref = RemoteRef.parse(remote_id)
        req_key = ref.context.get("k")
        if not req_key:
            raise ProviderError(f"remote id {remote_id!r} has no req_key", provider=self.name)
        body: dict[str, Any] = {"req_key": req_key, "task_id": ref.id}
        if ref.context.get("logo"):
            body["req_json"] = json.dumps(
                {"logo_info": json.loads(ref.context["logo"])}, separators=(",", ":")
            )
        response, answer = self._action(RESULT_ACTION, body)
        code = _int(answer.get("code"))
        raw = dict(answer)
        if code in RISK_CODES:
            return RemoteResult(
                remote_id,
                RemoteStatus.REJECTED,
                error_code="content_rejected",
                provider_code=str(code),
                error_message=str(answer.get("message") or RISK_CODES[code]),
                raw=raw,
            )
        if code != SUCCESS:
            self._raise_business_error(response, answer)
            return RemoteResult(
                remote_id,
                RemoteStatus.FAILED,
                error_code="remote_failed",
                provider_code=str(code),
                error_message=str(answer.get("message") or f"error code {code}"),
                raw=raw,
            )
        found = answer.get("data")
        data: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        status = data.get("status")
        if status == "in_queue":
            return RemoteResult(remote_id, RemoteStatus.QUEUED, raw=raw)
        if status == "generating":
            return RemoteResult(remote_id, RemoteStatus.RUNNING, raw=raw)
        if status == "not_found":
            return self._not_found(remote_id, ref, raw)
        if status == "done" or (status is None and data.get("binary_data_base64")):
            # The seed's own example of a finished task carries no status field, only the images.
            outputs = _outputs(data)
            if outputs:
                return RemoteResult(
                    remote_id, RemoteStatus.SUCCEEDED, outputs=outputs, raw=_strip_images(raw)
                )
            return RemoteResult(
                remote_id,
                RemoteStatus.FAILED,
                error_code="remote_failed",
                error_message="the task finished without images",
                raw=raw,
            )
        # Unknown status words keep the job running; the poller's deadline bounds the wait.
        return RemoteResult(remote_id, RemoteStatus.RUNNING, raw=raw)

    def _not_found(self, remote_id: str, ref: RemoteRef, raw: dict) -> RemoteResult:
        submitted = _int(ref.context.get("t"))
        if submitted is not None and self.clock() - submitted >= TASK_LIFETIME_S:
            return RemoteResult(
                remote_id,
                RemoteStatus.EXPIRED,
                error_code="remote_expired",
                provider_code="not_found",
                error_message="Volcengine dropped the task after its 12-hour lifetime",
                raw=raw,
            )
        return RemoteResult(
            remote_id,
            RemoteStatus.FAILED,
            error_code="remote_not_found",
            provider_code="not_found",
            error_message="Volcengine does not know this task",
            raw=raw,
        )


# ------------------------------------------------------------------------------ request build


def build_request(req_key: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Our payload (names from the seeds) as a Volcengine body for ``req_key``."""
    body: dict[str, Any] = {"req_key": req_key}
    params = options.get("params") or {}
    if not isinstance(params, Mapping):
        raise ProviderError(
            "route 'params' must be a mapping", provider="volcengine", code="provider_misconfigured"
        )
    body.update(params)
    if payload.get("prompt") is not None:
        body["positive_prompt"] = str(payload["prompt"])
    # Volcengine's "no fixed seed" is -1; our payload leaves seed out for the same meaning.
    body["seed"] = int(payload["seed"]) if payload.get("seed") is not None else -1
    # ``steps`` is in range by here: ``check_limits`` (``BOUNDS``), which submit calls first.
    if payload.get("steps") is not None:
        body["step"] = int(payload["steps"])
    if payload.get("cfg_scale") is not None:
        body["cfg"] = float(payload["cfg_scale"])
    for side in ("width", "height"):
        # "取值范围[600-1500]": refused before this by ``check_limits`` (``SIDES``).
        if payload.get(side) is not None:
            body[side] = int(payload[side])
    images = [(name, payload[name]) for name in IMAGE_FIELDS if payload.get(name)]
    if images:
        inline = [value.startswith("data:") for _, value in images]
        # "与image_urls二选一传入": one list or the other, never both.
        if all(inline):
            body["binary_data_base64"] = [_data_uri_base64(name, value) for name, value in images]
        elif any(inline):
            raise InvalidInput(
                "Volcengine takes all images inline or all as URLs, not both", field=images[0][0]
            )
        else:
            for name, value in images:
                if not value.startswith(("http://", "https://")):
                    raise InvalidInput(f"'{name}' must be an http(s) URL or a data: URI", field=name)
            body["image_urls"] = [value for _, value in images]
    return body


def check_limits(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """What seed 002 cannot take, refused naming our field before any request (any ``req_key``):
    values outside its ranges, and fields its body cannot express (``NOT_TAKEN``)."""
    check_bounds(PROVIDER, payload, BOUNDS)
    refuse_loras(PROVIDER, payload)
    refuse_controlnets(PROVIDER, payload)
    if task == "stylize":
        stylized(payload)
    refuse_not_taken(PROVIDER, task, payload, NOT_TAKEN)


def stylized(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``stylize`` payload as seed 002's img2img takes it (a portrait restyled "通过文本prompt"):
    the preset's prompt, its template around ours, as the prompt. A LoRA style has no field there,
    and is refused naming ``style`` (the route goes on to its next backend)."""
    style = str(payload.get("style") or "")
    preset = BUILTIN_STYLES.get(style)
    if preset is None:
        raise InvalidInput(
            f"Volcengine styles by prompt: {style!r} is not a style preset ({', '.join(BUILTIN_STYLES)})",
            field="style",
        )
    body = {name: value for name, value in payload.items() if name not in ("style", "strength")}
    body["prompt"] = preset.compose(payload.get("prompt"))
    return body


def logo_info(option: Any) -> dict[str, Any] | None:
    """The route option ``logo_info`` (seed 002's LogoInfo: Volcengine's own fixed label, on top of
    ours) checked against the seed; None: the route asks for none.

    The payload's ``watermark`` never comes here: Volcengine prints one of two fixed labels ("AI生成"
    or "Generated by AI") in four corners, which cannot say our text, our seven positions or our
    look, so the label the client asked for is drawn by us on the downloaded output, as locally.
    """
    if not option:
        return None
    if not isinstance(option, Mapping):
        raise ProviderError(
            "route option 'logo_info' must be an object", provider="volcengine", code="provider_misconfigured"
        )
    checks = {
        "add_logo": lambda v: isinstance(v, bool),
        "position": lambda v: v in (0, 1, 2, 3) and not isinstance(v, bool),
        "language": lambda v: v in (0, 1) and not isinstance(v, bool),
        "opacity": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1,
    }
    for name, value in option.items():
        if name not in checks or not checks[name](value):
            raise ProviderError(
                f"route option 'logo_info.{name}' is not seed 002's (add_logo, position 0-3, language "
                "0-1, opacity 0-1)",
                provider="volcengine",
                code="provider_misconfigured",
            )
    return {"add_logo": True, **option}


def _data_uri_base64(name: str, value: str) -> str:
    header, _, data = value.partition(",")
    if ";base64" not in header or not data:
        raise InvalidInput(f"'{name}' must be a base64 data: URI", field=name)
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise InvalidInput(f"'{name}' is not valid base64", field=name) from exc
    return data


def _outputs(data: Mapping[str, Any]) -> tuple[RemoteOutput, ...]:
    outputs: list[RemoteOutput] = []
    for index, item in enumerate(data.get("binary_data_base64") or []):
        try:
            outputs.append(RemoteOutput(data=base64.b64decode(item, validate=True), meta={"index": index}))
        except (binascii.Error, TypeError) as exc:
            raise ProviderRetryableError(
                "an inline image is not valid base64", provider="volcengine", code="provider_bad_response"
            ) from exc
    if not outputs:
        # The seed's example answer carries image_urls: [""]; only real links count.
        outputs = [
            RemoteOutput(url=url) for url in data.get("image_urls") or [] if isinstance(url, str) and url
        ]
    return tuple(outputs)


def _strip_images(raw: dict) -> dict:
    # Results keep the provider's answer for diagnosis, minus megabytes of base64.
    data = dict(raw.get("data") or {})
    if "binary_data_base64" in data:
        data["binary_data_base64"] = [f"<{len(item)} base64 chars>" for item in data["binary_data_base64"]]
    return {**raw, "data": data}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
