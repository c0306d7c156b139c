"""Local file storage for inputs and outputs (an S3-compatible backend can take this shape later).

Output names carry 128 random bits, because ``/files/<name>`` is served without a key.
"""

from __future__ import annotations

import io
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from config import Settings

CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "json": "application/json",
    "mp4": "video/mp4",  # faceswap_video's output
}
NAME_RE = re.compile(r"^[0-9a-f]{32}\.(jpg|png|webp|json|mp4)$")


@dataclass(frozen=True)
class SavedFile:
    name: str
    path: Path
    size: int
    content_type: str


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
        image.save(buffer, "JPEG", quality=95, subsampling=0)
    elif fmt == "webp":
        image.save(buffer, "WEBP", quality=95)
    else:
        if image.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "P"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(buffer, "PNG", optimize=False, compress_level=3)
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
        self.public_url = settings.public_url

    def url_for(self, name: str) -> str:
        return f"{self.public_url}/files/{name}"

    def path_for(self, name: str) -> Path | None:
        if not NAME_RE.match(name):
            return None
        return self.files_dir / name

    def save_output(self, data: bytes, ext: str) -> SavedFile:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        name = f"{secrets.token_hex(16)}.{ext}"
        path = self.files_dir / name
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers never see half a file
        return SavedFile(name, path, len(data), CONTENT_TYPES[ext])

    def delete_outputs(self, names: list[str]) -> None:
        for name in names:
            path = self.path_for(name)
            if path is not None:
                path.unlink(missing_ok=True)

    def input_dir(self, job_id: str) -> Path:
        path = self.inputs_dir / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_inputs(self, job_id: str) -> None:
        shutil.rmtree(self.inputs_dir / job_id, ignore_errors=True)
