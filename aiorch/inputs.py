"""Local files named in a job payload, uploaded as assets and replaced by ``asset://<id>``.

An input field is one whose name ends in ``_url`` or ``_urls`` (``image_url``, ``mask_url``,
``source_urls``, ``controlnets[].image_url``) or that the server lists among a task's inputs in
``GET /v1/capabilities`` (``images``). A string there that is no URL (``http(s)://``, ``data:``,
``asset://``) is a local path (``file://`` too): relative ones are looked up beside the file that
named them (a JSONL of jobs), then in the working directory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from aiorch.client import Client
from aiorch.errors import AiorchError

REMOTE_SCHEMES = ("http", "https", "data", "asset")


class LocalInputError(AiorchError):
    """A payload names a local file that is not there; ``field`` says where (``payload.image_url``)."""

    def __init__(self, field: str, value: str):
        super().__init__(f"{field}: no such file: {value}")
        self.field = field
        self.value = value

    def as_error(self) -> dict[str, Any]:
        """The API's error shape, for a report line: ``details`` nested as the body nests the field,
        as the server names fields (``{"payload": {"source_urls": {"1": [...]}}}``)."""
        details: Any = ["no such file"]
        for part in reversed(re.findall(r"[^.\[\]]+", self.field)):
            details = {part: details}
        return {"code": "input_not_found", "message": str(self), "details": details}


@dataclass(frozen=True)
class LocalInput:
    field: str  # where in the body, for messages: payload.source_urls[1]
    path: Path


def is_input_field(name: str, extra: Iterable[str] = ()) -> bool:
    return name.endswith(("_url", "_urls")) or name in extra


def local_path(value: str, bases: Iterable[Path]) -> Path | None:
    """The file ``value`` names, or None when it is a URL the server fetches itself.

    Raises ``FileNotFoundError`` for a path that names no file."""
    scheme = urlsplit(value).scheme.lower()
    if scheme in REMOTE_SCHEMES:
        return None
    if scheme == "file":
        candidates = [Path(unquote(urlsplit(value).path))]
    elif Path(value).is_absolute():
        candidates = [Path(value)]
    else:
        candidates = [base / value for base in bases]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(value)


class LocalInputs:
    """Finds and replaces the local files of payloads; ``bases`` are the folders a relative path
    is looked up in, ``extra_fields`` the server's input fields beyond ``*_url(s)``."""

    def __init__(self, bases: Iterable[Path], extra_fields: Iterable[str] = ()):
        self.bases = list(bases)
        self.extra = frozenset(extra_fields)

    def find(self, payload: Any) -> list[LocalInput]:
        """Every local file in ``payload``'s input fields; ``LocalInputError`` for one not there."""
        found = []
        for field, value in self._strings(payload, "payload"):
            try:
                path = local_path(value, self.bases)
            except FileNotFoundError:
                raise LocalInputError(field, value) from None
            if path is not None:
                found.append(LocalInput(field, path))
        return found

    def replace(self, payload: Any, assets: dict[Path, str]) -> Any:
        """``payload`` with each file that ``find`` found as ``asset://<id>``."""

        def swap(value: str) -> str:
            try:
                path = local_path(value, self.bases)
            except FileNotFoundError:
                return value
            return value if path is None else f"asset://{assets[path]}"

        def walk(node: Any, inside_input: bool) -> Any:
            if isinstance(node, dict):
                return {k: walk(v, is_input_field(k, self.extra)) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v, inside_input) for v in node]
            if isinstance(node, str) and inside_input:
                return swap(node)
            return node

        return walk(payload, False)

    def _strings(self, node: Any, where: str) -> Iterator[tuple[str, str]]:
        """(where, string) for each string under an input field of ``node``."""
        if isinstance(node, dict):
            for key, value in node.items():
                if not is_input_field(key, self.extra):
                    yield from self._strings(value, f"{where}.{key}")
                    continue
                values = value if isinstance(value, list) else [value]
                for index, item in enumerate(values):
                    label = f"{where}.{key}[{index}]" if isinstance(value, list) else f"{where}.{key}"
                    if isinstance(item, str):
                        yield label, item
                    else:
                        yield from self._strings(item, label)
        elif isinstance(node, list):
            for index, item in enumerate(node):
                yield from self._strings(item, f"{where}[{index}]")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Uploader:
    """Uploads local inputs once each, by content: the same image named by a thousand lines (or by
    two paths) is one asset. ``known`` maps a file's sha256 to its asset id, from an earlier run."""

    def __init__(self, client: Client, known: dict[str, str] | None = None):
        self.client = client
        self.by_digest: dict[str, str] = dict(known or {})
        self._digests: dict[Path, str] = {}

    def digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path]

    def upload(self, paths: Iterable[Path]) -> dict[str, str]:
        """Upload the files not yet uploaded; the new ``{sha256: asset_id}`` made by this call."""
        todo: dict[str, Path] = {}
        for path in paths:
            digest = self.digest(path)
            if digest not in self.by_digest:
                todo.setdefault(digest, path)
        made: dict[str, str] = {}
        if todo:
            assets = self.client.upload_many(list(todo.values()))
            for digest, asset in zip(todo, assets, strict=True):
                made[digest] = self.by_digest[digest] = asset["asset_id"]
        return made

    def asset_ids(self, paths: Iterable[Path]) -> dict[Path, str]:
        return {path: self.by_digest[self.digest(path)] for path in paths}
