"""How a job fails, as one type: ``JobFailure(code, message, details, retryable)``.

Every ``error`` a job shows (the job object, its webhooks and its logged events) is a
``JobFailure`` written by ``as_error``: a snake_case ``code``, a ``message`` written for a person
(never an internal class name or an object's repr), and ``details``, always an object (an input's
error names its field in ``details.field``). ``retryable`` says whether trying the same thing
again later may succeed (a network failure) rather than fail the same way (a bad input), and
``status`` is the final status the failure ends the job with.

Here, below the tasks layer, so the job store and the API can use it: the failures no exception
causes (a cancel, an expiry, a worker lost too often, an operator's revoke) are made here, and the
one mapping from exceptions to failures is ``tasks.failures.failure_of``, which knows the
exceptions of the engines, the providers and the input checks that this layer must not import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models.state import FINAL_STATUSES, JobStatus


@dataclass(frozen=True)
class JobFailure:
    code: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)
    retryable: bool = False
    status: JobStatus = JobStatus.FAILED

    def __post_init__(self) -> None:
        if not isinstance(self.details, Mapping):
            raise TypeError(f"the details of a job's error are an object, not {self.details!r}")
        if self.status not in FINAL_STATUSES or self.status is JobStatus.SUCCEEDED:
            raise ValueError(f"a failure cannot end a job {self.status.value}")

    def as_error(self) -> dict[str, Any]:
        """The job's ``error``, as the API, its webhooks and its events show it."""
        return {"code": self.code, "message": self.message, "details": dict(self.details)}

    @classmethod
    def cancelled(cls, message: str = "The job was cancelled.") -> JobFailure:
        return cls("cancelled", message, status=JobStatus.CANCELLED)

    @classmethod
    def expired(cls, message: str, details: Mapping[str, Any] | None = None) -> JobFailure:
        return cls("expired", message, details or {}, status=JobStatus.EXPIRED)

    @classmethod
    def uninstalled(cls, engine_task: str) -> JobFailure:
        """The job's engine left this installation after the job was accepted."""
        return cls(
            "task_not_installed",
            f"No engine for task {engine_task!r} is installed here any more.",
            {"field": "task"},
        )

    @classmethod
    def revoked(cls) -> JobFailure:
        """An operator revoked (or terminated) one of the job's Celery tasks, from Flower or
        ``celery control revoke``."""
        message = "An operator revoked the job's task on the workers; the job was cancelled."
        return cls("revoked_by_operator", message, status=JobStatus.CANCELLED)

    @classmethod
    def worker_lost(cls, attempts: int) -> JobFailure:
        """The job's worker died mid-run as many times as attempts are allowed (a poison job)."""
        message = f"The job's worker died {attempts} times while running it; it is not retried again."
        return cls("worker_lost", message, {"attempts": attempts})
