"""The Python client of an aiorch server.

    from aiorch import Client

    client = Client()  # AIORCH_URL (default http://127.0.0.1:8000) and AIORCH_API_KEY
    asset = client.upload("photo.png")
    job = client.submit("upscale", {"image_url": f"asset://{asset['asset_id']}", "scale": 2})
    job = client.wait(job, timeout=300)
    client.download(job, "out/")

Light on purpose: the standard library and ``requests`` only, never Flask, torch or the server's
packages, so a script installs it without the engines. Every job-creating POST carries an
idempotency key (the caller's, or a fresh one), so the retries after a lost connection never
create a job twice.
"""

from __future__ import annotations

import json
import mimetypes
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, overload

from aiorch.environment import default_key, default_url
from aiorch.errors import JobFailed, TransportError, WaitTimeout
from aiorch.transport import Transport
from aiorch.watch import FINAL, POLL_IDS, STREAM_READ_TIMEOUT, EventSupport, JobWatcher, job_events

Job = dict[str, Any]
JobRef = str | Job
# Spelled here, because inside ``Client`` the name ``list`` is its method.
Jobs = list[Job]
Assets = list[dict[str, Any]]
Paths = list[Path]
BATCH_LIMIT = 1000  # jobs in one POST /v1/jobs/batch
UPLOAD_FILES = 32  # file parts in one POST /v1/assets
UPLOAD_BYTES = 32 << 20  # and bytes, so one request stays a reasonable size
PAGE_SIZE = 100
MAX_PAGE = 200  # the API's largest ``limit``


def job_id_of(job: JobRef) -> str:
    return job if isinstance(job, str) else str(job["job_id"])


def output_files(job: Job) -> list[dict[str, Any]]:
    """The outputs of a succeeded job: ``result.files`` when it has several, else the one URL."""
    result = job.get("result") or {}
    if not isinstance(result, dict):
        return []
    files = result.get("files")
    if isinstance(files, list) and files:
        return [f for f in files if isinstance(f, dict) and f.get("url")]
    return [result] if result.get("url") else []


class Client:
    """A connection to one aiorch server with one API key; safe to share between threads."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        max_retry_wait: float = 120.0,
        poll_interval: float = 0.2,
        max_poll_interval: float = 2.0,
    ):
        self.transport = Transport(
            url or default_url(),
            key or default_key(),
            timeout=timeout,
            retries=retries,
            max_retry_wait=max_retry_wait,
        )
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.events = EventSupport()

    @property
    def url(self) -> str:
        return self.transport.url

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- jobs -----------------------------------------------------------------------------------
    def submit(
        self,
        task: str,
        payload: dict[str, Any] | None = None,
        *,
        webhook_url: str | None = None,
        priority: int | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Create a job (``POST /v1/jobs``); the job object, ``queued`` (or ``reused``)."""
        body, headers = _submission(task, payload, webhook_url, priority, metadata, idempotency_key)
        job: Job = self.transport.json("POST", "/v1/jobs", json=body, headers=headers)
        return job

    def submit_and_follow(
        self,
        task: str,
        payload: dict[str, Any] | None = None,
        *,
        webhook_url: str | None = None,
        priority: int | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Iterator[Job]:
        """Create a job and follow it in the same request (``POST /v1/jobs`` with ``Accept:
        text/event-stream``): the new job's first object, then every change as it happens, to its
        final object. A server that answers the submit with JSON (no such streams), or a stream that
        breaks before its job ends, goes on with ``watch`` from there."""
        body, headers = _submission(task, payload, webhook_url, priority, metadata, idempotency_key)
        headers.update({"Accept": "text/event-stream", "Accept-Encoding": "identity"})
        response = self.transport.request(
            "POST", "/v1/jobs", json=body, headers=headers, stream=True,
            timeout=(self.transport.timeout, STREAM_READ_TIMEOUT),
        )  # fmt: skip
        last: Job | None = None
        try:
            if response.headers.get("Content-Type", "").startswith("text/event-stream"):
                for last in job_events(response):
                    yield last
            else:
                last = response.json()
                yield last
        finally:
            response.close()
        if last is None:
            raise TransportError("POST /v1/jobs: the stream ended before its job's first event")
        if last.get("status") not in FINAL:
            yield from (change for change in self.watch(last) if change != last)

    def submit_many(
        self, jobs: Iterable[dict[str, Any]], *, batch_id: str | None = None, chunk_size: int = BATCH_LIMIT
    ) -> dict[str, Any]:
        """Create many jobs through ``POST /v1/jobs/batch``, ``chunk_size`` (≤ 1000) a request.

        Each item is a ``POST /v1/jobs`` body, optionally with its ``idempotency_key`` (one is
        added where missing). Returns ``{"batch_id", "jobs"}``: per item, in order, the job object
        or ``{"error": {...}}`` for an item the server refused. Every chunk joins one batch (the
        given ``batch_id``, else the one the server made for the first chunk)."""
        if not 1 <= chunk_size <= BATCH_LIMIT:
            raise ValueError(f"chunk_size must be 1 to {BATCH_LIMIT}")
        results: Jobs = []
        chunk: list[dict[str, Any]] = []

        def send() -> None:
            nonlocal batch_id
            body: dict[str, Any] = {"jobs": chunk}
            if batch_id is not None:
                body["batch_id"] = batch_id
            answer = self.transport.json("POST", "/v1/jobs/batch", json=body)
            batch_id = answer["batch_id"]
            results.extend(answer["jobs"])
            chunk.clear()

        for item in jobs:
            chunk.append(item if item.get("idempotency_key") else {**item, "idempotency_key": _new_key()})
            if len(chunk) == chunk_size:
                send()
        if chunk:
            send()
        return {"batch_id": batch_id, "jobs": results}

    def get(self, job: JobRef) -> Job:
        """The job's current object (``GET /v1/jobs/{id}``)."""
        found: Job = self.transport.json("GET", f"/v1/jobs/{job_id_of(job)}")
        return found

    def get_many(self, jobs: Iterable[JobRef]) -> Jobs:
        """Current objects of many jobs, 50 a request; jobs not found are left out."""
        ids = list(dict.fromkeys(job_id_of(j) for j in jobs))
        found: dict[str, Job] = {}
        for start in range(0, len(ids), POLL_IDS):
            chunk = ids[start : start + POLL_IDS]
            page = self.transport.json("GET", "/v1/jobs", params={"ids": ",".join(chunk), "limit": POLL_IDS})
            found.update((j["job_id"], j) for j in page["jobs"])
        return [found[i] for i in ids if i in found]

    def watcher(self) -> JobWatcher:
        """A ``JobWatcher`` on this server: follow a growing set of jobs (``add``, ``next``)."""
        return JobWatcher(
            self.transport,
            self.events,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
        )

    def watch(self, jobs: JobRef | Iterable[JobRef], *, timeout: float | None = None) -> Iterator[Job]:
        """Every change of these jobs (status, progress, queue position) as it happens, the first
        object of each at once, until all are final; ``WaitTimeout`` after ``timeout`` seconds."""
        refs = [jobs] if isinstance(jobs, str | dict) else list(jobs)
        ids = list(dict.fromkeys(job_id_of(j) for j in refs))
        watcher = self.watcher()
        deadline = None if timeout is None else _now() + timeout
        try:
            watcher.add(ids)
            waiting = set(ids)
            while waiting:
                left = None if deadline is None else deadline - _now()
                change = watcher.next(timeout=left) if left is None or left > 0 else None
                if change is None:
                    raise WaitTimeout(
                        f"{len(waiting)} job(s) not final after {timeout} s",
                        [watcher.latest.get(i, {"job_id": i}) for i in sorted(waiting)],
                    )
                if change.get("status") in FINAL:
                    waiting.discard(change["job_id"])
                yield change
        finally:
            watcher.close()

    # A str and a dict are iterable too, but here they are one job: the first overload wins.
    @overload
    def wait(self, jobs: JobRef, *, timeout: float | None = None) -> Job: ...  # type: ignore[overload-overlap]
    @overload
    def wait(self, jobs: Iterable[JobRef], *, timeout: float | None = None) -> Jobs: ...
    def wait(self, jobs: JobRef | Iterable[JobRef], *, timeout: float | None = None) -> Job | list[Job]:
        """Block until the job (or every job of a list) is final; its final object(s), in order.

        Uses the server's event stream when it has one, else polls (``GET /v1/jobs?ids=``)."""
        single = isinstance(jobs, str | dict)
        refs: list[JobRef] = [jobs] if single else list(jobs)  # type: ignore[list-item]
        ids = [job_id_of(j) for j in refs]
        final: dict[str, Job] = {}
        for change in self.watch(ids, timeout=timeout):
            if change.get("status") in FINAL:
                final[change["job_id"]] = change
        return final[ids[0]] if single else [final[i] for i in ids]

    def run(
        self,
        task: str,
        payload: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Job:
        """Submit, wait, and return the final job; ``JobFailed`` unless it succeeded. Without a
        ``timeout`` the job is followed in its submit's own request (``submit_and_follow``)."""
        if timeout is None:
            job: Job = {}
            for change in self.submit_and_follow(task, payload, **options):
                job = change
        else:
            job = self.wait(self.submit(task, payload, **options), timeout=timeout)
        if job.get("status") != "succeeded":
            raise JobFailed(job)
        return job

    def cancel(self, job: JobRef) -> Job:
        """Cancel one job: a queued one at once, a running one as soon as its engine allows;
        ``Conflict`` if it already ended."""
        found: Job = self.transport.json("POST", f"/v1/jobs/{job_id_of(job)}/cancel")
        return found

    def cancel_many(
        self, jobs: Iterable[JobRef] | None = None, *, batch_id: str | None = None
    ) -> dict[str, int]:
        """Cancel many jobs by id, or a whole batch (``POST /v1/jobs/cancel``): the counts
        ``{"cancelled", "already_final"}``."""
        if (jobs is None) == (batch_id is None):
            raise ValueError("give jobs or batch_id, not both")
        if batch_id is not None:
            answer: dict[str, int] = self.transport.json(
                "POST", "/v1/jobs/cancel", json={"batch_id": batch_id}
            )
            return answer
        ids = list(dict.fromkeys(job_id_of(j) for j in jobs or ()))
        total = {"cancelled": 0, "already_final": 0}
        for start in range(0, len(ids), BATCH_LIMIT):
            answer = self.transport.json(
                "POST", "/v1/jobs/cancel", json={"ids": ids[start : start + BATCH_LIMIT]}
            )
            for name in total:
                total[name] += int(answer.get(name, 0))
        return total

    def delete(self, job: JobRef) -> None:
        """Delete the job and its output files."""
        self.transport.request("DELETE", f"/v1/jobs/{job_id_of(job)}")

    def list(
        self,
        *,
        status: str | None = None,
        task: str | None = None,
        batch_id: str | None = None,
        page_size: int = PAGE_SIZE,
        limit: int | None = None,
    ) -> Iterator[Job]:
        """The caller's jobs, newest first, fetched page by page (``before``) as you iterate."""
        params: dict[str, Any] = {}
        for name, value in (("status", status), ("task", task), ("batch_id", batch_id)):
            if value is not None:
                params[name] = value
        if limit is not None and limit <= 0:
            return
        given, size = 0, min(page_size, MAX_PAGE)
        # ``before`` is exclusive, and a bulk insert gives many jobs one creation time. Asking from
        # just past the last time of a page, and skipping what was given already, keeps the jobs
        # sharing that instant from falling between two pages. A page of nothing new means more
        # jobs share it than a page holds: ask for bigger pages, and past the API's largest, step
        # over the instant (the API's ``before`` can say no more).
        boundary: str | None = None
        at_boundary: set[str] = set()
        before: str | None = None
        while True:
            query = {**params, "limit": size, **({"before": before} if before else {})}
            page = self.transport.json("GET", "/v1/jobs", params=query)
            jobs: Jobs = page["jobs"]
            fresh = [j for j in jobs if j["job_id"] not in at_boundary]
            for job in fresh:
                yield job
                given += 1
                if limit is not None and given >= limit:
                    return
            if not page.get("have_next") or not jobs:
                return
            last = jobs[-1]["created_at"]
            if last != boundary:
                boundary, at_boundary = last, set()
            at_boundary.update(j["job_id"] for j in jobs if j["created_at"] == last)
            if fresh:
                before = _just_after(last)
            elif size < MAX_PAGE:
                size = min(MAX_PAGE, size * 2)
            else:
                before = last

    def batch(self, batch_id: str) -> dict[str, Any]:
        """A batch's counts by status, progress and ETA (``GET /v1/batches/{id}``)."""
        found: dict[str, Any] = self.transport.json("GET", f"/v1/batches/{batch_id}")
        return found

    def capabilities(self) -> Jobs:
        """Every task the server knows: its queue, inputs, parameters and whether it runs now."""
        tasks: Jobs = self.transport.json("GET", "/v1/capabilities")["tasks"]
        return tasks

    # -- files ----------------------------------------------------------------------------------
    def upload(self, path: str | Path) -> dict[str, Any]:
        """Upload one image as an asset; its object. Use it as ``asset://<asset_id>``."""
        return self.upload_many([path])[0]

    def upload_many(self, paths: Sequence[str | Path]) -> Assets:
        """Upload images as assets, in as few requests as the limits allow; their objects, in order."""
        assets: Assets = []
        parts: list[tuple[str, tuple[str, bytes, str]]] = []
        size = 0

        def send() -> None:
            nonlocal size
            answer = self.transport.json("POST", "/v1/assets", files=parts)
            assets.extend(answer["assets"])
            parts.clear()
            size = 0

        for raw in paths:
            path = Path(raw)
            data = path.read_bytes()
            if parts and (len(parts) >= UPLOAD_FILES or size + len(data) > UPLOAD_BYTES):
                send()
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            parts.append(("file", (path.name, data, kind)))
            size += len(data)
        if parts:
            send()
        return assets

    def download(self, job: JobRef, directory: str | Path, *, stem: str | None = None) -> Paths:
        """Save a succeeded job's outputs into ``directory``; their paths.

        Named ``<stem><ext>`` (``<stem>-<n><ext>`` for several) when ``stem`` is given, else as the
        server names them. A task whose result is data, not files (``face_detect``), is saved as
        ``<stem>.json``. Each file appears whole or not at all (written aside, then renamed)."""
        found = self.get(job) if isinstance(job, str) else job
        if found.get("status") != "succeeded":
            raise JobFailed(found)
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        outputs = output_files(found)
        if not outputs:
            target = folder / f"{stem or found['job_id']}.json"
            _write_atomically(target, [_json_bytes(found.get("result"))])
            return [target]
        saved = []
        for index, output in enumerate(outputs, start=1):
            name = str(output.get("filename") or Path(output["url"]).name)
            if stem is not None:
                suffix = Path(name).suffix
                name = f"{stem}{suffix}" if len(outputs) == 1 else f"{stem}-{index}{suffix}"
            response = self.transport.request("GET", output["url"], stream=True)
            target = folder / Path(name).name
            with response:
                _write_atomically(target, response.iter_content(1 << 16))
            saved.append(target)
        return saved


def _write_atomically(target: Path, chunks: Iterable[bytes]) -> None:
    part = target.with_name(target.name + ".part")
    try:
        with open(part, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
        part.replace(target)
    finally:
        part.unlink(missing_ok=True)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2).encode() + b"\n"


def _new_key() -> str:
    return f"aiorch-client-{uuid.uuid4().hex}"


def _now() -> float:
    return time.monotonic()


def _just_after(iso: str) -> str:
    return (datetime.fromisoformat(iso) + timedelta(microseconds=1)).isoformat()


def _submission(
    task: str,
    payload: dict[str, Any] | None,
    webhook_url: str | None,
    priority: int | None,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """A ``POST /v1/jobs`` body and its headers (an idempotency key, the caller's or a new one)."""
    body: dict[str, Any] = {"task": task, "payload": payload or {}}
    if webhook_url is not None:
        body["webhook_url"] = webhook_url
    if priority is not None:
        body["priority"] = priority
    if metadata is not None:
        body["metadata"] = metadata
    return body, {"Idempotency-Key": idempotency_key or _new_key()}
