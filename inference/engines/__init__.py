"""The platform's engines, one module each, and ``REGISTRY``, the registry that holds them.

Every module of this package declares one engine as ``ENGINE = Engine(...)``
(``inference/registry.py``); ``REGISTRY`` holds them all, in module-name order, without a list
to keep up to date: a module added here is registered. The API reads these declarations too, so
an engine module imports its engine code (torch, onnxruntime, OpenCV and the ``inference``
modules built on them) inside its run function, never at the top: the one kind of function-level
import this package allows.

A new local task is an engine module here plus its payload schema in ``tasks/payloads/``
(``@payload_for("<task>")``); nothing else lists tasks.
"""

from __future__ import annotations

import importlib
import pkgutil

from inference.registry import Engine, Registry


def discover() -> list[Engine]:
    """The ``ENGINE`` of every module of this package, in module-name order."""
    found = []
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        loaded = importlib.import_module(f"{__name__}.{module.name}")
        engine = getattr(loaded, "ENGINE", None)
        if not isinstance(engine, Engine):
            raise TypeError(f"{loaded.__name__} declares no ENGINE = Engine(...)")
        found.append(engine)
    return found


REGISTRY = Registry(discover())
