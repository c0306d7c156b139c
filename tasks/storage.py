"""Storage of inputs, outputs and uploads, on a local folder or an S3-compatible bucket.

``Storage`` is the one way in: every reader and writer (the API's ``/files`` and asset content,
the prepare and run steps, provider copies, the sweeps, deletions) goes through it, never
through a path of its own, so nothing assumes the API and the workers share a disk. The backend
(``tasks.storage_backends``) is the local folder ``AIORCH_STORAGE_DIR`` by default, or the bucket
of ``AIORCH_STORAGE_URL=s3://bucket/prefix`` (``tasks.storage_s3``, imported only then). Keys:

- ``files/<name>``: outputs (and public copies of inputs for a provider), served at
  ``/files/<name>`` without a key, so every name carries 128 random bits;
- ``uploads/<name>``: uploads (``POST /v1/assets``, large ``data:`` inputs), never served by
  ``/files``: their bytes are the client's alone, read through ``/v1/assets/{id}/content``;
- ``inputs/<job id>/<field>_<index>.<ext>``: a job's checked inputs, written by the prepare step
  (on any host) and read by the run step (on any other), removed when the job ends.

On a local folder, folders are ``0700`` and files ``0600``, so no other local user reads a
tenant's images. An engine that reads a file itself (a video input) gets a local copy in the
job's local folder (``input_dir``), removed with its inputs.
"""

from __future__ import annotations

import io
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from config import Settings
from models.assets import OUTPUT, UPLOAD
from tasks.storage_backends import (
    CONTENT_TYPES,
    NAME_RE,
    Backend,
    Blob,
    LocalBackend,
    private_dir,
)

__all__ = ["CONTENT_TYPES", "Blob", "SavedFile", "Storage", "default_format", "encode_image", "input_name"]

# Key folders (see the module's docstring).
FILES = "files"
UPLOADS = "uploads"
INPUTS = "inputs"


@dataclass(frozen=True)
class SavedFile:
    name: str
    size: int
    content_type: str
    path: Path | None = None  # its file on this host, with local storage only


def open_backend(settings: Settings) -> Backend:
    """The bucket of ``AIORCH_STORAGE_URL`` when one is set, else the local storage folder."""
    if settings.storage_url:
        # Imported here: boto3 costs an API or a worker on local storage ~25 MB it never uses.
        from tasks.storage_s3 import S3Backend

        return S3Backend(settings)
    return LocalBackend(settings.storage_dir)


def input_name(entry: dict[str, Any]) -> str:
    """The stored name of one checked input (an entry of ``jobs.inputs``). Entries recorded
    before shared storage carried only their local ``path``; its last part is the same name."""
    name = entry.get("name") or Path(entry["path"]).name
    return str(name)


# Output encoder settings, chosen with ``python -m bench.encode`` (numbers in README.md, under
# "make bench-gpu"), so that encoding does not dominate a job. PNG level 1 takes 64-73 % of level
# 3's time (228 vs 357 ms at 2048x2048 on a 2-core CPU) for 1.6-6.9 % more bytes, and every level
# is lossless; level 0 is faster still but writes 1.7-3.1x the bytes of level 1. WebP method 2 takes
# about half of method 4's time (Pillow's default; 142 vs 297 ms) for bytes within 1 % and a PSNR
# 0.15-0.45 dB lower. JPEG quality 95 with 4:4:4 chroma takes 17 ms at 2048x2048: unchanged.
PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 95
WEBP_QUALITY = 95
WEBP_METHOD = 2


def encode_image(image: Image.Image, fmt: str) -> bytes:
    # Imported here: only workers encode outputs, and the API process (which builds a Storage to
    # serve and delete files) must load neither numpy nor the engines.
    import numpy as np

    from inference.watermark import to_eight_bit

    buffer = io.BytesIO()
    if fmt != "png":
        # JPEG and WebP hold 8 bits per channel: 16-bit grey is scaled down, not clipped.
        image = to_eight_bit(image)
    elif image.mode == "I":
        # 32-bit "I" holding 16-bit values (older Pillow paths): PNG stores it as 16-bit grey.
        image = Image.fromarray(np.clip(np.asarray(image), 0, 65535).astype(np.uint16))
    if fmt == "jpg":
        if image.mode not in ("RGB", "L"):
            # JPEG has no alpha: flatten onto white rather than letting transparent pixels go black.
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            image = flat
        image.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    elif fmt == "webp":
        image.save(buffer, "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
    else:
        if image.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "P"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(buffer, "PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def default_format(image: Image.Image, input_ext: str | None) -> str:
    """PNG when the image has alpha (JPEG would lose it), else the input's family, else JPEG."""
    if "A" in image.getbands():
        return "png"
    if input_ext in ("png", "webp"):
        return input_ext
    return "jpg"


class Storage:
    def __init__(self, settings: Settings):
        self.public_url = settings.public_url
        self.backend = open_backend(settings)
        self.shared = bool(settings.storage_url)
        # This host's folder of a job's local files: its inputs with local storage, only the copies
        # an engine reads as files (and scratch outputs) with a bucket.
        self.inputs_dir = settings.inputs_dir

    def url_for(self, name: str) -> str:
        return f"{self.public_url}/files/{name}"

    # -- outputs and uploads ------------------------------------------------------------------------

    @staticmethod
    def _file_key(kind: str, name: str) -> str | None:
        """The key of a stored file of either kind (``StoredFile.kind``); None for a name we never
        make, so a request's name can never reach another key."""
        if not NAME_RE.match(name):
            return None
        return f"{UPLOADS if kind == UPLOAD else FILES}/{name}"

    def save_output(self, data: bytes, ext: str) -> SavedFile:
        return self._save(FILES, data, ext)

    def save_upload(self, data: bytes, ext: str) -> SavedFile:
        return self._save(UPLOADS, data, ext)

    def _save(self, folder: str, data: bytes, ext: str) -> SavedFile:
        name = f"{secrets.token_hex(16)}.{ext}"
        key = f"{folder}/{name}"
        self.backend.put(key, data)
        return SavedFile(name, len(data), CONTENT_TYPES[ext], self.backend.local_path(key))

    def open_file(self, kind: str, name: str) -> Blob | None:
        """A stored file opened to be served (``/files/<name>``, asset content); None when missing."""
        key = self._file_key(kind, name)
        return None if key is None else self.backend.open(key)

    def read_file(self, kind: str, name: str) -> bytes | None:
        key = self._file_key(kind, name)
        return None if key is None else self.backend.get(key)

    def has_file(self, kind: str, name: str) -> bool:
        key = self._file_key(kind, name)
        return key is not None and self.backend.exists(key)

    def asset_path(self, kind: str, name: str) -> Path | None:
        """A stored file's path on this host: local storage only (None with a bucket)."""
        key = self._file_key(kind, name)
        return None if key is None else self.backend.local_path(key)

    def delete_outputs(self, names: list[str]) -> None:
        self.delete_files([(OUTPUT, name) for name in names])

    def delete_files(self, files: list[tuple[str, str]]) -> None:
        """Delete stored files of either kind, given as ``(kind, name)``."""
        self.backend.delete(key for key in (self._file_key(k, n) for k, n in files) if key is not None)

    # -- a job's checked inputs -----------------------------------------------------------------------

    def save_input(self, job_id: str, name: str, data: bytes) -> dict[str, Any]:
        """Store one checked input of a job; returns what its ``jobs.inputs`` entry records of it.

        Written aside and renamed (or in one PUT): two workers may prepare the same job at once
        (its own run message and a batching neighbour), and neither may read half a file."""
        key = f"{INPUTS}/{job_id}/{name}"
        self.backend.put(key, data)
        path = self.backend.local_path(key)
        # Local storage records the path too, as before (entries are read through ``read_input``).
        return {"name": name} if path is None else {"name": name, "path": str(path)}

    def read_input(self, job_id: str, entry: dict[str, Any]) -> bytes:
        name = input_name(entry)
        data = self.backend.get(f"{INPUTS}/{job_id}/{name}")
        if data is None:
            raise FileNotFoundError(f"input {name} of job {job_id} is not in storage")
        return data

    def local_input(self, job_id: str, entry: dict[str, Any]) -> Path:
        """A local file of one checked input, for an engine that reads files itself (a video):
        the stored file on local storage, else a copy in the job's local folder."""
        name = input_name(entry)
        key = f"{INPUTS}/{job_id}/{name}"
        path = self.backend.local_path(key)
        if path is not None:
            return path
        copy = self.input_dir(job_id) / name
        if not copy.is_file() and not self.backend.download(key, copy):
            raise FileNotFoundError(f"input {name} of job {job_id} is not in storage")
        return copy

    def input_dir(self, job_id: str) -> Path:
        """The job's folder on this host (created ``0700``): local copies and scratch files."""
        return private_dir(self.inputs_dir / job_id)

    def remove_inputs(self, job_id: str) -> None:
        self.backend.delete_prefix(f"{INPUTS}/{job_id}/")
        shutil.rmtree(self.inputs_dir / job_id, ignore_errors=True)

    def ping(self) -> None:
        """Raise when the storage cannot be reached (``/readyz``)."""
        self.backend.ping()
