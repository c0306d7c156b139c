"""Style presets of ``stylize``: what one is, and the operator's own, read from the JSON or TOML
file ``AIORCH_STYLES_FILE`` (``.toml``: TOML, anything else: JSON).

The file maps each preset's name to its fields; a preset named like a built-in one
(``inference.styles``) replaces it::

    {
      "noir": {
        "prompt": "film noir photograph of {prompt}, high contrast, dramatic shadows",
        "negative_prompt": "color, cartoon",
        "description": "Film noir: black and white, hard light",
        "strength": 0.5,
        "lora": "noir-lora",
        "lora_weight": 0.8
      }
    }

``prompt`` is required and holds ``{prompt}`` where the payload's prompt goes; the rest is
optional. Everything is checked when the settings load, and every problem names the preset and
the field (``styles file: preset 'noir': lora_weight must be ...``), so a typo stops the process
at start-up instead of failing jobs.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import limits

# What ``{prompt}`` becomes when the payload gives no prompt: img2img keeps the picture's
# content, so a neutral subject lets the style words do the work.
DEFAULT_SUBJECT = "the scene"
# A file preset's strength when it names none: the built-ins' usual one.
DEFAULT_STRENGTH = 0.55
PLACEHOLDER = "{prompt}"
# A preset name is a payload value and sits beside LoRA ids in ``style``: a short plain word.
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FIELDS = ("prompt", "negative_prompt", "description", "strength", "lora", "lora_weight")
_MAX_TEXT = limits.DIFFUSION_MAX_PROMPT_CHARS


class StylesError(ValueError):
    """The styles file is unusable; the message names the preset and field (the settings wrap it)."""


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
        return self.prompt.replace(PLACEHOLDER, subject)

    def describe(self) -> dict[str, object]:
        """What ``GET /v1/capabilities`` shows of it."""
        described: dict[str, object] = {
            "name": self.name,
            "description": self.description,
            "strength": self.strength,
        }
        if self.lora:
            described["lora"] = self.lora
        return described


def load_styles(path: Path) -> tuple[StylePreset, ...]:
    """Read and check a styles file; raises ``StylesError`` naming the bad preset and field."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StylesError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".toml":
        try:
            document: Any = tomllib.loads(raw)
        except tomllib.TOMLDecodeError as exc:
            raise StylesError(f"{path} is not valid TOML: {exc}") from None
    else:
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StylesError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    return parse_styles(document)


def parse_styles(document: Any) -> tuple[StylePreset, ...]:
    """The presets of a parsed styles document, in the file's order."""
    if not isinstance(document, dict):
        raise StylesError("the styles file must hold an object of presets by name")
    return tuple(_preset(name, fields) for name, fields in document.items())


def _preset(name: str, fields: Any) -> StylePreset:
    where = f"preset {name!r}"
    if not _NAME.match(name):
        raise StylesError(f"{where}: a name is 1-64 letters, digits, '_', '.' or '-'")
    if not isinstance(fields, dict):
        raise StylesError(f"{where} must be an object with at least a prompt")
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise StylesError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    prompt = _text(where, "prompt", fields.get("prompt"), required=True)
    if PLACEHOLDER not in prompt:
        raise StylesError(f"{where}: prompt must contain {PLACEHOLDER} where the payload's prompt goes")
    strength = _number(where, "strength", fields.get("strength", DEFAULT_STRENGTH), 1.0)
    lora = _text(where, "lora", fields.get("lora")) or None
    if lora is not None and len(lora) > 128:
        raise StylesError(f"{where}: lora must be a model id of at most 128 characters")
    if "lora_weight" in fields and lora is None:
        raise StylesError(f"{where}: lora_weight needs a lora")
    weight = _number(where, "lora_weight", fields.get("lora_weight", 1.0), limits.DIFFUSION_MAX_LORA_WEIGHT)
    return StylePreset(
        name=name,
        description=_text(where, "description", fields.get("description")),
        prompt=prompt,
        negative_prompt=_text(where, "negative_prompt", fields.get("negative_prompt")),
        strength=strength,
        lora=lora,
        lora_weight=weight,
    )


def _text(where: str, field: str, value: Any, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise StylesError(f"{where}: {field} must be {'a non-empty' if required else 'a'} string")
    if len(value) > _MAX_TEXT:
        raise StylesError(f"{where}: {field} must be at most {_MAX_TEXT} characters")
    return value


def _number(where: str, field: str, value: Any, high: float) -> float:
    """A number in (0, ``high``]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
        raise StylesError(f"{where}: {field} must be a number in (0, {high}], got {value!r}")
    return float(value)
