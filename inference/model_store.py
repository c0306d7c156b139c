"""The model store: which weights live in the models directory, and what each one is for.

The store is a JSON manifest (``models.json``) inside the models directory. The API, the CLI and
every worker read the same file, so a model added by ``aiorch models add`` is seen by running
processes without a restart: each read checks the file's identity (inode, size, mtime) and
reloads it when another process replaced it. Writes take an advisory lock and replace the file
atomically, so concurrent writers never lose an entry and readers never see half a file.

What a file is (a diffusers folder, a LoRA, an ESRGAN or detector state dict, an ONNX model) is
read by ``inference/model_files.py``, without loading it.

Engines that need no weights (the Lanczos upscaler) are listed as built-ins so ``GET
/v1/models`` shows every backend that can run, but they are not in the manifest and cannot be
removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.model_files import (
    MODEL_TYPES,
    ModelStoreError,
    detect_model,
    detect_onnx,
    diffusers_tasks,
    is_model_folder,
    with_control_type,
)

MANIFEST_NAME = "models.json"
MANIFEST_VERSION = 1

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")

# What ``pull`` fetches. huggingface_hub matches with fnmatch, whose ``*`` also matches ``/``, so a
# bare ``*.safetensors`` would take a diffusers repo's root single-file checkpoints and every
# ``.fp16.`` variant too (the same weights two or three times over). A diffusers repo gets the
# configs and the canonical (non-variant) safetensors of its component folders only; the
# "<component>/" prefix keeps root checkpoints out, the exact file names keep variants out.
DIFFUSERS_PULL_PATTERNS = (
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/*.model",
    "*/diffusion_pytorch_model.safetensors",
    "*/diffusion_pytorch_model-*-of-*.safetensors",
    "*/model.safetensors",
    "*/model-*-of-*.safetensors",
)
# A repo that is one model file (a LoRA, an ONNX or .pth network) and its small companions.
SINGLE_FILE_PULL_PATTERNS = ("*.json", "*.txt", "*.safetensors", "*.model", "*.onnx", "*.pth")


class ModelNotFound(LookupError):
    """No model with that id is in the store."""

    def __init__(self, model_id: str):
        super().__init__(f"no model with id {model_id!r}")
        self.model_id = model_id


@dataclass(frozen=True)
class ModelEntry:
    """One model: its id, what it is, which tasks it serves and where its files are."""

    id: str
    name: str
    type: str
    tasks: tuple[str, ...]
    path: str | None
    base_model_type: str | None = None
    description: str = ""
    size_bytes: int = 0
    source: str | None = None
    added_at: str | None = None
    # Facts an engine needs that only some types have (an upscaler's scale, a pipeline class).
    extra: dict[str, Any] = field(default_factory=dict)
    # The client whose model it is (a LoRA it trained): only that client sees it. None: the
    # operator's, installed for everyone.
    owner: str | None = None

    def visible_to(self, client: str | None) -> bool:
        """Whether ``client`` sees it (None: the operator's view, which sees every model)."""
        return client is None or self.owner is None or self.owner == client

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tasks"] = list(self.tasks)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelEntry:
        tasks = tuple(data.get("tasks") or ())
        if data["type"] == "diffusers":
            # Derived, not trusted from the file: a model added before a task existed serves it.
            in_channels = int((data.get("extra") or {}).get("unet_in_channels", 4))
            tasks = diffusers_tasks(data.get("base_model_type"), in_channels)
        return cls(
            id=data["id"],
            name=data.get("name") or data["id"],
            type=data["type"],
            tasks=tasks,
            path=data.get("path"),
            base_model_type=data.get("base_model_type"),
            description=data.get("description") or "",
            size_bytes=int(data.get("size_bytes") or 0),
            source=data.get("source"),
            added_at=data.get("added_at"),
            extra=dict(data.get("extra") or {}),
            owner=data.get("owner"),
        )


BUILTIN_MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(
        id="lanczos",
        name="Lanczos resampling",
        type="builtin",
        tasks=("upscale",),
        path=None,
        description="Weight-free Lanczos upscaler with optional unsharp mask (inference/lanczos.py).",
    ),
)


@dataclass(frozen=True)
class Page:
    """One page of a listing, in the seeds' ``{data, have_next}`` shape."""

    data: list[ModelEntry]
    have_next: bool


class ModelStore:
    """The manifest of the models in ``models_dir``, shared by every process that opens it."""

    def __init__(self, models_dir: Path, *, include_builtin: bool = True):
        self.models_dir = Path(models_dir)
        self.manifest_path = self.models_dir / MANIFEST_NAME
        self.include_builtin = include_builtin
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, ModelEntry] = {}

    # -- reading -----------------------------------------------------------------------------

    def list(
        self, *, type: str | None = None, task: str | None = None, client: str | None = None
    ) -> list[ModelEntry]:
        """Every model, built-ins first then by id, optionally of one type and/or serving one task;
        with ``client``, only what that client sees (the operator's models and its own)."""
        entries = list(BUILTIN_MODELS) if self.include_builtin else []
        entries += sorted(self._current().values(), key=lambda e: e.id)
        if type is not None:
            entries = [e for e in entries if e.type == type]
        if task is not None:
            entries = [e for e in entries if task in e.tasks]
        if client is not None:
            entries = [e for e in entries if e.visible_to(client)]
        return entries

    def page(
        self, *, size: int = 20, offset: int = 0, type: str | None = None, task: str | None = None
    ) -> Page:
        """``size`` entries from ``offset`` (the seed's ``size``/``offset``/``have_next`` paging)."""
        if size < 1:
            raise ModelStoreError(f"size must be at least 1, got {size}")
        if offset < 0:
            raise ModelStoreError(f"offset must not be negative, got {offset}")
        entries = self.list(type=type, task=task)
        return Page(data=entries[offset : offset + size], have_next=offset + size < len(entries))

    def get(self, model_id: str, *, client: str | None = None) -> ModelEntry:
        """The model ``model_id``; with ``client``, another client's model is not found, exactly
        like one that does not exist."""
        for builtin in BUILTIN_MODELS if self.include_builtin else ():
            if builtin.id == model_id:
                return builtin
        entry = self._current().get(model_id)
        if entry is None or not entry.visible_to(client):
            raise ModelNotFound(model_id)
        return entry

    def __contains__(self, model_id: object) -> bool:
        try:
            self.get(str(model_id))
        except ModelNotFound:
            return False
        return True

    def resolve_path(self, entry: ModelEntry) -> Path:
        """The absolute path of a model's files (manifest paths are relative to the models dir)."""
        if entry.path is None:
            raise ModelStoreError(f"model {entry.id!r} has no files")
        path = Path(entry.path)
        return path if path.is_absolute() else self.models_dir / path

    # -- writing -----------------------------------------------------------------------------

    def add(
        self,
        path: str | Path,
        id: str | None = None,
        type: str | None = None,
        *,
        name: str | None = None,
        tasks: Iterable[str] | None = None,
        base_model_type: str | None = None,
        description: str = "",
        source: str | None = None,
        replace: bool = False,
        role: str | None = None,
        family: str | None = None,
        owner: str | None = None,
        control_type: str | None = None,
    ) -> ModelEntry:
        """Register the model at ``path``; its type, tasks and base model are read from its files
        unless given. Paths inside the models dir are stored relative to it, so the directory can
        be mounted elsewhere (a container) and the manifest still holds. ``role`` names the part
        an ONNX file plays in the InsightFace engine (``FACE_ROLES``) when its name does not say;
        ``family`` the preset of an ONNX segmentation file (``SEGMENTATION_FAMILIES``);
        ``control_type`` what a ControlNet conditions on (``CONTROL_TYPES``), else read from the
        folder's, the id's or the pulled repository's name."""
        path = Path(path).expanduser()
        if not path.is_absolute() and not path.exists() and (self.models_dir / path).exists():
            path = self.models_dir / path
        path = path.resolve()
        if not path.exists():
            raise ModelStoreError(f"no such file or folder: {path}")
        if type is not None and type not in MODEL_TYPES[:-1]:
            raise ModelStoreError(f"unknown model type {type!r}; one of {', '.join(MODEL_TYPES[:-1])}")
        detected = detect_model(path, type)
        if role is not None:
            if detected.type != "onnx":
                raise ModelStoreError(f"a role is for ONNX face models; {path.name} is {detected.type!r}")
            detected = detect_onnx(path, role)
        if family is not None:
            # A segmentation file named like "model.onnx" (as RMBG-2.0 ships): the operator says.
            if detected.type != "onnx":
                raise ModelStoreError(
                    f"a family is for ONNX segmentation models; {path.name} is {detected.type!r}"
                )
            detected = detect_onnx(path, family=family)
        model_id = id or _slug(path.stem if path.is_file() else path.name)
        if not _ID_RE.match(model_id):
            raise ModelStoreError(
                f"model id {model_id!r} must be 1-128 lowercase letters, digits, '.', '_' or '-'"
            )
        if any(b.id == model_id for b in BUILTIN_MODELS):
            raise ModelStoreError(f"model id {model_id!r} is a built-in engine")
        detected = with_control_type(detected, control_type, [path.name, id, source], path.name)
        try:
            stored_path = str(path.relative_to(self.models_dir.resolve()))
        except ValueError:
            stored_path = str(path)
        entry = ModelEntry(
            id=model_id,
            name=name or model_id,
            type=detected.type,
            tasks=tuple(tasks) if tasks is not None else detected.tasks,
            path=stored_path,
            base_model_type=base_model_type or detected.base_model_type,
            description=description,
            size_bytes=_disk_size(path),
            source=source,
            added_at=datetime.now(UTC).isoformat(),
            extra=detected.extra,
            owner=owner,
        )
        with self._locked_manifest() as entries:
            if model_id in entries and not replace:
                raise ModelStoreError(f"model id {model_id!r} already exists; pass another id")
            entries[model_id] = entry
        return entry

    def remove(self, model_id: str, *, client: str | None = None) -> ModelEntry:
        """Drop a model from the manifest. The operator's files stay where they are (the operator
        owns them); a client's model (a LoRA it trained, kept in the models dir) goes with its
        files. With ``client``, only that client's own models: another client's is not found, an
        operator's is refused (``ModelStoreError``)."""
        if any(b.id == model_id for b in BUILTIN_MODELS):
            raise ModelStoreError(f"{model_id!r} is a built-in engine and cannot be removed")
        with self._locked_manifest() as entries:
            entry = entries.get(model_id)
            if entry is None or not entry.visible_to(client):
                raise ModelNotFound(model_id)
            if client is not None and entry.owner is None:
                raise ModelStoreError(f"{model_id!r} is an operator's model; only an admin removes it")
            del entries[model_id]
        if entry.owner is not None and entry.path is not None:
            path = self.resolve_path(entry)
            if path.resolve().is_relative_to(self.models_dir.resolve()):  # never beyond the store
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        return entry

    def pull(
        self,
        hf_repo: str,
        *,
        id: str | None = None,
        type: str | None = None,
        revision: str | None = None,
        cache_dir: Path | None = None,
        allow_patterns: Sequence[str] | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **add_kwargs: Any,
    ) -> ModelEntry:
        """Download ``hf_repo`` from the Hugging Face Hub into the models dir and register it.

        Files go to an HF cache inside the models dir (``<models_dir>/hub`` unless ``cache_dir``),
        so every worker that mounts the models dir sees them, and a second pull of the same
        revision downloads nothing. ``local_files_only`` resolves the snapshot from that cache
        without touching the network (used by tests and air-gapped installs)."""
        from huggingface_hub import snapshot_download  # only the CLI pulls; workers never import it

        cache = Path(cache_dir) if cache_dir is not None else self.models_dir / "hub"

        def download(patterns: Sequence[str]) -> str:
            try:
                return str(
                    snapshot_download(
                        repo_id=hf_repo,
                        revision=revision,
                        cache_dir=str(cache),
                        allow_patterns=list(patterns),
                        local_files_only=local_files_only,
                        token=token,
                    )
                )
            except Exception as exc:  # the hub raises many types (offline, 404, auth); one message each
                raise ModelStoreError(f"could not pull {hf_repo!r}: {exc}") from exc

        if allow_patterns is None:
            # First the one small file that tells a diffusers repo from a single-file one.
            is_diffusers = (Path(download(["model_index.json"])) / "model_index.json").exists()
            allow_patterns = DIFFUSERS_PULL_PATTERNS if is_diffusers else SINGLE_FILE_PULL_PATTERNS
        folder = download(allow_patterns)
        path = Path(folder)
        # A repo that holds a single weight file (a LoRA, an ONNX model) registers that file.
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        weights = [p for p in files if p.suffix in (".safetensors", ".onnx", ".pth", ".pt")]
        # (A ControlNet's or depth annotator's folder is one weight file too, but its config.json
        # is part of the model: the folder is registered.)
        if not (path / "model_index.json").exists() and len(weights) == 1 and not is_model_folder(path):
            path = weights[0]
        model_id = id or _slug(hf_repo.split("/")[-1])
        source = f"hf:{hf_repo}" + (f"@{revision}" if revision else "")
        return self.add(path, id=model_id, type=type, source=source, **add_kwargs)

    # -- the manifest file -------------------------------------------------------------------

    def _current(self) -> dict[str, ModelEntry]:
        """The manifest's entries, re-read only when the file changed since the last read."""
        with self._lock:
            stamp = _file_stamp(self.manifest_path)
            if stamp != self._stamp:
                self._entries = _read_manifest(self.manifest_path) if stamp else {}
                self._stamp = stamp
            return self._entries

    @contextlib.contextmanager
    def _locked_manifest(self) -> Iterator[dict[str, ModelEntry]]:
        """Read-modify-write under an exclusive lock on a side file, then replace atomically."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.models_dir / f".{MANIFEST_NAME}.lock"
        with open(lock_path, "a") as lock_file, self._lock:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                entries = _read_manifest(self.manifest_path) if self.manifest_path.exists() else {}
                yield entries
                _write_manifest(self.manifest_path, entries)
                self._entries = entries
                self._stamp = _file_stamp(self.manifest_path)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    # The inode changes on every atomic replace, so two writes within one mtime tick still differ.
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_manifest(path: Path) -> dict[str, ModelEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"cannot read the model manifest {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ModelStoreError(f"the model manifest {path} has no 'models' list")
    return {entry.id: entry for entry in map(ModelEntry.from_dict, data["models"])}


def _write_manifest(path: Path, entries: dict[str, ModelEntry]) -> None:
    body = {"version": MANIFEST_VERSION, "models": [entries[k].to_dict() for k in sorted(entries)]}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(body, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return slug[:128] or "model"


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    # follow symlinks: an HF snapshot folder is made of links into the blob store
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
