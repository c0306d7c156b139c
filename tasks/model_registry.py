"""The model store as the API and workers see it (the store itself is pure and lives in inference/)."""

from __future__ import annotations

from typing import Any

from config import Settings


def list_models(settings: Settings, model_type: str | None = None) -> list[dict[str, Any]]:
    # The manifest reader is stdlib-only: importing it does not pull torch into the API process.
    from inference.model_store import ModelStore

    return [entry.to_dict() for entry in ModelStore(settings.models_dir).list(type=model_type)]


def has_model_for(settings: Settings, task: str, types: tuple[str, ...]) -> bool:
    from inference.model_store import ModelStore

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
    from inference.model_store import ModelStore

    store = ModelStore(settings.models_dir)
    return store.add(path, id=model_id, type=model_type, role=role, family=family).to_dict()


def pull_model(
    settings: Settings, repo: str, model_id: str | None, revision: str | None, offline: bool = False
) -> dict[str, Any]:
    from inference.model_store import ModelStore

    store = ModelStore(settings.models_dir)
    return store.pull(repo, id=model_id, revision=revision, local_files_only=offline).to_dict()


def remove_model(settings: Settings, model_id: str) -> dict[str, Any]:
    from inference.model_store import ModelStore

    return ModelStore(settings.models_dir).remove(model_id).to_dict()
