"""What the client raises: one class per kind of answer a script handles differently.

Every error the API answers carries ``{"error": {"code", "message", "details"?}}``; ``ApiError``
keeps all three and the HTTP status, and ``error_for`` picks the subclass by status, so a script
can ``except NotFound`` or ``except RateLimited`` without reading numbers.
"""

from __future__ import annotations

from typing import Any


class AiorchError(Exception):
    """Base of everything this package raises."""


class TransportError(AiorchError):
    """The server could not be reached (refused, reset, timed out), after the retries."""


class WaitTimeout(AiorchError, TimeoutError):
    """``wait`` ran out of time; ``jobs`` holds the latest object of every job still not final."""

    def __init__(self, message: str, jobs: list[dict[str, Any]]):
        super().__init__(message)
        self.jobs = jobs


class ApiError(AiorchError):
    """An error answer of the API."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


class BadRequest(ApiError):
    """400: the request is malformed."""


class Unauthorized(ApiError):
    """401: no key, or a key the server does not know."""


class Forbidden(ApiError):
    """403: the key may not do this."""


class NotFound(ApiError):
    """404: no such job or asset, or not yours."""


class Conflict(ApiError):
    """409: e.g. cancelling a finished job, or an Idempotency-Key reused with another body."""


class PayloadTooLarge(ApiError):
    """413: an input over the byte limit, or over the storage quota (``code`` says which)."""


class ValidationFailed(ApiError):
    """422: invalid fields; ``details`` names them."""


class RateLimited(ApiError):
    """429: over a per-client limit; still so after the client's bounded retries."""


class ServerError(ApiError):
    """5xx other than 503."""


class ServiceUnavailable(ServerError):
    """503: a dependency of the server is down; still so after the retries."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_for(status: int, body: Any, headers: dict[str, str] | None = None) -> ApiError:
    """The exception for an error answer; a body not in the API's shape (a proxy's HTML page)
    still gives a code and a message."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or "error")
        message = str(error.get("message") or "")
        details = error.get("details")
    else:
        code, message, details = f"http_{status}", f"HTTP {status} without an API error body", None
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(status, code, message, details, headers)


class JobFailed(AiorchError):
    """A job ended in another status than ``succeeded`` where its output was needed; ``job`` is
    its final object (``job["error"]`` says why)."""

    def __init__(self, job: dict[str, Any]):
        error = job.get("error") or {}
        why = error.get("message") if isinstance(error, dict) else str(error)
        super().__init__(f"job {job.get('job_id')} {job.get('status')}" + (f": {why}" if why else ""))
        self.job = job
