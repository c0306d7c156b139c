"""Import a GPU worker's engines in each pool child as it starts, not on its first job.

Importing torch, diffusers or onnxruntime takes seconds; done lazily, the first job of every new
child paid for it (about 5 s for a 64 px Lanczos upscale on the embedded default). The parent only
records which queues it consumes (it must never import torch or touch CUDA); each forked child
imports the engine modules of those queues in a background thread as soon as it starts. Not in
the signal handler itself: the pool kills a child that has not reported ready within
``worker_proc_alive_timeout`` (4 s), and these imports can take longer on a busy machine. A job
that arrives meanwhile waits on the module import lock for whatever is still loading. Loading
weights stays lazy: which model a job needs is not known until it arrives.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Any

from celery.signals import celeryd_after_setup, worker_process_init

log = logging.getLogger("aiorch.warmup")

ENGINE_MODULES = {
    "gpu.superres": ("inference.superres", "inference.lanczos"),
    "gpu.diffusion": ("inference.diffusion",),
    "gpu.faceswap": ("inference.faceswap.landmark", "inference.faceswap.insight"),
    "gpu.vision": ("inference.background", "inference.detection"),
}

_queues: list[str] = []


def modules_for(queues: list[str]) -> list[str]:
    return [m for q in queues for m in ENGINE_MODULES.get(q, ())]


@celeryd_after_setup.connect
def _remember_queues(sender: Any = None, instance: Any = None, **_: Any) -> None:
    try:
        _queues[:] = sorted(instance.app.amqp.queues.consume_from)
    except AttributeError:
        _queues[:] = []


@worker_process_init.connect
def _start_imports(**_: Any) -> None:
    names = modules_for(_queues)
    if names:
        threading.Thread(target=import_engines, args=(names,), name="aiorch-warmup", daemon=True).start()


def import_engines(names: list[str]) -> None:
    started = time.monotonic()
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an engine with a broken install must not stop the child
            log.warning("could not pre-import %s: %s", name, exc)
    log.info("engines imported in %.1f s: %s", time.monotonic() - started, ", ".join(names))
