"""The model store as the API and workers see it (the store itself is pure and lives in inference/).

The manifest reader is stdlib-only: importing it pulls neither torch nor numpy into the API.
"""

from __future__ import annotations

from typing import Any

from config import Settings
from inference.model_store import ModelNotFound, ModelStore, ModelStoreError

__all__ = [
    "ModelNotFound",
    "ModelStoreError",
    "add_model",
    "has_model_for",
    "list_models",
    "model_problem",
    "pull_model",
    "remove_model",
]


def list_models(
    settings: Settings, model_type: str | None = None, client: str | None = None
) -> list[dict[str, Any]]:
    """Every model (``client`` None: the operator's or an admin's view), or what ``client`` sees:
    the operator's models and its own."""
    store = ModelStore(settings.models_dir)
    return [entry.to_dict() for entry in store.list(type=model_type, client=client)]


def model_problem(
    settings: Settings, model_id: str, types: tuple[str, ...], task: str, client: str | None
) -> str | None:
    """What is wrong with naming ``model_id`` where a model of ``types`` serving ``task`` is wanted,
    as ``client`` sees the store (another client's model is unknown); None when nothing is."""
    try:
        entry = ModelStore(settings.models_dir).get(model_id, client=client)
    except ModelNotFound:
        return f"unknown model {model_id!r}"
    if entry.type not in types:
        return f"{model_id!r} is a {entry.type} model, not {' or '.join(types)}"
    if task not in entry.tasks:
        kind = f"{entry.type}, {entry.base_model_type}" if entry.base_model_type else entry.type
        return f"{model_id!r} ({kind}) does not serve {task}"
    return None


def has_model_for(settings: Settings, task: str, types: tuple[str, ...]) -> bool:
    store = ModelStore(settings.models_dir, include_builtin=False)
    return any(entry.type in types for entry in store.list(task=task))


def annotator_kinds(settings: Settings) -> set[str]:
    """What the installed annotators make (``extra["annotates"]``: ``depth``, ``openpose``)."""
    store = ModelStore(settings.models_dir, include_builtin=False)
    return {str(entry.extra.get("annotates")) for entry in store.list(type="annotator")}


def add_model(
    settings: Settings,
    path: str,
    model_id: str | None,
    model_type: str | None,
    role: str | None = None,
    family: str | None = None,
    control_type: str | None = None,
) -> dict[str, Any]:
    store = ModelStore(settings.models_dir)
    return store.add(
        path, id=model_id, type=model_type, role=role, family=family, control_type=control_type
    ).to_dict()


def pull_model(
    settings: Settings, repo: str, model_id: str | None, revision: str | None, offline: bool = False
) -> dict[str, Any]:
    store = ModelStore(settings.models_dir)
    return store.pull(repo, id=model_id, revision=revision, local_files_only=offline).to_dict()


def remove_model(settings: Settings, model_id: str, client: str | None = None) -> dict[str, Any]:
    """Remove a model (``client``: only one of its own; ``ModelNotFound`` for another client's,
    ``ModelStoreError`` for an operator's)."""
    return ModelStore(settings.models_dir).remove(model_id, client=client).to_dict()
