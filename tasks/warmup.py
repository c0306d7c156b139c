"""Import a GPU worker's engines in each pool child as it starts, not on its first job.

Importing torch, diffusers or onnxruntime takes seconds; done lazily, the first job of every new
child paid for it (about 5 s for a 64 px Lanczos upscale on the embedded default). The parent only
records which queues it consumes (it must never import torch or touch CUDA); each forked child
imports the modules the engines of those queues declare (``Engine.warmup``, in
``inference/engines/``) in a background thread as soon as it starts. Not in the signal handler
itself: the pool kills a child that has not reported ready within ``worker_proc_alive_timeout``
(4 s), and these imports can take longer on a busy machine. A job that arrives meanwhile waits on
the module import lock for whatever is still loading. Loading weights stays lazy: which model a
job needs is not known until it arrives.

The child also chooses its GPU here, from its slot in the pool, before anything in it touches
CUDA (``inference.devices``).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Any

from billiard.process import current_process
from celery.signals import celeryd_after_setup, worker_process_init

from inference import devices
from inference.engines import REGISTRY
from tasks.memory import settle  # its failed-task collection hooks every worker that loads warmup

log = logging.getLogger("aiorch.warmup")

_queues: list[str] = []
_concurrency = 1
_gpus: tuple[str, ...] = ()


def modules_for(queues: list[str]) -> list[str]:
    return REGISTRY.warmup_modules(queues)


@celeryd_after_setup.connect
def _remember_queues(sender: Any = None, instance: Any = None, **_: Any) -> None:
    global _concurrency, _gpus
    try:
        _queues[:] = sorted(instance.app.amqp.queues.consume_from)
    except AttributeError:
        _queues[:] = []
    _gpus = tuple(getattr(getattr(instance.app, "aiorch_settings", None), "gpus", ()) or ())
    try:
        _concurrency = max(1, int(instance.concurrency))
    except (AttributeError, TypeError, ValueError):
        _concurrency = 1


@worker_process_init.connect
def _start_imports(**_: Any) -> None:
    try:
        index = int(getattr(current_process(), "index", 0) or 0)
    except (TypeError, ValueError):
        index = 0
    devices.configure_process(index, _concurrency, _gpus)
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
    settle()  # what the imports made lives as long as the child: out of the collector's way
