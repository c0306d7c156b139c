"""A job's outputs, stored: encoded (and watermarked) images and produced files saved under
random names, each an asset of the job's client, and the ``result`` the job shows.

One path for every backend: a local engine's outcome (``tasks.run``) and the outputs a remote
provider returned, downloaded and checked like inputs (``tasks.remote.poll``), are stored here
alike, so clients always get our own URLs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from inference.base import EngineResult
from inference.watermark import add_label
from models.assets import output_asset
from models.db import database_unreachable
from models.failures import JobFailure
from models.jobs import StoredFile
from models.jobstore import Claim
from models.state import JobStatus
from tasks.runtime import DATABASE_WAIT, Runtime, note_ended, wait_for_database
from tasks.storage import SavedFile, default_format, encode_image

log = logging.getLogger("aiorch.tasks")


def store_outputs(
    rt: Runtime,
    job_id: str,
    client_id: str,
    outcome: EngineResult,
    payload: dict[str, Any],
    inputs: dict[str, Any],
) -> tuple[dict[str, Any], list[StoredFile]]:
    """Save the outcome's images and files; returns the job's ``result`` and the file rows to
    record with its final move (not written yet: a fenced-off finish deletes the files instead)."""
    # The picture the output is made from sets its default format: a face swap's target, not
    # its first source.
    first_input = inputs.get("target_url") or next(iter(inputs.values()), None)
    input_ext = first_input.get("ext") if isinstance(first_input, dict) else None
    watermark = payload.get("watermark")
    outputs: list[dict[str, Any]] = []
    rows: list[StoredFile] = []

    def keep(saved: SavedFile, meta: dict[str, Any], width: Any, height: Any) -> None:
        # Every output is also an asset of the job's client (result.asset_id, files[].asset_id).
        row = output_asset(saved.name, job_id, client_id, saved.content_type, saved.size, width, height)
        rows.append(row)
        entry = {"url": rt.storage.url_for(saved.name), "filename": saved.name, "asset_id": row.asset_id}
        outputs.append({**entry, "meta": meta})

    for output in outcome.images:
        image = output.image
        if watermark:
            image = add_label(image, **watermark)
        fmt = payload.get("format") or default_format(image, input_ext)
        saved = rt.storage.save_output(encode_image(image, fmt), fmt)
        meta = {
            **output.meta,
            "width": image.width,
            "height": image.height,
            "backend": outcome.backend,
            "format": fmt,
        }
        keep(saved, meta, image.width, image.height)
    for produced in outcome.files:
        # A video the engine wrote to a scratch file: stored under its own random name.
        try:
            saved = rt.storage.save_output(produced.path.read_bytes(), produced.ext)
        finally:
            produced.path.unlink(missing_ok=True)
        meta = {**produced.meta, "backend": outcome.backend, "format": produced.ext}
        keep(saved, meta, meta.get("width"), meta.get("height"))
    result: dict[str, Any] = {"ok": True, "status": JobStatus.SUCCEEDED.value}
    if outputs:
        result.update(outputs[0])
    else:
        result["meta"] = {"backend": outcome.backend}
    if len(outputs) > 1 or outcome.files:
        # Several outputs, or a file that is not a picture (a video, a trained LoRA): listed.
        result["files"] = outputs
    if outcome.data:
        result.update(outcome.data)
    return result, rows


def record_outcome(
    rt: Runtime,
    claim: Claim,
    failure: JobFailure | None,
    *,
    result: dict[str, Any] | None,
    files: list[StoredFile],
    backend: str | None,
    progress_detail: dict[str, Any] | None = None,
) -> bool:
    """Write a claimed run's final status with its output files (local engine or provider alike);
    False when the claim was fenced off meanwhile (cancelled, re-claimed, or a provider's webhook
    got there first), and then the outputs, which are not the job's, are deleted. A failed or
    rejected end fails the task that wrote it, if the job is its own (``runtime.note_ended``).

    A run that ended while the database was unreachable (a restart) waits for it and writes then,
    up to ``DATABASE_WAIT``: its work is not redone and no attempt is counted for an interruption
    of the platform's own (after that the task gives its message back, ``JobTask``)."""

    def write() -> bool:
        return bool(
            rt.store.finish(
                claim,
                JobStatus.SUCCEEDED if failure is None else failure.status,
                result=result,
                error=failure,
                backend=backend,
                files=files,
                retention=rt.settings.result_retention,
                progress_detail=progress_detail,
            )
        )

    deadline = time.monotonic() + DATABASE_WAIT
    retried = False
    while True:
        try:
            finished = write()
            break
        except Exception as exc:
            left = deadline - time.monotonic()
            if not database_unreachable(exc) or left <= 0:
                raise
            log.warning("job %s: database unreachable at its final write; waiting for it", claim.job_id)
            if not wait_for_database(rt.db, left):
                raise
            retried = True
    if not finished and retried and files and rt.store.has_file(claim.job_id, files[0].name):
        # The write before the outage had committed (its file rows are the job's); only its
        # answer was lost. Without outputs there is nothing of ours to tell it by.
        finished = True
    if finished:
        note_ended(claim.job_id, failure)
        return True
    rt.storage.delete_outputs([f.name for f in files])
    return False


def note_refusal_end(rt: Runtime, job_id: str) -> None:
    """A claim refused *and* ending the job (``ClaimRefused.finalized``: its worker was lost too
    often, or it was flagged cancelled): the task that made that final move notes how it ended."""
    job = rt.store.get(job_id)
    if job is None or job.error is None or job.status not in (JobStatus.FAILED, JobStatus.REJECTED):
        return
    error = job.error
    details = error.get("details") or {}
    note_ended(job_id, JobFailure(error["code"], error["message"], details, status=JobStatus(job.status)))
