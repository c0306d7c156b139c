"""Runs the real thing for integration tests: the API under gunicorn and Celery worker processes,
configured through ``AIORCH_*`` variables exactly as an operator would."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from config import Settings

ROOT = Path(__file__).resolve().parents[2]
FINAL = {"succeeded", "failed", "rejected", "cancelled", "expired"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``Settings.from_env()`` equal ``settings``."""
    env = {
        "AIORCH_VAR_DIR": str(settings.var_dir),
        "AIORCH_HOST": settings.host,
        "AIORCH_PORT": str(settings.port),
        "AIORCH_DATABASE_URL": settings.database_url,
        "AIORCH_BROKER_URL": settings.broker_url,
        "AIORCH_API_KEYS": ",".join(f"{c}:{k}" for c, k in settings.api_keys),
        "AIORCH_ADMIN_KEYS": ",".join(f"{c}:{k}" for c, k in settings.admin_keys),
        "AIORCH_METRICS_PUBLIC": "1" if settings.metrics_public else "0",
        "AIORCH_STORAGE_DIR": str(settings.storage_dir),
        "AIORCH_PUBLIC_URL": settings.public_url,
        "AIORCH_MODELS_DIR": str(settings.models_dir),
        "AIORCH_ALLOW_PRIVATE_URLS": "1" if settings.allow_private_urls else "0",
        "AIORCH_ALLOW_PRIVATE_NETWORKS": ",".join(settings.allow_private_networks),
        "AIORCH_MAX_ATTEMPTS": str(settings.max_attempts),
        "AIORCH_DEBUG_TASKS": "1" if settings.debug_tasks else "0",
        "AIORCH_SYNC_TIMEOUT": str(settings.sync_timeout),
        "AIORCH_STREAM_KEEPALIVE": str(settings.stream_keepalive),
        "AIORCH_DISPATCH_AHEAD": str(settings.dispatch_ahead),
        "AIORCH_WEBHOOK_TIMEOUT": str(settings.webhook_timeout),
        "AIORCH_WEBHOOK_RETRY_BASE": str(settings.webhook_retry_base),
        "AIORCH_WEBHOOK_SECRET_GRACE": str(settings.webhook_secret_grace),
        "AIORCH_EVENT_RETENTION": str(settings.event_retention),
        "AIORCH_ASSET_QUOTA_BYTES": str(settings.asset_quota_bytes),
        "AIORCH_RATE_LIMIT_PER_MINUTE": str(settings.rate_limit_per_minute),
        "AIORCH_MAX_QUEUED_PER_CLIENT": str(settings.max_queued_per_client),
        "AIORCH_MAX_RUNNING_PER_CLIENT": str(settings.max_running_per_client),
        "AIORCH_MAX_PRIORITY": str(settings.max_priority),
        "AIORCH_RESULT_RETENTION": str(settings.result_retention),
        "AIORCH_REPUBLISH_AFTER": str(settings.republish_after),
        "AIORCH_JOB_TTL": str(settings.job_ttl),
        "AIORCH_LOG_JSON": "1",
        "AIORCH_FETCH_TIMEOUT": str(settings.fetch_timeout),
        "AIORCH_MAX_OUTPUT_SIDE": str(settings.max_output_side),
        "AIORCH_UPSCALE_MAX_BATCH": str(settings.upscale_max_batch),
        "AIORCH_UPSCALE_BATCH_WAIT_MS": str(settings.upscale_batch_wait_ms),
        "AIORCH_MAX_FACES": str(settings.max_faces),
        "AIORCH_MAX_VIDEO_BYTES": str(settings.max_video_bytes),
        "AIORCH_MAX_VIDEO_FRAMES": str(settings.max_video_frames),
        "AIORCH_BROKER_POLL_INTERVAL": str(settings.broker_poll_interval),
        "AIORCH_TRAIN_CHECKPOINT_EVERY": str(settings.train_checkpoint_every),
    }
    if settings.prompt_blocklist:
        env["AIORCH_PROMPT_BLOCKLIST"] = ",".join(settings.prompt_blocklist)
    if settings.webhook_secret:
        env["AIORCH_WEBHOOK_SECRET"] = settings.webhook_secret
    if settings.routes_file is not None:
        env["AIORCH_ROUTES_FILE"] = str(settings.routes_file)
    if settings.styles_file is not None:
        env["AIORCH_STYLES_FILE"] = str(settings.styles_file)
    if settings.ca_bundle is not None:
        env["AIORCH_CA_BUNDLE"] = str(settings.ca_bundle)
    if settings.debug_crash_before_dispatch:
        env["AIORCH_DEBUG_CRASH_BEFORE_DISPATCH"] = settings.debug_crash_before_dispatch
    if settings.storage_url:
        env["AIORCH_STORAGE_URL"] = settings.storage_url
        env["AIORCH_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
        env["AIORCH_S3_REGION"] = settings.s3_region
        env["AIORCH_S3_ACCESS_KEY_ID"] = settings.s3_access_key_id
        env["AIORCH_S3_SECRET_ACCESS_KEY"] = settings.s3_secret_access_key
    return env


@dataclass
class Platform:
    settings: Settings
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIORCH_")}
        env.update(settings_env(self.settings))
        env["PYTHONPATH"] = str(ROOT)
        return env

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the process owns it)
        # A session of its own, so SIGKILL can take the worker with its pool children.
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**self._env(), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_api(self, workers: int = 1, threads: int = 32) -> None:
        """``aiorch serve`` as it ships (one gunicorn process, 32 threads) unless told otherwise."""
        self._spawn(
            "api",
            [sys.executable, "-m", "app.cli", "serve", "--workers", str(workers), "--threads", str(threads)],
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(self.base_url + "/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError("API did not start:\n" + self.log("api"))

    def start_worker(
        self,
        name: str,
        queues: str,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        node: str | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        """A Celery worker named ``node`` (default ``<name>@test``); ``wrap`` goes before its
        command line (the multi-host harness's ``nsenter`` into a host's namespaces)."""
        log = self.logs / f"{name}.log"
        before = log.stat().st_size if log.exists() else 0
        self._spawn(
            name,
            [
                *wrap,
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks.worker:celery",
                "worker",
                "-Q",
                queues,
                "-c",
                str(concurrency),
                "-n",
                node or f"{name}@test",
                "--pool",
                "prefork",
                "--without-mingle",
                "--without-gossip",
                "-E",
                "--loglevel",
                "INFO",
            ],
            env,
        )
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if log.exists() and b" ready." in log.read_bytes()[before:]:
                return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"worker {name} did not start:\n" + self.log(name))

    def start_beat(self) -> None:
        """``aiorch beat``, the periodic sweeps, as ``aiorch up`` runs it."""
        self._spawn("beat", [sys.executable, "-m", "app.cli", "beat"])

    def start_workers(self) -> None:
        self.start_worker("cpu", "cpu", 2)
        self.start_worker("gpu", "gpu.diffusion,gpu.superres,gpu.faceswap,gpu.vision", 1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def log(self, name: str, tail: int | None = 4000) -> str:
        """The end of process ``name``'s log (its last ``tail`` characters; all of it for None)."""
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text if tail is None else text[-tail:]

    # -- client helpers ---------------------------------------------------------------------------
    def headers(self, key: str) -> dict[str, str]:
        return {"X-API-Key": key}

    def submit(self, key: str, task: str, payload: dict[str, Any], **extra: Any) -> requests.Response:
        return requests.post(
            self.base_url + "/v1/jobs",
            json={"task": task, "payload": payload, **extra},
            headers=self.headers(key),
            timeout=15,
        )

    def job(self, key: str, job_id: str) -> dict[str, Any]:
        response = requests.get(f"{self.base_url}/v1/jobs/{job_id}", headers=self.headers(key), timeout=10)
        response.raise_for_status()
        return response.json()

    def wait(
        self,
        key: str,
        job_id: str,
        statuses: set[str] = FINAL,
        timeout: float = 30.0,
        poll: float = 0.05,
    ) -> dict[str, Any]:
        """Poll the job every ``poll`` seconds until its status is one of ``statuses``."""
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.job(key, job_id)
            if job["status"] in statuses:
                return job
            time.sleep(poll)
        raise AssertionError(
            f"job {job_id} still {job.get('status')} after {timeout}s; worker logs:\n"
            + self.log("gpu")[-1500:]
            + self.log("cpu")[-1500:]
        )
