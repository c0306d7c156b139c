"""``aiorch batch run``: a JSONL of job bodies through the bulk endpoint, outputs into a folder,
resumable.

The run keeps an append-only journal in ``DIR/.aiorch-batch/journal.jsonl``: the assets uploaded
(by content hash), each line's job id once submitted, and each line's outcome once final and its
outputs are on disk. A line is known by its text (and, for lines repeated word for word, which
repeat it is), not by its number, so lines inserted or moved between two runs keep their jobs;
a line whose text changed is a new line. Every line is submitted with an idempotency key made of
the file and that identity, so a line whose journal entry was lost (the process killed between
the server's answer and the write) is answered with the same job, never a second one. Running
again with the same FILE and DIR therefore submits only lines never accepted, waits for those in
flight, and leaves finished ones alone.

Outputs are saved as ``DIR/<line, 6 digits>-<job id, 8 characters>.<ext>`` (``-<n>`` before the
extension for a job with several). ``DIR/report.jsonl`` is written whenever a run stops (done,
failed or interrupted): one object per job line, ``{"line", "job_id", "status", "error",
"files"}``, ``files`` relative to DIR; ``status`` is the job's, or ``invalid`` (refused before it
ran: ``error`` says why), ``download_failed``, or, for a run stopped early, ``pending`` (never
submitted) and the status it was last seen in.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiorch.client import BATCH_LIMIT, Client
from aiorch.errors import AiorchError, ApiError, NotFound, PayloadTooLarge
from aiorch.inputs import LocalInputError, LocalInputs, Uploader
from aiorch.watch import FINAL, JobWatcher

STATE_DIR = ".aiorch-batch"
JOURNAL = "journal.jsonl"
REPORT = "report.jsonl"
# Refusals of one item that mean "not now" rather than "never": the line goes back in the queue.
RETRYABLE_CODES = frozenset(
    {
        "rate_limited",
        "too_many_queued_jobs",
        "service_unavailable",
        "database_unavailable",
        "broker_unavailable",
    }
)
# Statuses of a line that did not end well; any of them makes the run's exit status non-zero.
INVALID = "invalid"  # refused before running: bad JSON, a missing file, a 4xx of the item
DOWNLOAD_FAILED = "download_failed"  # succeeded, but its outputs could not be fetched (retried next run)
PENDING = "pending"  # not submitted yet
DOWNLOADING = "downloading"  # succeeded, its outputs not on disk yet
REQUEST_BYTES = 8 << 20  # JSON in one bulk request, so lines with data: URIs stay under body limits


class BatchError(AiorchError):
    """The run cannot start or go on (DIR belongs to another file, the server refuses the batch)."""


@dataclass
class Line:
    number: int  # 1-based, as an editor shows it
    ident: str  # sha256 of the line's text, and which repeat of that text it is: "<hex>.<n>"
    body: dict[str, Any] | None
    error: dict[str, Any] | None = None


@dataclass
class Outcome:
    line: int
    job_id: str | None
    status: str
    error: Any = None
    files: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "job_id": self.job_id,
            "status": self.status,
            "error": self.error,
            "files": self.files,
        }

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


def read_lines(path: Path) -> list[Line]:
    """The job lines of a JSONL file (blank lines and ``#`` comments skipped); a line that is no
    job body is kept with its ``error``, so the report names it."""
    lines = []
    seen: Counter[str] = Counter()
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            text_digest = hashlib.sha256(text.encode()).hexdigest()[:32]
            digest = f"{text_digest}.{seen[text_digest]}"
            seen[text_digest] += 1
            try:
                body = json.loads(text)
            except ValueError as exc:
                lines.append(Line(number, digest, None, _error("invalid_json", f"line {number}: {exc}")))
                continue
            problem = None
            if not isinstance(body, dict):
                problem = "a line must be a JSON object (a POST /v1/jobs body)"
            elif not isinstance(body.get("task"), str):
                problem = "task: a string is required"
            elif not isinstance(body.get("payload", {}), dict):
                problem = "payload: must be an object"
            if problem:
                lines.append(Line(number, digest, None, _error("invalid_line", f"line {number}: {problem}")))
            else:
                lines.append(Line(number, digest, body))
    return lines


def _error(code: str, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return error


class Journal:
    """The append-only record of a run; a torn last line (a kill mid-write) is ignored."""

    def __init__(self, directory: Path):
        self.path = directory / STATE_DIR / JOURNAL
        self._lock = threading.Lock()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for raw in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(raw))
            except ValueError:
                continue
        return records

    def append(self, *records: dict[str, Any]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(text)


@dataclass
class RunState:
    """What the journal says about a DIR."""

    file: str | None = None
    batch_id: str | None = None
    assets: dict[str, str] = field(default_factory=dict)  # sha256 -> asset_id
    submitted: dict[str, str] = field(default_factory=dict)  # line ident -> job_id
    done: dict[str, Outcome] = field(default_factory=dict)  # line ident -> outcome

    @classmethod
    def load(cls, directory: Path) -> RunState:
        state = cls()
        for record in Journal(directory).read():
            kind = record.get("t")
            if kind == "run":
                state.file, state.batch_id = record.get("file"), record.get("batch_id")
            elif kind == "asset":
                state.assets[record["sha256"]] = record["asset_id"]
            elif kind == "submitted":
                state.submitted[record["ident"]] = record["job_id"]
            elif kind == "done":
                outcome = Outcome(record["line"], record.get("job_id"), record["status"], record.get("error"))
                outcome.files = list(record.get("files") or [])
                state.done[record["ident"]] = outcome
        return state


def file_identity(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()


def idempotency_key(file_id: str, line: Line) -> str:
    return f"aiorch-batch-{file_id[:16]}-{line.ident}"


@dataclass
class Progress:
    """A snapshot for the progress display."""

    total: int
    finished: int  # lines with an outcome, this run and earlier ones
    finished_before: int  # of those, finished by an earlier run
    counts: Counter[str]  # lines by current status


class BatchRun:
    """One ``aiorch batch run``; ``run()`` returns the outcomes in line order. Set ``stop`` (from a
    signal handler) to end early, leaving a state the next run resumes."""

    def __init__(
        self,
        client: Client,
        file: Path,
        out: Path,
        *,
        concurrency: int = 256,
        download_threads: int = 8,
        on_progress: Callable[[Progress], None] | None = None,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.client = client
        self.file = file.resolve()
        self.out = out
        self.concurrency = concurrency
        self.download_threads = download_threads
        self.on_progress = on_progress
        self.stop = threading.Event()
        self.journal = Journal(out)
        self.file_id = file_identity(self.file)
        self.batch_id = self.file_id[:32]
        self.status: dict[int, str] = {}
        self.job_of: dict[int, str] = {}
        self.outcomes: dict[int, Outcome] = {}
        self._idents: dict[int, str] = {}
        self.finished_before = 0
        self.deferred = 0  # submissions of a line refused for now (a limit) and sent again later
        self.interrupted = False

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> list[Outcome]:
        lines = read_lines(self.file)
        by_number = {line.number: line for line in lines}
        self._idents = {line.number: line.ident for line in lines}
        state = self._start(lines)
        uploader = Uploader(self.client, state.assets)
        inputs = LocalInputs([self.file.parent, Path.cwd()], self._extra_input_fields())
        pending: deque[Line] = deque()
        inflight: dict[str, int] = {}  # job_id -> line
        for line in lines:
            done = state.done.get(line.ident)
            submitted = state.submitted.get(line.ident)
            if done is not None and done.ok and done.job_id and not self._on_disk(done):
                # Finished, but its outputs were removed since: fetched again, not run again.
                inflight[done.job_id] = line.number
                self.job_of[line.number] = done.job_id
                self.status[line.number] = "succeeded"
            elif done is not None:
                # Its number may have changed since (lines inserted above it).
                self._finish(
                    Outcome(line.number, done.job_id, done.status, done.error, done.files), journal=False
                )
                self.finished_before += 1
            elif line.error is not None:
                self._finish(Outcome(line.number, None, INVALID, line.error))
            elif submitted is not None:
                inflight[submitted] = line.number
                self.job_of[line.number] = submitted
                self.status[line.number] = "queued"
            else:
                pending.append(line)
                self.status[line.number] = PENDING
        watcher = self.client.watcher()
        downloads: dict[Future[Outcome], int] = {}
        not_before = 0.0  # after a "not now" refusal, when to submit again
        refusals = 0
        self._report_progress()
        try:
            watcher.add(inflight)
            with ThreadPoolExecutor(self.download_threads, thread_name_prefix="aiorch-download") as pool:
                try:
                    while (pending or inflight or downloads) and not self.stop.is_set():
                        room = self.concurrency - len(inflight)
                        # Free slots are filled a quarter of the window at a time: fewer, larger
                        # bulk requests (and fewer event streams) than one job per freed slot.
                        wanted = min(len(pending), max(1, self.concurrency // 4))
                        if pending and room >= wanted and time.monotonic() >= not_before:
                            accepted, told = self._submit(pending, room, uploader, inputs)
                            inflight.update(accepted)
                            watcher.add(accepted)
                            if told is not None:
                                # Some lines were refused for now (a per-client limit): wait as
                                # long as the server said, or back off when it did not say.
                                refusals += 1
                                wait = told or min(30.0, 0.5 * 2**refusals)
                                not_before = time.monotonic() + min(wait, 60.0)
                            else:
                                refusals = 0
                        self._take_changes(watcher, inflight, pending, by_number, pool, downloads)
                        for future in [f for f in downloads if f.done()]:
                            self._finish(future.result())
                            del downloads[future]
                        self._report_progress()
                finally:
                    # Interrupted: downloads not started are left for the next run (their lines
                    # stay "downloading"); those under way are let finish.
                    for future in downloads:
                        if not future.cancel():
                            outcome = future.result()
                            self._finish(outcome)
        finally:
            watcher.close()
            self.interrupted = self.stop.is_set() and len(self.outcomes) < len(lines)
            self.write_report(lines)
            self._report_progress()
        return [self.outcomes[n] for n in sorted(self.outcomes)]

    def _on_disk(self, outcome: Outcome) -> bool:
        return all((self.out / name).is_file() for name in outcome.files)

    def _start(self, lines: list[Line]) -> RunState:
        self.out.mkdir(parents=True, exist_ok=True)
        state = RunState.load(self.out)
        if state.file is not None and state.file != str(self.file):
            raise BatchError(f"{self.out} holds the run of {state.file}; give another --out")
        if state.batch_id:
            self.batch_id = state.batch_id
        self.journal.append(
            {"t": "run", "file": str(self.file), "batch_id": self.batch_id, "lines": len(lines)}
        )
        return state

    def _extra_input_fields(self) -> set[str]:
        """Input fields the server names beyond ``*_url(s)`` (e.g. ``images``); none if it cannot say."""
        try:
            return {name for task in self.client.capabilities() for name in task.get("inputs", [])}
        except AiorchError:
            return set()

    def _submit(
        self,
        pending: deque[Line],
        room: int,
        uploader: Uploader,
        inputs: LocalInputs,
    ) -> tuple[dict[str, int], float | None]:
        """Submit up to ``room`` pending lines in one bulk request (their files uploaded first).

        Returns the accepted jobs (id -> line) and, when some line was refused for now, the
        seconds the server asked to wait (0 when it did not say); None when none was."""
        take: list[Line] = []
        size = 0
        while pending and len(take) < min(room, BATCH_LIMIT):
            line = pending[0]
            estimate = len(json.dumps(line.body)) + 200
            if take and size + estimate > REQUEST_BYTES:
                break
            take.append(pending.popleft())
            size += estimate
        files: dict[int, list[Path]] = {}
        for line in take:
            try:
                files[line.number] = [
                    found.path for found in inputs.find((line.body or {}).get("payload", {}))
                ]
            except LocalInputError as exc:
                self._finish(Outcome(line.number, None, INVALID, exc.as_error()))
        refused = self._upload([p for paths in files.values() for p in paths], uploader)
        items: list[tuple[Line, dict[str, Any]]] = []
        for line in take:
            if line.number not in files:
                continue
            bad = next((refused[p] for p in files[line.number] if p in refused), None)
            if bad is not None:
                self._finish(Outcome(line.number, None, INVALID, bad))
                continue
            body = dict(line.body or {})
            body["payload"] = inputs.replace(body.get("payload", {}), uploader.asset_ids(files[line.number]))
            body.setdefault("idempotency_key", idempotency_key(self.file_id, line))
            items.append((line, body))
        accepted: dict[str, int] = {}
        if not items:
            return accepted, None
        try:
            answer = self.client.submit_many([body for _, body in items], batch_id=self.batch_id)["jobs"]
        except PayloadTooLarge:
            if len(items) == 1:
                line = items[0][0]
                refusal = _error("payload_too_large", "the job body is over the server's size limit")
                self._finish(Outcome(line.number, None, INVALID, refusal))
                return accepted, None
            # Put them back, and send half as many at a time.
            for line, _ in reversed(items):
                pending.appendleft(line)
            return self._submit(pending, max(1, len(items) // 2), uploader, inputs)
        submitted, retry = [], []
        told = 0.0
        for (line, _), result in zip(items, answer, strict=True):
            error = result.get("error") if isinstance(result, dict) else None
            if error is not None:
                if error.get("code") in RETRYABLE_CODES:
                    retry.append(line)
                    details = error.get("details")
                    if isinstance(details, dict) and isinstance(details.get("retry_after"), int | float):
                        told = max(told, float(details["retry_after"]))
                else:
                    self._finish(Outcome(line.number, None, INVALID, error))
                continue
            job_id = result["job_id"]
            accepted[job_id] = line.number
            self.job_of[line.number] = job_id
            self.status[line.number] = result.get("status", "queued")
            submitted.append({"t": "submitted", "ident": line.ident, "line": line.number, "job_id": job_id})
        pending.extendleft(reversed(retry))  # refused for now: first in the queue, in their order
        self.deferred += len(retry)
        self.journal.append(*submitted)
        return accepted, (told if retry else None)

    def _upload(self, paths: list[Path], uploader: Uploader) -> dict[Path, dict[str, Any]]:
        """Upload the files not yet uploaded; the files the server refused, with its error."""
        refused: dict[Path, dict[str, Any]] = {}
        try:
            made = uploader.upload(paths)
        except ApiError as exc:
            if exc.status >= 500:
                raise
            # One bad file refuses the whole request: send them one by one to tell which.
            made = {}
            for path in dict.fromkeys(paths):
                try:
                    made.update(uploader.upload([path]))
                except ApiError as one:
                    if one.status >= 500:
                        raise
                    refused[path] = _error(one.code, f"{path.name}: {one.message}", one.details)
        self.journal.append(*({"t": "asset", "sha256": d, "asset_id": a} for d, a in made.items()))
        return refused

    def _take_changes(
        self,
        watcher: JobWatcher,
        inflight: dict[str, int],
        pending: deque[Line],
        by_number: dict[int, Line],
        pool: ThreadPoolExecutor,
        downloads: dict[Future[Outcome], int],
    ) -> None:
        timeout = 0.1
        while True:
            try:
                job = watcher.next(timeout=timeout)
            except NotFound as exc:
                # A journalled job that is gone (deleted): its line is submitted again.
                gone = (exc.details or {}).get("job_id") if isinstance(exc.details, dict) else None
                number = inflight.pop(gone, None) if gone else None
                if number is None:
                    raise
                pending.appendleft(by_number[number])
                self.status[number] = PENDING
                continue
            if job is None:
                return
            timeout = 0
            number = inflight.get(job["job_id"])
            if number is None:
                continue
            self.status[number] = job["status"]
            if job["status"] not in FINAL:
                continue
            del inflight[job["job_id"]]
            if job["status"] == "succeeded":
                self.status[number] = DOWNLOADING
                downloads[pool.submit(self._download, number, job)] = number
            else:
                self._finish(Outcome(number, job["job_id"], job["status"], job.get("error")))

    def _download(self, number: int, job: dict[str, Any]) -> Outcome:
        try:
            # The line number sorts the files; the job id keeps them apart when a later run finds
            # the lines renumbered (a line inserted above).
            paths = self.client.download(job, self.out, stem=f"{number:06d}-{job['job_id'][:8]}")
        except (AiorchError, OSError) as exc:
            return Outcome(number, job["job_id"], DOWNLOAD_FAILED, _error("download_failed", str(exc)))
        return Outcome(number, job["job_id"], "succeeded", None, [p.name for p in paths])

    def _finish(self, outcome: Outcome, journal: bool = True) -> None:
        """Record a line's outcome. Only a job's final status is journalled: a line refused before
        running, or whose outputs did not download, is tried again by the next run."""
        line = outcome.line
        self.outcomes[line] = outcome
        self.status[line] = outcome.status
        if outcome.job_id:
            self.job_of[line] = outcome.job_id
        if journal and outcome.status in FINAL:
            self.journal.append({"t": "done", "ident": self._idents.get(line, ""), **outcome.record()})

    def _report_progress(self) -> None:
        if self.on_progress is not None:
            counts = Counter(self.status.values())
            finished = sum(1 for o in self.outcomes.values() if o.status != DOWNLOAD_FAILED)
            self.on_progress(Progress(len(self.status), finished, self.finished_before, counts))

    # -- the report -----------------------------------------------------------------------------
    def write_report(self, lines: list[Line]) -> Path:
        records = []
        for line in lines:
            outcome = self.outcomes.get(line.number)
            if outcome is None:
                status = self.status.get(line.number, PENDING)
                outcome = Outcome(line.number, self.job_of.get(line.number), status)
            records.append(json.dumps(outcome.record()) + "\n")
        target = self.out / REPORT
        part = target.with_name(REPORT + ".part")
        part.write_text("".join(records), encoding="utf-8")
        os.replace(part, target)
        return target
