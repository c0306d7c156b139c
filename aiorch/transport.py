"""HTTP to one aiorch server: the key, timeouts, error mapping and bounded retries.

Retried: connection errors (refused, reset, timed out) and ``429``/``503`` answers, honouring
``Retry-After``. Bounded twice: at most ``retries`` retries per request, and a ``Retry-After``
longer than ``max_retry_wait`` is not waited out but raised (``RateLimited`` with ``headers``),
so a script never sleeps for an hour it did not ask for. Retrying a POST is safe because the
client sends every job-creating POST with an idempotency key.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from aiorch.errors import TransportError, error_for

RETRY_STATUSES = frozenset({429, 503})
USER_AGENT = "aiorch-client/1"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Transport:
    """A ``requests.Session`` bound to one server and key; safe to share between threads
    (``requests`` sessions are, for plain request/response use)."""

    def __init__(
        self,
        url: str,
        key: str | None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_wait: float = 120.0,
    ):
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_wait = max_retry_wait
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        # Enough pooled connections for the CLI's download and upload threads.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._origin = urlsplit(self.url)[:2]
        self._lock = threading.Lock()
        self.retried = 0  # retries made, all requests together (tests and the CLI's summary read it)

    def close(self) -> None:
        self.session.close()

    def auth_headers(self, url: str) -> dict[str, str]:
        """The key, only for this server: an output URL on another host never sees it."""
        if self.key and urlsplit(url)[:2] == self._origin:
            return {"X-API-Key": self.key}
        return {}

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter for the ``attempt``-th retry (0-based)."""
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        files: Any = None,
        stream: bool = False,
        timeout: float | tuple[float, float] | None = None,
        retries: int | None = None,
    ) -> requests.Response:
        """One API call; ``path`` is relative to the server (``/v1/jobs``) or a full URL.

        Returns the response of a 2xx/3xx answer; raises the ``ApiError`` subclass of an error
        answer, or ``TransportError`` when the server stayed unreachable."""
        url = path if "://" in path else self.url + path
        sent_headers = {**self.auth_headers(url), **(headers or {})}
        limit = self.retries if retries is None else retries
        attempt = 0
        while True:
            try:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    json=json,
                    files=files,
                    headers=sent_headers,
                    stream=stream,
                    timeout=timeout if timeout is not None else self.timeout,
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt >= limit:
                    raise TransportError(f"{method} {url}: {_reason(exc)}") from exc
                wait = self.delay(attempt)
            else:
                if response.status_code < 400:
                    return response
                if response.status_code not in RETRY_STATUSES or attempt >= limit:
                    raise self._error(response)
                told = retry_after_seconds(response.headers.get("Retry-After"))
                if told is not None and told > self.max_retry_wait:
                    raise self._error(response)
                wait = told if told is not None else self.delay(attempt)
                response.close()
            with self._lock:
                self.retried += 1
            time.sleep(wait)
            attempt += 1

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    @staticmethod
    def _error(response: requests.Response) -> Exception:
        try:
            body = response.json()
        except ValueError:
            body = None
        return error_for(response.status_code, body, dict(response.headers))


def _reason(exc: requests.RequestException) -> str:
    """The last words of what went wrong ("[Errno 111] Connection refused", "Read timed out."),
    without the pool and retry wrappers around them."""
    inner = exc.args[0] if exc.args else exc
    reason = getattr(inner, "reason", inner)
    return str(reason).rsplit("): ", 1)[-1].strip(" )\"'") or exc.__class__.__name__
