"""A GPU worker's start-up check: every GPU it was given really works, for torch and, where its
queues run ONNX models, for ONNX Runtime, or the worker does not start.

Without it, a card the driver cannot open, a torch without CUDA, or an onnxruntime whose CUDA
provider cannot load its libraries all end in the same place: jobs that run on the CPU, 10-50x
slower, with nothing in any log. Each GPU is probed in a process of its own (``python -m
inference.gpu_check``, its ``CUDA_VISIBLE_DEVICES`` that one GPU), so the worker's own process
never touches CUDA before it forks its pool.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from config.devices import VISIBLE, environment_with

# The engines' modules that run ONNX models: a worker that imports one needs ONNX Runtime on CUDA.
ONNX_MODULES = frozenset({"inference.faceswap.insight", "inference.background"})
PROBE_SECONDS = 180


def needs_onnx(modules: Iterable[str]) -> bool:
    return any(module in ONNX_MODULES for module in modules)


def check_gpus(gpus: list[str], onnx: bool, python: str = sys.executable) -> list[str]:
    """What is wrong with each of ``gpus`` (one sentence per problem); empty when all work."""
    problems = []
    for gpu in gpus:
        env = environment_with(**{VISIBLE: gpu})
        argv = [python, "-m", "inference.gpu_check", *(["--onnx"] if onnx else [])]
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=PROBE_SECONDS, check=False
            )
        except subprocess.TimeoutExpired:
            problems.append(f"GPU {gpu}: the probe did not finish in {PROBE_SECONDS} s")
            continue
        try:
            found = json.loads(done.stdout.strip().splitlines()[-1])["problems"]
        except (IndexError, KeyError, ValueError):
            tail = (done.stderr or done.stdout).strip()[-500:]
            found = [f"the probe failed (exit {done.returncode}): {tail}"]
        problems += [f"GPU {gpu}: {problem}" for problem in found]
    return problems


def probe(onnx: bool) -> list[str]:
    """In the probing process: the problems of the one GPU it sees."""
    import torch

    if not torch.cuda.is_available():
        return [f"torch {torch.__version__} sees no CUDA device (a CPU build, or no driver for it)"]
    try:
        x = torch.ones(256, 256, device="cuda")
        (x @ x).sum().item()
    except Exception as exc:
        return [f"torch cannot compute on it: {exc}"]
    if onnx:
        return _probe_onnx()
    return []


def _probe_onnx() -> list[str]:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10  # the newest this onnxruntime reads (DEPENDENCIES.md)
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload(cuda=True, cudnn=True, msvc=False)
    session = ort.InferenceSession(
        model.SerializeToString(),
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return [
            f"onnxruntime {ort.__version__} cannot use CUDA (its CUDA or cuDNN libraries are missing "
            "or built for another CUDA major than torch's); its sessions would run on the CPU"
        ]
    return []


def main(argv: list[str]) -> int:
    result: dict[str, Any] = {"problems": probe(onnx="--onnx" in argv)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
