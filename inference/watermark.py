"""The visible "AI generated" label (the Volcengine seed's ``logo_info``, done locally)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Modes Pillow gives 16-bit greyscale PNG/TIFF files ("I" is the 32-bit mode older paths use).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as 8-bit ``L`` (value / 257, so 65535 -> 255); others unchanged.

    Pillow's own ``convert`` from I;16 clips every value above 255 to white instead of scaling.
    """
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))


def add_label(
    image: Image.Image, text: str = "AI generated", position: str = "bottomright", opacity: float = 0.6
) -> Image.Image:
    """Draw ``text`` on a translucent dark box in a corner (or top/bottom/middle).

    The label is drawn in 8 bits per channel: a 16-bit greyscale image comes back as 8-bit ``L``.
    """
    image = to_eight_bit(image)
    base = image.convert("RGBA")
    # Scale the label with the image so it stays legible on large outputs and small on thumbnails.
    size = max(10, min(base.width, base.height) // 24)
    font = ImageFont.load_default(size=size)
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 3)
    box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
    margin = pad
    xs = {"left": margin, "right": base.width - box_w - margin, "center": (base.width - box_w) // 2}
    ys = {"top": margin, "bottom": base.height - box_h - margin, "center": (base.height - box_h) // 2}
    vertical = (
        "top" if position.startswith("top") else "bottom" if position.startswith("bottom") else "center"
    )
    horizontal = "left" if position.endswith("left") else "right" if position.endswith("right") else "center"
    x, y = max(0, xs[horizontal]), max(0, ys[vertical])
    alpha = int(255 * opacity)
    draw.rectangle((x, y, x + box_w, y + box_h), fill=(0, 0, 0, alpha // 2))
    draw.text((x + pad - left, y + pad - top), text, font=font, fill=(255, 255, 255, alpha))
    out = Image.alpha_composite(base, overlay)
    return (
        out if "A" in image.getbands() else out.convert(image.mode if image.mode in ("RGB", "L") else "RGB")
    )
