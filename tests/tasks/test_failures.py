"""One failure type and one mapping: every ``error`` a job shows is a ``JobFailure`` made by
``tasks.failures.failure_of`` (or, for failures no exception causes, by ``JobFailure`` itself), its
message never shows an internal class name, an input's error names its field in
``details.field``, and ``details`` is always an object."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import urllib3
from celery.exceptions import SoftTimeLimitExceeded
from marshmallow import ValidationError

from config import Settings
from inference.base import Cancelled, ContentRejected, EngineError, InvalidInput
from inference.remote import ProviderError, ProviderRejected, ProviderRetryableError
from models.db import Database
from models.failures import JobFailure
from models.jobstore import JobStore
from models.state import JobStatus
from tasks import catalog
from tasks.celery_app import create_celery
from tasks.failures import failure_of
from tasks.inputs import FetchCancelled, InputProblem, TransientFetchError
from tasks.run import run_job
from tasks.runtime import JobFailed, Runtime
from tasks.webhooks import send
from tests.support.factories import make_job

ROOT = Path(__file__).resolve().parents[2]
# What an internal name looks like in a sentence: a CamelCase word (``NewConnectionError``,
# ``_PinnedHTTPSConnection``, ``EngineCall``), an object's repr, or a ``Class(...)`` call.
INTERNAL = re.compile(r"\b_?[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+\b|object at 0x|<[\w.]+[ >]|\b[A-Z]\w*\(")


def assert_a_plain_error(error: dict[str, Any]) -> None:
    """The shape every job error has, and no internal name in its message or details."""
    assert set(error) == {"code", "message", "details"}, error
    assert re.fullmatch(r"[a-z][a-z0-9_]*", error["code"]), error
    assert isinstance(error["details"], dict), error
    assert error["message"] and not INTERNAL.search(error["message"]), error["message"]
    assert not INTERNAL.search(str(error["details"])), error["details"]


def refused_connection() -> urllib3.exceptions.HTTPError:
    """A real connection failure from urllib3 (nothing listens on port 1), its text full of reprs."""
    pool = urllib3.PoolManager(retries=False)
    with pytest.raises(urllib3.exceptions.HTTPError) as caught:
        pool.request("GET", "http://127.0.0.1:1/x.png", timeout=2)
    assert INTERNAL.search(str(caught.value))  # what the mapping must not pass on
    return caught.value


def test_the_internal_name_detector_sees_class_names_and_reprs_and_passes_sentences() -> None:
    for leak in (
        "RuntimeError: boom",
        "HTTPConnectionPool(host='x', port=1): Max retries exceeded",
        "<urllib3.connection.HTTPConnection object at 0x7f>",
        "_PinnedHTTPSConnection(host=..., port=443)",
        "debug engine crashed in EngineCall(task='x')",
    ):
        assert INTERNAL.search(leak), leak
    for sentence in (
        "cannot reach http://127.0.0.1:1/a.png: the connection failed: connection refused",
        "TLS failed: certificate verify failed: self-signed certificate",
        "The payload is invalid: scale: Must be greater than 1 and less than or equal to 4.",
        "st: the provider refused the content",
    ):
        assert not INTERNAL.search(sentence), sentence


# -- the mapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            InputProblem("input_not_image", "the input is empty", "image_url"),
            JobFailure("input_not_image", "the input is empty", {"field": "image_url"}),
        ),
        (
            TransientFetchError("cannot reach http://x/a.png: connecting timed out", "mask_url"),
            JobFailure(
                "input_unreachable",
                "cannot reach http://x/a.png: connecting timed out",
                {"field": "mask_url"},
                retryable=True,
            ),
        ),
        (FetchCancelled(), JobFailure.cancelled()),
        (Cancelled(), JobFailure.cancelled("The job was cancelled while running.")),
        (
            ContentRejected("the safety check refused the output"),
            JobFailure("content_rejected", "the safety check refused the output", status=JobStatus.REJECTED),
        ),
        (
            InvalidInput("no such model", field="model"),
            JobFailure("invalid_input", "no such model", {"field": "model"}),
        ),
        (EngineError("out of memory", code="engine_oom"), JobFailure("engine_oom", "out of memory")),
        (
            ProviderError("quota exhausted", provider="st", provider_code=2003),
            JobFailure("provider_error", "st: quota exhausted", {"provider": "st", "provider_code": "2003"}),
        ),
        (
            ProviderRejected("risky content", provider="volc"),
            JobFailure(
                "content_rejected", "volc: risky content", {"provider": "volc"}, status=JobStatus.REJECTED
            ),
        ),
        (
            ProviderRetryableError("HTTP 503", provider="st", retry_after=3),
            JobFailure("provider_unavailable", "st: HTTP 503", {"provider": "st"}, retryable=True),
        ),
    ],
)
def test_each_kind_of_exception_maps_to_its_failure(exc: BaseException, expected: JobFailure) -> None:
    failure = failure_of(exc)
    assert failure == expected
    assert_a_plain_error(failure.as_error())


def test_a_soft_time_limit_says_the_limit_it_ran_into() -> None:
    failure = failure_of(SoftTimeLimitExceeded(), time_limit=30)
    assert (failure.code, failure.message, failure.status) == (
        "timeout",
        "The job ran longer than its time limit of 30 s.",
        JobStatus.FAILED,
    )


def test_an_invalid_payload_names_its_first_field_and_keeps_every_message(settings: Settings) -> None:
    schema = catalog.payload_schema(catalog.TASKS["upscale"], settings)
    with pytest.raises(ValidationError) as caught:
        schema.load({"image_url": "http://x/a.png", "scale": 9, "watermark": {"opacity": 7}})
    failure = failure_of(caught.value)
    assert failure.code == "invalid_payload" and failure.status is JobStatus.FAILED
    assert failure.details["field"] in {"scale", "watermark.opacity"}
    assert {"scale", "watermark"} <= set(failure.details["payload"])
    assert failure.message.startswith(f"The payload is invalid: {failure.details['field']}: ")
    assert_a_plain_error(failure.as_error())


def test_a_payload_error_of_a_list_item_names_its_index_and_one_of_the_whole_payload_names_it() -> None:
    item = failure_of(ValidationError({"source_urls": {1: ["Not a valid URL."]}}))
    assert item.details["field"] == "source_urls[1]"
    assert item.message == "The payload is invalid: source_urls[1]: Not a valid URL."
    whole = failure_of(ValidationError(["Give width and height together."]))
    assert whole.details["field"] == "payload"


def test_a_network_failure_is_told_in_words_retryable() -> None:
    failure = failure_of(refused_connection())
    assert failure.code == "network_error" and failure.retryable
    assert failure.message == "the connection failed: connection refused"
    at_provider = failure_of(refused_connection(), provider="st")
    assert (at_provider.code, at_provider.details) == ("provider_unreachable", {"provider": "st"})


def test_an_unexpected_exception_fails_the_job_with_a_fixed_sentence_and_logs_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class SecretInternalThing(KeyError):
        pass

    failure = failure_of(SecretInternalThing("<object at 0x1>"))
    assert (failure.code, failure.status, failure.retryable) == ("engine_error", JobStatus.FAILED, False)
    assert_a_plain_error(failure.as_error())
    assert "SecretInternalThing" in caplog.text  # the operator still sees what happened
    provider = failure_of(SecretInternalThing("x"), provider="st")
    assert (provider.code, provider.details) == ("provider_error", {"provider": "st"})
    assert_a_plain_error(provider.as_error())


def test_an_unusable_provider_output_names_the_output_and_the_problem() -> None:
    problem = InputProblem("output_not_mp4", "the video is mkv, not MP4", "output[0]")
    failure = failure_of(problem, provider="volc")
    assert failure.code == "remote_output_invalid"
    assert failure.details == {"field": "output[0]", "problem": "output_not_mp4", "provider": "volc"}
    assert failure.message == "volc returned an unusable output: the video is mkv, not MP4"


def test_details_are_always_an_object_and_a_failure_never_ends_a_job_succeeded() -> None:
    assert JobFailure("x", "y").as_error() == {"code": "x", "message": "y", "details": {}}
    with pytest.raises(TypeError):
        JobFailure("x", "y", ["a list"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        JobFailure("x", "y", status=JobStatus.SUCCEEDED)
    assert JobFailure.worker_lost(3).as_error()["details"] == {"attempts": 3}
    assert JobFailure.expired("late").status is JobStatus.EXPIRED


# -- through the pipeline ---------------------------------------------------------------------------


def error_of(db: Database, job_id: str) -> tuple[str, dict[str, Any]]:
    job = JobStore(db).get(job_id)
    assert job is not None and job.error is not None
    return job.status, job.error


def test_a_crashing_engine_fails_its_job_without_a_class_name_and_the_worker_goes_on(
    settings: Settings, db: Database
) -> None:
    create_celery(settings)  # the app the task runs under (its settings)
    crashing = make_job(
        db,
        task="debug_sleep",
        engine_task="debug_sleep",
        queue="gpu.diffusion",
        payload={"seconds": 0, "crash": "raise"},
    )
    # A direct call runs the task body here. The crash itself does not escape it: the task ends
    # in FAILURE (JobFailed, what Flower shows) only after the job's final write.
    with pytest.raises(JobFailed, match=r"^engine_error: The engine failed unexpectedly"):
        run_job(crashing)
    status, error = error_of(db, crashing)
    assert status == "failed" and error["code"] == "engine_error", error
    assert "RuntimeError" not in error["message"] and "EngineCall" not in error["message"]
    assert_a_plain_error(error)
    fine = make_job(
        db, task="debug_sleep", engine_task="debug_sleep", queue="gpu.diffusion", payload={"seconds": 0}
    )
    run_job(fine)
    job = JobStore(db).get(fine)
    assert job is not None and job.status == "succeeded"


def test_an_unreachable_input_fails_the_job_naming_its_field_in_words(
    settings: Settings, db: Database
) -> None:
    create_celery(settings)
    # Sent straight to the run queue from PREPARING, as the API does when it sees nothing to
    # download: the run checks the input itself, and cannot reach it.
    job_id = make_job(db, stage="prepare", payload={"image_url": "http://127.0.0.1:1/a.png", "scale": 2})
    with pytest.raises(JobFailed, match=r"^input_unreachable: cannot reach"):
        run_job(job_id, prepare=True)
    status, error = error_of(db, job_id)
    assert status == "failed" and error["code"] == "input_unreachable"
    assert error["details"] == {"field": "image_url"}
    refused = "the connection failed: connection refused"
    assert error["message"] == f"cannot reach http://127.0.0.1:1/a.png: {refused}"
    assert_a_plain_error(error)


def test_a_webhook_attempt_that_cannot_connect_records_the_failure_in_words(settings: Settings) -> None:
    runtime = Runtime(settings)
    try:
        attempt = send(runtime, "http://127.0.0.1:1/hook", "e" * 32, "{}", [])
    finally:
        runtime.db.dispose()
    assert not attempt.ok and attempt.status_code is None
    assert attempt.error == "network error: the connection failed: connection refused"


# -- nothing else builds a job's error --------------------------------------------------------------


def _sources(*layers: str) -> list[Path]:
    paths = [p for layer in layers for p in sorted((ROOT / layer).rglob("*.py"))]
    return [p for p in paths if "migrations" not in p.parts]


def test_no_code_but_the_failure_type_writes_an_error_dict_or_a_class_name_into_a_message() -> None:
    bad = []
    for path in _sources("tasks", "models"):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict) and rel != "models/failures.py":
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if "code" in keys and "message" in keys:
                    bad.append(f"{rel}:{node.lineno}: an error dict built by hand")
            if isinstance(node, ast.Attribute) and node.attr == "__name__":
                inner = node.value
                if isinstance(inner, ast.Attribute) and inner.attr == "__class__":
                    bad.append(f"{rel}:{node.lineno}: a class name")
                if isinstance(inner, ast.Call) and getattr(inner.func, "id", "") == "type":
                    bad.append(f"{rel}:{node.lineno}: a class name")
    assert not bad, "job errors must be JobFailures (tasks.failures.failure_of):\n" + "\n".join(bad)
