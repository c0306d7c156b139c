"""The style presets of ``stylize``: each a prompt template, a negative prompt, a default
strength and optionally a LoRA. The built-in ones are here; an operator adds more, or replaces
one of the same name, in the file ``AIORCH_STYLES_FILE`` (read and checked by ``config.styles``,
which also defines a preset, so the settings can hold the file's).

Stdlib only: the API lists the presets (``GET /v1/capabilities``) and checks a payload's ``style``
against them without loading any engine; the remote providers compose their prompts from them.
"""

from __future__ import annotations

from collections.abc import Iterable

from config.styles import DEFAULT_SUBJECT, StylePreset

__all__ = ["BUILTIN_STYLES", "DEFAULT_SUBJECT", "LORA_STYLE_STRENGTH", "StylePreset", "style_presets"]

# The strength of a style given as a LoRA id: enough denoising for the LoRA to show, little
# enough that the picture's composition survives.
LORA_STYLE_STRENGTH = 0.6


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


def style_presets(operators: Iterable[StylePreset] = ()) -> dict[str, StylePreset]:
    """The presets a platform offers: the built-in ones, then the operator's (``Settings.styles``,
    from ``AIORCH_STYLES_FILE``) in their file's order; an operator's preset replaces a built-in
    one of the same name in place."""
    presets = dict(BUILTIN_STYLES)
    presets.update((preset.name, preset) for preset in operators)
    return presets
