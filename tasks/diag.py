"""What a worker reports to ``GET /diag/backends`` beyond Celery's own inspect replies.

Models live in the prefork children, but control commands are answered by the parent (which must
never touch CUDA). So each child writes a small status file after every task, and the parent's
``aiorch_info`` inspect command gathers the files of its live children.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, worker_process_init
from celery.worker.control import inspect_command

from inference import devices, runtime

_hostname: dict[str, str] = {}


def _status_dir(settings: Any, hostname: str) -> Path:
    return Path(settings.var_dir) / "diag" / hostname.replace("/", "_")


def device_info() -> dict[str, Any]:
    """Device and memory of this process. torch is consulted only if the engines already loaded
    it, and CUDA only if they already made a context: a diagnostic never creates one (on GPU 0
    or anywhere else)."""
    chosen = devices.assignment()
    info: dict[str, Any] = {"device": "cpu"}
    if chosen.gpu is not None:
        info.update(gpu=chosen.gpu, gpu_share=chosen.share)
    torch = sys.modules.get("torch")
    if torch is not None and devices.cuda_initialized():
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        info.update(
            device=f"cuda:{index}",
            device_name=torch.cuda.get_device_name(index),
            memory_total=total,
            memory_free=free,
            memory_allocated=torch.cuda.memory_allocated(index),
        )
    onnx = runtime.onnx_report()
    if onnx:
        info["onnx"] = onnx
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    info["rss_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return info


def loaded_models() -> list[dict[str, Any]]:
    try:
        return runtime.loaded_models()
    except Exception:  # diagnostics must never fail a task
        return []


def write_child_status(app: Any, hostname: str) -> None:
    settings = app.aiorch_settings
    folder = _status_dir(settings, hostname)
    folder.mkdir(parents=True, exist_ok=True)
    status = {
        "pid": os.getpid(),
        "updated_at": time.time(),
        **device_info(),
        "loaded_models": loaded_models(),
    }
    tmp = folder / f"{os.getpid()}.tmp"
    tmp.write_text(json.dumps(status, default=str))
    tmp.replace(folder / f"{os.getpid()}.json")


@worker_process_init.connect
def _child_started(sender: Any = None, **_: Any) -> None:
    _hostname.clear()
    _last_status.clear()


# A child rewrites its status file at most this often (seconds) while its loaded models stay the
# same: a tiny job would otherwise spend a few percent of its worker time on diagnostics.
STATUS_INTERVAL = 1.0
_last_status: dict[str, Any] = {}


@task_postrun.connect
def _after_task(sender: Any = None, **_: Any) -> None:
    if sender is None or not hasattr(sender.app, "aiorch_settings"):
        return
    hostname = getattr(sender.request, "hostname", None) or "unknown"
    models = loaded_models()
    now = time.monotonic()
    if (
        models == _last_status.get("models")
        and now - _last_status.get("at", -STATUS_INTERVAL) < STATUS_INTERVAL
    ):
        return
    with contextlib.suppress(OSError):
        write_child_status(sender.app, hostname)
        _last_status.update(models=models, at=now)


def _node_summary(consumer: Any) -> dict[str, Any]:
    """What ``stats``, ``active`` and ``active_queues`` would say, gathered in this one reply so
    ``/diag/backends`` costs one broadcast and one wait instead of four."""
    from celery.worker import state as worker_state

    summary: dict[str, Any] = {"now": time.time()}
    with contextlib.suppress(Exception):  # diagnostics must never break the control channel
        stats = consumer.controller.stats()
        summary["concurrency"] = (stats.get("pool") or {}).get("max-concurrency")
        summary["uptime"] = stats.get("uptime")
    with contextlib.suppress(Exception):
        summary["queues"] = sorted(q.name for q in consumer.task_consumer.queues)
    with contextlib.suppress(Exception):
        summary["active_jobs"] = [
            (list(request.args) or [None])[0] for request in list(worker_state.active_requests)
        ]
    return summary


@inspect_command()
def aiorch_info(state: Any) -> dict[str, Any]:
    """The node's slots, queues and active jobs, and its children's device, memory and loaded
    models (read from their status files); ``now`` is the worker's own clock, its heartbeat."""
    app = state.consumer.app
    hostname = state.consumer.hostname
    children = []
    folder = _status_dir(app.aiorch_settings, hostname)
    if folder.is_dir():
        for path in folder.glob("*.json"):
            try:
                status = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if Path(f"/proc/{status.get('pid')}").exists():
                children.append(status)
            else:
                path.unlink(missing_ok=True)  # a child that was replaced
    return {
        **_node_summary(state.consumer),
        "children": children,
        "parent": {"pid": os.getpid(), **device_info()},
    }
