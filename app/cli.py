"""The ``aiorch`` command: serve, worker, beat, migrate, keys, and ``up`` (everything at once)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from app.cli_models import models
from config import QUEUES, REQUEST_LINE_LIMIT, Settings
from config.logs import configure_logging

# The inference queues one GPU worker takes; training has its own worker (``aiorch up``'s "train"),
# so a long training never holds the GPU that jobs of the other queues wait for.
TRAIN_QUEUE = "gpu.train"
GPU_QUEUES = [q for q in QUEUES if q.startswith("gpu.") and q != TRAIN_QUEUE]
# Every file an aiorch process creates (database, broker folders, keys, outputs, logs) is its
# owner's only: no other local user reads a tenant's images or the platform's secrets.
PRIVATE_UMASK = 0o077
JSON_ERROR_WORKER = "app.gunicorn_json.JsonErrorWorker"
CLIENT_COMMANDS = ("assets", "batch", "jobs")  # app.cli_client's: a server's users, through aiorch.client


class AiorchGroup(click.Group):
    """The ``aiorch`` group, whose client commands (``CLIENT_COMMANDS``) are loaded from
    ``app.cli_client`` only when one of them is looked up (run, or listed by ``--help``): they
    bring requests and rich, about 19 MB of RSS that the server processes never use, and the
    gunicorn master's modules are in every API worker it forks."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *CLIENT_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in CLIENT_COMMANDS and cmd_name not in self.commands:
            from app.cli_client import register_client_commands

            register_client_commands(self)
        return super().get_command(ctx, cmd_name)


M_ARENA_MAX = -8  # glibc's mallopt parameter
API_MALLOC_ARENAS = 2


def fewer_malloc_arenas(settings: Settings) -> None:
    """Cap glibc's malloc arenas for the API processes (its workers inherit the setting when
    gunicorn forks them). glibc gives threads that allocate at once arenas of their own, up to 8
    per core, and each keeps its freed pages: a worker's 32 threads held about 6 MB more RSS after
    the bench's load than with 2 arenas, while the GIL serialises their allocations anyway. An
    operator's own ``MALLOC_ARENA_MAX`` (read by glibc at start) wins; elsewhere than glibc, nothing."""
    if settings.operator_malloc_arenas or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # a libc without mallopt: nothing to cap
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, API_MALLOC_ARENAS)


def settings_from_env() -> Settings:
    return Settings.from_env()


def private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) as ``0700``; an existing one of ours is tightened to it,
    so a ``var/`` made world-readable by an older version stops being so."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        path.chmod(0o700)
    return path


@click.group(cls=AiorchGroup)
def main() -> None:
    """aiorch: a self-hosted AI image job platform."""
    # Here, before any command runs, so that it holds for every aiorch process and for what they
    # exec (celery workers, beat, Flower) and spawn (``aiorch up``).
    os.umask(PRIVATE_UMASK)


@main.command()
def migrate() -> None:
    """Create or upgrade the database schema."""
    from models.db import Database
    from models.migrate import upgrade

    settings = settings_from_env()
    private_dir(settings.var_dir)
    db = Database(settings)
    upgrade(db)
    click.echo(f"database at head: {db.engine.url.render_as_string(hide_password=True)}")


@main.command()
@click.option(
    "--workers",
    default=1,
    show_default=True,
    envvar="AIORCH_API_WORKERS",
    help="gunicorn worker processes (each holds its own ~80 MB of Python; one serves ~200 submits/s here)",
)
@click.option(
    "--threads",
    default=32,
    show_default=True,
    envvar="AIORCH_API_THREADS",
    help="threads per process (a blocking endpoint holds one while its job runs)",
)
def serve(workers: int, threads: int) -> None:
    """Run the API with gunicorn."""
    from gunicorn.app.base import BaseApplication

    from app import create_app

    settings = settings_from_env()
    configure_logging(settings.log_level, settings.log_json)
    private_dir(settings.var_dir)
    fewer_malloc_arenas(settings)  # before gunicorn starts a thread or forks a worker

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", workers)
            # gthread, answering gunicorn's own errors (bad request line, URL or headers too
            # long) in the API's JSON error shape instead of HTML pages.
            self.cfg.set("worker_class", JSON_ERROR_WORKER)
            self.cfg.set("threads", threads)
            # ``GET /v1/events?ids=`` takes up to 1000 job ids (~33 KB of URL; app/gunicorn_json.py).
            self.cfg.set("limit_request_line", REQUEST_LINE_LIMIT)
            self.cfg.set("timeout", int(settings.sync_timeout) + 30)
            self.cfg.set("accesslog", None)

        def load(self) -> Any:
            return create_app(settings)

    _Server().run()


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--queues", "-Q", default="cpu", show_default=True, help="comma-separated queues")
@click.option("--concurrency", "-c", type=int, default=None, help="processes (default: 1 for GPU queues)")
@click.option("--name", "-n", default=None, help="worker node name")
@click.option(
    "--gpus",
    default=None,
    help="GPUs its processes share, e.g. 0,1 (AIORCH_GPUS; default: CUDA_VISIBLE_DEVICES, else all)",
)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def worker(
    queues: str, concurrency: int | None, name: str | None, gpus: str | None, extra: tuple[str, ...]
) -> None:
    """Run a Celery worker on the given queues.

    A worker of GPU queues spreads its processes over its GPUs (process i takes GPU i mod count)
    and checks each GPU first: one that torch (or, for the ONNX engines, onnxruntime) cannot use
    stops the start with the reason, rather than running its jobs on the CPU."""
    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if unknown:
        raise click.BadParameter(
            f"unknown queue {unknown[0]}; known: {', '.join(QUEUES)}", param_hint="--queues"
        )
    settings = settings_from_env()
    if concurrency is None:
        # One process per GPU: CUDA contexts and model caches are per process.
        concurrency = settings.worker_concurrency or (1 if any(q.startswith("gpu.") for q in names) else 2)
    label = name or f"{'gpu' if any(q.startswith('gpu.') for q in names) else 'cpu'}@%h"
    from config.devices import environment_with, parse_gpus
    from tasks.gpus import worker_gpu_problems

    env = None
    if gpus is not None:
        try:
            settings = settings.with_overrides(gpus=parse_gpus(gpus))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gpus") from None
        env = environment_with(AIORCH_GPUS=gpus)  # for the worker it becomes
    problems = worker_gpu_problems(names, settings)
    if problems:
        raise click.ClickException(
            "a GPU this worker was given cannot be used, so it does not start:\n  " + "\n  ".join(problems)
        )
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.worker:celery",
        "worker",
        "-Q",
        ",".join(names),
        "-c",
        str(concurrency),
        "-n",
        label,
        "--pool",
        "prefork",
        "-E",
        "--without-mingle",
        "--loglevel",
        settings.log_level,
        *extra,
    ]
    if env is None:
        os.execv(sys.executable, argv)
    os.execve(sys.executable, argv, env)


@main.command()
def beat() -> None:
    """Run the periodic scheduler (expiry, re-publish, retention, webhook retries)."""
    settings = settings_from_env()
    private_dir(settings.var_dir)
    schedule = settings.var_dir / "celerybeat-schedule"
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks.worker:celery",
            "beat",
            "-s",
            str(schedule),
            "--loglevel",
            settings.log_level,
        ],
    )


@main.group()
def keys() -> None:
    """Manage API keys stored in the database, and each client's limits."""


RESET = "default"  # a limit's value that gives it back to the environment's default


class LimitValue(click.ParamType):
    """A client limit on the command line: a whole number in the limit's range, or ``default``
    (back to the environment's default). A nonsense value stops the command with a message
    naming the option, before anything is written."""

    name = "N|default"

    def __init__(self, limit: str):
        self.limit = limit  # its name in models.client_limits.NAMES

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from models.client_limits import InvalidLimit, check

        if isinstance(value, str) and value.strip().lower() == RESET:
            return RESET
        try:
            return check(self.limit, value)
        except InvalidLimit as exc:
            self.fail(f"{exc} (or '{RESET}')", param, ctx)


def limit_options(command: Any) -> Any:
    """``--rate-per-minute``, ``--max-queued``, ``--max-running`` and ``--max-priority``."""
    helps = {
        "rate_per_minute": "jobs the client may create in any 60 s (0 = no limit; default: "
        "AIORCH_RATE_LIMIT_PER_MINUTE)",
        "max_queued": "jobs the client may have waiting in queued at once (0 = no limit; default: "
        "AIORCH_MAX_QUEUED_PER_CLIENT)",
        "max_running": "jobs of the client running at once across all workers (0 = no limit; default: "
        "AIORCH_MAX_RUNNING_PER_CLIENT)",
        "max_priority": "the highest priority 0-9 its jobs get; a higher ask is lowered to it (default: "
        "AIORCH_MAX_PRIORITY)",
    }
    for name in reversed(list(helps)):
        option = click.option(
            f"--{name.replace('_', '-')}", name, type=LimitValue(name), default=None, help=helps[name]
        )
        command = option(command)
    return command


def limit_changes(given: dict[str, Any]) -> dict[str, int | None]:
    """The limits an invocation named: a number, or None for ``default``."""
    return {name: None if value == RESET else value for name, value in given.items() if value is not None}


def describe_limits(own: dict[str, int | None], settings: Settings) -> str:
    """``rate-per-minute=60* max-queued=0 ...``: the limits in force, ``*`` on the client's own."""
    from models.client_limits import OPTIONS, in_force

    force = in_force(own, settings)
    return " ".join(
        f"{OPTIONS[name]}={getattr(force, name)}{'' if own.get(name) is None else '*'}" for name in OPTIONS
    )


@keys.command("create")
@click.argument("client")
@click.option("--label", default=None)
@click.option(
    "--jwt",
    "jwt_auth",
    is_flag=True,
    help="also an access key / secret key pair, for seed 001-style JWT auth (Bearer <JWT HS256, iss=AK>)",
)
@click.option(
    "--admin",
    is_flag=True,
    help="an admin key: reads, lists, cancels and deletes every client's jobs, sees every client in "
    "/stats and /diag/backends, and may read /metrics",
)
@limit_options
def keys_create(client: str, label: str | None, jwt_auth: bool, admin: bool, **limits: Any) -> None:
    """Create a key for CLIENT and print it once, with the client's webhook signing secret and
    its limits ('*': the client's own; the limit options set them for the client, every key
    of it).

    The key is the last line (scripts read it from there)."""
    from models.client_limits import ClientLimits
    from models.db import Database
    from models.keys import KeyRing
    from models.webhook_secrets import WebhookSecrets

    settings = settings_from_env()
    db = Database(settings)
    changes = limit_changes(limits)
    table = ClientLimits(db)
    own = table.set(client, changes) if changes else table.own(client)
    row, key = KeyRing(db).create(client, label, jwt_auth=jwt_auth, admin=admin)
    role = "admin" if admin else "client"
    lines = [
        f"id={row.id} client={client} role={role}",
        f"limits {describe_limits(own, settings)}",
        f"webhook_secret={WebhookSecrets(db, settings).current(client)}",
    ]
    if jwt_auth:
        lines += [f"access_key={row.access_key}", f"secret_key={row.secret_key}"]
    click.echo("\n".join([*lines, key]))
    db.dispose()


@keys.command("update")
@click.argument("client")
@limit_options
def keys_update(client: str, **limits: Any) -> None:
    """Change CLIENT's limits (every key of it, static ones too); 'default' gives a limit back
    to the environment's default. Prints the limits in force ('*': the client's own)."""
    from models.client_limits import ClientLimits
    from models.db import Database

    changes = limit_changes(limits)
    if not changes:
        raise click.UsageError(
            "name at least one limit: --rate-per-minute, --max-queued, --max-running or --max-priority"
        )
    settings = settings_from_env()
    db = Database(settings)
    own = ClientLimits(db).set(client, changes)
    click.echo(f"{client} {describe_limits(own, settings)}")
    db.dispose()


@keys.command("list")
def keys_list() -> None:
    """List keys (prefixes only) and their role; keys from AIORCH_API_KEYS / AIORCH_ADMIN_KEYS
    are not listed. Then every client's limits in force ('*': its own, the rest the
    environment's defaults; 0 = no limit)."""
    from models.client_limits import ClientLimits
    from models.db import Database
    from models.keys import KeyRing

    settings = settings_from_env()
    db = Database(settings)
    for row in KeyRing(db).list():
        state = "revoked" if row.revoked_at else "active"
        role = "admin" if row.admin else "client"
        access = f"\tak={row.access_key}" if row.access_key else ""
        click.echo(f"{row.id}\t{row.client_id}\t{row.prefix}…\t{state}\t{role}\t{row.label or ''}{access}")
    clients = ClientLimits(db).listed()
    if clients:
        click.echo("limits (* = the client's own; 0 = no limit)")
        for client_id, own in clients.items():
            click.echo(f"{client_id}\t{describe_limits(own, settings)}")
    db.dispose()


@keys.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    """Revoke a key by id."""
    from models.db import Database
    from models.keys import KeyRing

    if not KeyRing(Database(settings_from_env())).revoke(key_id):
        raise click.ClickException(f"no active key with id {key_id}")
    click.echo(f"revoked {key_id}")


def ensure_dev_key(settings: Settings) -> str | None:
    """With no key configured anywhere, create one for client ``dev`` and keep it in var/."""
    from models.db import Database
    from models.keys import KeyRing

    ring = KeyRing(Database(settings), settings.api_keys, settings.admin_keys)
    keyfile = settings.var_dir / "dev-api-key"
    if keyfile.exists():
        key = keyfile.read_text().strip()
        if ring.client_for(key):
            return key
    if ring.any_configured():
        return None
    _row, key = ring.create("dev", "created by make run")
    keyfile.write_text(key + "\n")
    keyfile.chmod(0o600)
    return key


@main.command()
@click.option("--flower/--no-flower", default=True, help="also start Flower on 127.0.0.1")
def up(flower: bool) -> None:
    """Migrate, then run the API, a cpu worker, a GPU-queues worker, a training worker and the
    scheduler together."""
    settings = settings_from_env()
    private_dir(settings.var_dir)
    exe = [sys.executable, "-m", "app.cli"]
    subprocess.run([*exe, "migrate"], check=True)
    key = ensure_dev_key(settings)
    commands = {
        "api": [*exe, "serve"],
        "cpu": [*exe, "worker", "-Q", "cpu", "-c", "2", "-n", "cpu@%h"],
        "gpu": [*exe, "worker", "-Q", ",".join(GPU_QUEUES), "-c", "1", "-n", "gpu@%h"],
        "train": [*exe, "worker", "-Q", TRAIN_QUEUE, "-c", "1", "-n", "train@%h"],
        "beat": [*exe, "beat"],
    }
    if flower:
        commands["flower"] = [*exe, "flower"]
    procs = {name: subprocess.Popen(cmd) for name, cmd in commands.items()}
    click.echo(f"aiorch API on http://{settings.host}:{settings.port}  (docs: /v1/docs)")
    if key:
        click.echo(f"development API key (kept in {settings.var_dir / 'dev-api-key'}): {key}")
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    click.echo(f"{name} exited with {proc.returncode}; stopping the rest", err=True)
                    stopping = True
            time.sleep(0.5)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


def flower_command(settings: Settings, password: str) -> tuple[list[str], dict[str, str]]:
    """The argv that runs Flower, and the variables to add to its environment.

    Credentials travel only in the environment, which Flower reads (``FLOWER_<OPTION>``): a
    process's argv is readable by every local user (``ps``, ``/proc/<pid>/cmdline``), its
    environment only by its own user."""
    # Flower splits FLOWER_BASIC_AUTH on commas (several user:password pairs): a comma inside
    # would turn the tail of the password into a credential of its own.
    if "," in password or "," in settings.flower_user or ":" in settings.flower_user:
        raise click.ClickException(
            "AIORCH_FLOWER_USER and AIORCH_FLOWER_PASSWORD may not contain ',' (nor the user ':')"
        )
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.worker:celery",
        "flower",
        "--address=127.0.0.1",
        f"--port={settings.flower_port}",
        # Workers answer inspect over the broker; the default 1 s wait drops the replies of a
        # busy worker (or of the embedded transport's polled folders) and shows no workers.
        "--inspect_timeout=3000",
    ]
    env = {"FLOWER_BASIC_AUTH": f"{settings.flower_user}:{password}"}
    if settings.broker_management_api:
        # Queue depths of an amqp broker come from RabbitMQ's management API; its URL carries
        # the management password.
        env["FLOWER_BROKER_API"] = settings.broker_management_api
    return argv, env


@main.command()
def flower() -> None:
    """Run Flower on 127.0.0.1 with basic auth, watching this platform's broker."""
    settings = settings_from_env()
    password = settings.flower_password
    if not password:
        keyfile = private_dir(settings.var_dir) / "flower-password"
        if not keyfile.exists():
            import secrets

            keyfile.write_text(secrets.token_urlsafe(16) + "\n")  # 0600: the umask above
            keyfile.chmod(0o600)
        password = keyfile.read_text().strip()
        click.echo(
            f"Flower: http://127.0.0.1:{settings.flower_port} user {settings.flower_user}, "
            f"password in {keyfile}"
        )
    argv, env = flower_command(settings, password)
    # Added to the process's own environment, which exec hands on: this process only writes the
    # environment (config/ alone reads it).
    for name, value in env.items():
        os.putenv(name, value)
    os.execv(sys.executable, argv)


main.add_command(models)

if __name__ == "__main__":
    main()
