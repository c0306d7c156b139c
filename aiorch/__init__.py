"""aiorch's Python client: ``from aiorch import Client``.

Only the client lives here (the standard library and ``requests``); the platform itself is the
``app``, ``tasks``, ``models``, ``inference`` and ``config`` packages beside it.
"""

from aiorch.aio import AsyncClient
from aiorch.client import Client, output_files
from aiorch.errors import (
    AiorchError,
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    TransportError,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)
from aiorch.watch import FINAL, JobWatcher

__all__ = [
    "FINAL",
    "AiorchError",
    "ApiError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "Forbidden",
    "JobFailed",
    "JobWatcher",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServerError",
    "ServiceUnavailable",
    "TransportError",
    "Unauthorized",
    "ValidationFailed",
    "WaitTimeout",
    "output_files",
]
