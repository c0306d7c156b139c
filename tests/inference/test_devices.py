"""One process, one device: the GPU each pool child takes, the environment it sets before torch
loads, its share of the memory, ONNX Runtime on the same device or not at all, and what counts as
a GPU fault. CPU-only here; the CUDA calls a worker makes are faked only where they report
numbers (free and total memory) that this machine cannot have."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import Settings, SettingsError
from config.devices import parse_gpus
from inference import devices, runtime
from inference.base import EngineError
from inference.devices import Assignment, assign, discover_gpus

ROOT = Path(__file__).resolve().parents[2]


def test_a_gpu_list_takes_indices_and_uuids_and_refuses_anything_else() -> None:
    assert parse_gpus(" 0, 1 ,3") == ("0", "1", "3")
    assert parse_gpus("GPU-8f6c1b2e-4c1d-11ee-be56-0242ac120002") == (
        "GPU-8f6c1b2e-4c1d-11ee-be56-0242ac120002",
    )
    assert parse_gpus("") == ()
    with pytest.raises(ValueError, match="twice"):
        parse_gpus("0,0")
    with pytest.raises(ValueError, match="not a GPU id"):
        parse_gpus("cuda:0")
    assert Settings.from_env({"AIORCH_GPUS": "0,2"}).gpus == ("0", "2")
    with pytest.raises(SettingsError, match="AIORCH_GPUS"):
        Settings.from_env({"AIORCH_GPUS": "cuda:0"})


def test_pool_children_spread_over_the_gpus_and_know_who_shares_theirs() -> None:
    # Four processes over two GPUs: two on each.
    assert [assign(i, 4, ["0", "1"]) for i in range(4)] == [
        Assignment("0", 2),
        Assignment("1", 2),
        Assignment("0", 2),
        Assignment("1", 2),
    ]
    # Three over two: GPU 0 has two, GPU 1 one.
    assert [assign(i, 3, ["0", "1"]) for i in range(3)] == [
        Assignment("0", 2),
        Assignment("1", 1),
        Assignment("0", 2),
    ]
    # One worker per GPU (``--gpus 1 -c 1``): alone on it.
    assert assign(0, 1, ["1"]) == Assignment("1", 1)
    # Two processes on one card: each budgets half of it.
    assert assign(1, 2, ["0"]) == Assignment("0", 2)
    # No GPU: nothing assigned.
    assert assign(0, 2, []) == Assignment()


def test_the_gpus_come_from_the_setting_then_the_inherited_visible_devices_then_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert discover_gpus(("2", "3")) == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert discover_gpus(()) == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # every GPU hidden
    assert discover_gpus(()) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert discover_gpus(()) == []
    # Neither: what nvidia-smi lists (a stand-in on PATH answers as the real one does).
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert discover_gpus(()) == ["0", "1"]
    tool.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert discover_gpus(()) == []
    monkeypatch.setenv("PATH", "/nonexistent")
    assert discover_gpus(()) == []


def test_a_pool_child_sets_its_device_and_allocator_before_torch_loads() -> None:
    script = (
        "import json, os, sys\n"
        "from inference import devices\n"
        "chosen = devices.configure_process(1, 2, ('4', '6'))\n"
        "print(json.dumps({'visible': os.environ.get('CUDA_VISIBLE_DEVICES'),"
        " 'alloc': os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), 'torch': 'torch' in sys.modules,"
        " 'gpu': chosen.gpu, 'share': chosen.share}))\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")
    }
    env.update(PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "visible": "6",
        "alloc": "expandable_segments:True",
        "torch": False,
        "gpu": "6",
        "share": 1,
    }
    # An operator's own allocator settings stay.
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:512"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1])["alloc"] == "max_split_size_mb:512"


def test_the_budget_is_a_share_of_what_is_free_never_more_than_the_card_over_its_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    gib = 2**30
    free_total = [(70 * gib, 80 * gib)]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: free_total[0])
    # Alone on an almost empty card: 60 % of what is free.
    assert devices.budget_bytes("cuda", share=1) == int(70 * gib * 0.6)
    # Two processes on it: each budgets 60 % of half the card, not of all of it (120 % together).
    assert devices.budget_bytes("cuda", share=2) == int(40 * gib * 0.6)
    # Another process already holds most of it: what is free bounds the budget.
    free_total[0] = (10 * gib, 80 * gib)
    assert devices.budget_bytes("cuda", share=2) == int(10 * gib * 0.6)
    # ONNX Runtime's arena comes out of the budget: at most 2 GiB, at most a quarter.
    assert devices.onnx_arena_bytes(48 * gib) == 2 * gib
    assert devices.onnx_arena_bytes(4 * gib) == gib


def test_a_gpu_process_runs_onnx_on_cuda_with_its_device_and_arena_or_fails_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import onnxruntime as ort

    # This machine: no GPU, the CPU build: the CPU.
    assert runtime.onnx_session_providers() == ["CPUExecutionProvider"]
    # A process with a GPU beside an onnxruntime without CUDA: an error, not a quiet CPU run.
    monkeypatch.setattr(runtime, "torch_device", lambda: "cuda")
    with pytest.raises(EngineError, match="no CUDA provider") as refused:
        runtime.onnx_session_providers()
    assert refused.value.code == "device_unavailable"
    # With onnxruntime-gpu: CUDA on device 0 (the one its CUDA_VISIBLE_DEVICES leaves), a bounded
    # arena growing by what is asked, the heuristic cuDNN search; the CPU after it.
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(devices, "budget_bytes", lambda device="cpu", fraction=0.6, share=None: 16 * 2**30)
    providers = runtime.onnx_session_providers()
    assert providers == [
        (
            "CUDAExecutionProvider",
            {
                "device_id": 0,
                "gpu_mem_limit": 2 * 2**30,
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "HEURISTIC",
            },
        ),
        "CPUExecutionProvider",
    ]
    assert runtime.onnx_session_providers("cpu") == ["CPUExecutionProvider"]


def test_a_session_that_onnxruntime_quietly_put_on_the_cpu_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    path = tmp_path / "relu.onnx"
    save(model, str(path))
    # What happens on a GPU box whose CUDA libraries do not load: CUDA asked for, and onnxruntime
    # (here: a build without it) opens the session on the CPU with only a warning.
    asked = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=asked)
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(EngineError, match="could not use the GPU") as refused:
        runtime.check_onnx_session(session, asked)
    assert refused.value.code == "device_unavailable"
    # Asked for the CPU, the CPU is right; and where sessions run is reported.
    assert runtime.check_onnx_session(session, ["CPUExecutionProvider"]) is session
    assert runtime.onnx_report()["sessions_on"] == ["CPUExecutionProvider"]


def test_out_of_memory_and_sticky_cuda_errors_are_told_apart_from_everything_else() -> None:
    import torch
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert devices.is_out_of_memory(oom) and not devices.is_device_fault(oom)
    ort_oom = RuntimeException(
        "[ONNXRuntimeError] : 6 : Failed to allocate memory for requested buffer of size 1"
    )
    assert devices.is_out_of_memory(ort_oom) and not devices.is_device_fault(ort_oom)
    assert devices.is_out_of_memory(
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")
    )

    for sticky in (
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
        RuntimeException("CUDA failure 700: an illegal memory access was encountered ; GPU=0"),
    ):
        assert devices.is_device_fault(sticky) and not devices.is_out_of_memory(sticky), sticky
    for ordinary in (
        RuntimeError("The size of tensor a (4) must match the size of tensor b (3)"),
        ValueError("CUDA error: said by our own code, not by a runtime"),
        EngineError("the device ran out of memory: ...", code="out_of_memory"),
    ):
        assert not devices.is_device_fault(ordinary) and not devices.is_out_of_memory(ordinary), ordinary


def test_release_memory_empties_the_model_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from inference.model_cache import ModelCache

    cache = ModelCache(2**30)
    cache.get_or_load("a", lambda: object(), 10)
    monkeypatch.setattr(runtime, "_cache", cache)
    runtime.release_memory()
    assert cache.loaded() == []
