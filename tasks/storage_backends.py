"""Where stored bytes live, under keys such as ``files/<name>`` or ``inputs/<job id>/<name>``.

Two backends share one small interface (``Backend``): ``LocalBackend``, a folder on this host
(``AIORCH_STORAGE_DIR``, the default), and ``tasks.storage_s3.S3Backend``, an S3-compatible
bucket (``AIORCH_STORAGE_URL=s3://bucket/prefix``) that API and workers on different hosts share.
``tasks.storage.Storage`` picks one from the settings and is the only caller: it owns the key
layout, the random names and the kinds of files; a backend only moves bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol

CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "json": "application/json",
    "mp4": "video/mp4",  # faceswap_video's output
    "safetensors": "application/octet-stream",  # train_lora's LoRA
    # Uploads keep the format they came in (every format an input may have).
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "gif": "image/gif",
}
NAME_RE = re.compile(r"^[0-9a-f]{32}\.(jpg|png|webp|json|mp4|safetensors|bmp|tiff|gif)$")
DIR_MODE = 0o700
FILE_MODE = 0o600


def content_type_of(key: str) -> str:
    """The media type a stored key is served with (by its extension)."""
    return CONTENT_TYPES.get(key.rpartition(".")[2], "application/octet-stream")


def private_dir(path: Path) -> Path:
    """``mkdir -p`` with every folder it creates ``0700`` (``Path.mkdir`` gives the parents it
    creates the default mode, so each level is made here)."""
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            folder.mkdir(mode=DIR_MODE)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a ``0600`` file, aside and then renamed: readers (and two
    workers writing the same input) never see half a file."""
    part = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


class StorageUnavailable(Exception):
    """The storage cannot be reached now (a network failure, the server's 5xx): worth a retry,
    unlike a refusal (a missing bucket, wrong credentials), which is the operator's to fix."""


@dataclass(frozen=True)
class Blob:
    """A stored object opened for reading, to be served without holding it in memory: a local
    file the web server sends itself (``path``), or a stream of its bytes (``stream``, which the
    reader closes)."""

    size: int
    etag: str | None = None
    last_modified: datetime | None = None
    path: Path | None = None
    stream: BinaryIO | None = None


class Backend(Protocol):
    """Bytes under keys (``a/b/name``, never ``..``). Missing keys are not errors: ``get`` and
    ``open`` answer None, ``delete`` skips them. Anything else (a bucket that refuses us, a
    network failure) raises."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def open(self, key: str) -> Blob | None: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, keys: Iterable[str]) -> None: ...

    def delete_prefix(self, prefix: str) -> None:
        """Every key under ``prefix`` (a folder, ending in ``/``)."""

    def local_path(self, key: str) -> Path | None:
        """The key's file on this host's disk, when the backend is a local folder; else None."""

    def download(self, key: str, target: Path) -> bool:
        """Copy the object to the local file ``target`` (``0600``); False when it is missing."""

    def ping(self) -> None:
        """Raise when the storage cannot be reached (``/readyz``)."""


class LocalBackend:
    """A folder of this host: folders ``0700``, files ``0600``, written aside and renamed."""

    def __init__(self, root: Path):
        self.root = root

    def local_path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self.local_path(key)
        private_dir(path.parent)
        write_private(path, data)

    def get(self, key: str) -> bytes | None:
        try:
            return self.local_path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def open(self, key: str) -> Blob | None:
        path = self.local_path(key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        return Blob(size=stat.st_size, last_modified=datetime.fromtimestamp(stat.st_mtime, UTC), path=path)

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.local_path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.local_path(prefix), ignore_errors=True)

    def download(self, key: str, target: Path) -> bool:
        data = self.get(key)
        if data is None:
            return False
        write_private(target, data)
        return True

    def ping(self) -> None:
        private_dir(self.root)
