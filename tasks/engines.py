"""The engines as the run task calls them: engine name -> its run (and batch run) function.

Read through to the registry (``inference/engines/``), where each engine declares its tasks,
queue, model types and warm-up once; ``TaskSpec.engine`` names the entry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from inference.engines import REGISTRY
from inference.registry import EngineCall, Registry, Run, RunBatch

__all__ = ["BATCH_ENGINES", "ENGINES", "EngineCall"]

F = TypeVar("F")


class _Functions(Mapping[str, F], Generic[F]):
    """Engine name -> one of its functions, read through to the registry, so an engine
    registered later (a test's) is seen at once; engines without that function are absent."""

    def __init__(self, registry: Registry, attribute: str):
        self._registry = registry
        self._attribute = attribute

    def __getitem__(self, name: str) -> F:
        found: F | None = getattr(self._registry.engine(name), self._attribute)
        if found is None:
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        return (e.name for e in self._registry.engines() if getattr(e, self._attribute) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


ENGINES: Mapping[str, Run] = _Functions[Run](REGISTRY, "run")
# Engines that can run several waiting jobs as one batch (tasks/batching.py picks the jobs).
BATCH_ENGINES: Mapping[str, RunBatch] = _Functions[RunBatch](REGISTRY, "run_batch")
