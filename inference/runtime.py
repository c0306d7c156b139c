"""What one worker process holds for its engines: its device, its model cache and its model store.

Device policy: one GPU per pool process, chosen before CUDA starts (``inference.devices``), seen
by torch as ``cuda`` and by ONNX Runtime as ``device_id`` 0. On a process with a GPU, ONNX
sessions run on CUDA or not at all: a session that falls back to the CPU (CUDA or cuDNN libraries
missing, a build for another CUDA) fails the job loudly instead of running 10-50x slower.
Cache policy: one ``ModelCache`` per process, bounded by its share of the device's memory less
ONNX Runtime's arena, evicting the least recently used model; engines load through it and never
hold weights of their own. After a GPU fault, ``release_memory`` empties it.

torch is imported inside the functions that need it: the API and the cpu workers import this
module (through the engine declarations) and must not load torch.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from config import Settings
from inference import devices
from inference.base import EngineError, InvalidInput
from inference.model_cache import ModelCache, estimate_checkpoint_bytes, file_identity
from inference.model_store import ModelEntry, ModelNotFound, ModelStore
from inference.registry import EngineCall

log = logging.getLogger("aiorch.runtime")

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

_cache: ModelCache | None = None
_onnx_on: set[str] = set()  # the first provider of every ONNX session this process opened
_diffusion: Any = None  # the diffusion model layer, once a diffusion engine ran here


def torch_device() -> str:
    """CUDA when this process sees a GPU (the one ``inference.devices`` left visible), else the CPU."""
    import torch  # heavy: only a process that runs a torch engine loads it

    return "cuda" if torch.cuda.is_available() else "cpu"


def onnx_providers(available: Sequence[str], device: str = "auto") -> list[str]:
    """The execution providers to open an ONNX session with, best first, given what this
    onnxruntime build offers (``ort.get_available_providers()``).

    ``auto``: CUDA first when the build has it (a GPU worker installs ``onnxruntime-gpu``), and
    always the CPU after it, where onnxruntime places any op the CUDA provider lacks. ``cuda``
    insists on CUDA; ``cpu`` never uses it.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    has_cuda = CUDA_PROVIDER in available
    if device == "cuda" and not has_cuda:
        raise EngineError("device 'cuda' asked for, but this onnxruntime has no CUDA provider")
    if device != "cpu" and has_cuda:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def onnx_session_providers(device: str = "auto") -> list[Any]:
    """The providers, with options, for an ONNX session of this process.

    On a process with a GPU (``auto`` or ``cuda``), CUDA with this process's device and a bounded
    arena (``inference.devices.cuda_options``), the CPU after it for the ops CUDA lacks; an
    onnxruntime without the CUDA provider there is an error (``device_unavailable``), not a
    quiet CPU run. Without a GPU, the CPU (``cuda`` asked for then is an error).
    """
    import onnxruntime as ort

    names = onnx_providers(ort.get_available_providers(), device)
    gpu = device != "cpu" and torch_device() != "cpu"
    if not gpu:
        if device == "cuda":
            raise EngineError(
                "device 'cuda' asked for, but this process has no GPU", code="device_unavailable"
            )
        return [CPU_PROVIDER]
    if names[0] != CUDA_PROVIDER:
        raise EngineError(
            "this worker has a GPU but its onnxruntime has no CUDA provider: install onnxruntime-gpu "
            "built for the CUDA of torch",
            code="device_unavailable",
        )
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:  # CUDA and cuDNN from the nvidia-* wheels torch brought
        try:
            preload(cuda=True, cudnn=True, msvc=False)
        except Exception as exc:  # the session check below says what this means
            log.warning("onnxruntime could not preload the CUDA libraries: %s", exc)
    arena = devices.onnx_arena_bytes(devices.budget_bytes("cuda"))
    return [(CUDA_PROVIDER, devices.cuda_options(0, arena)), CPU_PROVIDER]


def check_onnx_session(session: Any, providers: Sequence[Any]) -> Any:
    """``session`` if it runs on the provider asked for first; a session that ONNX Runtime quietly
    put on the CPU when CUDA was asked for is an error (``device_unavailable``)."""
    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    running = session.get_providers()[0]
    _onnx_on.add(running)
    if first == CUDA_PROVIDER and running != CUDA_PROVIDER:
        raise EngineError(
            "onnxruntime could not use the GPU (its CUDA or cuDNN libraries are missing or built for "
            "another CUDA) and would run this model on the CPU",
            code="device_unavailable",
        )
    return session


def onnx_report() -> dict[str, Any]:
    """What ONNX Runtime offers this process and where its sessions run; nothing imported for it."""
    ort = sys.modules.get("onnxruntime")
    if ort is None:
        return {}
    return {"available": list(ort.get_available_providers()), "sessions_on": sorted(_onnx_on)}


def model_cache() -> ModelCache:
    """The per-process cache of loaded models, bounded by the device's memory budget."""
    global _cache
    if _cache is None:
        device = torch_device()
        budget = devices.budget_bytes(device)
        if device != "cpu":
            budget -= devices.onnx_arena_bytes(budget)
        _cache = ModelCache(budget, device=device)
    return _cache


def release_memory() -> None:
    """After a GPU fault: drop every cached model not in use and hand CUDA's cached blocks back,
    so the next job starts on an empty device rather than on what the failed one left."""
    if _cache is not None:
        _cache.clear()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and devices.cuda_initialized():
        torch.cuda.empty_cache()


def loaded_models() -> list[dict[str, Any]]:
    """What the cache holds now, for diagnostics; empty (and no torch loaded) before any model."""
    return [] if _cache is None else list(_cache.loaded())


def model_store(settings: Settings) -> ModelStore:
    """The model store of ``AIORCH_MODELS_DIR``."""
    return ModelStore(settings.models_dir)


def diffusion_models(settings: Settings) -> Any:
    """The process's one diffusion model layer (``inference.diffusion.DiffusionModels``), built on
    the first diffusion job: every engine that runs a diffusers pipeline shares it, and with it
    the loaded pipelines and their LoRA adapters."""
    global _diffusion
    if _diffusion is None:
        from inference.diffusion import DiffusionModels  # heavy: torch, diffusers

        _diffusion = DiffusionModels(model_store(settings), model_cache())
    return _diffusion


def chosen_model(call: EngineCall, task: str, types: tuple[str, ...]) -> ModelEntry | None:
    """The store entry named by ``payload.model``; None when the payload names none."""
    model_id = call.payload.get("model")
    if not model_id:
        return None
    try:
        entry = model_store(call.settings).get(model_id, client=call.owner or None)
    except ModelNotFound:
        raise InvalidInput(f"model {model_id!r} is not installed", field="model") from None
    if entry.type not in types or task not in entry.tasks:
        raise InvalidInput(f"model {model_id!r} ({entry.type}) does not serve {task}", field="model")
    return entry


def load_cached(key: str, path: Path, loader: Callable[[], Any]) -> Any:
    """``loader()``'s model from the process cache, loaded (and budgeted by its files' size) once
    for these files (``key#<file_identity>``)."""
    return model_cache().get_or_load(f"{key}#{file_identity(path)}", loader, estimate_checkpoint_bytes(path))
