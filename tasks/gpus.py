"""A GPU worker's GPUs, settled before it starts: each GPU it would use is probed
(``inference.gpu_check``), and one that torch or onnxruntime cannot use stops the start. Its pool
children then take one GPU each as they start (``inference.devices``, from ``Settings.gpus``)."""

from __future__ import annotations

from config import Settings
from inference import devices, gpu_check
from inference.engines import REGISTRY


def worker_gpu_problems(queues: list[str], settings: Settings) -> list[str]:
    """For a worker of GPU queues, what is wrong with each GPU it would use; empty when all work,
    or when the machine has none (the engines then run on the CPU, as on a laptop)."""
    if not any(q.startswith("gpu.") for q in queues):
        return []
    found = devices.discover_gpus(settings.gpus)
    if not found:
        return []
    return gpu_check.check_gpus(found, onnx=gpu_check.needs_onnx(REGISTRY.warmup_modules(queues)))
