"""A provider's own limits, checked on our payload before anything is sent.

Our payload schemas hold the local engines' limits; a provider documents narrower ones (SenseTime's
sides of 640-6000 px and ``hd_ratio`` up to 3, Volcengine's sides of 600-1500 px), or cannot take a
field at all (LoRAs or a negative prompt at Volcengine: ``refuse_not_taken``; a field is refused, never
dropped, so the picture is the one asked for wherever it is made). Each client declares them in one
``check_limits(task, payload, options)`` that raises ``InvalidInput`` naming our field and the
provider's limit, so:

- the submit step skips a backend whose limits refuse the payload and goes on to the next one of
  the route (``local`` included) instead of failing the job;
- the API refuses at ``POST`` (422 naming the field) a payload that no backend of its route can take.

The check is pure (no request, no credentials): the API runs it without building a client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from inference.base import InvalidInput

# The route option the submit step fills with the pixel sizes of the job's checked inputs
# (``{"image_url": [width, height]}``): what a limit needs the input for (the output size of a free
# outpaint) is checked where they are known. At ``POST`` the inputs are not fetched yet, so such a
# limit is checked at submit only, and refuses there (the route goes on to its next backend).
INPUT_SIZES = "input_sizes"
# Values of our fields that ask for nothing a provider must do (our defaults): a provider without
# the field makes the same picture. One image is what a provider without ``samples`` returns.
NEUTRAL: dict[str, Any] = {"samples": 1, "sharpen": 0, "face_enhance": False}


@dataclass(frozen=True)
class Bound:
    """A provider's documented range for one numeric field of our payload; the one range check of
    every client (``check_bounds``), whose refusal names the field, the range and the value."""

    field: str
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def check(self, provider: str, value: Any, *, where: str | None = None) -> None:
        """Refuse ``value`` (a present number) outside the range, naming ``where`` (default: the field)."""
        name = where or self.field
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(f"'{name}' must be a number", field=name)
        if not self.holds(value):
            raise InvalidInput(f"{provider} takes '{name}' in {self}, got {_number(value)}", field=name)


def _number(value: float) -> str:
    # 99999999, not 1e+08: the limit as the seed writes it.
    return str(int(value)) if float(value).is_integer() else str(value)


def check_bounds(provider: str, payload: Mapping[str, Any], bounds: Iterable[Bound]) -> None:
    """Every bound whose field the payload gives, in order; the first one broken is raised."""
    for bound in bounds:
        bound.check(provider, payload.get(bound.field))


def refuse_not_taken(
    provider: str, task: str, payload: Mapping[str, Any], not_taken: Mapping[str, str]
) -> None:
    """Refuse a field the provider has no counterpart for (``{field: why}``) where the payload asks
    for something with it, rather than drop it and return a picture other than the one asked for."""
    for name, why in not_taken.items():
        value = payload.get(name)
        if value is None or (name in NEUTRAL and value == NEUTRAL[name]):
            continue
        raise InvalidInput(f"{provider} cannot take {task}'s {name!r}: {why}", field=name)


def input_size(options: Mapping[str, Any], field: str) -> tuple[int, int] | None:
    """The pixel size of the job's checked input ``field`` (``INPUT_SIZES``), or None where it is
    not known (at ``POST``, or a client called without it)."""
    sizes = options.get(INPUT_SIZES)
    found = sizes.get(field) if isinstance(sizes, Mapping) else None
    if not isinstance(found, list | tuple) or len(found) != 2:
        return None
    width, height = found
    return int(width), int(height)


def refuse_loras(provider: str, payload: Mapping[str, Any]) -> None:
    """A provider with no LoRA parameter refuses a payload that names LoRAs, rather than dropping them
    and returning a picture without the style the client asked for."""
    if payload.get("loras"):
        raise InvalidInput(f"{provider} takes no LoRAs", field="loras")


def refuse_controlnets(provider: str, payload: Mapping[str, Any]) -> None:
    """Likewise for ``generate``'s ``controlnets``: a provider with no ControlNet parameter would
    return a picture that ignores the structure the client asked for."""
    if payload.get("controlnets"):
        raise InvalidInput(f"{provider} takes no ControlNets", field="controlnets")


def lora_items(payload: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The payload's ``loras`` items (``{"model", "weight"}`` per the contract), checked for shape."""
    loras = payload.get("loras") or []
    if not isinstance(loras, list):
        raise InvalidInput("'loras' must be a list of {model, weight}", field="loras")
    for index, item in enumerate(loras):
        if not isinstance(item, Mapping):
            raise InvalidInput(
                f"'loras[{index}]' must be an object with a 'model' id", field=f"loras[{index}]"
            )
    return loras


def mapped_model(provider: str, model_id: str, options: Mapping[str, Any], field: str) -> str:
    """Our model id as the provider's, through the route option ``models`` (``{"ours": "theirs"}``).

    A route that gives ``models`` speaks our ids only: one it does not map is refused naming the
    field, so the route goes on to a backend that has the model (``local``). Without the option the
    id is the provider's own, sent as it is.
    """
    mapping = options.get("models")
    if mapping is None:
        return model_id
    if not isinstance(mapping, Mapping) or not mapping.get(model_id):
        known = ", ".join(sorted(mapping)) if isinstance(mapping, Mapping) else ""
        raise InvalidInput(
            f"the {provider} route has no model {model_id!r} (it maps: {known or 'none'})", field=field
        )
    return str(mapping[model_id])
