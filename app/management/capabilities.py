"""``GET /v1/capabilities``: every task the platform knows, its queue, its parameters (read from
its payload schema) and whether ``POST /v1/jobs`` would accept it now."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from marshmallow import Schema, fields, validate

from app.schemas import Blueprint
from app.services import current_services
from config import Settings
from tasks import catalog
from tasks.model_registry import has_model_for

blp = Blueprint("capabilities", __name__, description="Operators: what the platform can run")


def describe_field(name: str, field: fields.Field) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "type": type(field).__name__.lower(), "required": field.required}
    if field.metadata.get("description"):
        # What a parameter means where the schema says it (the face tasks' index order, e.g.).
        entry["description"] = field.metadata["description"]
    if field.metadata.get("x-presets"):
        # The named values a field takes besides model ids (stylize's style presets).
        entry["presets"] = field.metadata["x-presets"]
    default = field.load_default
    if default is not None and not callable(default) and repr(default) != "<marshmallow.missing>":
        entry["default"] = default
    for rule in field.validators:
        if isinstance(rule, validate.OneOf):
            entry["choices"] = list(rule.choices)
        elif isinstance(rule, validate.Range):
            entry["min"], entry["max"] = rule.min, rule.max
        elif isinstance(rule, validate.Length):
            entry["min_length"], entry["max_length"] = rule.min, rule.max
    return entry


def runs_now(settings: Settings, name: str) -> bool:
    """Whether ``POST /v1/jobs`` would accept the task now: the same check job creation makes, so
    a task served by a configured remote route counts as installed without a local model."""
    try:
        catalog.resolve(
            name,
            debug_tasks=settings.debug_tasks,
            has_model=lambda s: has_model_for(settings, s.name, s.model_types),
            routes=settings.routes,
        )
    except (catalog.UnknownTask, catalog.TaskUnavailable):
        return False
    return True


def _parameters(schema: Schema) -> list[dict[str, Any]]:
    return [describe_field(name, field) for name, field in schema.fields.items()]


def capability_list(settings: Settings) -> list[dict[str, Any]]:
    tasks = []
    for spec in catalog.TASKS.values():
        if spec.debug_only and not settings.debug_tasks:
            continue
        tasks.append(
            {
                "task": spec.name,
                "queue": spec.queue,
                "summary": spec.summary,
                "installed": runs_now(settings, spec.name),
                "aliases": sorted(alias for alias, target in catalog.ALIASES.items() if target == spec.name),
                "inputs": list(spec.inputs),
                "parameters": _parameters(catalog.payload_schema(spec, settings)),
            }
        )
    for name, summary in catalog.REMOTE_ONLY.items():
        # A task only a provider runs takes the payload of the local task it stands in for.
        target = catalog.TASKS.get(catalog.REMOTE_TARGETS.get(name, ""))
        tasks.append(
            {
                "task": name,
                "queue": "cpu",
                "summary": summary,
                "installed": runs_now(settings, name),
                "aliases": [],
                "inputs": list(target.inputs) if target else [],
                "parameters": _parameters(catalog.payload_schema(target, settings)) if target else [],
            }
        )
    return tasks


@blp.route("/v1/capabilities")
class Capabilities(MethodView):
    @blp.response(200)
    def get(self) -> dict[str, Any]:
        """Every task, its queue, parameters and whether it can run here now"""
        return {"tasks": capability_list(current_services().settings)}
