"""ControlNets on ``generate``: up to three, from the model store, each steering the denoising with
a control image made from the job's picture (``control_images``) or sent ready (``preprocessed``).

A ControlNet is a diffusers ``ControlNetModel`` folder whose entry records its control type and
base model (``aiorch models add``). Each is loaded once into the process's model cache, like a
base pipeline, and held there while a run uses it; the run derives the ControlNet pipeline from
the loaded base pipeline with ``from_pipe`` (``DiffusionModels.run``'s ``modules``), so the UNet,
VAE and text encoders are shared, never reloaded. Several ControlNets run as diffusers'
``MultiControlNetModel``, each with its own scale and start/end.

Every check (count, types, scales, the models and annotators the job needs) runs before any
weight is loaded, and raises ``InvalidInput`` naming the field (``controlnets[1].type``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from config import limits
from inference.base import InvalidInput
from inference.diffusion import control_images
from inference.diffusion.loader import DiffusionModels
from inference.diffusion.params import input_image, number
from inference.model_cache import estimate_checkpoint_bytes
from inference.model_store import ModelEntry, ModelNotFound
from inference.pose import body_pose_map, load_body_pose_annotator

MAX_CONTROLNETS = limits.DIFFUSION_MAX_CONTROLNETS
CONTROL_TYPES = limits.CONTROLNET_TYPES
# The control types whose image a model of the store makes (an ``annotator`` entry whose
# ``extra["annotates"]`` is the type), and what to install when none is: the API refuses the same
# ones (config/limits.py CONTROLNET_ANNOTATED_TYPES) when none is installed.
ANNOTATED_TYPES = {
    "depth": "add a transformers depth-estimation model folder, DPT or Depth Anything",
    "openpose": "add OpenPose's body_pose_model.pth",
}


@dataclass(frozen=True)
class ControlRequest:
    """One ControlNet of a job, checked: what the payload asked for."""

    index: int
    type: str
    image: Image.Image
    model: str | None
    scale: float
    start: float
    end: float
    preprocessed: bool

    @property
    def field(self) -> str:
        return f"controlnets[{self.index}]"


@dataclass(frozen=True)
class Control:
    """A request with the ControlNet that serves it and, when its image is to be made by a model,
    that annotator's entry."""

    request: ControlRequest
    entry: ModelEntry
    annotator: ModelEntry | None = None

    def meta(self) -> dict[str, Any]:
        r = self.request
        preprocessor = "none" if r.preprocessed else control_images.PREPROCESSORS[r.type]
        if self.annotator is not None:
            preprocessor = f"{preprocessor}:{self.annotator.id}"
        return {
            "type": r.type,
            "model": self.entry.id,
            "scale": r.scale,
            "start": r.start,
            "end": r.end,
            "preprocessor": preprocessor,
        }


def check_controlnets(value: Any) -> list[ControlRequest]:
    """The payload's ``controlnets`` (each with its decoded ``image``), checked as the API does."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InvalidInput("controlnets must be a list of objects", field="controlnets")
    if len(value) > MAX_CONTROLNETS:
        raise InvalidInput(f"at most {MAX_CONTROLNETS} controlnets, got {len(value)}", field="controlnets")
    requests = []
    for index, item in enumerate(value):
        where = f"controlnets[{index}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where} must be an object", field=where)
        kind = item.get("type")
        if kind not in CONTROL_TYPES:
            raise InvalidInput(
                f"{where}.type must be one of {', '.join(CONTROL_TYPES)}, got {kind!r}", field=f"{where}.type"
            )
        model = item.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidInput(f"{where}.model must be a model id", field=f"{where}.model")
        scale = number(f"{where}.scale", item.get("scale", 1.0), 0.0, limits.DIFFUSION_MAX_CONTROLNET_SCALE)
        start = number(f"{where}.start", item.get("start", 0.0), 0.0, 1.0)
        end = number(f"{where}.end", item.get("end", 1.0), 0.0, 1.0)
        if start >= end:
            raise InvalidInput(
                f"{where}.start ({start:g}) must be below end ({end:g})", field=f"{where}.start"
            )
        image = input_image(f"{where}.image_url", item.get("image"))
        preprocessed = bool(item.get("preprocessed", False))
        requests.append(ControlRequest(index, str(kind), image, model, scale, start, end, preprocessed))
    return requests


class ControlNets:
    """Finds a job's ControlNets and annotators in the store, makes its control images, and holds
    the loaded ControlNets for its run. Built on the process's ``DiffusionModels`` (its store,
    cache, device and dtype)."""

    def __init__(self, models: DiffusionModels):
        self.models = models

    # -- resolving (no weights touched) ------------------------------------------------------

    def resolve(
        self, requests: list[ControlRequest], base: ModelEntry, base_type: str, client: str | None
    ) -> list[Control]:
        base_width = _cross_attention_dim(str(self.models.store.resolve_path(base) / "unet"))
        controls = []
        for request in requests:
            entry = self._controlnet_for(request, base_type, client)
            width = entry.extra.get("cross_attention_dim")
            if base_width is not None and width is not None and width != base_width:
                raise InvalidInput(
                    f"ControlNet {entry.id!r} takes {width}-wide text features; model {base.id!r} "
                    f"gives {base_width}",
                    field=f"{request.field}.model",
                )
            controls.append(Control(request, entry, self._annotator_for(request, client)))
        return controls

    def _controlnet_for(self, request: ControlRequest, base_type: str, client: str | None) -> ModelEntry:
        where = request.field
        if request.model is None:
            # The operator's ControlNet of that type for the base model (a client's own first).
            fits = [
                e
                for e in self.models.store.list(type="controlnet", client=client)
                if e.extra.get("control_type") == request.type and e.base_model_type in (None, base_type)
            ]
            if not fits:
                raise InvalidInput(
                    f"no {request.type} ControlNet for {base_type} models is installed",
                    field=f"{where}.type",
                )
            fits.sort(key=lambda e: (e.owner is None, e.id))
            return fits[0]
        try:
            entry = self.models.store.get(request.model, client=client)
        except ModelNotFound:
            raise InvalidInput(f"unknown ControlNet {request.model!r}", field=f"{where}.model") from None
        if entry.type != "controlnet":
            raise InvalidInput(
                f"{entry.id!r} is a {entry.type} model, not a ControlNet", field=f"{where}.model"
            )
        if entry.extra.get("control_type") != request.type:
            raise InvalidInput(
                f"ControlNet {entry.id!r} is a {entry.extra.get('control_type')} ControlNet, "
                f"not {request.type}",
                field=f"{where}.model",
            )
        if entry.base_model_type and entry.base_model_type != base_type:
            raise InvalidInput(
                f"ControlNet {entry.id!r} is for {entry.base_model_type}, the model is {base_type}",
                field=f"{where}.model",
            )
        return entry

    def _annotator_for(self, request: ControlRequest, client: str | None) -> ModelEntry | None:
        if request.preprocessed or request.type not in ANNOTATED_TYPES:
            return None
        found = [
            e
            for e in self.models.store.list(type="annotator", client=client)
            if e.extra.get("annotates") == request.type
        ]
        if not found:
            raise InvalidInput(
                f"the {request.type} annotator is not installed ({ANNOTATED_TYPES[request.type]} "
                f"with aiorch models add); or send a {request.type} image with preprocessed: true",
                field=f"{request.field}.type",
                code="annotator_missing",
            )
        found.sort(key=lambda e: (e.owner is None, e.id))
        return found[0]

    # -- control images ----------------------------------------------------------------------

    def control_images(self, controls: list[Control], size: tuple[int, int]) -> list[Image.Image]:
        """One control image per ControlNet, made at the output ``size``; a preprocessed one is
        the job's image as sent (the pipeline resizes it to the output size)."""
        images = []
        for control in controls:
            request = control.request
            if request.preprocessed:
                images.append(request.image)
            elif request.type == "canny":
                images.append(control_images.canny_map(request.image, size))
            elif request.type == "lineart":
                images.append(control_images.lineart_map(request.image, size))
            elif request.type == "tile":
                images.append(control_images.tile_map(request.image, size))
            elif request.type == "depth":
                assert control.annotator is not None  # resolve() found one
                with self._hold_depth(control.annotator) as annotator:
                    images.append(control_images.depth_map(annotator, request.image, size))
            else:
                assert control.annotator is not None  # resolve() found one
                with self._hold_pose(control.annotator) as annotator:
                    images.append(body_pose_map(annotator, request.image, size))
        return images

    def _hold_depth(self, entry: ModelEntry) -> contextlib.AbstractContextManager[Any]:
        models = self.models
        path = models.store.resolve_path(entry)
        itemsize = torch.finfo(models.dtype).bits // 8
        return models.cache.hold(
            f"annotator:{entry.id}:{models.device}:{str(models.dtype).removeprefix('torch.')}",
            lambda: control_images.load_depth_annotator(str(path), models.device, models.dtype),
            estimate_checkpoint_bytes(path, itemsize=itemsize),
            device=str(models.device),
        )

    def _hold_pose(self, entry: ModelEntry) -> contextlib.AbstractContextManager[Any]:
        # float32 whatever the worker's dtype (inference/pose/annotator.py): the file's own size.
        models = self.models
        path = models.store.resolve_path(entry)
        return models.cache.hold(
            f"annotator:{entry.id}:{models.device}:float32",
            lambda: load_body_pose_annotator(path, models.device),
            estimate_checkpoint_bytes(path, itemsize=4),
            device=str(models.device),
        )

    # -- loading -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, controls: list[Control]) -> Iterator[Any]:
        """The loaded ControlNet (one) or the list of them (several, in order), held in the cache
        (not evictable) while the run uses them. The same ControlNet named twice loads once."""
        with contextlib.ExitStack() as stack:
            loaded = [stack.enter_context(self._hold_one(c.entry)) for c in controls]
            yield loaded[0] if len(loaded) == 1 else loaded

    def _hold_one(self, entry: ModelEntry) -> contextlib.AbstractContextManager[Any]:
        models = self.models
        path = models.store.resolve_path(entry)
        itemsize = torch.finfo(models.dtype).bits // 8
        return models.cache.hold(
            f"controlnet:{entry.id}:{models.device}:{str(models.dtype).removeprefix('torch.')}",
            lambda: _load_controlnet(path, models.device, models.dtype),
            estimate_checkpoint_bytes(path, itemsize=itemsize),
            device=str(models.device),
        )


def controlnet_call(controls: list[Control], images: list[Image.Image], kind: str) -> dict[str, Any]:
    """The ControlNet pipeline's keywords: the control image(s) (``image`` for text-to-image,
    ``control_image`` beside the init image for img2img), scales and start/end."""
    one = len(controls) == 1

    def per_control(values: list[Any]) -> Any:
        return values[0] if one else values

    return {
        ("control_image" if kind == "img2img" else "image"): per_control(images),
        "controlnet_conditioning_scale": per_control([c.request.scale for c in controls]),
        "control_guidance_start": per_control([c.request.start for c in controls]),
        "control_guidance_end": per_control([c.request.end for c in controls]),
    }


def _load_controlnet(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import ControlNetModel

    model = ControlNetModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.to(device).eval()


@lru_cache(maxsize=64)
def _cross_attention_dim(unet_folder: str) -> int | None:
    """The width of the text features a base model's UNet attends to (its config, no weights)."""
    try:
        config = json.loads((Path(unet_folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    width = config.get("cross_attention_dim")
    return width if isinstance(width, int) else None
