"""Pictures as a client sends them inline: a PIL image as a ``data:`` URI."""

from __future__ import annotations

import base64
import io

from PIL import Image


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    """``image`` encoded as ``fmt`` in a base64 ``data:`` URI."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()
