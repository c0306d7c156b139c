"""The one mapping from an exception to the way it fails a job (``models.failures.JobFailure``).

Every path that ends a job on an exception calls ``failure_of``: preparing its inputs, running
its engine (alone or in a batch), handing it to a provider and polling it, checking what the
provider returned. No other code turns an exception into a job's ``error``. The message is the
exception's own sentence where that is written for people (an input problem, an engine's or a
provider's error), a network failure is told by ``tasks.outbound.describe_network_error``, and an
unexpected exception gets a fixed sentence: its class and text go to the log, bound to the job,
never to the client.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import urllib3
from celery.exceptions import SoftTimeLimitExceeded
from marshmallow import ValidationError
from marshmallow.schema import SCHEMA

from inference import devices
from inference.base import Cancelled, ContentRejected, EngineError
from inference.remote import ProviderException, ProviderRetryableError
from models.failures import JobFailure
from models.state import JobStatus
from tasks.inputs import FetchCancelled, InputProblem, TransientFetchError
from tasks.outbound import describe_network_error

log = logging.getLogger("aiorch.tasks")

PAYLOAD = "payload"  # ``details.field`` of an error of the payload as a whole
NETWORK_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


def failure_of(
    exc: BaseException, *, time_limit: float | None = None, provider: str | None = None
) -> JobFailure:
    """How ``exc`` fails the job.

    ``time_limit``: the soft limit (seconds) a ``SoftTimeLimitExceeded`` ran into.
    ``provider``: the exception came from that provider's side (its client, or the outputs it
    returned, which are checked like inputs) rather than from our own inputs or engine.
    """
    details: dict[str, Any]
    if isinstance(exc, InputProblem):
        if provider is not None:
            message = f"{provider} returned an unusable output: {exc.message}"
            details = {"field": exc.field, "problem": exc.code, "provider": provider}
            return JobFailure("remote_output_invalid", message, details)
        return JobFailure(exc.code, exc.message, {"field": exc.field})
    if isinstance(exc, TransientFetchError):
        return JobFailure("input_unreachable", str(exc), {"field": exc.field}, retryable=True)
    if isinstance(exc, ValidationError):
        return _invalid_payload(exc)
    if isinstance(exc, FetchCancelled):
        return JobFailure.cancelled()
    if isinstance(exc, Cancelled):
        return JobFailure.cancelled("The job was cancelled while running.")
    if isinstance(exc, ProviderException):  # before EngineError: a ProviderError is both
        details = {"provider": exc.provider}
        if exc.provider_code:
            details["provider_code"] = exc.provider_code
        status = JobStatus.REJECTED if isinstance(exc, ContentRejected) else JobStatus.FAILED
        retryable = isinstance(exc, ProviderRetryableError)
        return JobFailure(exc.code, _sentence(exc, "The provider failed."), details, retryable, status)
    if isinstance(exc, EngineError):
        details = {"field": exc.field} if exc.field else {}
        status = JobStatus.REJECTED if isinstance(exc, ContentRejected) else JobStatus.FAILED
        message = without_paths(_sentence(exc, "The engine failed on this input."))
        return JobFailure(exc.code, message, details, status=status)
    if devices.is_out_of_memory(exc):
        reason = without_paths(devices.first_line(exc, "out of memory"))
        message = f"The device ran out of memory on this job ({reason}); try a smaller size or batch."
        return JobFailure("out_of_memory", message)
    if devices.is_device_fault(exc):
        log.error("GPU fault", exc_info=exc)
        reason = without_paths(devices.first_line(exc, "CUDA error"))
        message = f"The GPU failed while running this job ({reason}); the worker process was replaced."
        return JobFailure("device_error", message)
    if isinstance(exc, SoftTimeLimitExceeded):
        limit = f"its time limit of {time_limit:g} s" if time_limit else "its time limit"
        return JobFailure("timeout", f"The job ran longer than {limit}.")
    if isinstance(exc, NETWORK_ERRORS):
        code = "provider_unreachable" if provider is not None else "network_error"
        details = {"provider": provider} if provider is not None else {}
        return JobFailure(code, describe_network_error(exc), details, retryable=True)
    # A bug (of an engine or a provider's client) fails this one job; the worker goes on.
    log.error("unexpected failure%s", f" at {provider}" if provider else "", exc_info=exc)
    if provider is not None:
        message = f"The client of provider {provider} failed unexpectedly; the worker's log has the details."
        return JobFailure("provider_error", message, {"provider": provider})
    return JobFailure("engine_error", "The engine failed unexpectedly; the worker's log has the details.")


def _sentence(exc: BaseException, default: str) -> str:
    return str(exc).strip()[:500] or default


# An absolute path (not a URL's: no ':', '/' or word character before its first slash), split into
# its folders and its last part.
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~])/(?:[^\s'\"/]+/)*([^\s'\"/]+)")


def without_paths(message: str) -> str:
    """An engine's message with absolute paths cut to their last part: a client sees which model
    file is missing, never where the platform keeps it (no response shows a filesystem path)."""
    return _ABSOLUTE_PATH.sub(r"\1", message)


def _invalid_payload(exc: ValidationError) -> JobFailure:
    """The first failing field (a dotted path, list items in brackets) names the error; every
    field's messages follow under ``details.payload``, as the API's 422 nests them."""
    messages = exc.normalized_messages()
    path, first = _first_problem(messages)
    field = path or PAYLOAD
    return JobFailure(
        "invalid_payload",
        f"The payload is invalid: {field}: {first}." if first else "The payload is invalid.",
        {"field": field, PAYLOAD: messages},
    )


def _first_problem(messages: Any, path: str = "") -> tuple[str, str]:
    """(path, first message) of the first leaf of marshmallow's nested messages."""
    if isinstance(messages, Mapping):
        for key, value in messages.items():
            if key == SCHEMA:
                step = ""
            elif isinstance(key, int):
                step = f"{path}[{key}]"
            else:
                step = f"{path}.{key}" if path else str(key)
            return _first_problem(value, step or path)
        return path, ""
    if isinstance(messages, list) and messages:
        return _first_problem(messages[0], path)
    return path, str(messages).rstrip(".")
