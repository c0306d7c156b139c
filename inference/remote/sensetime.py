"""SenseTime Miaohua open API client (seed 001).

Auth is a JWT (HS256) signed with the secret key, ``iss`` = access key, with ``exp``/``nbf``; the
client mints one and re-mints it shortly before it expires. Every capability is submit-then-poll:
``POST /v1/<family>/imgen`` returns a ``task_id``, ``GET /v1/<family>/result/<id>`` reports
``PENDING``/``RUNNING``/``SUCCESS``/``FAILED``, and most families have a batch ``/results`` that
takes up to 50 ids per call. Face swap (``/v1/face/imggen``) and face detection report ``state``
0 (running) / 1 (done) instead.

Error bodies are ``{"error": {"code", "message", "details"}}``; the codes are mapped in
``_raise_error`` (16 auth -> permanent, 8 rate limit -> retry later, 18 sensitive -> rejected).
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jwt
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
    check_range,
    chunked,
    require,
)

DEFAULT_BASE_URL = "https://mhapi.sensetime.com"
# The seed's batch result endpoints take "最多50条" ids per call.
MAX_BATCH = 50
# The seed's examples mint 30-minute tokens valid from 5 seconds ago (clock skew allowance).
TOKEN_TTL = 1800
TOKEN_NBF_SKEW = 5
# Re-mint this long before expiry, so a token never expires between minting a header and the
# provider checking it (slow request, small clock drift).
TOKEN_REFRESH_MARGIN = 60

# Seed 001 section 11: codes that mean "try again later" rather than "this request is wrong".
_RETRYABLE_CODES = {
    2: "internal error",
    4: "provider timed out",
    9: "cannot run in the current state",
    10: "concurrency conflict",
    13: "internal error",
    14: "internal error",
    15: "internal error",
    409: "previous trial task still running",
    503: "timeout or service error",
}
# Rate limits get a default wait when the provider sends no Retry-After: 8 is a QPS limit (seconds),
# 429 is the trial's daily quota (no point retrying within the hour).
_RATE_LIMIT_WAIT = {8: 10.0, 429: 3600.0, 409: 5.0}
# Per-image error_code "Sensitive" is the only content verdict in result bodies.
_SENSITIVE = "Sensitive"


@dataclass(frozen=True)
class _Family:
    """One capability's endpoints. ``batch`` is None where the seed documents no batch look-up."""

    submit: str
    result: str
    batch: str | None
    shape: str = "images"  # images | faceswap | detect


_FAMILIES: dict[str, _Family] = {
    "imgenstd": _Family("/v1/imgenstd/imgen", "/v1/imgenstd/result/{}", "/v1/imgenstd/results"),
    "face.imggen": _Family("/v1/face/imggen", "/v1/face/imggen/{}", None, "faceswap"),
    "face.detect": _Family("/v1/face/detect", "/v1/face/detect/{}", None, "detect"),
    "erase": _Family("/v1/erase/imgen", "/v1/erase/result/{}", "/v1/erase/results"),
    "outpaint": _Family("/v1/outpaint/imgen", "/v1/outpaint/result/{}", "/v1/outpaint/results"),
    "outpaint.free": _Family("/v1/outpaint/imgen_free", "/v1/outpaint/result/{}", "/v1/outpaint/results"),
    "inpaint": _Family("/v1/inpaint/imgen", "/v1/inpaint/result/{}", "/v1/inpaint/results"),
    "sup_res": _Family("/v1/sup_res/imgen", "/v1/sup_res/result/{}", "/v1/sup_res/results"),
    # The seed's "split" batch section points at /v1/sup_res/results, a copy-paste slip in the
    # document; polling a split task there would ask the wrong service, so split polls one by one.
    "split": _Family("/v1/split/imgen", "/v1/split/result/{}", None),
    "stylization": _Family("/v1/stylization/imgen", "/v1/stylization/result/{}", "/v1/stylization/results"),
}

# Model listing endpoints per capability (``size`` 1-100, ``offset``, ``have_next``).
MODEL_KINDS: dict[str, str] = {
    "imgenstd": "/v1/imgenstd/models",
    "face": "/v1/face/models",
    "erase": "/v1/erase/models",
    "outpaint": "/v1/outpaint/models",
    "stylization": "/v1/stylization/models",
    "inpaint": "/v1/inpaint/models",
    "sup_res": "/v1/sup_res/models",
    "split": "/v1/split/models",
    "lora": "/v1/lora/models",
}

_ALIGN = {
    "topleft",
    "topmiddle",
    "topright",
    "middleleft",
    "middle",
    "middleright",
    "bottomleft",
    "bottommiddle",
    "bottomright",
}
# Our outpaint ``align`` words onto the seed's ``align_position`` enum.
_ALIGN_ALIASES = {
    "center": "middle",
    "top": "topmiddle",
    "bottom": "bottommiddle",
    "left": "middleleft",
    "right": "middleright",
}


@dataclass(frozen=True)
class ModelPage:
    data: list[dict[str, Any]]
    have_next: bool


class SenseTimeClient(HttpClient):
    """Submit, poll and download SenseTime Miaohua jobs; list its models."""

    name = "sensetime"
    max_batch = MAX_BATCH

    def __init__(
        self,
        *,
        base_url: str,
        access_key: str,
        secret_key: str,
        token_ttl: int = TOKEN_TTL,
        **kwargs: Any,
    ):
        super().__init__(base_url, **kwargs)
        if token_ttl <= TOKEN_REFRESH_MARGIN:
            raise ValueError(f"token_ttl must be over {TOKEN_REFRESH_MARGIN} seconds")
        self._access_key = Secret(access_key)
        self._secret_key = Secret(secret_key)
        self.token_ttl = token_ttl
        self._token: str | None = None
        self._token_exp = 0.0
        # One client may be shared by threads of a worker; minting is cheap but must not tear.
        self._token_lock = threading.Lock()

    # -- auth -------------------------------------------------------------------------------

    def token(self, *, force: bool = False) -> str:
        """The current bearer token, re-minted when it is within the refresh margin of ``exp``."""
        with self._token_lock:
            now = self.clock()
            if force or self._token is None or now >= self._token_exp - TOKEN_REFRESH_MARGIN:
                exp = int(now) + self.token_ttl
                claims = {"iss": self._access_key.reveal(), "exp": exp, "nbf": int(now) - TOKEN_NBF_SKEW}
                self._token = jwt.encode(
                    claims, self._secret_key.reveal(), algorithm="HS256", headers={"typ": "JWT"}
                )
                self._token_exp = exp
            return self._token

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        not_found_ok: bool = False,
    ) -> Any:
        """One API call; returns the decoded body or raises the mapped error.

        A code-16 answer is retried once with a freshly minted token: a token can expire in
        flight or be refused after a provider clock jump, and a second refusal is then real.
        """
        for attempt in (0, 1):
            headers = {"Content-Type": "application/json", **self._auth_headers()}
            response = self._send(method, self.base_url + path, json=json, params=params, headers=headers)
            if not_found_ok and response.status_code == 404:
                return None
            body = self._json(response) if response.content else {}
            error = body.get("error") if isinstance(body, dict) else None
            if response.status_code < 400 and not error:
                return body
            if attempt == 0 and isinstance(error, dict) and _code(error) == 16:
                self.token(force=True)
                continue
            self._raise_error(response, error)
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise_error(self, response: requests.Response, error: Any) -> None:
        status = response.status_code
        if not isinstance(error, dict):
            if status in (401, 403):
                raise ProviderAuthError(f"HTTP {status}", provider=self.name, http_status=status)
            if status >= 500 or status == 429:
                raise self._retryable_http(response, f"HTTP {status}")
            raise ProviderError(f"HTTP {status}", provider=self.name, http_status=status)
        code = _code(error)
        message = str(error.get("message") or f"error code {code}")
        kwargs: ProviderErrorContext = {"provider": self.name, "provider_code": code, "http_status": status}
        if code == 18:
            raise ProviderRejected(message, **kwargs)
        if code == 16:
            raise ProviderAuthError(message, **kwargs)
        if code in _RATE_LIMIT_WAIT:
            raise self._retryable_http(
                response,
                message,
                code="provider_rate_limited",
                provider_code=code,
                default_wait=_RATE_LIMIT_WAIT[code],
            )
        if code in _RETRYABLE_CODES:
            raise self._retryable_http(response, message, code="provider_unavailable", provider_code=code)
        if code is None and (status >= 500 or status == 429):
            raise self._retryable_http(response, message)
        # 3 (invalid parameters), 5, 6, 7 (no permission), 11, 12 and anything unknown: permanent.
        raise ProviderError(message, code="invalid_input" if code == 3 else "provider_error", **kwargs)

    # -- submit -----------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> str:
        """Start ``task`` at SenseTime; returns the remote id to store.

        SenseTime has no idempotency key, so ``idempotency_key`` is accepted and unused: a submit
        retried after a lost response can create a second remote job (the first is then orphaned).
        ``options`` is the route's parameter mapping: ``model_id`` (required unless the payload
        names ``model``), and provider-only fields such as ``dino_scale`` or ``mask_type``.
        """
        family, body = build_request(task, payload, options or {})
        answer = self._call("POST", _FAMILIES[family].submit, json=body)
        task_id = answer.get("task_id") if isinstance(answer, dict) else None
        if not task_id:
            raise ProviderRetryableError(
                "submit answered without a task_id", provider=self.name, code="provider_bad_response"
            )
        return str(RemoteRef(str(task_id), {"f": family}))

    # -- poll -------------------------------------------------------------------------------

    def poll(self, remote_id: str) -> RemoteResult:
        ref, family = self._parse(remote_id)
        body = self._call("GET", family.result.format(_path_id(ref.id)), not_found_ok=True)
        if body is None:
            return _not_found(remote_id)
        return _to_result(remote_id, family, body)

    def poll_many(self, remote_ids: Sequence[str]) -> dict[str, RemoteResult]:
        """Poll many jobs with as few calls as the seed allows: 50 ids per batch call per family."""
        results: dict[str, RemoteResult] = {}
        by_family: dict[str, dict[str, str]] = {}
        for remote_id in dict.fromkeys(remote_ids):
            ref, family = self._parse(remote_id)
            if family.batch is None:
                results[remote_id] = self.poll(remote_id)
            else:
                by_family.setdefault(family.batch, {})[ref.id] = remote_id
        for batch_path, ids in by_family.items():
            family = next(f for f in _FAMILIES.values() if f.batch == batch_path)
            for chunk in chunked(list(ids), MAX_BATCH):
                body = self._call("GET", batch_path, json={"task_ids": list(chunk)})
                for item in body.get("results") or []:
                    answered_id = ids.get(str(item.get("task_id")))
                    if answered_id is not None:
                        results[answered_id] = _to_result(answered_id, family, item)
        # An id the batch answer left out is asked about alone, so it gets a definite answer
        # (a 404 becomes a failed result) instead of silently never finishing.
        for remote_id in remote_ids:
            if remote_id not in results:
                results[remote_id] = self.poll(remote_id)
        return results

    def _parse(self, remote_id: str) -> tuple[RemoteRef, _Family]:
        ref = RemoteRef.parse(remote_id)
        family = _FAMILIES.get(ref.context.get("f", ""))
        if family is None:
            raise ProviderError(f"remote id {remote_id!r} names no SenseTime endpoint", provider=self.name)
        return ref, family

    # -- models -----------------------------------------------------------------------------

    def list_models_page(
        self, kind: str = "imgenstd", *, size: int = 100, offset: int = 0, mtp: str | None = None
    ) -> ModelPage:
        """One page of a capability's models (``size`` 1-100)."""
        if kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {kind!r}; one of {sorted(MODEL_KINDS)}")
        if not 1 <= size <= 100:
            raise ValueError("size must be in 1..100")
        if offset < 0:
            raise ValueError("offset must be >= 0")
        params: dict[str, Any] = {"size": size, "offset": offset}
        if mtp:
            params["mtp"] = mtp
        body = self._call("GET", MODEL_KINDS[kind], params=params)
        return ModelPage(data=list(body.get("data") or []), have_next=bool(body.get("have_next")))

    def list_models(
        self, kind: str = "imgenstd", *, page_size: int = 100, mtp: str | None = None
    ) -> Iterator[dict]:
        """Every model of a capability, page by page until ``have_next`` is false."""
        offset = 0
        while True:
            page = self.list_models_page(kind, size=page_size, offset=offset, mtp=mtp)
            yield from page.data
            # An empty page that claims more would loop forever; trust the data over the flag.
            if not page.have_next or not page.data:
                return
            offset += len(page.data)


# ------------------------------------------------------------------------------ request build


def build_request(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    """Our task and payload (names from the seeds) as a SenseTime family and request body.

    Raises ``InvalidInput`` naming the field for anything the seed's limits refuse, before any
    request is sent.
    """
    builder = _BUILDERS.get(task)
    if builder is None:
        raise InvalidInput(f"SenseTime serves no task {task!r}", field="task")
    return builder(payload, options)


def _model_id(payload: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    model = payload.get("model") or options.get("model_id")
    if not model:
        raise InvalidInput("SenseTime needs a model_id (route option or payload 'model')", field="model")
    return str(model)


def _public_url(payload: Mapping[str, Any], name: str) -> str:
    # SenseTime fetches inputs itself ("必须是公开可访"): data: URIs and asset:// ids must be
    # turned into public URLs of ours before the submit.
    value = require(payload, name)
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise InvalidInput(f"'{name}' must be a public http(s) URL for SenseTime", field=name)
    return value


def _common(body: dict, payload: Mapping[str, Any], options: Mapping[str, Any], *, png: bool = False) -> dict:
    fmt = str(payload.get("format") or options.get("format") or "").lower()
    # SenseTime writes JPG or PNG only; webp is requested as PNG (lossless) and re-encoded by us.
    if png or fmt in ("png", "webp"):
        body["format"] = "PNG"
    elif fmt in ("jpg", "jpeg"):
        body["format"] = "JPG"
    if payload.get("watermark") or options.get("watermark_type"):
        # "Default" is SenseTime's own "图片由 AI 生成" label, the closest to our visible label.
        body["watermark_config"] = {"type": options.get("watermark_type", "Default")}
    return body


def _put(body: dict, payload: Mapping[str, Any], ours: str, theirs: str | None = None) -> None:
    if payload.get(ours) is not None:
        body[theirs or ours] = payload[ours]


def _diffusion_params(body: dict, payload: Mapping[str, Any], *, seed_max: int) -> None:
    check_range(payload, "cfg_scale", 1, 20)
    check_range(payload, "steps", 0, 70, low_open=True)
    check_range(payload, "samples", 1, 8)
    check_range(payload, "seed", 0, seed_max - 1)
    _put(body, payload, "negative_prompt", "neg_prompt")
    for name in ("cfg_scale", "steps", "samples", "seed"):
        _put(body, payload, name)


def _build_generate(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    prompt = require(payload, "prompt")
    if len(prompt) > 2000:
        raise InvalidInput("'prompt' must be at most 2000 characters", field="prompt")
    body: dict[str, Any] = {"model_id": _model_id(payload, options), "prompt": prompt}
    _diffusion_params(body, payload, seed_max=99999999)
    for side in ("width", "height"):
        check_range(payload, side, 640, 6000)
        _put(body, payload, side)
    if payload.get("image_url"):
        body["img_url"] = _public_url(payload, "image_url")
        check_range(payload, "image_strength", 0, 1)
        _put(body, payload, "image_strength")
    loras = payload.get("loras") or []
    if loras:
        body["lora_configs"] = [_lora(item) for item in loras]
    for name in ("force_translation", "add_prompt", "controlnet_configs"):
        if name in options:
            body[name] = options[name]
    return "imgenstd", _common(body, payload, options)


def _lora(item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        return {"model_id": item}
    if isinstance(item, Mapping) and (item.get("model_id") or item.get("id")):
        lora: dict[str, Any] = {"model_id": str(item.get("model_id") or item.get("id"))}
        weight = item.get("merge_weight", item.get("weight"))
        if weight is not None:
            if not 0 < float(weight) < 2:
                raise InvalidInput("a LoRA weight must be in (0, 2)", field="loras")
            lora["merge_weight"] = float(weight)
        return lora
    raise InvalidInput("each LoRA is a model id or {'model_id', 'weight'}", field="loras")


def _build_faceswap(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    faces = [{"url": _public_url(payload, "source_url"), "index": 0, "base_index": 0}]
    return "face.imggen", _faceswap_body(payload, options, faces)


def _build_faceswap_multi(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    sources = require(payload, "source_urls")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise InvalidInput("'source_urls' must be a list of URLs", field="source_urls")
    swap = list(payload.get("swap_faces_index") or range(len(sources)))
    target = list(payload.get("target_faces_index") or range(len(swap)))
    if len(swap) != len(target):
        raise InvalidInput(
            "'swap_faces_index' and 'target_faces_index' differ in length", field="target_faces_index"
        )
    # "目前换脸接口最多支持换4张人脸"
    if len(target) > 4:
        raise InvalidInput("SenseTime swaps at most 4 faces", field="target_faces_index")
    faces = []
    for i, (index, base_index) in enumerate(zip(swap, target, strict=True)):
        url = sources[i] if i < len(sources) else sources[-1]
        if not url.startswith(("http://", "https://")):
            raise InvalidInput("'source_urls' must be public http(s) URLs for SenseTime", field="source_urls")
        faces.append({"url": url, "index": int(index), "base_index": int(base_index)})
    return "face.imggen", _faceswap_body(payload, options, faces)


def _faceswap_body(payload: Mapping[str, Any], options: Mapping[str, Any], faces: list[dict]) -> dict:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "base_img": {"url": _public_url(payload, "target_url")},
        "faces": faces,
    }
    for name in ("dino_scale", "guidance_scale", "prompt"):
        if name in options:
            body[name] = options[name]
    return _common(body, payload, options)


def _build_face_detect(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    return "face.detect", {
        "img_url": _public_url(payload, "image_url"),
        "type": options.get("type", "normal"),
    }


def _build_remove_object(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    # The mask goes through as is: the platform's mask convention is SenseTime's (black = area to
    # erase), see seeds/README.md.
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
        "mask_img_url": _public_url(payload, "mask_url"),
    }
    check_range(payload, "samples", 1, 8)
    _put(body, payload, "samples")
    if "mask_type" in options:
        body["mask_type"] = options["mask_type"]
    return "erase", _common(body, payload, options)


def _build_outpaint(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
    }
    check_range(payload, "ratio", 1.0, 5.0, low_open=True)
    check_range(payload, "samples", 1, 8)
    _put(body, payload, "ratio", "outpaint_ratio")
    _put(body, payload, "samples")
    for side in ("width", "height"):
        check_range(payload, side, 640, 6000)
        _put(body, payload, side)
    align = payload.get("align")
    if align is not None:
        align = _ALIGN_ALIASES.get(str(align).lower().replace("-", "").replace("_", ""), str(align).lower())
        if align not in _ALIGN:
            raise InvalidInput(f"'align' must be one of {sorted(_ALIGN)}", field="align")
        body["align_position"] = align
    return "outpaint", _common(body, payload, options)


def _build_inpaint(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
        "mask_img_url": _public_url(payload, "mask_url"),
        "prompt": require(payload, "prompt"),
    }
    check_range(payload, "strength", 0.1, 1)
    _put(body, payload, "strength", "repaint_strength")
    _diffusion_params(body, payload, seed_max=9999999)
    return "inpaint", _common(body, payload, options)


def _build_upscale(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
    }
    # hd_ratio is (1.0, 3.0]; our scale goes to 4, so a route must send larger scales elsewhere.
    check_range(payload, "scale", 1.0, 3.0, low_open=True)
    _put(body, payload, "scale", "hd_ratio")
    return "sup_res", _common(body, payload, options)


def _build_remove_background(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
    }
    # PNG keeps the alpha channel the task exists for ("JPG不带透明通道").
    return "split", _common(body, payload, options, png=True)


def _build_stylize(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, dict]:
    body: dict[str, Any] = {
        "model_id": _model_id(payload, options),
        "img_url": _public_url(payload, "image_url"),
    }
    check_range(payload, "samples", 1, 8)
    _put(body, payload, "samples")
    if (payload.get("width") is None) != (payload.get("height") is None):
        raise InvalidInput("'width' and 'height' go together for stylization", field="width")
    for side in ("width", "height"):
        check_range(payload, side, 640, 6000)
        _put(body, payload, side)
    return "stylization", _common(body, payload, options)


_BUILDERS = {
    "generate": _build_generate,
    "faceswap": _build_faceswap,
    "faceswap_multi": _build_faceswap_multi,
    "face_detect": _build_face_detect,
    "remove_object": _build_remove_object,
    "outpaint": _build_outpaint,
    "inpaint": _build_inpaint,
    "upscale": _build_upscale,
    "remove_background": _build_remove_background,
    "stylize": _build_stylize,
}
SUPPORTED_TASKS = frozenset(_BUILDERS)


# ------------------------------------------------------------------------------- result parse


def _to_result(remote_id: str, family: _Family, body: Mapping[str, Any]) -> RemoteResult:
    if family.shape == "faceswap":
        return _faceswap_result(remote_id, body)
    if family.shape == "detect":
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
    if _int(task.get("state")) != 1:
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
    if _int(body.get("state")) != 1:
        return RemoteResult(remote_id, RemoteStatus.RUNNING, raw=raw)
    faces = [
        {"index": face.get("index"), "box": face.get("coords")}
        for face in body.get("faces") or []
        if isinstance(face, Mapping)
    ]
    return RemoteResult(remote_id, RemoteStatus.SUCCEEDED, data={"faces": faces}, raw=raw)


def _not_found(remote_id: str) -> RemoteResult:
    return RemoteResult(
        remote_id,
        RemoteStatus.FAILED,
        error_code="remote_not_found",
        error_message="SenseTime does not know this task",
        provider_code="404",
    )


def _code(error: Mapping[str, Any]) -> int | None:
    return _int(error.get("code"))


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _path_id(task_id: str) -> str:
    return quote(task_id, safe="")
