"""Client for another aiorch (or AHV-compatible) instance, so instances can federate.

It speaks the public contract of seed 000 / ARCHITECTURE.md: ``X-API-Key``, ``POST /v1/jobs``
with ``task`` + ``payload`` (+ ``Idempotency-Key``), ``GET /v1/jobs/<id>``, the batch look-up
``GET /v1/jobs?ids=a,b,c`` (up to 50), ``POST /v1/jobs/<id>/cancel``, and errors shaped
``{"error": {"code", "message", "details"}}``. Statuses are ours already, so they map one to one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urljoin

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
    chunked,
)

MAX_BATCH = 50


class UpstreamClient(HttpClient):
    """Submit, poll (one or 50 at a time), cancel and download jobs of an upstream aiorch."""

    name = "upstream"
    max_batch = MAX_BATCH
    # Another aiorch/AHV instance serves ahv_video itself (seed 000's POST /ahv/video).
    makes_video = True

    def __init__(self, *, base_url: str, api_key: str, name: str | None = None, **kwargs: Any):
        super().__init__(base_url, **kwargs)
        self._api_key = Secret(api_key)
        # Several upstreams may be configured; the name tells them apart in errors and logs.
        if name:
            self.name = name

    def _auth_headers(self) -> dict[str, str]:
        return {"X-API-Key": self._api_key.reveal()}

    def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[requests.Response, Any]:
        response = self._send(
            method,
            self.base_url + path,
            json=json_body,
            params=params,
            headers={**self._auth_headers(), **dict(headers or {})},
        )
        if response.status_code < 400:
            return response, (self._json(response) if response.content else None)
        self._raise_error(response)
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise_error(self, response: requests.Response) -> None:
        status = response.status_code
        code, message = None, f"HTTP {status}"
        try:
            error = response.json().get("error")
            if isinstance(error, Mapping):
                code, message = error.get("code"), str(error.get("message") or message)
        except (ValueError, AttributeError):
            pass
        kwargs: ProviderErrorContext = {
            "provider": self.name,
            "provider_code": code or status,
            "http_status": status,
        }
        if status == 401:
            raise ProviderAuthError(message, **kwargs)
        if status in (429, 503) or status >= 500:
            raise self._retryable_http(
                response, message, code="provider_rate_limited" if status == 429 else "provider_unavailable"
            )
        if status == 409:
            raise ProviderError(message, code="remote_conflict", **kwargs)
        if status == 404:
            raise ProviderError(message, code="remote_not_found", **kwargs)
        raise ProviderError(
            message, code="invalid_input" if status in (400, 413, 422) else "provider_error", **kwargs
        )

    # -- submit -----------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> str:
        """Create the job upstream; returns its ``job_id`` (the remote id to store).

        ``options``: ``task`` (the upstream's name for it, e.g. an alias), ``webhook_url``,
        ``priority``, ``metadata``. The idempotency key makes a retried submit return the same job.
        """
        options = options or {}
        if not task:
            raise InvalidInput("a task name is required", field="task")
        body: dict[str, Any] = {"task": options.get("task") or task, "payload": dict(payload)}
        for name in ("webhook_url", "priority", "metadata"):
            if options.get(name) is not None:
                body[name] = options[name]
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        _, job = self._call("POST", "/v1/jobs", json_body=body, headers=headers)
        if not isinstance(job, Mapping) or not job.get("job_id"):
            raise ProviderRetryableError(
                "create answered without job_id", provider=self.name, code="provider_bad_response"
            )
        status = (
            RemoteStatus(job["status"]) if job.get("status") in RemoteStatus.__members__.values() else None
        )
        if status is RemoteStatus.REJECTED:
            # An upstream that refuses the content at once answers with a rejected job.
            raise ProviderRejected(_error_message(job) or "content refused upstream", provider=self.name)
        return str(RemoteRef(str(job["job_id"])))

    # -- poll -------------------------------------------------------------------------------

    def poll(self, remote_id: str) -> RemoteResult:
        job_id = RemoteRef.parse(remote_id).id
        try:
            _, job = self._call("GET", f"/v1/jobs/{quote(job_id, safe='')}")
        except ProviderError as exc:
            if exc.code != "remote_not_found":
                raise
            return RemoteResult(
                remote_id,
                RemoteStatus.FAILED,
                error_code="remote_not_found",
                provider_code="404",
                error_message=str(exc.args[0]),
            )
        if not isinstance(job, Mapping):
            raise ProviderRetryableError(
                "job answer is not an object", provider=self.name, code="provider_bad_response"
            )
        return self.job_result(remote_id, job)

    def poll_many(self, remote_ids: Sequence[str]) -> dict[str, RemoteResult]:
        """``GET /v1/jobs?ids=...`` in chunks of 50; ids the upstream no longer has come back failed."""
        wanted = {RemoteRef.parse(remote_id).id: remote_id for remote_id in dict.fromkeys(remote_ids)}
        results: dict[str, RemoteResult] = {}
        for chunk in chunked(list(wanted), MAX_BATCH):
            _, answer = self._call("GET", "/v1/jobs", params={"ids": ",".join(chunk)})
            jobs = answer.get("jobs") if isinstance(answer, Mapping) else None
            if not isinstance(jobs, list):
                raise ProviderRetryableError(
                    "batch answer has no jobs list", provider=self.name, code="provider_bad_response"
                )
            for job in jobs:
                remote_id = wanted.get(str(job.get("job_id")))
                if remote_id is not None:
                    results[remote_id] = self.job_result(remote_id, job)
        for remote_id in wanted.values():
            if remote_id not in results:
                # A batch look-up leaves out ids it cannot see (deleted, or another client's).
                results[remote_id] = RemoteResult(
                    remote_id,
                    RemoteStatus.FAILED,
                    error_code="remote_not_found",
                    error_message="the upstream no longer has this job",
                )
        return results

    def job_result(self, remote_id: str, job: Mapping[str, Any]) -> RemoteResult:
        """An upstream job object as a ``RemoteResult``."""
        raw = dict(job)
        try:
            status = RemoteStatus(str(job.get("status")))
        except ValueError:
            return RemoteResult(remote_id, RemoteStatus.RUNNING, raw=raw)
        progress = job.get("progress") if isinstance(job.get("progress"), int | float) else None
        if status is RemoteStatus.SUCCEEDED:
            found = job.get("result")
            result: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
            outputs = self._outputs(result)
            data = None if outputs else {k: v for k, v in result.items() if k not in ("ok", "status")}
            if not outputs and not data:
                return RemoteResult(
                    remote_id,
                    RemoteStatus.FAILED,
                    error_code="remote_failed",
                    error_message="the upstream job succeeded without a result",
                    raw=raw,
                )
            return RemoteResult(remote_id, status, outputs=outputs, data=data, progress=100.0, raw=raw)
        if status.final:
            found = job.get("error")
            error: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
            return RemoteResult(
                remote_id,
                status,
                error_code="content_rejected"
                if status is RemoteStatus.REJECTED
                else f"remote_{status.value}",
                provider_code=str(error.get("code") or status.value),
                error_message=_error_message(job) or f"the upstream job is {status.value}",
                raw=raw,
            )
        return RemoteResult(remote_id, status, progress=progress, raw=raw)

    def _outputs(self, result: Mapping[str, Any]) -> tuple[RemoteOutput, ...]:
        files = result.get("files") if isinstance(result.get("files"), list) else None
        entries = files or ([result] if result.get("url") else [])
        # Relative URLs are resolved against the upstream; /files/<name> needs no key (seed 000).
        return tuple(
            RemoteOutput(
                url=urljoin(self.base_url + "/", str(entry["url"])),
                meta={"filename": entry.get("filename"), **dict(entry.get("meta") or {})},
            )
            for entry in entries
            if isinstance(entry, Mapping) and entry.get("url")
        )

    # -- cancel -----------------------------------------------------------------------------

    def cancel(self, remote_id: str) -> bool:
        """Ask the upstream to cancel; False when it had already finished (409) or is gone (404)."""
        job_id = RemoteRef.parse(remote_id).id
        try:
            self._call("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel")
        except ProviderError as exc:
            if exc.code in ("remote_conflict", "remote_not_found"):
                return False
            raise
        return True


def _error_message(job: Mapping[str, Any]) -> str | None:
    error = job.get("error")
    if isinstance(error, Mapping):
        return str(error.get("message") or error.get("code") or "") or None
    return str(error) if error else None
