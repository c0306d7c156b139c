"""The one typed settings object. Nothing else in aiorch reads the environment.

Every value comes from an ``AIORCH_*`` variable through an explicit converter, so a typo in a
number fails at start-up with the variable's name instead of deep inside a worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from config.devices import parse_gpus
from config.routes import NO_ROUTES, Routes, RoutesError, load_routes
from config.storage import (
    StorageSettingsError,
    check_credentials,
    check_endpoint,
    check_s3_only,
    parse_storage_url,
)
from config.styles import StylePreset, StylesError, load_styles

QUEUES = ("cpu", "gpu.diffusion", "gpu.superres", "gpu.faceswap", "gpu.vision", "gpu.train")
# The longest request line ``aiorch serve`` reads (414 past it): ``GET /v1/events?ids=`` takes up
# to 1000 job ids, about 33 KB of URL (app/gunicorn_json.py raises gunicorn's own 8190 ceiling).
REQUEST_LINE_LIMIT = 64 * 1024


class SettingsError(ValueError):
    """A configuration variable holds a value aiorch cannot use."""


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def _int(name: str, raw: str, *, low: int | None = None, high: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise SettingsError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _gpus(name: str, raw: str) -> tuple[str, ...]:
    try:
        return parse_gpus(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def _float(name: str, raw: str, *, low: float = 0.0) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < low:
        raise SettingsError(f"{name} must be at least {low}, got {value}")
    return value


def _webhook_secret(name: str, raw: str) -> str | None:
    """A Standard Webhooks secret: base64, usually behind ``whsec_``. The verifier libraries
    base64-decode it to get the HMAC key, so a secret that does not decode could never verify."""
    if not raw:
        return None
    import base64
    import binascii

    try:
        key = base64.b64decode(raw.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError(f"{name} must be whsec_ followed by base64 (Standard Webhooks)") from None
    if len(key) < 16:
        raise SettingsError(f"{name} must hold a key of at least 16 bytes")
    return raw


def _networks(name: str, raw: str) -> tuple[str, ...]:
    """``10.1.2.0/24,fd00::/8`` -> the networks as normalised CIDR strings (checked here, so a typo
    stops the process at start-up with the variable's name)."""
    import ipaddress

    networks = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise SettingsError(f"{name}: {item!r} is not an IP network in CIDR form") from None
    return tuple(networks)


def _existing_file(name: str, raw: str) -> Path | None:
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise SettingsError(f"{name}: {raw} is not a readable file")
    return path


def _api_keys(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    """``client-a:key-a,client-b:key-b`` -> ((client, key), ...)."""
    pairs = []
    for position, item in enumerate(raw.split(","), start=1):
        item = item.strip()
        if not item:
            continue
        client, sep, key = item.partition(":")
        if not sep or not client.strip() or not key.strip():
            # The entry is named by position, never echoed: a malformed one is often a bare key.
            raise SettingsError(f"{name} entry {position} must look like client:key")
        pairs.append((client.strip(), key.strip()))
    return tuple(pairs)


def _admin_keys(name: str, raw: str, client_keys: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``AIORCH_ADMIN_KEYS``, as ``AIORCH_API_KEYS``; a key may not be in both (which role would
    it have?)."""
    pairs = _api_keys(name, raw)
    shared = {key for _, key in client_keys} & {key for _, key in pairs}
    if shared:
        position = next(i for i, (_, key) in enumerate(pairs, start=1) if key in shared)
        raise SettingsError(f"{name} entry {position} is also a key of AIORCH_API_KEYS")
    return pairs


def _storage(get: Callable[[str], str]) -> dict[str, str]:
    """The shared-storage fields (``AIORCH_STORAGE_URL`` and its S3 endpoint and credentials),
    checked together: a half-configured bucket stops the process at start-up."""
    names = {
        "AIORCH_S3_ENDPOINT_URL": get("S3_ENDPOINT_URL"),
        "AIORCH_S3_REGION": get("S3_REGION"),
        "AIORCH_S3_ACCESS_KEY_ID": get("S3_ACCESS_KEY_ID"),
        "AIORCH_S3_SECRET_ACCESS_KEY": get("S3_SECRET_ACCESS_KEY"),
    }
    try:
        bucket, prefix = parse_storage_url("AIORCH_STORAGE_URL", get("STORAGE_URL"))
        check_s3_only(bucket, names)
        check_credentials(
            "AIORCH_S3_ACCESS_KEY_ID",
            names["AIORCH_S3_ACCESS_KEY_ID"],
            "AIORCH_S3_SECRET_ACCESS_KEY",
            names["AIORCH_S3_SECRET_ACCESS_KEY"],
        )
        endpoint = check_endpoint("AIORCH_S3_ENDPOINT_URL", names["AIORCH_S3_ENDPOINT_URL"])
    except StorageSettingsError as exc:
        raise SettingsError(str(exc)) from None
    return {
        "storage_url": f"s3://{bucket}/{prefix}".rstrip("/") if bucket else "",
        "s3_endpoint_url": endpoint,
        "s3_region": names["AIORCH_S3_REGION"].strip(),
        "s3_access_key_id": names["AIORCH_S3_ACCESS_KEY_ID"],
        "s3_secret_access_key": names["AIORCH_S3_SECRET_ACCESS_KEY"],
    }


def _blocklist(raw: str) -> tuple[str, ...]:
    """Comma-separated terms, or ``@/path/file`` with one term per line (``#`` comments)."""
    if raw.startswith("@"):
        try:
            lines = Path(raw[1:]).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SettingsError(f"AIORCH_PROMPT_BLOCKLIST: cannot read {raw[1:]}: {exc}") from None
        items = [line.split("#", 1)[0] for line in lines]
    else:
        items = raw.split(",")
    return tuple(term.strip().lower() for term in items if term.strip())


@dataclass(frozen=True)
class Settings:
    """Everything configurable about one aiorch process."""

    var_dir: Path = Path("var")
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = ""
    broker_url: str = ""
    api_keys: tuple[tuple[str, str], ...] = ()
    # Operators' keys (same ``client:key`` form): they read, list, cancel and delete every
    # client's jobs and see every client in /stats and /diag/backends.
    admin_keys: tuple[tuple[str, str], ...] = ()
    # /metrics answers without a key (as before roles existed); otherwise only to an admin key.
    metrics_public: bool = False
    storage_dir: Path = Path("var/storage")
    # Shared storage for several hosts (config/storage.py, tasks/storage_s3.py): s3://bucket/prefix
    # keeps outputs, uploads and checked inputs in an S3-compatible bucket; empty: storage_dir.
    # storage_dir then holds only local scratch copies (a video input an engine reads as a file).
    storage_url: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key_id: str = field(default="", repr=False)
    s3_secret_access_key: str = field(default="", repr=False)
    public_url: str = ""
    webhook_secret: str | None = None
    models_dir: Path = Path("var/models")
    allow_private_urls: bool = False
    # The SSRF guard's exceptions: private networks (CIDR) an operator lets through the same
    # checked, pinned path (an internal image server), and extra CA certificates to trust for
    # every outbound https request (inputs, webhooks, providers).
    allow_private_networks: tuple[str, ...] = ()
    ca_bundle: Path | None = None
    # Inputs: the limits every image passes before an engine sees it.
    max_input_bytes: int = 25 * 1024 * 1024
    max_input_pixels: int = 40_000_000
    min_input_side: int = 16
    fetch_timeout: float = 20.0
    # Upscaling: the longest output side (larger asks are capped to it), and batching of small
    # same-model jobs on gpu.superres (as Ray Serve's max_batch_size / batch_wait_timeout_s).
    max_output_side: int = 8192
    upscale_max_batch: int = 8
    upscale_batch_wait_ms: int = 20
    # Faces: the most faces one image yields and one swap may name (seed 001 allows 4).
    max_faces: int = 8
    # Videos (faceswap_video): their own byte cap, and a frame cap that bounds the GPU time.
    max_video_bytes: int = 200 * 1024 * 1024
    max_video_frames: int = 9000
    # Jobs.
    max_attempts: int = 3
    job_ttl: float = 24 * 3600.0
    republish_after: float = 300.0
    # Jobs sent to a local engine queue beyond its workers' slots, so a worker never idles between
    # two jobs (fair share: models/dispatch.py).
    dispatch_ahead: int = 1
    result_retention: float = 7 * 24 * 3600.0
    sync_timeout: float = 120.0
    webhook_timeout: float = 10.0
    webhook_retry_base: float = 10.0
    # After a client rotates its webhook secret, deliveries carry both signatures this long.
    webhook_secret_grace: float = 86400.0
    stream_keepalive: float = 15.0  # seconds between keep-alive comments on an idle event stream
    # Events of the jobs' lifecycle log are kept this long, then pruned by the sweep.
    event_retention: float = 7 * 24 * 3600.0
    # Assets: bytes of uploads one client may keep at once (0 = no quota).
    asset_quota_bytes: int = 5 * 1024**3
    # Workers.
    broker_poll_interval: float = 0.05
    worker_concurrency: int = 0
    # GPUs a worker's processes share (process i takes gpus[i mod len]); empty: CUDA_VISIBLE_DEVICES
    # as inherited, else every GPU nvidia-smi lists (``inference.devices``).
    gpus: tuple[str, ...] = ()
    # train_lora: steps between checkpoints (a run that died resumes from the last one).
    train_checkpoint_every: int = 100
    debug_tasks: bool = False
    # Fault tests only (honoured with debug_tasks): a worker that commits a move with this event
    # type (e.g. ``job.finished``) kills itself before kicking the dispatcher; ``fill_slots``: a
    # worker that filled a queue's slots kills itself between that COMMIT and the publish.
    debug_crash_before_dispatch: str = ""
    # Content safety: prompts containing any of these words or phrases are refused (rejected).
    prompt_blocklist: tuple[str, ...] = ()
    log_json: bool = True
    log_level: str = "INFO"
    # Per-client admission limits on POST /v1/jobs (0 = off): jobs created in the last minute,
    # and jobs waiting in ``queued`` at once. Over either, the answer is 429 with Retry-After.
    rate_limit_per_minute: int = 0
    max_queued_per_client: int = 0
    # A client's jobs running at once across all workers (0 = no limit), and the highest
    # ``priority`` its jobs get (a higher ask is lowered to it). All four are defaults: a client's
    # own limits (``aiorch keys update CLIENT ...``, models/client_limits.py) override them.
    max_running_per_client: int = 0
    max_priority: int = 9
    # glibc's own MALLOC_ARENA_MAX, when the operator set one: ``aiorch serve`` then leaves the
    # malloc arena cap to it instead of applying its own (app/cli.py).
    operator_malloc_arenas: str = ""
    flower_user: str = "admin"
    flower_password: str = ""
    flower_port: int = 5555
    # RabbitMQ's management API, which Flower needs to show queue depths of an amqp broker;
    # derived from the broker URL (same host and credentials, port 15672) unless set.
    flower_broker_api: str = ""
    # Remote providers and which backend serves which task (config/routes.py); None: all local.
    routes_file: Path | None = None
    # The operator's stylize presets (config/styles.py), merged over the built-in ones; None: none.
    styles_file: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def routes(self) -> Routes:
        """The parsed routes file (read once per settings object; ``from_env`` reads it eagerly)."""
        if self.routes_file is None:
            return NO_ROUTES
        try:
            return load_routes(self.routes_file)
        except RoutesError as exc:
            raise SettingsError(f"AIORCH_ROUTES_FILE: {exc}") from None

    @cached_property
    def styles(self) -> tuple[StylePreset, ...]:
        """The styles file's presets (read once per settings object; ``from_env`` reads it eagerly)."""
        if self.styles_file is None:
            return ()
        try:
            return load_styles(self.styles_file)
        except StylesError as exc:
            raise SettingsError(f"AIORCH_STYLES_FILE: {exc}") from None

    @property
    def embedded(self) -> bool:
        return self.database_url.startswith("sqlite") or self.broker_url.startswith("filesystem")

    @property
    def broker_folder(self) -> Path:
        return self.var_dir / "broker"

    @property
    def files_dir(self) -> Path:
        return self.storage_dir / "files"

    @property
    def inputs_dir(self) -> Path:
        return self.storage_dir / "inputs"

    @property
    def s3_bucket(self) -> str:
        return parse_storage_url("AIORCH_STORAGE_URL", self.storage_url)[0]

    @property
    def s3_prefix(self) -> str:
        return parse_storage_url("AIORCH_STORAGE_URL", self.storage_url)[1]

    @property
    def broker_management_api(self) -> str | None:
        """Flower's ``--broker_api``: the configured one, else RabbitMQ's management API on the
        broker's host with its credentials; None for brokers Flower reads directly or not at all."""
        if self.flower_broker_api:
            return self.flower_broker_api
        from urllib.parse import quote, unquote, urlsplit

        parts = urlsplit(self.broker_url)
        if parts.scheme not in ("amqp", "amqps", "pyamqp"):
            return None
        user = quote(unquote(parts.username or "guest"), safe="")
        password = quote(unquote(parts.password or "guest"), safe="")
        scheme = "https" if parts.scheme == "amqps" else "http"
        return f"{scheme}://{user}:{password}@{parts.hostname or 'localhost'}:15672/api/"

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(key: str, default: str = "") -> str:
            return env.get(f"AIORCH_{key}", default)

        var_dir = Path(get("VAR_DIR", "var")).resolve()
        port = _int("AIORCH_PORT", get("PORT", "8000"), low=1, high=65535)
        host = get("HOST", "127.0.0.1")
        storage = Path(get("STORAGE_DIR") or var_dir / "storage").resolve()
        shared = _storage(get)
        routes_file = get("ROUTES_FILE")
        api_keys = _api_keys("AIORCH_API_KEYS", get("API_KEYS"))
        settings = cls(
            var_dir=var_dir,
            host=host,
            port=port,
            database_url=get("DATABASE_URL") or f"sqlite:///{var_dir / 'aiorch.db'}",
            broker_url=get("BROKER_URL") or "filesystem://",
            api_keys=api_keys,
            admin_keys=_admin_keys("AIORCH_ADMIN_KEYS", get("ADMIN_KEYS"), api_keys),
            metrics_public=_bool("AIORCH_METRICS_PUBLIC", get("METRICS_PUBLIC", "0")),
            storage_dir=storage,
            storage_url=shared["storage_url"],
            s3_endpoint_url=shared["s3_endpoint_url"],
            s3_region=shared["s3_region"],
            s3_access_key_id=shared["s3_access_key_id"],
            s3_secret_access_key=shared["s3_secret_access_key"],
            public_url=(get("PUBLIC_URL") or f"http://{host}:{port}").rstrip("/"),
            webhook_secret=_webhook_secret("AIORCH_WEBHOOK_SECRET", get("WEBHOOK_SECRET")),
            models_dir=Path(get("MODELS_DIR") or var_dir / "models").resolve(),
            allow_private_urls=_bool("AIORCH_ALLOW_PRIVATE_URLS", get("ALLOW_PRIVATE_URLS", "0")),
            allow_private_networks=_networks(
                "AIORCH_ALLOW_PRIVATE_NETWORKS", get("ALLOW_PRIVATE_NETWORKS")
            ),
            ca_bundle=_existing_file("AIORCH_CA_BUNDLE", get("CA_BUNDLE")),
            max_input_bytes=_int("AIORCH_MAX_INPUT_BYTES", get("MAX_INPUT_BYTES", str(25 << 20)), low=1024),
            max_input_pixels=_int("AIORCH_MAX_INPUT_PIXELS", get("MAX_INPUT_PIXELS", "40000000"), low=1),
            min_input_side=_int("AIORCH_MIN_INPUT_SIDE", get("MIN_INPUT_SIDE", "16"), low=1),
            fetch_timeout=_float("AIORCH_FETCH_TIMEOUT", get("FETCH_TIMEOUT", "20"), low=0.1),
            max_output_side=_int("AIORCH_MAX_OUTPUT_SIDE", get("MAX_OUTPUT_SIDE", "8192"), low=64),
            upscale_max_batch=_int("AIORCH_UPSCALE_MAX_BATCH", get("UPSCALE_MAX_BATCH", "8"), low=1, high=64),
            upscale_batch_wait_ms=_int(
                "AIORCH_UPSCALE_BATCH_WAIT_MS", get("UPSCALE_BATCH_WAIT_MS", "20"), low=0, high=10_000
            ),
            max_faces=_int("AIORCH_MAX_FACES", get("MAX_FACES", "8"), low=1, high=64),
            max_video_bytes=_int("AIORCH_MAX_VIDEO_BYTES", get("MAX_VIDEO_BYTES", str(200 << 20)), low=1024),
            max_video_frames=_int("AIORCH_MAX_VIDEO_FRAMES", get("MAX_VIDEO_FRAMES", "9000"), low=1),
            max_attempts=_int("AIORCH_MAX_ATTEMPTS", get("MAX_ATTEMPTS", "3"), low=1, high=100),
            job_ttl=_float("AIORCH_JOB_TTL", get("JOB_TTL", str(24 * 3600)), low=1),
            republish_after=_float("AIORCH_REPUBLISH_AFTER", get("REPUBLISH_AFTER", "300"), low=1),
            dispatch_ahead=_int("AIORCH_DISPATCH_AHEAD", get("DISPATCH_AHEAD", "1"), low=0),
            result_retention=_float(
                "AIORCH_RESULT_RETENTION", get("RESULT_RETENTION", str(7 * 86400)), low=1
            ),
            sync_timeout=_float("AIORCH_SYNC_TIMEOUT", get("SYNC_TIMEOUT", "120"), low=0.1),
            stream_keepalive=_float("AIORCH_STREAM_KEEPALIVE", get("STREAM_KEEPALIVE", "15"), low=0.05),
            webhook_timeout=_float("AIORCH_WEBHOOK_TIMEOUT", get("WEBHOOK_TIMEOUT", "10"), low=0.1),
            webhook_retry_base=_float("AIORCH_WEBHOOK_RETRY_BASE", get("WEBHOOK_RETRY_BASE", "10"), low=0.01),
            webhook_secret_grace=_float(
                "AIORCH_WEBHOOK_SECRET_GRACE", get("WEBHOOK_SECRET_GRACE", "86400"), low=0
            ),
            event_retention=_float(
                "AIORCH_EVENT_RETENTION", get("EVENT_RETENTION", str(7 * 86400)), low=60
            ),
            asset_quota_bytes=_int(
                "AIORCH_ASSET_QUOTA_BYTES", get("ASSET_QUOTA_BYTES", str(5 * 1024**3)), low=0
            ),
            broker_poll_interval=_float("AIORCH_BROKER_POLL_INTERVAL", get("BROKER_POLL_INTERVAL", "0.05")),
            worker_concurrency=_int("AIORCH_WORKER_CONCURRENCY", get("WORKER_CONCURRENCY", "0"), low=0),
            gpus=_gpus("AIORCH_GPUS", get("GPUS")),
            train_checkpoint_every=_int(
                "AIORCH_TRAIN_CHECKPOINT_EVERY", get("TRAIN_CHECKPOINT_EVERY", "100"), low=1
            ),
            debug_tasks=_bool("AIORCH_DEBUG_TASKS", get("DEBUG_TASKS", "0")),
            debug_crash_before_dispatch=get("DEBUG_CRASH_BEFORE_DISPATCH"),
            prompt_blocklist=_blocklist(get("PROMPT_BLOCKLIST")),
            log_json=_bool("AIORCH_LOG_JSON", get("LOG_JSON", "1")),
            log_level=get("LOG_LEVEL", "INFO").upper(),
            rate_limit_per_minute=_int(
                "AIORCH_RATE_LIMIT_PER_MINUTE", get("RATE_LIMIT_PER_MINUTE", "0"), low=0
            ),
            max_queued_per_client=_int(
                "AIORCH_MAX_QUEUED_PER_CLIENT", get("MAX_QUEUED_PER_CLIENT", "0"), low=0
            ),
            max_running_per_client=_int(
                "AIORCH_MAX_RUNNING_PER_CLIENT", get("MAX_RUNNING_PER_CLIENT", "0"), low=0
            ),
            max_priority=_int("AIORCH_MAX_PRIORITY", get("MAX_PRIORITY", "9"), low=0, high=9),
            operator_malloc_arenas=env.get("MALLOC_ARENA_MAX", ""),
            flower_user=get("FLOWER_USER", "admin"),
            flower_password=get("FLOWER_PASSWORD"),
            flower_port=_int("AIORCH_FLOWER_PORT", get("FLOWER_PORT", "5555"), low=1, high=65535),
            flower_broker_api=get("FLOWER_BROKER_API"),
            routes_file=Path(routes_file).resolve() if routes_file else None,
            styles_file=_existing_file("AIORCH_STYLES_FILE", get("STYLES_FILE")),
        )
        # Read now, so a bad routes file stops the process at start-up with the entry's name.
        settings.routes  # noqa: B018
        settings.styles  # noqa: B018  (the same for the styles file, naming the preset and field)
        return settings
