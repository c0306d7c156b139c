"""What every face engine shares: input checks and the operations the task layer calls.

An engine subclass only knows how to find faces (``detect``), how to prepare a source face for
swapping (``_prepare_source``) and how to put one source face onto one target face
(``_swap_face``). Everything the task layer sees (``face_detect``, ``faceswap``,
``faceswap_multi``, ``max_side``, ``sharpen``, the upscaler hook, error codes, result meta) lives
here once, so the engines cannot drift apart in behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image

from inference.base import (
    EngineResult,
    InvalidInput,
    NullControl,
    OutputImage,
    RunControl,
    check_stop,
)
from inference.faceswap.blending import FaceEnhancer, Upscaler, sharpen_region, upscale_faces
from inference.faceswap.faces import Detector, Face, keep_largest

DEFAULT_MAX_FACES = 8
DEFAULT_MAX_SIDE = 1080
MIN_MAX_SIDE = 64
MAX_MAX_SIDE = 8192


def to_rgb_array(image: Image.Image, field: str) -> tuple[np.ndarray, np.ndarray | None]:
    """8-bit RGB pixels and, when the image had one, its alpha channel (kept for the output)."""
    if not isinstance(image, Image.Image):
        raise InvalidInput(f"{field} must be a decoded image", field=field)
    if image.width < 16 or image.height < 16:
        raise InvalidInput(f"{field} is too small ({image.width}x{image.height})", field=field)
    alpha = None
    if "A" in image.getbands():
        alpha = np.asarray(image.getchannel("A"))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))), alpha


def fit_max_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the longest side is at most ``max_side``; never enlarge."""
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # INTER_AREA averages the source pixels: no aliasing on large reductions.
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def validate_max_side(max_side: Any) -> int:
    if isinstance(max_side, bool) or not isinstance(max_side, int):
        raise InvalidInput(f"max_side must be an integer, got {max_side!r}", field="max_side")
    if not MIN_MAX_SIDE <= max_side <= MAX_MAX_SIDE:
        raise InvalidInput(
            f"max_side must be in [{MIN_MAX_SIDE}, {MAX_MAX_SIDE}], got {max_side}", field="max_side"
        )
    return max_side


def validate_sharpen(sharpen: Any) -> float:
    if isinstance(sharpen, bool) or not isinstance(sharpen, int | float) or not 0 <= sharpen <= 1:
        raise InvalidInput(f"sharpen must be a number in [0, 1], got {sharpen!r}", field="sharpen")
    return float(sharpen)


def _check_index(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise InvalidInput(f"{field} must be a non-negative integer, got {value!r}", field=field)
    return int(value)


class FaceSwapEngine:
    """Base of the face engines: ``face_detect``, ``faceswap`` and ``faceswap_multi``.

    Subclasses set ``backend`` and implement ``detect``, ``_prepare_source`` and ``_swap_face``.
    ``max_faces`` caps how many faces one image may yield (the largest ones are kept, then put
    in index order); ``source_max_side`` bounds the work spent on a source photo, whose only use
    is the one face taken from it.
    """

    backend = "face-engine"
    # An engine whose detector needs no files names its class here: it is built with
    # ``max_faces`` when the constructor is given no detector.
    detector_class: Callable[..., Detector] | None = None

    def __init__(
        self,
        *,
        detector: Detector | None = None,
        max_faces: int = DEFAULT_MAX_FACES,
        source_max_side: int = 1280,
    ):
        if max_faces < 1:
            raise ValueError(f"max_faces must be at least 1, got {max_faces}")
        self.max_faces = max_faces
        self.source_max_side = source_max_side
        if detector is None and self.detector_class is not None:
            detector = self.detector_class(max_faces=max_faces)
        self.detector = detector

    # -- what a subclass provides --------------------------------------------------------------

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in ``rgb`` (HxWx3 uint8), at most ``max_faces``, in index order."""
        if self.detector is None:
            raise NotImplementedError(f"{type(self).__name__} has no detector")
        return self.detector.detect(rgb)

    def _prepare_source(self, rgb: np.ndarray, face: Face) -> Any:
        raise NotImplementedError

    def _swap_face(self, rgb: np.ndarray, face: Face, source: Any) -> tuple[np.ndarray, np.ndarray]:
        """Return the image with ``source`` put onto ``face`` and the soft alpha of the change."""
        raise NotImplementedError

    def run_meta(self) -> dict[str, Any]:
        """Facts about how this engine runs (its device) for the result's meta."""
        return {}

    # -- operations ----------------------------------------------------------------------------

    def face_detect(
        self, image: Image.Image, *, max_side: int = DEFAULT_MAX_SIDE, control: RunControl | None = None
    ) -> EngineResult:
        """Faces of ``image`` as JSON data, boxes in the input image's own pixels.

        Detection runs on the image shrunk to ``max_side``, exactly as ``faceswap_multi`` shrinks
        its target, so the indices reported here are the ones ``target_faces_index`` refers to
        when both calls use the same ``max_side`` (both default to 1080).
        """
        control = control or NullControl()
        max_side = validate_max_side(max_side)
        rgb, _ = to_rgb_array(image, "image_url")
        work = fit_max_side(rgb, max_side)
        control.progress(10)
        check_stop(control)
        faces = self.detect(work)
        back = rgb.shape[1] / work.shape[1]
        height, width = rgb.shape[:2]
        data = {
            "faces": [face.scaled(back).to_dict(i, width, height) for i, face in enumerate(faces)],
            "width": width,
            "height": height,
        }
        control.progress(100)
        return EngineResult(backend=self.backend, data=data)

    def prepare_source(self, source: Image.Image, field: str = "source_url") -> Any:
        """The one face of a single-source swap, ready to put on any number of targets.

        The largest face that has landmarks: a face whose eyes were found is a face for sure,
        and it aligns properly; the weight-free detector only gives eyes on clear faces.
        """
        rgb, _ = to_rgb_array(source, field)
        rgb = fit_max_side(rgb, self.source_max_side)
        faces = self.detect(rgb)
        if not faces:
            raise InvalidInput("no face was found in the source image", code="no_face_in_source", field=field)
        face = max(faces, key=lambda f: (f.kps is not None, f.area, f.score))
        return self._prepare_source(rgb, face)

    def prepare_sources(
        self, sources: Sequence[Image.Image], swap_faces_index: Sequence[int], control: RunControl
    ) -> list[Any]:
        """Face ``swap_faces_index[i]`` of ``sources[i]``, each ready to swap (faceswap_multi)."""
        # The same image object may be passed for several entries (two faces from one group
        # photo); detect it once.
        detected: dict[int, tuple[np.ndarray, list[Face]]] = {}
        prepared = []
        for i, (image, index) in enumerate(zip(sources, swap_faces_index, strict=True)):
            check_stop(control)
            if id(image) not in detected:
                rgb, _ = to_rgb_array(image, f"source_urls[{i}]")
                rgb = fit_max_side(rgb, self.source_max_side)
                detected[id(image)] = (rgb, self.detect(rgb))
            rgb, faces = detected[id(image)]
            if not faces:
                raise InvalidInput(
                    f"no face was found in source_urls[{i}]",
                    code="no_face_in_source",
                    field=f"source_urls[{i}]",
                )
            if index >= len(faces):
                raise InvalidInput(
                    f"swap_faces_index[{i}] is {index} but source_urls[{i}] has {len(faces)} face(s)",
                    code="index_out_of_range",
                    field=f"swap_faces_index[{i}]",
                )
            prepared.append(self._prepare_source(rgb, faces[index]))
            control.progress(10 + 15 * (i + 1) / len(sources))
        return prepared

    def swap_onto(
        self,
        rgb: np.ndarray,
        faces: list[Face],
        pairs: Sequence[tuple[Any, int]],
        *,
        sharpen: float,
        upscaler: Upscaler | None,
        control: RunControl | None = None,
        enhancer: FaceEnhancer | None = None,
    ) -> np.ndarray:
        """Put each prepared source of ``pairs`` onto face ``index`` of ``rgb``, then enhance
        (``upscaler``, then ``enhancer``, a face restorer) and sharpen only the swapped faces. One
        frame's work: the image and video paths share it."""
        control = control or NullControl()
        out = rgb.copy()
        region = np.zeros(out.shape[:2], np.float32)
        for n, (source, index) in enumerate(pairs):
            check_stop(control)
            out, alpha = self._swap_face(out, faces[index], source)
            np.maximum(region, alpha, out=region)
            control.progress(25 + 60 * (n + 1) / len(pairs))
        check_stop(control)
        if upscaler is not None and pairs:
            out = upscale_faces(out, [faces[index] for _, index in pairs], region, upscaler)
        if enhancer is not None and pairs:
            check_stop(control)
            out = enhancer(out, [faces[index] for _, index in pairs], region)
        return sharpen_region(out, region, sharpen)

    def faceswap(
        self,
        source: Image.Image,
        target: Image.Image,
        *,
        max_side: int = DEFAULT_MAX_SIDE,
        sharpen: float = 0.0,
        max_faces: int = 0,
        upscaler: Upscaler | None = None,
        control: RunControl | None = None,
        enhancer: FaceEnhancer | None = None,
    ) -> EngineResult:
        """Put the source's face onto faces of the target.

        The largest face of ``source`` (preferring one with landmarks) is used. ``max_faces``
        = 0 swaps every face found in the target (up to the engine's cap); n > 0 swaps the n
        largest, and n above the cap is refused. ``upscaler`` and ``enhancer`` (optional) restore
        detail on the swapped faces; ``sharpen`` in [0, 1] sharpens them.
        """
        control = control or NullControl()
        max_side = validate_max_side(max_side)
        sharpen = validate_sharpen(sharpen)
        if isinstance(max_faces, bool) or not isinstance(max_faces, int) or max_faces < 0:
            raise InvalidInput(f"max_faces must be an integer >= 0, got {max_faces!r}", field="max_faces")
        if max_faces > self.max_faces:
            # Refused rather than capped: the client asked for more faces than it can get.
            raise InvalidInput(
                f"max_faces must be at most {self.max_faces}, got {max_faces}", field="max_faces"
            )
        target_rgb, target_alpha = to_rgb_array(target, "target_url")
        target_rgb = fit_max_side(target_rgb, max_side)
        control.progress(5)
        check_stop(control)
        prepared = self.prepare_source(source)
        control.progress(15)

        check_stop(control)
        target_faces = self.detect(target_rgb)
        if not target_faces:
            raise InvalidInput(
                "no face was found in the target image", code="no_face_in_target", field="target_url"
            )
        chosen = target_faces if max_faces == 0 else keep_largest(target_faces, max_faces)
        indices = [target_faces.index(face) for face in chosen]
        control.progress(25)
        return self._swap_all(
            target_rgb,
            target_alpha,
            target_faces,
            [(prepared, i) for i in indices],
            sharpen=sharpen,
            upscaler=upscaler,
            control=control,
            enhancer=enhancer,
        )

    def faceswap_multi(
        self,
        sources: Sequence[Image.Image],
        target: Image.Image,
        swap_faces_index: Sequence[int],
        target_faces_index: Sequence[int],
        *,
        max_side: int = DEFAULT_MAX_SIDE,
        sharpen: float = 0.0,
        upscaler: Upscaler | None = None,
        control: RunControl | None = None,
        enhancer: FaceEnhancer | None = None,
    ) -> EngineResult:
        """Face ``swap_faces_index[i]`` of ``sources[i]`` replaces target face ``target_faces_index[i]``.

        Indices are those ``face_detect`` reports (left to right, then top to bottom).
        """
        control = control or NullControl()
        max_side = validate_max_side(max_side)
        sharpen = validate_sharpen(sharpen)
        sources = list(sources)
        swap_faces_index = list(swap_faces_index)
        target_faces_index = list(target_faces_index)
        if not sources:
            raise InvalidInput("source_urls must name at least one image", field="source_urls")
        if len(sources) > self.max_faces:
            raise InvalidInput(
                f"at most {self.max_faces} faces can be swapped at once, got {len(sources)}",
                field="source_urls",
            )
        for name, values in (
            ("swap_faces_index", swap_faces_index),
            ("target_faces_index", target_faces_index),
        ):
            if len(values) != len(sources):
                raise InvalidInput(
                    f"{name} has {len(values)} entries but source_urls has {len(sources)}",
                    code="length_mismatch",
                    field=name,
                )
        swap_idx = [_check_index(v, f"swap_faces_index[{i}]") for i, v in enumerate(swap_faces_index)]
        target_idx = [_check_index(v, f"target_faces_index[{i}]") for i, v in enumerate(target_faces_index)]
        if len(set(target_idx)) != len(target_idx):
            raise InvalidInput(
                "target_faces_index names the same target face twice",
                code="duplicate_index",
                field="target_faces_index",
            )

        target_rgb, target_alpha = to_rgb_array(target, "target_url")
        target_rgb = fit_max_side(target_rgb, max_side)
        # The target first: one detection settles every target index before any source work.
        check_stop(control)
        target_faces = self.detect(target_rgb)
        if not target_faces:
            raise InvalidInput(
                "no face was found in the target image", code="no_face_in_target", field="target_url"
            )
        for i, index in enumerate(target_idx):
            if index >= len(target_faces):
                raise InvalidInput(
                    f"target_faces_index[{i}] is {index} but the target has {len(target_faces)} face(s)",
                    code="index_out_of_range",
                    field=f"target_faces_index[{i}]",
                )
        control.progress(10)

        prepared = self.prepare_sources(sources, swap_idx, control)
        pairs = list(zip(prepared, target_idx, strict=True))
        return self._swap_all(
            target_rgb,
            target_alpha,
            target_faces,
            pairs,
            sharpen=sharpen,
            upscaler=upscaler,
            control=control,
            enhancer=enhancer,
        )

    def _swap_all(
        self,
        target_rgb: np.ndarray,
        target_alpha: np.ndarray | None,
        target_faces: list[Face],
        pairs: list[tuple[Any, int]],
        *,
        sharpen: float,
        upscaler: Upscaler | None,
        control: RunControl,
        enhancer: FaceEnhancer | None = None,
    ) -> EngineResult:
        out = self.swap_onto(
            target_rgb,
            target_faces,
            pairs,
            sharpen=sharpen,
            upscaler=upscaler,
            control=control,
            enhancer=enhancer,
        )
        image = Image.fromarray(out)
        if target_alpha is not None:
            # Keep a transparent target transparent: its alpha, shrunk like its pixels.
            alpha_img = Image.fromarray(target_alpha).resize(image.size, Image.Resampling.LANCZOS)
            image.putalpha(alpha_img)
        control.progress(100)
        meta = {
            "width": image.width,
            "height": image.height,
            "faces_in_target": len(target_faces),
            "swapped_faces_index": [index for _, index in pairs],
            "upscaled": upscaler is not None,
            "sharpen": sharpen,
            **self.run_meta(),
        }
        return EngineResult(backend=self.backend, images=[OutputImage(image, meta)])
