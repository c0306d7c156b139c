"""The engine registry: every local task, declared once by the engine that runs it.

An engine module (``inference/engines/<name>.py``) ends with ``ENGINE = Engine(...)``: the queue
its jobs run on, the tasks it serves (each with its summary, the model types it needs, its
default time estimate, its time limits and its blocking endpoint), the modules a worker of that
queue imports ahead of its first job, and the function that runs one call. ``inference.engines``
collects every such module into ``REGISTRY``; the task catalog (``tasks/catalog.py``), the
worker warm-up (``tasks/warmup.py``), the API's time estimates and its blocking endpoints all
read it, and keep no lists of their own.

The API imports this module to read the declarations, so it stays light: no numpy, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from config import QUEUES, Settings
from inference.base import EngineResult, RunControl


@dataclass
class EngineCall:
    """One job as an engine sees it: its task, its validated payload and its decoded inputs."""

    task: str
    payload: dict[str, Any]
    images: dict[str, Any]  # field -> PIL image, or a list of them for list fields
    control: RunControl
    attempt: int
    settings: Settings
    job_id: str = ""
    # The client whose job it is: the models it may name are the operator's and its own.
    owner: str = ""


Run = Callable[[EngineCall], EngineResult]
# Several calls in one pass; each gets its own outcome (a result, or the error that refused it).
RunBatch = Callable[[list[EngineCall], RunControl], list[EngineResult | Exception]]


@dataclass(frozen=True)
class LocalTask:
    """One task an engine serves, as the catalog, the API and the workers see it."""

    name: str
    summary: str
    # Model types one of which must be installed for the task to run (empty: none needed).
    model_types: tuple[str, ...] = ()
    # Seconds a job takes before any job of the task has finished here (then measurements take
    # over): the platform's first ``predict_time``. Rough GPU figures.
    predict_seconds: float = 5.0
    soft_time_limit: int = 600
    time_limit: int = 660
    # The seed 000 blocking endpoint that runs this task (``POST <path>``), if it has one.
    blocking_path: str | None = None
    # Listed and accepted only with AIORCH_DEBUG_TASKS.
    debug_only: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or not self.name.islower():
            raise ValueError(f"task name {self.name!r} must be a lower-case identifier")
        if self.predict_seconds <= 0:
            raise ValueError(f"task {self.name!r}: predict_seconds must be positive")
        if not 0 < self.soft_time_limit < self.time_limit:
            raise ValueError(f"task {self.name!r}: needs 0 < soft_time_limit < time_limit")
        if self.blocking_path is not None and not self.blocking_path.startswith("/"):
            raise ValueError(f"task {self.name!r}: blocking_path must start with '/'")


@dataclass(frozen=True)
class Engine:
    """An engine: the tasks it serves, the queue they run on, how to run them and warm it up."""

    name: str
    queue: str
    tasks: tuple[LocalTask, ...]
    # Runs one call; ``call.task`` says which of ``tasks`` it is.
    run: Run
    # Runs several waiting jobs as one batch (``tasks/batching.py`` picks them), if it can.
    run_batch: RunBatch | None = None
    # Modules a worker consuming ``queue`` imports in each pool child as it starts (torch,
    # onnxruntime and the engine code: seconds), so its first job does not pay for them.
    warmup: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.queue not in QUEUES:
            raise ValueError(
                f"engine {self.name!r}: unknown queue {self.queue!r} (one of {', '.join(QUEUES)})"
            )
        if not self.tasks:
            raise ValueError(f"engine {self.name!r} serves no task")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"engine {self.name!r} declares a task twice: {names}")


class Registry:
    """The engines this process knows, and their tasks, in registration order."""

    def __init__(self, engines: Iterable[Engine] = ()):
        self._engines: dict[str, Engine] = {}
        self._by_task: dict[str, Engine] = {}
        # Bumped on every change, so views built from the registry (the catalog) know to rebuild.
        self.generation = 0
        for engine in engines:
            self.register(engine)

    def register(self, engine: Engine) -> Engine:
        """Add ``engine``; a task or engine name already taken is refused (``ValueError``)."""
        if engine.name in self._engines:
            raise ValueError(f"an engine named {engine.name!r} is already registered")
        for task in engine.tasks:
            if task.name in self._by_task:
                owner = self._by_task[task.name].name
                raise ValueError(f"task {task.name!r} is already served by engine {owner!r}")
        self._engines[engine.name] = engine
        for task in engine.tasks:
            self._by_task[task.name] = engine
        self.generation += 1
        return engine

    def unregister(self, name: str) -> Engine:
        """Remove the engine ``name`` and its tasks (``KeyError`` when there is none)."""
        engine = self._engines.pop(name)
        for task in engine.tasks:
            del self._by_task[task.name]
        self.generation += 1
        return engine

    def engines(self) -> tuple[Engine, ...]:
        return tuple(self._engines.values())

    def engine(self, name: str) -> Engine:
        return self._engines[name]

    def engine_for(self, task: str) -> Engine:
        """The engine that serves ``task`` (``KeyError`` when none does)."""
        return self._by_task[task]

    def tasks(self) -> list[tuple[Engine, LocalTask]]:
        return [(engine, task) for engine in self._engines.values() for task in engine.tasks]

    def warmup_modules(self, queues: Iterable[str]) -> list[str]:
        """What a worker consuming ``queues`` pre-imports, each module once, in engine order."""
        wanted = set(queues)
        found: dict[str, None] = {}
        for engine in self._engines.values():
            if engine.queue in wanted:
                found.update(dict.fromkeys(engine.warmup))
        return list(found)
