"""Payload schemas per task, shared by the API (to refuse bad input with a 422) and the workers
(which validate again, since a job row may come from an older API or another instance).

One module per task family, each schema marked ``@payload_for("<task>")`` (``base.py``). Every
module of this package is imported here, so a module added is found without a list to update;
``schema_for(task)`` answers with the schema, and the catalog pairs it with the engine that
declares the task (``inference/engines/``).
"""

from __future__ import annotations

import importlib
import pkgutil

from tasks.payloads.base import (
    SCHEMAS,
    BasePayload,
    InputObject,
    InputRef,
    VideoRef,
    input_fields,
    input_refs,
    payload_for,
    replace_input,
    schema_for,
)

__all__ = [
    "SCHEMAS",
    "BasePayload",
    "InputObject",
    "InputRef",
    "VideoRef",
    "input_fields",
    "input_refs",
    "payload_for",
    "replace_input",
    "schema_for",
]

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")
