"""The style presets of ``stylize``: each a prompt template, a negative prompt, a default
strength and optionally a LoRA.

Stdlib only: the API lists the presets (``GET /v1/capabilities``) and checks a payload's ``style``
against them without loading any engine; the remote providers compose their prompts from them.
"""

from __future__ import annotations

from dataclasses import dataclass

# What ``{prompt}`` becomes when the payload gives no prompt: img2img keeps the picture's
# content, so a neutral subject lets the style words do the work.
DEFAULT_SUBJECT = "the scene"
# The strength of a style given as a LoRA id: enough denoising for the LoRA to show, little
# enough that the picture's composition survives.
LORA_STYLE_STRENGTH = 0.6


@dataclass(frozen=True)
class StylePreset:
    """One named style: ``prompt`` holds ``{prompt}`` where the payload's prompt goes."""

    name: str
    description: str
    prompt: str
    negative_prompt: str
    strength: float
    # A LoRA model id applied with the preset (an operator's preset; the built-ins need none).
    lora: str | None = None
    lora_weight: float = 1.0

    def compose(self, prompt: str | None) -> str:
        """The preset's prompt around the payload's (or around ``DEFAULT_SUBJECT``)."""
        subject = (prompt or "").strip() or DEFAULT_SUBJECT
        return self.prompt.replace("{prompt}", subject)

    def describe(self) -> dict[str, object]:
        """What ``GET /v1/capabilities`` shows of it."""
        return {"name": self.name, "description": self.description, "strength": self.strength}


_PHOTO = "photo, photorealistic, 3d render"
_DEFECTS = "blurry, lowres, jpeg artifacts, deformed, watermark, text"

BUILTIN_STYLES: dict[str, StylePreset] = {
    preset.name: preset
    for preset in (
        StylePreset(
            "anime",
            "Anime illustration: cel shading, clean line art, vivid colours",
            "anime style illustration of {prompt}, cel shading, clean line art, vibrant colors, "
            "anime key visual",
            f"{_PHOTO}, {_DEFECTS}",
            0.55,
        ),
        StylePreset(
            "watercolor",
            "Watercolour painting: soft washes and paper texture",
            "watercolor painting of {prompt}, soft washes, bleeding pigments, paper texture, "
            "delicate brush strokes",
            f"{_PHOTO}, harsh lines, {_DEFECTS}",
            0.55,
        ),
        StylePreset(
            "oil_painting",
            "Oil painting: impasto brush strokes on canvas",
            "oil painting of {prompt}, thick impasto brush strokes, canvas texture, rich colors, "
            "classical fine art",
            f"{_PHOTO}, {_DEFECTS}",
            0.55,
        ),
        StylePreset(
            "sketch",
            "Pencil sketch: monochrome graphite with cross-hatching",
            "pencil sketch of {prompt}, graphite drawing, cross-hatching, monochrome, white paper",
            f"color, {_PHOTO}, painting, {_DEFECTS}",
            0.6,
        ),
        StylePreset(
            "cyberpunk",
            "Cyberpunk: neon light, magenta and cyan glow, night",
            "cyberpunk style {prompt}, neon lights, glowing magenta and cyan, futuristic, high-tech, night",
            f"daylight, pastoral, {_DEFECTS}",
            0.5,
        ),
    )
}
