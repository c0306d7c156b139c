"""Clients of the remote providers a route can hand a task to (pure: requests, no Celery).

The ``cpu``-queue tasks build a client from settings with ``build_client``, then:

1. ``remote_id = client.submit(task, payload, idempotency_key=..., options=route_options)`` and
   store ``remote_id`` on the job before the first poll (it is an opaque string);
2. ``client.poll(remote_id)`` or ``client.poll_many(ids)`` (``client.max_batch`` ids per call)
   until ``result.final``;
3. ``client.fetch_output(output)`` for each ``result.outputs`` entry, into our storage.

See ``inference.remote.base`` for how retryable, rejected and permanent failures are signalled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inference.remote.base import (
    DEFAULT_MAX_OUTPUT_BYTES,
    HttpClient,
    InvalidWebhookSignature,
    ProviderAuthError,
    ProviderError,
    ProviderException,
    ProviderRejected,
    ProviderRetryableError,
    RemoteOutput,
    RemoteProvider,
    RemoteResult,
    RemoteStatus,
    idempotency_key_for_job,
)
from inference.remote.limits import INPUT_SIZES
from inference.remote.sensetime import SenseTimeClient
from inference.remote.upstream import UpstreamClient
from inference.remote.volcengine import VolcengineClient, VolcengineSigner
from inference.remote.zhinian import ZhinianClient, verify_webhook_signature

PROVIDERS: dict[str, type[HttpClient]] = {
    "sensetime": SenseTimeClient,
    "volcengine": VolcengineClient,
    "zhinian": ZhinianClient,
    "upstream": UpstreamClient,
}


def build_client(kind: str, **settings: Any) -> RemoteProvider:
    """A client of provider ``kind`` from keyword settings (base_url, credentials, timeouts)."""
    try:
        cls = PROVIDERS[kind]
    except KeyError:
        raise ValueError(f"unknown remote provider {kind!r}; one of {sorted(PROVIDERS)}") from None
    # Every client is an HttpClient that adds submit (the base has none): the protocol holds.
    return cls(**settings)  # type: ignore[return-value]


def check_limits(kind: str, task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """Provider ``kind``'s own limits on our payload (``inference.remote.limits``): ``InvalidInput``
    naming our field and the provider's limit; pure, so the API asks it without a client."""
    try:
        cls = PROVIDERS[kind]
    except KeyError:
        raise ValueError(f"unknown remote provider {kind!r}; one of {sorted(PROVIDERS)}") from None
    cls.check_limits(task, payload, options)


__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "INPUT_SIZES",
    "PROVIDERS",
    "InvalidWebhookSignature",
    "ProviderAuthError",
    "ProviderError",
    "ProviderException",
    "ProviderRejected",
    "ProviderRetryableError",
    "RemoteOutput",
    "RemoteProvider",
    "RemoteResult",
    "RemoteStatus",
    "SenseTimeClient",
    "UpstreamClient",
    "VolcengineClient",
    "VolcengineSigner",
    "ZhinianClient",
    "build_client",
    "check_limits",
    "idempotency_key_for_job",
    "verify_webhook_signature",
]
