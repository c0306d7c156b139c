"""``generate``'s ``controlnets`` as SenseTime's ``controlnet_configs`` (seed 001, ``imgenstd``).

The seed takes at most three, each ``{"type", "img_url", "weight" (0, 2], "guidance_start",
"guidance_end" [0, 1], "pre_processor"}``; ``pre_processor`` ``"pass"`` (every type has it)
takes the image as the control image, which is our ``preprocessed: true``. SenseTime chooses the
ControlNet model for its base model itself, so a ControlNet ``model`` of ours cannot be sent.
What the seed cannot take is refused naming the field (``controlnets[0].scale``) before any
request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inference.base import InvalidInput

MAX_CONTROLNETS = 3
# The seed's ``controlnet_configs.type`` enum; ours (canny, depth, lineart, openpose, tile) are
# all in it, under the same names.
SENSETIME_TYPES = frozenset(
    {
        "canny", "depth", "ip2p", "lineart", "lineart_anime", "mlsd", "normal", "openpose", "scribble",
        "shuffle", "softedge", "tile", "seg", "brightness", "reference_only", "ip_adapter_faceid",
    }
)  # fmt: skip


def controlnet_configs(controlnets: Any) -> list[dict[str, Any]]:
    """The payload's ``controlnets`` (the contract's form) as ``controlnet_configs``."""
    if not isinstance(controlnets, list):
        raise InvalidInput("'controlnets' must be a list of objects", field="controlnets")
    if len(controlnets) > MAX_CONTROLNETS:
        raise InvalidInput(f"SenseTime takes at most {MAX_CONTROLNETS} controlnets", field="controlnets")
    return [_config(item, f"controlnets[{index}]") for index, item in enumerate(controlnets)]


def _config(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise InvalidInput(f"'{where}' must be an object", field=where)
    kind = item.get("type")
    if kind not in SENSETIME_TYPES:
        raise InvalidInput(f"SenseTime has no {kind!r} ControlNet", field=f"{where}.type")
    if item.get("model"):
        raise InvalidInput(
            "SenseTime picks the ControlNet for its model itself; leave 'model' out", field=f"{where}.model"
        )
    url = item.get("image_url")
    # SenseTime fetches the image itself: our public copy of the checked input, never a data: URI.
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InvalidInput(f"'{where}.image_url' must be a public http(s) URL", field=f"{where}.image_url")
    config: dict[str, Any] = {"type": kind, "img_url": url}
    scale = _number(item, "scale", where)
    if scale is not None:
        if not 0 < scale <= 2:
            raise InvalidInput(f"'{where}.scale' must be in (0, 2] for SenseTime", field=f"{where}.scale")
        config["weight"] = scale
    for ours, theirs in (("start", "guidance_start"), ("end", "guidance_end")):
        value = _number(item, ours, where)
        if value is not None:
            if not 0 <= value <= 1:
                raise InvalidInput(f"'{where}.{ours}' must be in [0, 1]", field=f"{where}.{ours}")
            config[theirs] = value
    if config.get("guidance_start", 0.0) >= config.get("guidance_end", 1.0):
        raise InvalidInput(f"'{where}.start' must be below its end", field=f"{where}.start")
    if item.get("preprocessed"):
        config["pre_processor"] = "pass"
    return config


def _number(item: Mapping[str, Any], name: str, where: str) -> float | None:
    value = item.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"'{where}.{name}' must be a number", field=f"{where}.{name}")
    return float(value)
