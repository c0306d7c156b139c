"""Local file storage for inputs, outputs and uploads (an S3-compatible backend can take this
shape later).

Every name carries 128 random bits, because ``/files/<name>`` serves outputs without a key.
Uploads (``POST /v1/assets``, large ``data:`` inputs) live in a folder of their own that
``/files`` never serves: their bytes are the client's alone, read through
``/v1/assets/{id}/content`` with its key. Folders are created ``0700`` and files ``0600``, so no
other local user reads a tenant's images.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from config import Settings
from models.assets import UPLOAD

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


@dataclass(frozen=True)
class SavedFile:
    name: str
    path: Path
    size: int
    content_type: str


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
        self.files_dir = settings.files_dir
        self.inputs_dir = settings.inputs_dir
        self.uploads_dir = settings.storage_dir / "uploads"
        self.public_url = settings.public_url

    def url_for(self, name: str) -> str:
        return f"{self.public_url}/files/{name}"

    def path_for(self, name: str) -> Path | None:
        """An output's path (what ``/files/<name>`` may serve); None for a name we never make."""
        if not NAME_RE.match(name):
            return None
        return self.files_dir / name

    def asset_path(self, kind: str, name: str) -> Path | None:
        """The path of a stored file of either kind (``StoredFile.kind``)."""
        if not NAME_RE.match(name):
            return None
        return (self.uploads_dir if kind == UPLOAD else self.files_dir) / name

    def save_output(self, data: bytes, ext: str) -> SavedFile:
        return self._save(self.files_dir, data, ext)

    def save_upload(self, data: bytes, ext: str) -> SavedFile:
        return self._save(self.uploads_dir, data, ext)

    def _save(self, folder: Path, data: bytes, ext: str) -> SavedFile:
        name = f"{secrets.token_hex(16)}.{ext}"
        path = private_dir(folder) / name
        write_private(path, data)
        return SavedFile(name, path, len(data), CONTENT_TYPES[ext])

    def delete_outputs(self, names: list[str]) -> None:
        for name in names:
            path = self.path_for(name)
            if path is not None:
                path.unlink(missing_ok=True)

    def delete_files(self, files: list[tuple[str, str]]) -> None:
        """Unlink stored files of either kind, given as ``(kind, name)``."""
        for kind, name in files:
            path = self.asset_path(kind, name)
            if path is not None:
                path.unlink(missing_ok=True)

    def input_dir(self, job_id: str) -> Path:
        return private_dir(self.inputs_dir / job_id)

    def remove_inputs(self, job_id: str) -> None:
        shutil.rmtree(self.inputs_dir / job_id, ignore_errors=True)
