"""Which GPU a worker process uses, how much of it, and what a GPU fault means for the process.

Chosen once per pool child, in its process init, before torch or ONNX Runtime initialise CUDA:

- ``AIORCH_GPUS`` (``aiorch worker --gpus 0,1``; ``Settings.gpus``) lists the GPUs a worker's
  processes share. Child ``i`` of a ``-c N`` pool sees only GPU ``gpus[i mod len]``: its
  ``CUDA_VISIBLE_DEVICES`` is that one id, so torch's ``cuda`` and ONNX Runtime's ``device_id=0``
  are that GPU. Without the setting, the GPUs of an inherited ``CUDA_VISIBLE_DEVICES`` (one worker
  per GPU, started with it set), else every GPU ``nvidia-smi`` lists; with none, the CPU.
- The pool's processes on one GPU share its memory: each budgets a fraction of what is free for
  its share (``budget_bytes``), so two processes on one card never commit 120 % of it. ONNX
  Runtime's CUDA arena is capped (``onnx_arena_bytes``) and counted inside that budget.
- ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the operator set it: mixed image
  sizes then fragment the caching allocator far less.

The process environment itself is read and written by ``config.devices``. Nothing here imports
torch at module level: the API and the cpu workers import this module.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from config import devices as config_devices

log = logging.getLogger("aiorch.devices")

BUDGET_FRACTION = 0.6  # of the memory free for this process: the rest is headroom for activations
ONNX_ARENA_CAP = 2 * 2**30  # ONNX Runtime's CUDA arena: at most this, and a quarter of the budget


@dataclass(frozen=True)
class Assignment:
    """This process's GPU (its id as ``CUDA_VISIBLE_DEVICES`` names it; None: none assigned, the
    process sees what it inherited) and how many of its pool's processes share that GPU."""

    gpu: str | None = None
    share: int = 1


_assignment = Assignment()


def assign(index: int, concurrency: int, gpus: Sequence[str]) -> Assignment:
    """Child ``index`` of a pool of ``concurrency`` processes over ``gpus``: its GPU and how many
    of the pool's processes land on it."""
    if not gpus:
        return Assignment()
    slot = index % len(gpus)
    share = sum(1 for child in range(max(concurrency, index + 1)) if child % len(gpus) == slot)
    return Assignment(gpus[slot], max(1, share))


def discover_gpus(configured: Sequence[str]) -> list[str]:
    """The GPUs this worker may use: ``configured`` (``AIORCH_GPUS``), else those an inherited
    ``CUDA_VISIBLE_DEVICES`` leaves, else every GPU ``nvidia-smi`` lists; none on a machine
    without GPUs."""
    if configured:
        return list(configured)
    visible = config_devices.visible_gpus()
    return list(visible if visible is not None else config_devices.listed_gpus())


def cuda_initialized() -> bool:
    """Whether this process already made a CUDA context (torch consulted only if imported)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def configure_process(index: int, concurrency: int, configured: Sequence[str] = ()) -> Assignment:
    """Choose this pool child's GPU and set its environment; call before anything touches CUDA."""
    global _assignment
    if cuda_initialized():
        config_devices.use_only(None)
        log.error("CUDA was initialised before the device was chosen; this process keeps its device")
        return _assignment
    chosen = assign(index, concurrency, discover_gpus(configured))
    config_devices.use_only(chosen.gpu)
    _assignment = chosen
    log.info("pool process %d of %d: GPU %s (shared by %d)", index, concurrency, chosen.gpu, chosen.share)
    return chosen


def assignment() -> Assignment:
    return _assignment


def budget_bytes(device: str = "cpu", fraction: float = BUDGET_FRACTION, share: int | None = None) -> int:
    """The model cache's budget: ``fraction`` of the memory free for this process's share of the
    device (on a GPU: what is free now, but never more than the card's total over the processes
    that share it), or of the machine's memory on the CPU."""
    if str(device).startswith("cuda"):
        import torch  # heavy: only a process that runs a torch engine gets here

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(min(free, total / max(1, share or _assignment.share)) * fraction)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * fraction)


def onnx_arena_bytes(budget: int) -> int:
    """The cap of ONNX Runtime's CUDA arena, taken out of the process budget."""
    return min(ONNX_ARENA_CAP, budget // 4)


def cuda_options(device_id: int, arena_bytes: int) -> dict[str, Any]:
    """The CUDA execution provider's options: this process's device, a bounded arena that grows by
    what is asked (not by doubling), and cuDNN's heuristic algorithm choice (the exhaustive search
    costs seconds on every new input shape)."""
    return {
        "device_id": device_id,
        "gpu_mem_limit": int(arena_bytes),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
    }


# -- faults -------------------------------------------------------------------------------------

# What CUDA's sticky errors say (torch's AcceleratorError and RuntimeError, ONNX Runtime's
# RuntimeException): after one of them the process's context is broken and fails every later call.
_DEVICE_FAULT = re.compile(
    r"CUDA error|CUBLAS_STATUS_(?!ALLOC)|CUDNN_STATUS_(?!ALLOC)|cudaError(?!MemoryAllocation)"
    r"|illegal memory access|device-side assert|unspecified launch failure|CUDA failure",
    re.IGNORECASE,
)
_OUT_OF_MEMORY = re.compile(
    r"out of memory|Failed to allocate memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED"
    r"|cudaErrorMemoryAllocation",
    re.IGNORECASE,
)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's ``OutOfMemoryError``, or an allocation failure of ONNX Runtime or cuBLAS/cuDNN."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return _from_a_runtime(exc) and bool(_OUT_OF_MEMORY.search(str(exc)))


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA error other than running out of memory: the process's context cannot be trusted."""
    if is_out_of_memory(exc):
        return False
    torch = sys.modules.get("torch")
    accelerator_error = getattr(torch, "AcceleratorError", None) if torch is not None else None
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return _from_a_runtime(exc) and bool(_DEVICE_FAULT.search(str(exc)))


def _from_a_runtime(exc: BaseException) -> bool:
    """Raised by torch (RuntimeError and its kin) or by ONNX Runtime (its own exception classes),
    not an error of ours whose message happens to mention CUDA."""
    return isinstance(exc, RuntimeError | MemoryError) or type(exc).__module__.startswith("onnxruntime")


def first_line(exc: BaseException, default: str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else default
