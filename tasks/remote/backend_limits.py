"""Which backends of a route can take a payload: each provider's own limits, asked before any request.

Our payload schemas hold the local engines' limits; a provider may document narrower ones (see
``inference.remote.limits``). The submit step skips a backend whose limits refuse the job and goes
on to the next (``local`` takes whatever our schema took), and the API refuses at ``POST`` (422 naming
the field and each provider's limit) a payload that no backend of its route can take.

Pure: no client, no request, no database, so the API process asks it as the submit step does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from config.routes import Routes, RouteStep
from inference.base import InvalidInput


def backend_refusal(
    routes: Routes,
    step: RouteStep,
    engine_task: str,
    payload: Mapping[str, Any],
    sizes: Mapping[str, list[int]] | None = None,
) -> InvalidInput | None:
    """Why the route's ``step`` cannot take ``payload`` (its provider's limits), or None when it can.

    ``sizes``: the job's checked inputs' pixel sizes (``input_sizes``), known from the submit step
    on; a limit that needs them (a free outpaint's output size) is checked only where they are.
    """
    if step.is_local:
        return None
    # The provider clients (requests, cryptography, jwt: about 16 MB in every API process) load only
    # where a route names a provider, never in an API whose tasks all run locally.
    from inference.remote import INPUT_SIZES, check_limits

    provider = routes.providers[step.backend]
    options = {**step.options, INPUT_SIZES: dict(sizes)} if sizes else step.options
    try:
        check_limits(provider.kind, step.task or engine_task, payload, options)
    except InvalidInput as refusal:
        return refusal
    return None


def input_sizes(inputs: Mapping[str, Any] | None) -> dict[str, list[int]]:
    """``{field: [width, height]}`` of a prepared job's single image inputs (``jobs.inputs``)."""
    return {
        field: [int(entry["width"]), int(entry["height"])]
        for field, entry in (inputs or {}).items()
        if isinstance(entry, Mapping) and entry.get("width") and entry.get("height")
    }


def route_refusals(
    routes: Routes, task: str, engine_task: str, payload: Mapping[str, Any]
) -> dict[str, list[str]]:
    """``{field: [why, ...]}`` when no backend of the route of ``task`` can take ``payload``; empty
    when one can, or when the task has no route that starts at a provider (it runs locally)."""
    route = routes.for_task(task, engine_task)
    if route is None or not route.remote_first:
        return {}
    found: dict[str, list[str]] = {}
    for step in route.steps:
        refusal = backend_refusal(routes, step, engine_task, payload)
        if refusal is None:
            return {}
        reasons = found.setdefault(refusal.field or "payload", [])
        if str(refusal) not in reasons:
            reasons.append(str(refusal))
    return found
