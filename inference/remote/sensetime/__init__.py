"""SenseTime Miaohua open API client (seed 001).

Every capability is submit-then-poll: ``POST /v1/<family>/imgen`` returns a ``task_id``,
``GET /v1/<family>/result/<id>`` reports ``PENDING``/``RUNNING``/``SUCCESS``/``FAILED``, and most
families have a batch ``/results`` that takes up to 50 ids per call. Face swap
(``/v1/face/imggen``) and face detection report ``state`` 0 (running) / 1 (done) instead. LoRA
training (``/v1/lora/train``) reports a ``training_progress`` and is the one capability with a
cancel (``/v1/lora/cancel``, while it waits).

- ``client``: ``SenseTimeClient`` (JWT auth, calls and error mapping, submit, poll, cancel, models);
- ``bodies``: our tasks and payloads as SenseTime request bodies, checked against the seed;
- ``results``: poll answers as ``RemoteResult``s;
- ``training``: ``train_lora``'s request body and its results (progress, the trained LoRA's id).
"""

from __future__ import annotations

from inference.remote.sensetime.bodies import SUPPORTED_TASKS, build_request
from inference.remote.sensetime.client import (
    DEFAULT_BASE_URL,
    MAX_BATCH,
    MODEL_KINDS,
    ModelPage,
    SenseTimeClient,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "MAX_BATCH",
    "MODEL_KINDS",
    "SUPPORTED_TASKS",
    "ModelPage",
    "SenseTimeClient",
    "build_request",
]
