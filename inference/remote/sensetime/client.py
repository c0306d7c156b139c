"""The SenseTime Miaohua client: auth, calls and error mapping, submit, poll, model listings.

Auth is a JWT (HS256) signed with the secret key, ``iss`` = access key, with ``exp``/``nbf``; the
client mints one and re-mints it shortly before it expires. Error bodies are ``{"error": {"code",
"message", "details"}}``; the codes are mapped in ``_raise_error`` (16 auth -> permanent, 8 rate
limit -> retry later, 18 sensitive -> rejected).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jwt
import requests

from inference.remote.base import (
    HttpClient,
    ProviderAuthError,
    ProviderError,
    ProviderErrorContext,
    ProviderRejected,
    ProviderRetryableError,
    RemoteRef,
    RemoteResult,
    Secret,
    chunked,
)
from inference.remote.sensetime.bodies import build_request
from inference.remote.sensetime.limits import check_limits
from inference.remote.sensetime.results import as_int, not_found, to_result

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


@dataclass(frozen=True)
class _Family:
    """One capability's endpoints. ``batch`` is None where the seed documents no batch look-up,
    ``cancel`` where it documents no cancel (every capability but LoRA training)."""

    submit: str
    result: str
    batch: str | None
    shape: str = "images"  # images | faceswap | detect | lora
    cancel: str | None = None


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
    "lora": _Family("/v1/lora/train", "/v1/lora/result/{}", "/v1/lora/results", "lora", "/v1/lora/cancel"),
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


@dataclass(frozen=True)
class ModelPage:
    data: list[dict[str, Any]]
    have_next: bool


class SenseTimeClient(HttpClient):
    """Submit, poll and download SenseTime Miaohua jobs; list its models."""

    name = "sensetime"
    max_batch = MAX_BATCH
    check_limits = staticmethod(check_limits)

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
        check_limits(task, payload, options or {})
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
            return not_found(remote_id)
        return to_result(remote_id, family.shape, body)

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
                        results[answered_id] = to_result(answered_id, family.shape, item)
        # An id the batch answer left out is asked about alone, so it gets a definite answer
        # (a 404 becomes a failed result) instead of silently never finishing.
        for remote_id in remote_ids:
            if remote_id not in results:
                results[remote_id] = self.poll(remote_id)
        return results

    # -- cancel -----------------------------------------------------------------------------

    def cancel(self, remote_id: str) -> bool:
        """Ask SenseTime to drop a job; True when it did.

        Only LoRA training has a cancel (``/v1/lora/cancel``), and only while the training waits
        ("等待状态才能被取消"): a training already running answers ``success: false`` and goes on
        at SenseTime. Every other capability has none, so nothing is sent for it.
        """
        ref, family = self._parse(remote_id)
        if family.cancel is None:
            return False
        answer = self._call("POST", family.cancel, json={"task_id": ref.id})
        return isinstance(answer, dict) and answer.get("success") is True

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


def _code(error: Mapping[str, Any]) -> int | None:
    return as_int(error.get("code"))


def _path_id(task_id: str) -> str:
    return quote(task_id, safe="")
