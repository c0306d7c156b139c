"""Background removal: a salient-object segmentation model run with onnxruntime, and GrabCut.

``BackgroundRemover`` runs the U2-Net / BiRefNet / RMBG family as exported to ONNX: one RGB
input normalised and resized to a fixed square, a saliency map out. The families differ only in
input size, normalisation and whether the map still needs a sigmoid, so they are presets rather
than classes. ``GrabCutBackgroundRemover`` needs no weights: OpenCV's GrabCut seeded with the image
border as background. Both return an RGBA image whose alpha is the foreground mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from inference.base import (
    EngineError,
    EngineResult,
    InvalidInput,
    NullControl,
    OutputImage,
    RunControl,
    check_stop,
)
from inference.runtime import check_onnx_session, onnx_session_providers

log = logging.getLogger(__name__)

BACKEND = "onnx-segmentation"
GRABCUT_BACKEND = "opencv-grabcut"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class SegmentationPreset:
    """How a model family wants its input and how its output becomes a [0, 1] mask."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # "sigmoid": the output is logits; "none": already a probability; "auto": sigmoid only when
    # the values leave [0, 1].
    activation: str = "auto"
    # Stretch the map to [0, 1] per image, as the U2-Net and RMBG-1.4 reference code does.
    stretch: bool = False


PRESETS = {
    "u2net": SegmentationPreset(320, _IMAGENET_MEAN, _IMAGENET_STD, activation="none", stretch=True),
    "birefnet": SegmentationPreset(1024, _IMAGENET_MEAN, _IMAGENET_STD, activation="sigmoid"),
    "rmbg": SegmentationPreset(1024, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), activation="none", stretch=True),
}


class BackgroundRemover:
    """Cut the salient foreground out of an image with an ONNX segmentation model.

    ``family`` picks the pre- and post-processing preset (``u2net``, ``birefnet``, ``rmbg``);
    ``input_size`` overrides it and must match the model where the model fixes its input shape.
    ``device`` is ``auto`` (CUDA when onnxruntime has it, else CPU), ``cuda`` or ``cpu``.
    """

    name = BACKEND

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_id: str | None = None,
        family: str = "u2net",
        input_size: int | None = None,
        device: str = "auto",
        threads: int | None = None,
        min_side: int = 8,
    ):
        if family not in PRESETS:
            raise ValueError(f"family must be one of {sorted(PRESETS)}, got {family!r}")
        path = Path(model_path)
        self.model_id = model_id or path.stem
        self.family = family
        self.min_side = min_side
        self._session = _open_session(path, device, threads)
        self._file_bytes = path.stat().st_size
        self.providers: list[str] = self._session.get_providers()

        model_input = self._session.get_inputs()[0]
        shape = model_input.shape
        channels_ok = shape[1] == 3 or not isinstance(shape[1], int) if len(shape) == 4 else False
        if not channels_ok:
            raise EngineError(
                f"{path.name} takes input {model_input.name} of shape {shape}; a segmentation model "
                "takes one NCHW RGB image",
                code="invalid_model",
            )
        fixed = [d for d in shape[2:] if isinstance(d, int)]
        if len(fixed) == 2 and fixed[0] != fixed[1]:
            raise EngineError(f"{path.name} expects a non-square {shape} input", code="invalid_model")
        preset = PRESETS[family]
        if fixed and input_size is not None and input_size != fixed[0]:
            raise EngineError(
                f"{path.name} fixes its input at {fixed[0]} px; input_size={input_size} cannot be used",
                code="invalid_model",
            )
        size = input_size or (fixed[0] if fixed else preset.size)
        self.preset = replace(preset, size=size)
        self._input_name = model_input.name

    @property
    def backend(self) -> str:
        return f"{BACKEND}:{self.model_id}"

    @property
    def memory_bytes(self) -> int:
        """About what the session holds: onnxruntime keeps one copy of the file's weights."""
        return self._file_bytes

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def __call__(
        self,
        image: Image.Image,
        *,
        return_mask: bool = False,
        control: RunControl | None = None,
    ) -> EngineResult:
        control = control or NullControl()
        _check_size(image, self.min_side)
        rgb, alpha_in = _to_rgb8(image)
        control.progress(5)

        preset = self.preset
        batch = np.asarray(Image.fromarray(rgb).resize((preset.size, preset.size), Image.Resampling.BILINEAR))
        batch = (batch.astype(np.float32) / 255.0 - preset.mean) / preset.std
        batch = np.ascontiguousarray(batch.transpose(2, 0, 1)[None], dtype=np.float32)
        check_stop(control)
        control.progress(15)
        try:
            prediction = self._session.run(None, {self._input_name: batch})[0]
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            raise EngineError(f"segmentation model {self.model_id} failed: {exc}") from exc
        check_stop(control)
        control.progress(85)

        mask = _to_probability(np.asarray(prediction, dtype=np.float32), preset)
        mask = _resize_plane(mask, image.width, image.height)
        if alpha_in is not None:
            # Pixels the input already made transparent stay transparent.
            mask = mask * alpha_in
        meta = {"model": self.model_id, "family": self.family, "device": self.device}
        result = _cutout(rgb, mask, self.backend, return_mask, meta)
        control.progress(100)
        return result


class GrabCutBackgroundRemover:
    """The weight-free fallback: OpenCV GrabCut, seeded with the image border as background.

    It assumes the subject does not touch the border band (``border`` of the shorter side) and
    works on a copy no larger than ``work_side`` so its cost does not grow with the input.
    """

    name = GRABCUT_BACKEND
    backend = GRABCUT_BACKEND

    def __init__(
        self,
        *,
        work_side: int = 320,
        iterations: int = 5,
        border: float = 0.04,
        min_side: int = 16,
    ):
        if not 0 < border < 0.5:
            raise ValueError(f"border must be in (0, 0.5), got {border}")
        self.work_side = work_side
        self.iterations = iterations
        self.border = border
        self.min_side = min_side

    def __call__(
        self,
        image: Image.Image,
        *,
        return_mask: bool = False,
        control: RunControl | None = None,
    ) -> EngineResult:
        import cv2

        control = control or NullControl()
        _check_size(image, self.min_side)
        rgb, alpha_in = _to_rgb8(image)
        height, width = rgb.shape[:2]
        factor = min(1.0, self.work_side / max(width, height))
        small_size = (max(1, round(width * factor)), max(1, round(height * factor)))
        small = cv2.resize(rgb, small_size, interpolation=cv2.INTER_AREA) if factor < 1 else rgb
        small = np.ascontiguousarray(small[..., ::-1])  # OpenCV's channel order

        band = max(1, round(self.border * min(small.shape[:2])))
        mask = np.full(small.shape[:2], cv2.GC_PR_FGD, dtype=np.uint8)
        mask[:band, :] = mask[-band:, :] = cv2.GC_BGD
        mask[:, :band] = mask[:, -band:] = cv2.GC_BGD
        background_model = np.zeros((1, 65), np.float64)
        foreground_model = np.zeros((1, 65), np.float64)
        control.progress(5)
        try:
            # One iteration per call, so cancellation and progress get a look in between.
            for step in range(self.iterations):
                check_stop(control)
                mode = cv2.GC_INIT_WITH_MASK if step == 0 else cv2.GC_EVAL
                # The rectangle is unused when seeding from a mask; the stubs just want a sequence.
                cv2.grabCut(small, mask, (0, 0, 0, 0), background_model, foreground_model, 1, mode)
                control.progress(5 + 85 * (step + 1) / self.iterations)
        except cv2.error as exc:
            raise EngineError(f"GrabCut could not segment this image: {exc}") from exc

        foreground = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
        foreground = _clean_mask(foreground)
        if not foreground.any():
            raise EngineError("GrabCut found no foreground in this image", code="no_foreground")
        # Bilinear upsampling of the binary mask leaves a soft edge about one work pixel wide.
        soft = cv2.resize(foreground.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        if alpha_in is not None:
            soft = soft * alpha_in
        meta = {"model": "grabcut", "iterations": self.iterations, "device": "cpu"}
        result = _cutout(rgb, soft, self.backend, return_mask, meta)
        control.progress(100)
        return result


# -- which family an ONNX file belongs to -------------------------------------------------------


def _open_session(path: Path, device: str, threads: int | None):
    import onnxruntime as ort

    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if not path.is_file():
        raise EngineError(f"segmentation model file not found: {path}", code="model_not_found")
    providers = onnx_session_providers(device)
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        # InvalidProtobuf, an unsupported IR version or opset, a missing external-data file: to the
        # job they all mean the same thing.
        raise EngineError(
            f"{path.name} is not a loadable ONNX segmentation model: {exc}", code="invalid_model"
        ) from exc
    return check_onnx_session(session, providers)


def _check_size(image: Image.Image, min_side: int) -> None:
    if min(image.size) < min_side:
        raise InvalidInput(
            f"image {image.width}x{image.height} is too small; both sides must be at least {min_side} px",
            field="image",
        )


def _to_rgb8(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """8-bit RGB pixels and, when the image has one, its alpha as floats in [0, 1]."""
    if image.mode in _16BIT_MODES:
        grey = np.clip(np.asarray(image).astype(np.float32) / 257.0, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), None
    if image.mode == "F":
        raise InvalidInput(
            "floating-point images are not supported; send an 8- or 16-bit image", field="image"
        )
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    alpha = None
    if "A" in image.getbands():
        image = image.convert("RGBA")
        alpha = np.asarray(image.getchannel("A")).astype(np.float32) / 255.0
    return np.asarray(image.convert("RGB")), alpha


def _to_probability(prediction: np.ndarray, preset: SegmentationPreset) -> np.ndarray:
    """The first map of a (N, 1, H, W), (N, H, W) or (H, W) output, as a [0, 1] float plane."""
    while prediction.ndim > 2:
        prediction = prediction[0]
    activation = preset.activation
    if activation == "auto":
        activation = "sigmoid" if prediction.min() < 0 or prediction.max() > 1 else "none"
    if activation == "sigmoid":
        prediction = 1.0 / (1.0 + np.exp(-prediction))
    if preset.stretch:
        low, high = float(prediction.min()), float(prediction.max())
        # A flat map (empty scene or a blank image) has nothing to stretch; keep it as it is.
        if high - low > 1e-6:
            prediction = (prediction - low) / (high - low)
    return np.clip(prediction, 0.0, 1.0).astype(np.float32)


def _resize_plane(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    resized = Image.fromarray(plane).resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _clean_mask(foreground: np.ndarray) -> np.ndarray:
    """Drop specks: an opening, then only components at least a tenth the size of the largest."""
    import cv2

    kernel = np.ones((3, 3), np.uint8)
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count <= 2:
        return foreground
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= areas.max() / 10) + 1
    return np.isin(labels, keep).astype(np.uint8)


def _cutout(rgb: np.ndarray, mask: np.ndarray, backend: str, return_mask: bool, meta: dict) -> EngineResult:
    alpha = np.clip(np.rint(mask * 255), 0, 255).astype(np.uint8)
    height, width = alpha.shape
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    coverage = round(float(mask.mean()), 4)
    images = [OutputImage(rgba, {"width": width, "height": height, "foreground": coverage, **meta})]
    if return_mask:
        images.append(OutputImage(Image.fromarray(alpha), {"width": width, "height": height, "kind": "mask"}))
    return EngineResult(backend=backend, images=images)
