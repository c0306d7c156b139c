"""Routes: which backend serves which task, in order, read from the JSON file ``AIORCH_ROUTES_FILE``.

The file holds the providers (with their credentials: operators protect the file, and no value of
a credential ever appears in a ``repr``, a log line or an error message) and, for each task name or
seed alias, the ordered backends that may serve it::

    {
      "timeout": 3600, "poll_interval": 2, "max_poll_interval": 30,
      "providers": {
        "st": {"kind": "sensetime", "base_url": "https://mhapi.sensetime.com",
               "access_key": "...", "secret_key": "..."}
      },
      "routes": {
        "gg_image": [{"backend": "st", "task": "generate", "options": {"model_id": "m1"}},
                     {"backend": "local"}],
        "upscale": {"backends": [{"backend": "st", "options": {"model_id": "sr"}}], "timeout": 600}
      }
    }

Everything is checked when the settings load, and every problem names its entry
(``routes.gg_image[0].backend``), so a typo stops the process at start-up, not a job at 3 a.m.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCAL = "local"
DEFAULT_TIMEOUT = 3600.0
DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_MAX_POLL_INTERVAL = 30.0

# Fields per provider kind: (required credentials, optional credentials, optional plain settings).
# The kinds mirror inference.remote.PROVIDERS (config imports nothing of ours, so they are listed).
_KINDS: dict[str, tuple[frozenset[str], frozenset[str], frozenset[str]]] = {
    "sensetime": (frozenset({"access_key", "secret_key"}), frozenset(), frozenset()),
    "volcengine": (frozenset({"access_key", "secret_key"}), frozenset(), frozenset({"region", "service"})),
    "zhinian": (frozenset({"api_key"}), frozenset({"webhook_secret"}), frozenset({"auth_scheme"})),
    "upstream": (frozenset({"api_key"}), frozenset(), frozenset()),
}
_COMMON = frozenset({"kind", "base_url", "connect_timeout", "read_timeout"})
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RoutesError(ValueError):
    """The routes file is unusable; the message names the entry (the settings wrap it)."""


@dataclass(frozen=True)
class Provider:
    """One configured remote provider. ``credentials`` never shows in repr."""

    name: str
    kind: str
    base_url: str
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``inference.remote.build_client(kind, **...)``."""
        kwargs: dict[str, Any] = {"base_url": self.base_url, **self.settings, **self.credentials}
        if self.kind == "upstream":
            kwargs["name"] = self.name
        return kwargs


@dataclass(frozen=True)
class RouteStep:
    """One backend of a route: ``local`` or a provider name, with the provider's task and options."""

    backend: str
    task: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.backend == LOCAL


@dataclass(frozen=True)
class Route:
    name: str
    steps: tuple[RouteStep, ...]
    timeout: float
    poll_interval: float
    max_poll_interval: float

    @property
    def remote_first(self) -> bool:
        return not self.steps[0].is_local

    @property
    def has_remote(self) -> bool:
        return any(not step.is_local for step in self.steps)


@dataclass(frozen=True)
class Routes:
    providers: Mapping[str, Provider] = field(default_factory=dict)
    routes: Mapping[str, Route] = field(default_factory=dict)

    def for_task(self, *names: str) -> Route | None:
        """The route of the first name that has one (the name asked for, then its canonical task)."""
        for name in names:
            if name in self.routes:
                return self.routes[name]
        return None

    def remote_first(self, *names: str) -> bool:
        """Whether the route of ``names`` (as ``for_task``) sends the job to a remote provider first."""
        route = self.for_task(*names)
        return route is not None and route.remote_first

    def __bool__(self) -> bool:
        return bool(self.routes)


NO_ROUTES = Routes()


def load_routes(path: Path) -> Routes:
    """Read and check a routes file; raises ``RoutesError`` naming the bad entry."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutesError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        # The position, not the text: the line could hold a credential.
        raise RoutesError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    return parse_routes(document)


def parse_routes(document: Any) -> Routes:
    top = _mapping(document, "the routes file")
    _only(top, {"providers", "routes", "timeout", "poll_interval", "max_poll_interval"}, "the routes file")
    timeout = _positive(top.get("timeout", DEFAULT_TIMEOUT), "timeout")
    poll = _positive(top.get("poll_interval", DEFAULT_POLL_INTERVAL), "poll_interval")
    max_poll = _positive(top.get("max_poll_interval", DEFAULT_MAX_POLL_INTERVAL), "max_poll_interval")
    providers = {
        name: _provider(name, entry)
        for name, entry in _mapping(top.get("providers", {}), "providers").items()
    }
    routes = {}
    for task, entry in _mapping(top.get("routes", {}), "routes").items():
        routes[task] = _route(task, entry, providers, timeout, poll, max_poll)
    return Routes(providers=providers, routes=routes)


def _provider(name: str, entry: Any) -> Provider:
    where = f"providers.{name}"
    if not _NAME.match(name) or name == LOCAL:
        raise RoutesError(f"{where}: a provider name is 1-64 letters, digits, '_', '-' or '.', not 'local'")
    entry = _mapping(entry, where)
    kind = entry.get("kind")
    if kind not in _KINDS:
        raise RoutesError(f"{where}.kind must be one of {sorted(_KINDS)}, got {kind!r}")
    required, optional_secrets, plain = _KINDS[kind]
    _only(entry, _COMMON | required | optional_secrets | plain, where)
    base_url = entry.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise RoutesError(f"{where}.base_url must be an http(s) URL")
    credentials = {}
    for key in sorted(required | optional_secrets):
        if key not in entry:
            if key in required:
                raise RoutesError(f"{where}.{key} is required for a {kind} provider")
            continue
        value = entry[key]
        if not isinstance(value, str) or not value.strip():
            # Never echo the value: it is a credential.
            raise RoutesError(f"{where}.{key} must be a non-empty string")
        credentials[key] = value
    settings: dict[str, Any] = {}
    for key in ("connect_timeout", "read_timeout"):
        if key in entry:
            settings[key] = _positive(entry[key], f"{where}.{key}")
    for key in sorted(plain):
        if key in entry:
            if not isinstance(entry[key], str) or not entry[key]:
                raise RoutesError(f"{where}.{key} must be a non-empty string")
            settings[key] = entry[key]
    if kind == "zhinian" and settings.get("auth_scheme", "bearer") not in ("bearer", "header"):
        raise RoutesError(f"{where}.auth_scheme must be 'bearer' or 'header'")
    return Provider(name, kind, base_url.rstrip("/"), credentials, settings)


def _route(
    task: str,
    entry: Any,
    providers: Mapping[str, Provider],
    timeout: float,
    poll: float,
    max_poll: float,
) -> Route:
    where = f"routes.{task}"
    if isinstance(entry, Mapping):
        _only(entry, {"backends", "timeout", "poll_interval", "max_poll_interval"}, where)
        timeout = _positive(entry.get("timeout", timeout), f"{where}.timeout")
        poll = _positive(entry.get("poll_interval", poll), f"{where}.poll_interval")
        max_poll = _positive(entry.get("max_poll_interval", max_poll), f"{where}.max_poll_interval")
        entry = entry.get("backends")
        where = f"{where}.backends"
    if not isinstance(entry, list) or not entry:
        raise RoutesError(f"{where} must be a non-empty list of backends")
    steps = []
    for index, raw in enumerate(entry):
        at = f"{where}[{index}]"
        raw = _mapping(raw, at)
        _only(raw, {"backend", "task", "options"}, at)
        backend = raw.get("backend")
        if backend != LOCAL and backend not in providers:
            raise RoutesError(f"{at}.backend must be 'local' or a provider of 'providers', got {backend!r}")
        if backend == LOCAL and index != len(entry) - 1:
            # A local engine's failure is final (it is not a provider being unavailable), so
            # anything listed after it could never be reached.
            raise RoutesError(f"{at}: 'local' must be the last backend of a route")
        remote_task = raw.get("task")
        if remote_task is not None and (not isinstance(remote_task, str) or not remote_task):
            raise RoutesError(f"{at}.task must be a task name")
        options = _mapping(raw.get("options", {}), f"{at}.options")
        if backend == LOCAL and (remote_task or options):
            raise RoutesError(f"{at}: a 'local' backend takes no task or options")
        steps.append(RouteStep(str(backend), remote_task, dict(options)))
    if max_poll < poll:
        raise RoutesError(f"{where}: max_poll_interval must be at least poll_interval")
    return Route(task, tuple(steps), timeout, poll, max_poll)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RoutesError(f"{where} must be a JSON object")
    return value


def _only(entry: Mapping[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise RoutesError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise RoutesError(f"{where} must be a positive number of seconds")
    return float(value)
