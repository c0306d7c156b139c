"""Object scanning with a torchvision detection model loaded from local weights and a label map.

The architecture is built empty (``weights=None, weights_backbone=None``: nothing is downloaded)
and filled from a state-dict file, such as torchvision's own COCO checkpoints or a model
fine-tuned with torchvision's reference scripts. The label map names the classes the head was
trained on: a JSON list indexed by class id, or a JSON object from id to name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference.base import (
    EngineError,
    EngineResult,
    InvalidInput,
    NullControl,
    RunControl,
    check_stop,
)

log = logging.getLogger(__name__)

SSDLITE = "ssdlite320_mobilenet_v3_large"
FASTER_RCNN = "fasterrcnn_mobilenet_v3_large_fpn"
FASTER_RCNN_320 = "fasterrcnn_mobilenet_v3_large_320_fpn"
ARCHITECTURES = (SSDLITE, FASTER_RCNN, FASTER_RCNN_320)

# SSDlite's anchor generator puts 2 + 2 * len([2, 3]) = 6 boxes on every feature-map cell, so its
# classification convs have 6 * num_classes output channels.
_SSDLITE_ANCHORS = 6
_NO_LABEL = ("__background__", "background", "N/A", "")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

LabelMap = str | Path | Sequence[str] | Mapping[str | int, str]


class ObjectScanner:
    """Detect objects and return them as JSON: label, score and pixel box, best first.

    ``score_floor`` is the threshold the model itself applies before non-maximum suppression;
    a call's ``min_score`` below it finds nothing more. ``arch`` may be left out: SSDlite and
    Faster R-CNN are told apart by their keys (the 320 px Faster R-CNN differs from the full one
    only in input size, so it has to be named).
    """

    def __init__(
        self,
        weights_path: str | Path,
        labels: LabelMap,
        *,
        arch: str | None = None,
        model_id: str | None = None,
        device: str | torch.device = "cpu",
        score_floor: float = 0.01,
        max_detections: int = 300,
        min_side: int = 8,
    ):
        if arch is not None and arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
        path = Path(weights_path)
        self.model_id = model_id or path.stem
        self.device = torch.device(device)
        self.min_side = min_side
        self.max_detections = max_detections

        state = _load_state_dict(path)
        detected, num_classes = _inspect(state, path)
        if arch is not None and (arch == SSDLITE) != (detected == SSDLITE):
            raise EngineError(f"{path.name} holds {detected} weights, not {arch}", code="invalid_model")
        self.arch = arch or detected
        self.labels = _label_map(labels, num_classes)
        self._model = _build(self.arch, num_classes, score_floor, max_detections)
        _fill(self._model, state, path)
        # Detection stays fp32 on every device: anchor decoding and NMS lose boxes in fp16.
        self._model.to(self.device).eval()

    @property
    def backend(self) -> str:
        return f"{self.arch}:{self.model_id}"

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._model.state_dict().values())

    def __call__(
        self,
        image: Image.Image,
        *,
        min_score: float = 0.5,
        max_objects: int = 100,
        control: RunControl | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        if not 0 <= min_score <= 1:
            raise InvalidInput(f"min_score must be in [0, 1], got {min_score}", field="min_score")
        if not 1 <= max_objects <= self.max_detections:
            raise InvalidInput(
                f"max_objects must be in [1, {self.max_detections}], got {max_objects}", field="max_objects"
            )
        if min(image.size) < self.min_side:
            raise InvalidInput(
                f"image {image.width}x{image.height} is too small; both sides must be at least "
                f"{self.min_side} px",
                field="image",
            )
        rgb = _to_rgb8(image)
        control.progress(5)
        # The models normalise and resize internally; they want float RGB in [0, 1], CHW.
        tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(self.device)
        tensor = tensor.float().div_(255.0)
        check_stop(control)
        with torch.inference_mode():
            found = self._model([tensor])[0]
        check_stop(control)
        control.progress(90)

        objects = []
        scores = found["scores"].float().cpu().numpy()
        class_ids = found["labels"].cpu().numpy()
        boxes = found["boxes"].float().cpu().numpy()
        width, height = image.size
        for index in np.argsort(-scores, kind="stable"):
            label = self.labels.get(int(class_ids[index]))
            if scores[index] < min_score or label is None:
                continue
            x1, y1, x2, y2 = boxes[index]
            objects.append(
                {
                    "label": label,
                    "score": round(float(scores[index]), 4),
                    "box": {
                        "x1": int(np.clip(round(float(x1)), 0, width)),
                        "y1": int(np.clip(round(float(y1)), 0, height)),
                        "x2": int(np.clip(round(float(x2)), 0, width)),
                        "y2": int(np.clip(round(float(y2)), 0, height)),
                    },
                }
            )
            if len(objects) == max_objects:
                break
        control.progress(100)
        data = {"objects": objects, "width": width, "height": height}
        return EngineResult(backend=self.backend, data=data)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EngineError(f"detection weights not found: {path}", code="model_not_found")
    try:
        # weights_only: a weight file must not be able to run code when it is unpickled.
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EngineError(
            f"{path.name} is not a readable state-dict file: {type(exc).__name__}: {exc}",
            code="invalid_model",
        ) from exc
    # torchvision's reference training scripts save {"model": ..., "optimizer": ..., ...}.
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EngineError(f"{path.name} holds no state dict of tensors", code="invalid_model")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _inspect(state: Mapping[str, torch.Tensor], path: Path) -> tuple[str, int]:
    """Which architecture the keys belong to, and how many classes (background included) it has."""
    ssd_key = "head.classification_head.module_list.0.1.weight"
    rcnn_key = "roi_heads.box_predictor.cls_score.weight"
    if ssd_key in state:
        return SSDLITE, state[ssd_key].shape[0] // _SSDLITE_ANCHORS
    if rcnn_key in state:
        return FASTER_RCNN, state[rcnn_key].shape[0]
    raise EngineError(
        f"{path.name} is neither an SSDlite nor a Faster R-CNN MobileNetV3 state dict", code="invalid_model"
    )


def _label_map(labels: LabelMap, num_classes: int) -> dict[int, str]:
    """Class id -> name for ids 1 .. num_classes - 1; ids named like background are left out."""
    if isinstance(labels, (str, Path)):
        try:
            labels = json.loads(Path(labels).read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot read label map {labels}: {exc}", code="invalid_model") from exc
    if isinstance(labels, Mapping):
        try:
            named = {int(k): str(v) for k, v in labels.items()}
        except ValueError as exc:
            raise EngineError(f"label map keys must be class ids: {exc}", code="invalid_model") from exc
    elif isinstance(labels, Sequence):
        names = [str(v) for v in labels]
        # A list may include the background entry at index 0 (torchvision's COCO list does) or not.
        offset = 1 if len(names) == num_classes - 1 else 0
        if len(names) not in (num_classes, num_classes - 1):
            raise EngineError(
                f"label map lists {len(names)} names, the weights have {num_classes - 1} classes "
                "(plus background)",
                code="invalid_model",
            )
        named = {i + offset: name for i, name in enumerate(names)}
    else:
        raise EngineError("label map must be a JSON list or object", code="invalid_model")
    missing = [i for i in range(1, num_classes) if i not in named]
    if missing:
        raise EngineError(f"label map names no class for ids {missing[:10]}", code="invalid_model")
    return {i: named[i] for i in range(1, num_classes) if named[i] not in _NO_LABEL}


def _build(arch: str, num_classes: int, score_floor: float, max_detections: int) -> torch.nn.Module:
    from torchvision.models import detection

    if arch == SSDLITE:
        return detection.ssdlite320_mobilenet_v3_large(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            score_thresh=score_floor,
            detections_per_img=max_detections,
        )
    builder = getattr(detection, arch)
    return builder(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        box_score_thresh=score_floor,
        box_detections_per_img=max_detections,
    )


def _fill(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        # Not strict: torchvision's pretrained Faster R-CNN files come from FrozenBatchNorm2d
        # models, which have no num_batches_tracked buffers; an empty build uses BatchNorm2d.
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise EngineError(
            f"{path.name} does not fit the {type(model).__name__} architecture: {exc}", code="invalid_model"
        ) from exc
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise EngineError(
            f"{path.name} does not fit the architecture: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}",
            code="invalid_model",
        )


def _to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in _16BIT_MODES:
        grey = np.clip(np.asarray(image).astype(np.float32) / 257.0, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        raise InvalidInput(
            "floating-point images are not supported; send an 8- or 16-bit image", field="image"
        )
    return np.asarray(image.convert("RGB"))
