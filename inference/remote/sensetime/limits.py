"""SenseTime's own limits on our payload (seed 001's parameter tables), checked before any submit.

They are narrower than our engines' in places: generated sides of 640-6000 px (ours start at 64),
``hd_ratio`` in (1, 3] (our ``scale`` goes to 4), ``steps`` up to 70, ``cfg_scale`` in [1, 20],
LoRA ``merge_weight`` in (0, 2) (ours takes 2), and LoRAs on generation only. A payload outside
them is refused naming our field, so a route goes on to its next backend (``inference.remote.limits``).

Free outpaint (our ``left``/``right``/``top``/``bottom``) is seed 001's ``imgen_free``: the output
(the input plus the margins) must be 640-6000 px a side and a multiple of 64, the image placed at
``free_x``/``free_y`` (our ``left``/``top``) in multiples of 8. The margins are checked at ``POST``;
the output size needs the input's, so it is checked at submit (``INPUT_SIZES``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inference.base import InvalidInput
from inference.remote.limits import (
    Bound,
    check_bounds,
    input_size,
    lora_items,
    mapped_model,
    refuse_not_taken,
)

PROVIDER = "SenseTime"
MAX_PROMPT_CHARS = 2000
# "目前换脸接口最多支持换4张人脸"
MAX_FACES = 4
SAMPLES = Bound("samples", 1, 8)
SIDES = (Bound("width", 640, 6000), Bound("height", 640, 6000))
_DIFFUSION = (Bound("cfg_scale", 1, 20), Bound("steps", 0, 70, low_open=True), SAMPLES)
# Our task -> the seed's ranges on its fields (by our names: ``scale`` is the seed's ``hd_ratio``).
BOUNDS: dict[str, tuple[Bound, ...]] = {
    "generate": (
        *_DIFFUSION,
        *SIDES,
        Bound("seed", 0, 99999999, high_open=True),
        Bound("image_strength", 0, 1),
    ),
    "inpaint": (*_DIFFUSION, Bound("seed", 0, 9999999, high_open=True), Bound("strength", 0.1, 1)),
    "remove_object": (SAMPLES,),
    "outpaint": (Bound("ratio", 1, 5, low_open=True), SAMPLES, *SIDES),
    "upscale": (Bound("scale", 1, 3, low_open=True),),
    "stylize": (SAMPLES, *SIDES),
}
# imgen_free: "需要是64的倍数" for the output's sides, "free_x需要是8的倍数" for the placement, and
# an input of "大于等于256*256,小于6000*6000".
FREE_SIDE_STEP = 64
FREE_OFFSET_STEP = 8
FREE_INPUT = Bound("image_url", 256, 6000, high_open=True)
LORA_WEIGHT = Bound("weight", 0, 2, low_open=True, high_open=True)
# Only text/img2img takes ``lora_configs``; inpaint, outpaint and the rest have no such field.
LORA_TASKS = frozenset({"generate"})


def check_limits(task: str, payload: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """Refuse (``InvalidInput`` naming our field and SenseTime's limit) what SenseTime cannot take."""
    check_bounds(PROVIDER, payload, BOUNDS.get(task, ()))
    prompt = payload.get("prompt")
    if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(
            f"{PROVIDER} takes a 'prompt' of at most {MAX_PROMPT_CHARS} characters", field="prompt"
        )
    if payload.get("model"):
        mapped_model(PROVIDER, str(payload["model"]), options, "model")
    loras = lora_items(payload)
    if loras and task not in LORA_TASKS:
        raise InvalidInput(f"{PROVIDER} takes LoRAs for generate only, not {task}", field="loras")
    for index, item in enumerate(loras):
        where = f"loras[{index}]"
        model = item.get("model") or item.get("model_id")
        if model:
            mapped_model(PROVIDER, str(model), options, f"{where}.model")
        LORA_WEIGHT.check(PROVIDER, item.get("weight"), where=f"{where}.weight")
    if task == "faceswap_multi":
        _check_faces(payload)
    refuse_not_taken(PROVIDER, task, payload, NOT_TAKEN.get(task, {}))
    if task == "outpaint" and free_outpaint(payload):
        free_outpaint_size(payload, options)
    if task == "stylize":
        stylization_model(payload, options)


# Fields of ours that seed 001 has no counterpart for, per task, and why.
_OUTPAINT_KNOBS = ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "scheduler")
NOT_TAKEN: dict[str, dict[str, str]] = {
    "generate": {"scheduler": "its imgenstd has no sampler choice"},
    "inpaint": {"scheduler": "its inpaint has no sampler choice"},
    "remove_object": {
        "prompt": "its erase takes a mask only",
        "fill_prompt": "its erase repaints from no prompt",
        "seed": "its erase takes no seed",
    },
    # Its outpaint (both kinds) fills from the image alone: no prompt, no sampling knobs.
    "outpaint": {name: "its outpaint fills from the image alone" for name in _OUTPAINT_KNOBS},
    # Its stylization (seed 001 "风格化") is a model per style: no prompt, no strength.
    "stylize": {
        name: "its stylization model is the style" for name in ("prompt", "negative_prompt", "strength")
    },
}


def stylization_model(payload: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    """SenseTime's stylization model for our ``style`` (a preset name or a LoRA id), through the
    route option ``styles`` (``{"anime": "<SenseTime model id>"}``); a style it does not map is
    refused naming ``style``, so the route goes on to a backend that has it (``local``)."""
    style = str(payload.get("style") or "")
    styles = options.get("styles")
    if not isinstance(styles, Mapping) or not styles.get(style):
        known = ", ".join(sorted(styles)) if isinstance(styles, Mapping) else ""
        raise InvalidInput(
            f"the {PROVIDER} route has no stylization model for style {style!r} (route option "
            f"'styles' maps: {known or 'none'})",
            field="style",
        )
    return str(styles[style])


def free_outpaint(payload: Mapping[str, Any]) -> bool:
    """Whether an outpaint payload extends by pixels (our ``left``/``right``/``top``/``bottom``)."""
    return any(payload.get(side) is not None for side in ("left", "right", "top", "bottom"))


def free_outpaint_size(payload: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[int, int] | None:
    """The output size of a free outpaint as ``imgen_free`` takes it (the input plus the margins),
    or None where the input's size is not known yet (at ``POST``: the margins alone are checked).

    Refused naming our field where SenseTime cannot make exactly the picture asked for: a margin
    it cannot place, an output side outside [640, 6000] or not a multiple of 64, an input outside
    [256, 6000) (seed 001's ``imgen_free``)."""
    for side, theirs in (("left", "free_x"), ("top", "free_y")):
        value = int(payload.get(side) or 0)
        if value % FREE_OFFSET_STEP:
            raise InvalidInput(
                f"{PROVIDER}'s free outpaint places the image by multiples of {FREE_OFFSET_STEP} px "
                f"('{side}' is its {theirs}), got {value}",
                field=side,
            )
    size = input_size(options, "image_url")
    if size is None:
        return None
    output: list[int] = []
    for axis, given, (low, high) in zip(
        ("wide", "high"), size, (("left", "right"), ("top", "bottom")), strict=True
    ):
        if not FREE_INPUT.holds(given):
            raise InvalidInput(
                f"{PROVIDER}'s free outpaint takes an input {FREE_INPUT} px {axis}, got {given}",
                field="image_url",
            )
        length = given + int(payload.get(low) or 0) + int(payload.get(high) or 0)
        if not SIDES[0].holds(length) or length % FREE_SIDE_STEP:
            # The margin the client gave on this axis is the field to change (else the input).
            field = next((name for name in (high, low) if payload.get(name)), "image_url")
            raise InvalidInput(
                f"{PROVIDER}'s free outpaint makes outputs {SIDES[0]} px a side in multiples of "
                f"{FREE_SIDE_STEP}; the input's {given} px + '{low}' + '{high}' make {length} px {axis}",
                field=field,
            )
        output.append(length)
    return output[0], output[1]


def _check_faces(payload: Mapping[str, Any]) -> None:
    for name in ("target_faces_index", "swap_faces_index", "source_urls"):
        given = payload.get(name)
        if given:
            if isinstance(given, list) and len(given) > MAX_FACES:
                raise InvalidInput(f"{PROVIDER} swaps at most {MAX_FACES} faces", field=name)
            return
