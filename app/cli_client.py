"""The ``aiorch`` commands of a script or a person using a server: ``jobs``, ``assets``, ``batch``.

They talk HTTP through ``aiorch.client`` only, apart from the operator commands in ``app.cli``:
no Flask, no database, no broker, no torch is imported, so they run wherever the light client is
installed. Where the server is comes from ``--url``/``--key``, else ``AIORCH_URL``/``AIORCH_API_KEY``
(read by the client). Results go to stdout (JSON, or a table), progress and messages to stderr.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aiorch.batch import DOWNLOAD_FAILED, INVALID, REPORT, BatchError, BatchRun, Outcome, RunState, read_lines
from aiorch.batch import Progress as BatchProgress
from aiorch.client import Client
from aiorch.errors import AiorchError, ApiError, TransportError, WaitTimeout
from aiorch.inputs import LocalInputError, LocalInputs, Uploader
from aiorch.watch import FINAL

STATUS_STYLES = {
    "pending": "dim",
    "queued": "cyan",
    "running": "blue",
    "downloading": "blue",
    "succeeded": "green",
    "failed": "red",
    "rejected": "red",
    "cancelled": "yellow",
    "expired": "yellow",
    INVALID: "red",
    DOWNLOAD_FAILED: "red",
}
STATUS_ORDER = list(STATUS_STYLES)
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT
err = Console(stderr=True)
out = Console()


class TimedOut(click.ClickException):
    exit_code = 2


class ClientGroup(click.Group):
    """Turns the client's exceptions into a one-line message and exit status 1, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            detail = f"\n{json.dumps(exc.details)}" if exc.details else ""
            raise click.ClickException(f"{exc.status} {exc.code}: {exc.message}{detail}") from None
        except TransportError as exc:
            raise click.ClickException(f"cannot reach the server: {exc}") from None
        except WaitTimeout as exc:
            raise TimedOut(str(exc)) from None
        except AiorchError as exc:
            raise click.ClickException(str(exc)) from None


def connection(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--url`` and ``--key`` on a command; it receives a ``client``."""

    def with_client(url: str | None, key: str | None, **kwargs: Any) -> Any:
        with Client(url, key) as client:
            return command(client=client, **kwargs)

    with_client.__name__ = command.__name__
    with_client.__doc__ = command.__doc__
    decorated = click.option("--key", default=None, help="API key  [default: $AIORCH_API_KEY]")(with_client)
    return click.option(
        "--url", default=None, help="server URL  [default: $AIORCH_URL, else http://127.0.0.1:8000]"
    )(decorated)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def load_payload(raw: str) -> tuple[dict[str, Any], Path]:
    """``--payload``: JSON, or ``@file`` holding it; and the folder its relative paths start from."""
    base = Path.cwd()
    if raw.startswith("@"):
        path = Path(raw[1:])
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint="--payload") from None
        base = path.resolve().parent
    return json_object(raw, "--payload"), base


def json_object(raw: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=option) from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return value


def upload_local_inputs(client: Client, payload: dict[str, Any], bases: list[Path]) -> dict[str, Any]:
    """The payload with its local files uploaded and named ``asset://<id>``."""
    try:
        extra = {name for task in client.capabilities() for name in task.get("inputs", [])}
    except AiorchError:
        extra = set()
    inputs = LocalInputs(bases, extra)
    try:
        paths = [found.path for found in inputs.find(payload)]
    except LocalInputError as exc:
        raise click.BadParameter(str(exc), param_hint="--payload") from None
    if not paths:
        return payload
    uploader = Uploader(client)
    uploader.upload(paths)
    for path in dict.fromkeys(paths):
        err.print(f"uploaded {path} as asset://{uploader.asset_ids([path])[path]}")
    replaced: dict[str, Any] = inputs.replace(payload, uploader.asset_ids(paths))
    return replaced


def follow(client: Client, job_ids: list[str], timeout: float | None) -> list[dict[str, Any]]:
    """Wait for the jobs with a live status line on stderr (status, queue position, progress)."""
    final: dict[str, dict[str, Any]] = {}
    with err.status("waiting…") as status:
        for job in client.watch(job_ids, timeout=timeout):
            if job["status"] in FINAL:
                final[job["job_id"]] = job
            where = f" #{job['queue_position']} in queue" if job.get("queue_position") is not None else ""
            eta = f" ETA {job['eta_utc'][11:19]}" if job.get("eta_utc") and job["status"] == "queued" else ""
            done = f"{len(final)}/{len(job_ids)} final · " if len(job_ids) > 1 else ""
            status.update(f"{done}{job['job_id'][:8]} {job['status']}{where} {job.get('progress', 0)}%{eta}")
    return [final[i] for i in job_ids]


def save_outputs(client: Client, jobs: list[dict[str, Any]], directory: Path) -> None:
    for job in jobs:
        if job["status"] == "succeeded":
            for path in client.download(job, directory):
                err.print(f"saved {path}")


def exit_for(jobs: list[dict[str, Any]]) -> None:
    if any(job["status"] != "succeeded" for job in jobs):
        sys.exit(1)


# -- jobs ---------------------------------------------------------------------------------------------


@click.group(cls=ClientGroup)
def jobs() -> None:
    """Submit, follow, cancel and list jobs on a server."""


@jobs.command("submit")
@click.argument("task")
@click.option("--payload", "raw_payload", default="{}", help="the payload as JSON, or @file holding it")
@click.option("--wait", "wait_", is_flag=True, help="wait until the job is final; exit 1 unless it succeeded")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="save the outputs here (implies --wait)"
)
@click.option("--timeout", type=float, default=None, help="seconds to wait at most (exit 2 after)")
@click.option("--priority", type=click.IntRange(0, 9), default=None)
@click.option("--webhook-url", default=None)
@click.option("--metadata", default=None, help="JSON object kept with the job")
@click.option("--idempotency-key", default=None, help="a retry with the same key returns the same job")
@connection
def jobs_submit(
    client: Client,
    task: str,
    raw_payload: str,
    wait_: bool,
    out: Path | None,
    timeout: float | None,
    priority: int | None,
    webhook_url: str | None,
    metadata: str | None,
    idempotency_key: str | None,
) -> None:
    """Submit a job of TASK; local files in its input fields are uploaded first.

    \b
    aiorch jobs submit upscale --payload '{"image_url": "photo.png", "scale": 2}' --out results/
    """
    payload, base = load_payload(raw_payload)
    payload = upload_local_inputs(client, payload, [base, Path.cwd()])
    meta = json_object(metadata, "--metadata") if metadata else None
    job = client.submit(
        task,
        payload,
        webhook_url=webhook_url,
        priority=priority,
        metadata=meta,
        idempotency_key=idempotency_key,
    )
    if not (wait_ or out):
        print_json(job)
        return
    err.print(f"submitted {job['job_id']}")
    (final,) = follow(client, [job["job_id"]], timeout)
    print_json(final)
    if out is not None:
        save_outputs(client, [final], out)
    exit_for([final])


@jobs.command("get")
@click.argument("job_id")
@connection
def jobs_get(client: Client, job_id: str) -> None:
    """Print a job."""
    print_json(client.get(job_id))


@jobs.command("wait")
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--timeout", type=float, default=None, help="seconds to wait at most (exit 2 after)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="save the outputs here")
@connection
def jobs_wait(client: Client, job_ids: tuple[str, ...], timeout: float | None, out: Path | None) -> None:
    """Wait for jobs to end and print them; exit 1 unless all succeeded."""
    final = follow(client, list(dict.fromkeys(job_ids)), timeout)
    print_json(final[0] if len(final) == 1 else final)
    if out is not None:
        save_outputs(client, final, out)
    exit_for(final)


@jobs.command("cancel")
@click.argument("job_ids", nargs=-1)
@click.option("--batch", "batch_id", default=None, help="cancel every job of this batch")
@connection
def jobs_cancel(client: Client, job_ids: tuple[str, ...], batch_id: str | None) -> None:
    """Cancel jobs (a queued one at once, a running one as soon as it can stop)."""
    if bool(job_ids) == bool(batch_id):
        raise click.UsageError("give job ids or --batch")
    if len(job_ids) == 1:
        print_json(client.cancel(job_ids[0]))
    else:
        print_json(client.cancel_many(list(job_ids) or None, batch_id=batch_id))


@jobs.command("list")
@click.option("--status", default=None, help="only jobs in this status")
@click.option("--task", default=None, help="only jobs of this task")
@click.option("--batch", "batch_id", default=None, help="only jobs of this batch")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object a line instead of a table")
@connection
def jobs_list(
    client: Client, status: str | None, task: str | None, batch_id: str | None, limit: int, as_json: bool
) -> None:
    """List your jobs, newest first."""
    found = client.list(status=status, task=task, batch_id=batch_id, limit=limit, page_size=min(limit, 200))
    if as_json:
        for job in found:
            click.echo(json.dumps(job))
        return
    table = Table("job_id", "task", "status", "progress", "created_at", "batch_id", box=None)
    for job in found:
        style = STATUS_STYLES.get(job["status"], "")
        table.add_row(
            job["job_id"],
            job["task"],
            f"[{style}]{job['status']}[/]",
            f"{job.get('progress', 0)}%",
            (job.get("created_at") or "")[:19],
            job.get("batch_id") or "",
        )
    out.print(table)


# -- assets ---------------------------------------------------------------------------------------------


@click.group(cls=ClientGroup)
def assets() -> None:
    """Upload images to use as job inputs (asset://<id>)."""


@assets.command("upload")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--json", "as_json", is_flag=True, help="the asset objects as JSON instead of a table")
@connection
def assets_upload(client: Client, files: tuple[Path, ...], as_json: bool) -> None:
    """Upload image FILES; prints their asset ids."""
    uploaded = client.upload_many(list(files))
    if as_json:
        print_json(uploaded)
        return
    table = Table("asset_id", "file", "size", "pixels", "expires_at", box=None)
    for path, asset in zip(files, uploaded, strict=True):
        table.add_row(
            asset["asset_id"],
            str(path),
            str(asset.get("size")),
            f"{asset.get('width')}x{asset.get('height')}",
            (asset.get("expires_at") or "")[:19],
        )
    out.print(table)


# -- batch ----------------------------------------------------------------------------------------------


@click.group(cls=ClientGroup)
def batch() -> None:
    """Run a JSONL file of jobs, resumably, with outputs saved to a folder."""


def counts_text(counts: dict[str, int]) -> str:
    parts = [
        f"[{STATUS_STYLES.get(name, '')}]{name} {counts[name]}[/]"
        for name in sorted(counts, key=lambda s: STATUS_ORDER.index(s) if s in STATUS_ORDER else 99)
        if counts[name]
    ]
    return " · ".join(parts)


class BatchDisplay:
    """The live bar: lines finished of the total, counts by status, this run's rate and ETA. Without
    a terminal (a log file), a plain line every ``every`` seconds instead."""

    def __init__(self, every: float = 10.0):
        self.progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            TextColumn("{task.fields[counts]}"),
            console=err,
        )
        self.task = self.progress.add_task("batch", total=None, rate="", eta="", counts="")
        self.started = time.monotonic()
        self.every = every
        self.printed = 0.0

    def __call__(self, snapshot: BatchProgress) -> None:
        elapsed = time.monotonic() - self.started
        fresh = snapshot.finished - snapshot.finished_before
        rate = fresh / elapsed if elapsed > 0 else 0.0
        left = snapshot.total - snapshot.finished
        eta = f"ETA {time.strftime('%H:%M:%S', time.gmtime(left / rate))}" if rate > 0 and left else ""
        counts = counts_text(snapshot.counts)
        self.progress.update(
            self.task,
            total=snapshot.total,
            completed=snapshot.finished,
            rate=f"{rate:.1f}/s",
            eta=eta,
            counts=counts,
        )
        if not err.is_terminal and time.monotonic() - self.printed >= self.every:
            self.printed = time.monotonic()
            err.print(f"{snapshot.finished}/{snapshot.total} {rate:.1f}/s {eta} {counts}", highlight=False)


def counts_table(counts: dict[str, int]) -> Table:
    table = Table("status", "lines", box=None)
    for name, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        table.add_row(f"[{STATUS_STYLES.get(name, '')}]{name}[/]", str(count))
    return table


def flat_details(details: Any, where: str = "") -> list[str]:
    """``{"payload": {"scale": ["too big"]}}`` as ``["payload.scale: too big"]``."""
    if isinstance(details, dict):
        return [
            line
            for key, value in details.items()
            for line in flat_details(value, f"{where}.{key}".strip("."))
        ]
    if isinstance(details, list) and all(isinstance(item, str) for item in details):
        return [f"{where}: {'; '.join(details)}" if where else "; ".join(details)]
    return [f"{where}: {details}" if where else str(details)]


def failures(outcomes: list[Outcome], limit: int = 20) -> Table | None:
    bad = [o for o in outcomes if not o.ok]
    if not bad:
        return None
    table = Table("line", "status", "error", title=f"{len(bad)} line(s) did not succeed", box=None)
    for outcome in bad[:limit]:
        error = outcome.error
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("code") or "")
            details = error.get("details")
            if details and error.get("code") != "input_not_found":  # its message names the field
                message += " (" + ", ".join(flat_details(details)) + ")"
        else:
            message = str(error or "")
        table.add_row(str(outcome.line), outcome.status, message)
    if len(bad) > limit:
        table.add_row("…", "", f"{len(bad) - limit} more in the report")
    return table


@batch.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="outputs and report.jsonl"
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 10000),
    default=256,
    show_default=True,
    help="jobs submitted and not yet final at any time",
)
@connection
def batch_run(client: Client, file: Path, out: Path, concurrency: int) -> NoReturn:
    """Run every line of FILE (one POST /v1/jobs body a line) and save the outputs in OUT.

    Local paths in a payload's input fields are uploaded first. Ctrl-C stops; the same command
    resumes (finished lines are not submitted again, unfinished ones are waited for). Exit status
    0 when every line succeeded, 1 when some did not, 130 when interrupted."""
    display = BatchDisplay()
    run = BatchRun(client, file, out, concurrency=concurrency, on_progress=display)

    def interrupt(_signum: int, _frame: Any) -> None:
        if run.stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        run.stop.set()
        err.print("stopping; run the same command again to resume")

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        with display.progress:
            outcomes = run.run()
    except BatchError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    out.mkdir(parents=True, exist_ok=True)
    err.print(counts_table(dict(Counter(run.status.values()))))
    err.print(f"report: {out / REPORT}", highlight=False)
    table = failures(outcomes)
    if table is not None:
        err.print(table)
    if run.deferred or client.transport.retried:
        err.print(
            f"the server's limits deferred {run.deferred} submission(s); "
            f"{client.transport.retried} request(s) retried",
            highlight=False,
        )
    if run.interrupted:
        err.print(f"interrupted: {len(outcomes)} line(s) ended; run the same command to go on")
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


@batch.command("status")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@connection
def batch_status(client: Client, directory: Path) -> NoReturn:
    """Where the batch run into DIRECTORY stands; with a server at hand, its counts there too.

    Exit status 0 when every line succeeded, 1 when some did not, 2 while some are not final."""
    client.transport.retries = 1  # the local state is the answer; the server's view is a bonus
    state = RunState.load(directory)
    if state.file is None:
        raise click.ClickException(f"{directory} holds no batch run")
    lines = read_lines(Path(state.file)) if Path(state.file).exists() else []
    counts: dict[str, int] = {}
    for line in lines:
        done = state.done.get(line.ident)
        if line.error is not None:
            status = INVALID
        elif done is not None:
            status = done.status
        elif line.ident in state.submitted:
            status = "in flight"
        else:
            status = "pending"
        counts[status] = counts.get(status, 0) + 1
    out.print(f"{state.file} → {directory}", highlight=False)
    out.print(counts_table(counts))
    if state.batch_id:
        try:
            server = client.batch(state.batch_id)
        except AiorchError as exc:
            err.print(f"server: {exc}", highlight=False)
        else:
            there = counts_text(server.get("counts") or {})
            total, progress = server.get("total"), server.get("progress")
            out.print(f"server, batch {state.batch_id}: {total} jobs, {progress}% · {there}")
    if any(status not in ("succeeded", "in flight", "pending") for status in counts):
        sys.exit(1)
    sys.exit(0 if set(counts) <= {"succeeded"} else 2)


CLIENT_COMMANDS = (jobs, assets, batch)


def register_client_commands(group: click.Group) -> None:
    """Add ``jobs``, ``assets`` and ``batch`` to the ``aiorch`` command."""
    for command in CLIENT_COMMANDS:
        group.add_command(command)
