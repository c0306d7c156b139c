"""Every task the platform knows: its queue, payload schema, input fields and time limits.

Local tasks come from the engine registry (``inference/engines/``: each engine declares its
tasks, queue, model types, time estimate and limits once), each paired with its payload schema
(``tasks/payloads/``, ``@payload_for``); the inputs are the schema's ``InputRef`` fields. The
seed 000 names served only by a remote provider, and the aliases, are listed here. A task whose
engine is missing is refused by the API with a clear error instead of queueing a job that can
never run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from marshmallow import Schema

from config import Settings
from config.routes import Routes
from config.styles import StylePreset
from inference.engines import REGISTRY
from inference.registry import Engine, LocalTask
from tasks import payloads
from tasks.outbound import UrlPolicy


@dataclass(frozen=True)
class TaskSpec:
    name: str
    queue: str
    schema: type[Schema]
    # Payload fields that hold input images (a list field holds several).
    inputs: tuple[str, ...]
    summary: str
    # The registered engine that runs it (``inference/engines/``); None: no local engine.
    engine: str | None = None
    soft_time_limit: int = 600
    time_limit: int = 660
    debug_only: bool = False
    # Model types one of which must be in the model store for the task to run (empty: none needed).
    model_types: tuple[str, ...] = ()
    # Input fields (among ``inputs``) that hold a video rather than an image.
    videos: tuple[str, ...] = ()
    # Served only through a route whose backends include a remote provider (no local engine).
    remote_only: bool = False
    # What the task makes: "image" (outputs checked and stored as images) or "video" (an MP4).
    output: str = "image"
    # Seconds a job takes before any job of the task has finished here (``predict_time``).
    predict_seconds: float = 5.0
    # The seed 000 blocking endpoint that runs it, if any.
    blocking_path: str | None = None

    @property
    def available(self) -> bool:
        return self.engine is not None


def local_spec(engine: Engine, task: LocalTask) -> TaskSpec:
    """The catalog entry of a task an engine declares, with its payload schema."""
    schema = payloads.schema_for(task.name)
    inputs, videos = payloads.input_fields(schema)
    return TaskSpec(
        task.name,
        engine.queue,
        schema,
        inputs,
        task.summary,
        engine=engine.name,
        soft_time_limit=task.soft_time_limit,
        time_limit=task.time_limit,
        debug_only=task.debug_only,
        model_types=task.model_types,
        videos=videos,
        predict_seconds=task.predict_seconds,
        blocking_path=task.blocking_path,
    )


def _remote_spec(name: str, summary: str, *, output: str, blocking_path: str) -> TaskSpec:
    schema = payloads.schema_for(name)
    inputs, videos = payloads.input_fields(schema)
    return TaskSpec(
        name,
        "cpu",
        schema,
        inputs,
        summary,
        videos=videos,
        remote_only=True,
        output=output,
        blocking_path=blocking_path,
    )


# Tasks of their own with no local engine: they run only through a configured remote route.
# (ahv_video: no local task generates video; faceswap_video edits one.)
REMOTE_TASKS = (
    _remote_spec(
        "ahv_video",
        "Video generation (text or image to video) through a configured remote provider",
        output="video",
        blocking_path="/ahv/video",
    ),
)


class TaskTable(Mapping[str, TaskSpec]):
    """Task name -> ``TaskSpec``, read from the engine registry and rebuilt when it changes (an
    engine a test registers is a task at once). Local tasks in registry order, then
    ``REMOTE_TASKS``."""

    def __init__(self) -> None:
        self._specs: dict[str, TaskSpec] = {}
        self._generation = -1

    def _table(self) -> dict[str, TaskSpec]:
        if self._generation != REGISTRY.generation:
            specs = {task.name: local_spec(engine, task) for engine, task in REGISTRY.tasks()}
            for spec in REMOTE_TASKS:
                if spec.name in specs:
                    raise ValueError(f"task {spec.name!r} is both remote-only and served by a local engine")
                specs[spec.name] = spec
            self._specs, self._generation = specs, REGISTRY.generation
        return self._specs

    def build(self) -> None:
        """Build the table now (at import: an engine without a payload schema fails there)."""
        self._table()

    def __getitem__(self, name: str) -> TaskSpec:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


TASKS = TaskTable()
TASKS.build()

# Seed 000's task names and endpoint spellings, mapped onto our tasks.
ALIASES: dict[str, str] = {
    "ahv_image": "generate",
    "remove-object": "remove_object",
    "remove_obj": "remove_object",
    "scan-objects": "scan_objects",
    "scan_obj": "scan_objects",
    "remove-background": "remove_background",
    "face-detect": "face_detect",
}

# Seed 000 tasks served by remote providers in the AHV orchestrator; they run here only through a
# configured route (AIORCH_ROUTES_FILE) whose backends include a provider.
REMOTE_ONLY = {
    "gg_image": "Image generation through a configured remote provider",
    "cx_image": "Image generation through a configured remote provider",
}
# The task whose payload schema and local queue a routed remote-only name takes.
REMOTE_TARGETS = {"gg_image": "generate", "cx_image": "generate"}

# Seed 000's blocking endpoints for names that are not tasks of their own (an alias, the
# remote-only names); a task's own endpoint is its ``blocking_path``.
SEED_ENDPOINTS = {"/ahv/image": "ahv_image", "/gg/image": "gg_image", "/cx/image": "cx_image"}


def blocking_endpoints() -> dict[str, str]:
    """Blocking endpoint path -> the task name it submits (seed 000)."""
    found = {spec.blocking_path: name for name, spec in TASKS.items() if spec.blocking_path}
    return {**found, **SEED_ENDPOINTS}


class UnknownTask(LookupError):
    pass


class TaskUnavailable(LookupError):
    pass


def resolve(
    name: str,
    *,
    debug_tasks: bool = False,
    has_model: Callable[[TaskSpec], bool] | None = None,
    routes: Routes | None = None,
) -> TaskSpec:
    """The spec for a task name or alias; raises ``UnknownTask`` / ``TaskUnavailable``.

    ``has_model`` tells whether the model store holds a model the task needs; a task whose engine
    needs weights is unavailable until an operator installs some (``aiorch models add``).
    ``routes``: a task whose route starts with a remote provider runs without a local engine or
    model, and the remote-only seed names (``gg_image``, ...) exist only through a route.
    """
    canonical = REMOTE_TARGETS.get(name) or ALIASES.get(name, name)
    route = routes.for_task(name, canonical) if routes else None
    spec = TASKS.get(canonical)
    remote_only = name in REMOTE_ONLY or (spec is not None and spec.remote_only)
    if remote_only and (route is None or not route.has_remote):
        raise TaskUnavailable(f"task {name!r} needs a remote provider route, and none is configured")
    if spec is None or (spec.debug_only and not debug_tasks):
        raise UnknownTask(f"unknown task {name!r}")
    if route is not None and route.remote_first:
        return spec
    if not spec.available:
        raise TaskUnavailable(f"task {name!r} is known but its engine is not installed on this platform yet")
    if spec.model_types and has_model is not None and not has_model(spec):
        raise TaskUnavailable(
            f"task {name!r} needs a {' or '.join(spec.model_types)} model and none is installed "
            "(aiorch models add PATH)"
        )
    return spec


class TimeLimits(TypedDict):
    """``publish`` options: typed keys, so ``**`` cannot be mistaken for its other arguments."""

    soft_time_limit: int
    time_limit: int


def time_limits(spec: TaskSpec) -> TimeLimits:
    """The run task's limits for this task, sent with its message."""
    return {"soft_time_limit": spec.soft_time_limit, "time_limit": spec.time_limit}


def payload_schema(spec: TaskSpec, settings: Settings) -> Any:
    """The payload schema of ``spec`` under these settings (the SSRF guard's policy,
    AIORCH_MAX_FACES and AIORCH_STYLES_FILE's presets), for the API and the workers alike."""
    return _schema(spec, UrlPolicy.from_settings(settings), settings.max_faces, settings.styles)


@functools.lru_cache(maxsize=256)
def _schema(spec: TaskSpec, url_policy: UrlPolicy, max_faces: int, styles: tuple[StylePreset, ...]) -> Any:
    # One instance per task and policy: building one costs more than loading with it, and
    # ``load`` keeps no state on the instance.
    return spec.schema(url_policy=url_policy, max_faces=max_faces, styles=styles)  # type: ignore[call-arg]


def known_names(debug_tasks: bool = False) -> list[str]:
    names = [n for n, s in TASKS.items() if debug_tasks or not s.debug_only]
    return sorted([*names, *ALIASES, *REMOTE_ONLY])


# Input references a worker reads without the network: checked on the run queue itself.
LOCAL_REFS = ("data:", "asset://")


def fetch_free(spec: TaskSpec, payload: dict[str, Any]) -> bool:
    """True when every input of the payload is a ``data:`` URI or a stored asset, and none is a
    video: such a job skips the prepare queue and its hop (its run task checks the inputs).
    Anything else, an http(s) URL above all, is fetched on the cpu queue, never on a GPU slot."""
    if spec.videos and any(payload.get(field) is not None for field in spec.videos):
        return False
    for field in spec.inputs:
        for _, ref in payloads.input_refs(field, payload.get(field)):
            if ref is not None and not (isinstance(ref, str) and ref.startswith(LOCAL_REFS)):
                return False
    return True
