"""What every remote provider client shares: statuses, results, errors and the HTTP plumbing.

A client is pure: it turns one of our tasks (``generate``, ``faceswap``, ...) and its payload into
the provider's request, and the provider's answers into a ``RemoteResult``. It never touches the
database, the broker or the settings; the ``cpu``-queue tasks around it store the ``remote_id``
that ``submit`` returns, poll it later (in another process, after a restart) and download the
outputs.

How failures are signalled, so the task can pick the next step without reading provider codes:

* ``ProviderRetryableError`` (timeouts, connection errors, 5xx, rate limits; ``retry_after`` in
  seconds when known): poll again later, or fall through to the next backend of the route.
* ``ProviderRejected`` (a content-risk refusal at submit): the job ends ``rejected`` and never
  falls through. It is an ``inference.base.ContentRejected``.
* ``ProviderError`` (bad credentials, invalid parameters, a refused idempotency key, ...): the job
  fails. It is an ``inference.base.EngineError``, so adapters treat it like an engine failure.

A remote job that *ended* badly is not an exception: ``poll`` returns a final ``RemoteResult``
whose ``status`` is ``failed``/``rejected``/``expired``/``cancelled`` with ``error_code`` set.
"""

from __future__ import annotations

import email.utils
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypedDict, runtime_checkable
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import requests
from requests.adapters import HTTPAdapter

from inference.base import ContentRejected, EngineError, InvalidInput

log = logging.getLogger(__name__)

# Output downloads are bounded so a broken or hostile provider cannot fill the worker's disk or
# memory; the task adapter still runs the platform's own format and pixel checks on the bytes.
DEFAULT_MAX_OUTPUT_BYTES = 50 * 1024 * 1024


class RemoteStatus(StrEnum):
    """A remote job's status in our vocabulary (the values are ``models.state.JobStatus`` values)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self not in (RemoteStatus.QUEUED, RemoteStatus.RUNNING)


@dataclass(frozen=True)
class RemoteOutput:
    """One output of a remote job: inline bytes, or a URL to download with ``fetch_output``.

    ``authenticated`` URLs belong to the provider's own API (Zhinian asset downloads) and need the
    client's credentials; every other URL (signed storage links, ``/files/...``) is fetched with
    no credentials at all, so a key is never handed to a third-party host.
    """

    url: str | None = None
    data: bytes | None = field(default=None, repr=False)
    authenticated: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RemoteResult:
    """A remote job as one poll saw it."""

    remote_id: str
    status: RemoteStatus
    outputs: tuple[RemoteOutput, ...] = ()
    # JSON tasks (face detection) put their answer here instead of in outputs.
    data: Mapping[str, Any] | None = None
    # Our snake_case code (``content_rejected``, ``remote_failed``, ...) and the provider's own.
    error_code: str | None = None
    error_message: str | None = None
    provider_code: str | None = None
    progress: float | None = None
    # What the provider says beside its percentage (a training's fraction done), kept on the job
    # as its ``progress_detail``; None: nothing to say.
    progress_detail: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def final(self) -> bool:
        return self.status.final

    def raise_for_outcome(self, provider: str) -> None:
        """Raise the exception a failed/rejected final result stands for (no-op otherwise)."""
        if self.status is RemoteStatus.REJECTED:
            raise ProviderRejected(
                self.error_message or "the provider refused the content",
                provider=provider,
                provider_code=self.provider_code,
            )
        if self.status in (RemoteStatus.FAILED, RemoteStatus.EXPIRED, RemoteStatus.CANCELLED):
            raise ProviderError(
                self.error_message or f"remote job ended {self.status.value}",
                provider=provider,
                code=self.error_code or f"remote_{self.status.value}",
                provider_code=self.provider_code,
            )


# --------------------------------------------------------------------------------------- errors


class ProviderErrorContext(TypedDict):
    """The keyword arguments a client's error mapper passes to every error it may raise."""

    provider: str
    provider_code: str | int | None
    http_status: int | None


class ProviderException(Exception):
    """Base of every error a remote client raises; carries the provider and its raw code."""

    code = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        code: str | None = None,
        provider_code: str | int | None = None,
        http_status: int | None = None,
    ):
        # Not a cooperative super().__init__: EngineError's signature differs, and these few
        # attributes are all it would set.
        Exception.__init__(self, message)
        if code is not None:
            self.code = code
        self.field: str | None = None
        self.provider = provider
        self.provider_code = None if provider_code is None else str(provider_code)
        self.http_status = http_status

    def __str__(self) -> str:
        return f"{self.provider}: {self.args[0]}" if self.args else self.provider


class ProviderError(ProviderException, EngineError):
    """A permanent failure: retrying the same request cannot help, the job fails."""

    code = "provider_error"


class ProviderAuthError(ProviderError):
    """The provider refused our credentials (wrong key or signature, expired token)."""

    code = "provider_auth_failed"


class ProviderRejected(ProviderException, ContentRejected):
    """The provider's content-risk check refused the input or the output: the job is ``rejected``."""

    code = "content_rejected"


class ProviderRetryableError(ProviderException):
    """A transient failure: try again after ``retry_after`` seconds (when known), or fall through."""

    code = "provider_unavailable"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class InvalidWebhookSignature(ValueError):
    """A webhook body whose signature does not match: refuse it (HTTP 401 at our endpoint)."""


# ------------------------------------------------------------------------------------- protocol


@runtime_checkable
class RemoteProvider(Protocol):
    """What the submit and poll tasks call. ``remote_id`` strings are opaque: store them as they are."""

    name: str
    # How many ids one ``poll_many`` HTTP call may carry (1 where the provider has no batch look-up).
    max_batch: int

    def submit(
        self,
        task: str,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> str: ...

    def poll(self, remote_id: str) -> RemoteResult: ...

    def poll_many(self, remote_ids: Sequence[str]) -> dict[str, RemoteResult]: ...

    def fetch_output(self, output: RemoteOutput, *, max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> bytes: ...

    def cancel(self, remote_id: str) -> bool: ...

    def close(self) -> None: ...

    # The provider's own limits on our payload (``inference.remote.limits``), before any request.
    @staticmethod
    def check_limits(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> None: ...


def idempotency_key_for_job(job_id: str, provider: str) -> str:
    """The Idempotency-Key a submit of our job ``job_id`` sends to ``provider``.

    Derived, not random, so a submit retried after a crash or a lost response sends the same key
    and the provider answers with the job it already created instead of starting a second one.
    """
    return f"aiorch-{provider}-{job_id}"


# ------------------------------------------------------------------------------- remote ids


@dataclass(frozen=True)
class RemoteRef:
    """A provider's job id plus what a later poll needs to find it again (endpoint, req_key, ...).

    Encoded as one string, ``<quoted id>?<sorted query>``, so the task stores a single column and a
    worker that restarts can poll without the original payload.
    """

    id: str
    context: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        head = quote(self.id, safe="")
        if not self.context:
            return head
        return head + "?" + urlencode(sorted(self.context.items()))

    @classmethod
    def parse(cls, value: str) -> RemoteRef:
        head, _, query = value.partition("?")
        if not head:
            raise ValueError(f"not a remote id: {value!r}")
        return cls(unquote(head), dict(parse_qsl(query, keep_blank_values=True)))


# ----------------------------------------------------------------------------------- helpers


class Secret:
    """A credential that never shows in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        if not isinstance(value, str) or not value:
            raise ValueError("a credential must be a non-empty string")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def chunked(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def require(payload: Mapping[str, Any], name: str) -> Any:
    """A required payload field, or ``InvalidInput`` naming it (before any request is sent)."""
    value = payload.get(name)
    if value is None or value == "" or value == []:
        raise InvalidInput(f"'{name}' is required", field=name)
    return value


class _TlsContextAdapter(HTTPAdapter):
    """An adapter whose https connections use a given TLS context (extra CA certificates).

    requests still adds its own CA bundle to the context for ``verify=True``: the extra CAs are
    trusted besides the usual ones, never instead of them.
    """

    def __init__(self, ssl_context: ssl.SSLContext, **kwargs: Any):
        self._ssl_context = ssl_context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)


class HttpClient:
    """The requests plumbing every client shares: one session, explicit timeouts, error mapping.

    Subclasses set ``name`` and implement ``_raise_for_response`` for the provider's error body;
    transport failures (timeouts, refused connections) are mapped here, once.
    """

    name = "remote"
    max_batch = 1
    # Whether the provider can generate video (``ahv_video``); a route skips the ones that cannot.
    makes_video = False

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        session: requests.Session | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"{self.name}: base_url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout, read_timeout)
        # Seconds every request must fit in while a caller's ``time_budget`` is open (None: none).
        self._budget_ends: float | None = None
        self.session = session or requests.Session()
        if ssl_context is not None:
            # The operator's AIORCH_CA_BUNDLE (a provider behind a private CA), passed in by the
            # task that builds the client.
            self.session.mount("https://", _TlsContextAdapter(ssl_context))
        # Injected so token refresh and 12-hour expiry are testable without waiting.
        self.clock = clock

    def __repr__(self) -> str:
        # Credentials live in Secret attributes and are deliberately not listed here.
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------

    @contextmanager
    def time_budget(self, seconds: float) -> Iterator[None]:
        """Cap the connect and read timeouts of every request inside at what is left of ``seconds``.

        The submit task tries several backends within one soft time limit; each backend's
        configured timeouts are shortened so the whole route fits, and a backend that would run
        past the budget times out (retryably, so the route falls through) instead of the task.
        """
        previous = self._budget_ends
        self._budget_ends = time.monotonic() + max(0.0, seconds)
        try:
            yield
        finally:
            self._budget_ends = previous

    def _timeouts(self) -> tuple[float, float]:
        if self._budget_ends is None:
            return self.timeout
        left = self._budget_ends - time.monotonic()
        if left <= 0:
            raise ProviderRetryableError(
                "no time left in this attempt's budget", provider=self.name, code="provider_timeout"
            )
        return (min(self.timeout[0], left), min(self.timeout[1], left))

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeouts())
        try:
            response = self.session.request(method, url, **kwargs)
        except requests.Timeout as exc:
            raise ProviderRetryableError(
                f"{method} {_path(url)} timed out", provider=self.name, code="provider_timeout"
            ) from exc
        except requests.ConnectionError as exc:
            raise ProviderRetryableError(
                f"{method} {_path(url)} could not connect", provider=self.name, code="provider_unreachable"
            ) from exc
        except requests.RequestException as exc:
            raise ProviderError(
                f"{method} {_path(url)} failed: {type(exc).__name__}", provider=self.name
            ) from exc
        log.debug("%s %s %s -> %s", self.name, method, _path(url), response.status_code)
        return response

    def _json(self, response: requests.Response) -> Any:
        """The response body as JSON; garbage from a provider is transient, not our job's fault."""
        try:
            return response.json()
        except ValueError as exc:
            raise ProviderRetryableError(
                f"malformed JSON in a {response.status_code} response",
                provider=self.name,
                code="provider_bad_response",
                http_status=response.status_code,
            ) from exc

    def _retryable_http(
        self, response: requests.Response, message: str, *, default_wait: float | None = None, **kwargs: Any
    ) -> ProviderRetryableError:
        """A retryable error for this response; the provider's Retry-After wins over our default."""
        found = parse_retry_after(response.headers.get("Retry-After"))
        return ProviderRetryableError(
            message,
            provider=self.name,
            http_status=response.status_code,
            retry_after=default_wait if found is None else found,
            **kwargs,
        )

    # -- outputs ----------------------------------------------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        """Headers that authenticate a request to the provider's own API (for ``authenticated`` outputs)."""
        return {}

    def fetch_output(self, output: RemoteOutput, *, max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> bytes:
        """The bytes of one output, downloaded with a size cap (inline data is returned as is)."""
        if output.data is not None:
            if len(output.data) > max_bytes:
                raise ProviderError(
                    f"inline output is {len(output.data)} bytes, over {max_bytes}",
                    provider=self.name,
                    code="output_too_large",
                )
            return output.data
        if not output.url:
            raise ProviderError("output has neither data nor url", provider=self.name, code="output_missing")
        credentials = self._auth_headers() if output.authenticated else {}
        origin = urlsplit(output.url).netloc
        headers, url = credentials, output.url
        # Redirects are followed by hand. Credentials go to the URL we were given and nowhere
        # else: a download redirect normally names a pre-signed storage link, which must not see
        # our key (requests would carry a custom key header to any host, and object stores refuse
        # a second auth mechanism). Only a same-origin target that answers 401/403 without them
        # is asked once more with them.
        for _ in range(5):
            response = self._send("GET", url, headers=headers, stream=True, allow_redirects=False)
            if (
                response.status_code in (401, 403)
                and credentials
                and not headers
                and urlsplit(url).netloc == origin
            ):
                response.close()
                headers = credentials
                continue
            if response.is_redirect and response.headers.get("Location"):
                url = requests.compat.urljoin(url, response.headers["Location"])
                response.close()
                headers = {}
                continue
            return self._read_capped(response, max_bytes)
        raise ProviderError(
            "too many redirects downloading an output", provider=self.name, code="output_missing"
        )

    def _read_capped(self, response: requests.Response, max_bytes: int) -> bytes:
        with response:
            if response.status_code >= 500 or response.status_code == 429:
                raise self._retryable_http(
                    response, f"output download answered {response.status_code}", code="output_unavailable"
                )
            if response.status_code != 200:
                raise ProviderError(
                    f"output download answered {response.status_code}",
                    provider=self.name,
                    code="output_unavailable",
                    http_status=response.status_code,
                )
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ProviderError(
                    f"output is {declared} bytes, over {max_bytes}",
                    provider=self.name,
                    code="output_too_large",
                )
            body = bytearray()
            try:
                for chunk in response.iter_content(64 * 1024):
                    body.extend(chunk)
                    if len(body) > max_bytes:
                        raise ProviderError(
                            f"output is over {max_bytes} bytes", provider=self.name, code="output_too_large"
                        )
            except requests.RequestException as exc:
                raise ProviderRetryableError(
                    "output download broke off", provider=self.name, code="provider_timeout"
                ) from exc
            return bytes(body)

    # -- defaults for providers without the feature -----------------------------------------

    @staticmethod
    def check_limits(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        """Refuse (``InvalidInput`` naming our field) what the provider cannot take; a provider
        that takes our payload as it is (an upstream aiorch) has no limits of its own."""

    def poll(self, remote_id: str) -> RemoteResult:  # pragma: no cover - every client overrides
        raise NotImplementedError

    def poll_many(self, remote_ids: Sequence[str]) -> dict[str, RemoteResult]:
        """One poll per id, for providers with no batch look-up."""
        return {remote_id: self.poll(remote_id) for remote_id in dict.fromkeys(remote_ids)}

    def cancel(self, remote_id: str) -> bool:
        """Providers without a cancel endpoint: nothing to call, the remote job runs to its end."""
        return False


def _path(url: str) -> str:
    # Logs and messages carry the path only: query strings can hold signed tokens.
    return urlsplit(url).path or "/"
