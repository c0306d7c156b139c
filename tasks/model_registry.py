"""The model store as the API and workers see it (the store itself is pure and lives in inference/).

The manifest reader is stdlib-only: importing it pulls neither torch nor numpy into the API.
"""

from __future__ import annotations

from typing import Any

from config import Settings
from inference.model_store import ModelStore


def list_models(settings: Settings, model_type: str | None = None) -> list[dict[str, Any]]:
    return [entry.to_dict() for entry in ModelStore(settings.models_dir).list(type=model_type)]


def has_model_for(settings: Settings, task: str, types: tuple[str, ...]) -> bool:
    store = ModelStore(settings.models_dir, include_builtin=False)
    return any(entry.type in types for entry in store.list(task=task))


def add_model(
    settings: Settings,
    path: str,
    model_id: str | None,
    model_type: str | None,
    role: str | None = None,
    family: str | None = None,
) -> dict[str, Any]:
    store = ModelStore(settings.models_dir)
    return store.add(path, id=model_id, type=model_type, role=role, family=family).to_dict()


def pull_model(
    settings: Settings, repo: str, model_id: str | None, revision: str | None, offline: bool = False
) -> dict[str, Any]:
    store = ModelStore(settings.models_dir)
    return store.pull(repo, id=model_id, revision=revision, local_files_only=offline).to_dict()


def remove_model(settings: Settings, model_id: str) -> dict[str, Any]:
    return ModelStore(settings.models_dir).remove(model_id).to_dict()
