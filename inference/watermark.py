"""The visible "AI generated" label (the Volcengine seed's ``logo_info``, done locally)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def add_label(
    image: Image.Image, text: str = "AI generated", position: str = "bottomright", opacity: float = 0.6
) -> Image.Image:
    """Draw ``text`` on a translucent dark box in a corner (or top/bottom/middle)."""
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
