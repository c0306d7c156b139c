"""What one worker process holds for its engines: its device, its model cache and its model store.

Device policy: one GPU per pool process (child ``i`` of a ``-c N`` worker takes GPU ``i mod
count``); ONNX sessions use CUDA when the onnxruntime build has it, with the CPU after it.
Cache policy: one ``ModelCache`` per process, bounded by the device's memory budget, evicting
the least recently used model; engines load through it and never hold weights of their own.

torch is imported inside the functions that need it: the API and the cpu workers import this
module (through the engine declarations) and must not load torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from config import Settings
from inference.base import EngineError, InvalidInput
from inference.model_cache import ModelCache, default_budget_bytes, estimate_checkpoint_bytes
from inference.model_store import ModelEntry, ModelNotFound, ModelStore
from inference.registry import EngineCall

_pool_index = 0
_cache: ModelCache | None = None


def set_pool_index(index: int) -> None:
    """This process's slot in its worker pool (0 .. concurrency-1), told by the worker as the
    child starts (``tasks/warmup.py``); 0 outside a pool."""
    global _pool_index
    _pool_index = max(0, int(index))


def cuda_device_for(index: int, device_count: int) -> str:
    """One GPU per pool process: child ``i`` of a ``-c N`` worker takes GPU ``i mod count``, so a
    worker started with one process per GPU spreads over all of them."""
    return f"cuda:{index % device_count}" if device_count > 1 else "cuda"


def torch_device() -> str:
    """CUDA when this process sees a GPU, else the CPU."""
    import torch  # heavy: only a process that runs a torch engine loads it

    if not torch.cuda.is_available():
        return "cpu"
    device = cuda_device_for(_pool_index, torch.cuda.device_count())
    if device != "cuda":
        torch.cuda.set_device(device)
    return device


def onnx_providers(available: Sequence[str], device: str = "auto") -> list[str]:
    """The execution providers to open an ONNX session with, best first, given what this
    onnxruntime build offers (``ort.get_available_providers()``).

    ``auto``: CUDA first when the build has it (a GPU worker installs ``onnxruntime-gpu``), and
    always the CPU after it, where onnxruntime places any op the CUDA provider lacks. ``cuda``
    insists on CUDA; ``cpu`` never uses it.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise EngineError("device 'cuda' asked for, but this onnxruntime has no CUDA provider")
    if device != "cpu" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def model_cache() -> ModelCache:
    """The per-process cache of loaded models, bounded by the device's memory budget."""
    global _cache
    if _cache is None:
        device = torch_device()
        _cache = ModelCache(default_budget_bytes(device), device=device)
    return _cache


def loaded_models() -> list[dict[str, Any]]:
    """What the cache holds now, for diagnostics; empty (and no torch loaded) before any model."""
    return [] if _cache is None else list(_cache.loaded())


def model_store(settings: Settings) -> ModelStore:
    """The model store of ``AIORCH_MODELS_DIR``."""
    return ModelStore(settings.models_dir)


def chosen_model(call: EngineCall, task: str, types: tuple[str, ...]) -> ModelEntry | None:
    """The store entry named by ``payload.model``; None when the payload names none."""
    model_id = call.payload.get("model")
    if not model_id:
        return None
    try:
        entry = model_store(call.settings).get(model_id)
    except ModelNotFound:
        raise InvalidInput(f"model {model_id!r} is not installed", field="model") from None
    if entry.type not in types or task not in entry.tasks:
        raise InvalidInput(f"model {model_id!r} ({entry.type}) does not serve {task}", field="model")
    return entry


def load_cached(key: str, path: Path, loader: Callable[[], Any]) -> Any:
    """``loader()``'s model from the process cache, loaded (and budgeted by its files' size) once."""
    return model_cache().get_or_load(key, loader, estimate_checkpoint_bytes(path))
