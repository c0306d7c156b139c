"""What both face engines share: the face record, index order, validation and the operations.

An engine subclass only knows how to find faces (``detect``), how to prepare a source face for
swapping (``_prepare_source``) and how to put one source face onto one target face
(``_swap_face``). Everything the task layer sees (``face_detect``, ``faceswap``,
``faceswap_multi``, ``max_side``, ``sharpen``, the upscaler hook, error codes, result meta) lives
here once, so the two engines cannot drift apart in behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
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

# Names of the five points in the order SCRFD emits them and the ArcFace template expects them.
# "left"/"right" are as seen in the image (viewer's left), not the person's own left.
KEYPOINT_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

DEFAULT_MAX_FACES = 8
DEFAULT_MAX_SIDE = 1080
MIN_MAX_SIDE = 64
MAX_MAX_SIDE = 8192

Upscaler = Callable[[Image.Image], Image.Image]


@dataclass(frozen=True)
class Face:
    """One detected face in pixel coordinates of the image it was found in.

    ``kps`` holds the first ``len(kps)`` points of ``KEYPOINT_NAMES``: five for SCRFD and the
    mesh engine, two (the eye centres) for the Haar engine when both eyes were found, else
    ``None``. ``mesh`` is the mesh engine's dense landmarks (468 x 2), else ``None``.
    """

    box: tuple[float, float, float, float]
    score: float
    kps: np.ndarray | None = None
    mesh: np.ndarray | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def scaled(self, factor: float) -> Face:
        kps = None if self.kps is None else self.kps * factor
        mesh = None if self.mesh is None else self.mesh * factor
        x1, y1, x2, y2 = (v * factor for v in self.box)
        return Face((x1, y1, x2, y2), self.score, kps, mesh)

    def to_dict(self, index: int, width: int, height: int) -> dict[str, Any]:
        x1, y1, x2, y2 = self.box
        box = {
            "x1": int(np.clip(round(x1), 0, width)),
            "y1": int(np.clip(round(y1), 0, height)),
            "x2": int(np.clip(round(x2), 0, width)),
            "y2": int(np.clip(round(y2), 0, height)),
        }
        landmarks: dict[str, list[float]] = {}
        if self.kps is not None:
            for name, (x, y) in zip(KEYPOINT_NAMES, self.kps, strict=False):
                landmarks[name] = [round(float(x), 1), round(float(y), 1)]
        return {"index": index, "box": box, "score": round(float(self.score), 4), "landmarks": landmarks}


def order_faces(faces: Sequence[Face]) -> list[Face]:
    """Put faces in the documented index order: left to right, then top to bottom.

    Sorting on the raw x of each centre would let a pixel of detector jitter decide the order of
    two faces stacked one above the other. So faces are first grouped into columns: walking
    left to right, a face joins the current column while its centre lies within half the median
    face width of the column's first face; columns are numbered left to right and faces inside
    a column top to bottom. The grouping is a partition of the sorted list, so the order is
    total and deterministic.
    """
    if not faces:
        return []
    by_x = sorted(faces, key=lambda f: (f.center[0], f.center[1]))
    tolerance = 0.5 * float(np.median([f.width for f in faces]))
    columns: list[list[Face]] = [[by_x[0]]]
    for face in by_x[1:]:
        if face.center[0] - columns[-1][0].center[0] <= tolerance:
            columns[-1].append(face)
        else:
            columns.append([face])
    return [face for column in columns for face in sorted(column, key=lambda f: f.center[1])]


def box_overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box: 1.0 when one box lies inside the other.

    Plain IoU misses a detector's typical duplicate, a small box on the lower half of a face
    inside the full face box; two real faces never overlap that much.
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


def drop_duplicates(faces: Sequence[Face], rank: Callable[[Face], Any]) -> list[Face]:
    """Of any two faces whose boxes overlap by half (``box_overlap``), keep the higher ``rank``.

    For a detector's duplicate hits on one face; returns the kept faces, best ranked first.
    """
    kept: list[Face] = []
    for face in sorted(faces, key=rank, reverse=True):
        if all(box_overlap(face.box, k.box) < 0.5 for k in kept):
            kept.append(face)
    return kept


def keep_largest(faces: Sequence[Face], limit: int) -> list[Face]:
    """The ``limit`` largest faces (ties broken by score), in index order.

    Large faces are the ones a person means; capping by size rather than by position keeps a
    small false positive at the left edge from taking a slot.
    """
    ranked = sorted(faces, key=lambda f: (f.area, f.score), reverse=True)[:limit]
    return order_faces(ranked)


# ---------------------------------------------------------------------------------------------
# Image helpers


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


# ---------------------------------------------------------------------------------------------
# Blending


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """A soft float alpha in [0, 1] that stays inside ``mask`` (uint8, 0/255).

    The mask is eroded by the blur radius first, so the soft edge ends where the hard mask
    ended instead of bleeding source pixels past it.
    """
    radius = max(1, int(radius))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    inner = cv2.erode(mask, kernel)
    soft = cv2.GaussianBlur(inner.astype(np.float32) / 255.0, (0, 0), sigmaX=radius / 2)
    return np.clip(soft, 0.0, 1.0) * (mask > 0)


def match_colour(source: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift ``source``'s colour statistics inside ``mask`` onto ``reference``'s (Reinhard, in Lab).

    Lab separates lightness from colour, so a face lit differently in the two photos is matched
    without tinting it. The gain is bounded so a nearly flat region cannot blow up the contrast.
    """
    inside = mask > 0
    if inside.sum() < 16:
        return source
    src_lab = cv2.cvtColor(source, cv2.COLOR_RGB2LAB).astype(np.float32)
    ref_lab = cv2.cvtColor(reference, cv2.COLOR_RGB2LAB).astype(np.float32)
    src_px, ref_px = src_lab[inside], ref_lab[inside]
    src_mean, src_std = src_px.mean(axis=0), src_px.std(axis=0) + 1e-3
    ref_mean, ref_std = ref_px.mean(axis=0), ref_px.std(axis=0) + 1e-3
    gain = np.clip(ref_std / src_std, 0.5, 2.0)
    out = (src_lab - src_mean) * gain + ref_mean
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def seamless_clone(source: np.ndarray, destination: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Poisson-blend ``source`` into ``destination`` where ``mask`` is set, in place (no shift).

    Both images are the same size and already aligned. OpenCV places the mask's bounding box
    centred on ``center``, so the centre of that box (with OpenCV's integer halving) keeps the
    source where it is. The outer pixel ring is cleared because OpenCV needs a mask that does
    not touch the border.
    """
    mask = mask.copy()
    mask[[0, -1], :] = 0
    mask[:, [0, -1]] = 0
    x, y, w, h = cv2.boundingRect(mask)
    if w < 3 or h < 3:
        return destination
    center = (x + w // 2, y + h // 2)
    return cv2.seamlessClone(source, destination, mask, center, cv2.NORMAL_CLONE)


def alpha_blend(top: np.ndarray, bottom: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return np.clip(top.astype(np.float32) * a + bottom.astype(np.float32) * (1 - a) + 0.5, 0, 255).astype(
        np.uint8
    )


def paste_face(
    rgb: np.ndarray,
    roi: tuple[int, int, int, int],
    warped: np.ndarray,
    mask: np.ndarray,
    feather_radius: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Put ``warped`` (the source face already aligned to the ``roi`` of ``rgb``) where ``mask``
    is set: colour matched, Poisson-cloned, then alpha-blended through a feathered mask.

    The weight-free engines' shared last step. Returns the new image and the full-size soft
    alpha of what changed; pixels outside ``mask`` are left exactly as they were. Works on the
    region only: Poisson-solving the whole frame for every face would cost seconds on a 1080p
    group photo.
    """
    if cv2.countNonZero(mask) < 64:
        raise EngineError("the source face does not cover the target face", code="swap_failed")
    x0, y0, x1, y1 = roi
    target_roi = rgb[y0:y1, x0:x1]
    warped = match_colour(warped, target_roi, mask)
    cloned = seamless_clone(warped, target_roi, mask)
    alpha_roi = feather(mask, feather_radius)
    out = rgb.copy()
    out[y0:y1, x0:x1] = alpha_blend(cloned, target_roi, alpha_roi)
    alpha = np.zeros(rgb.shape[:2], np.float32)
    alpha[y0:y1, x0:x1] = alpha_roi
    return out, alpha


def expand_box(face: Face, factor: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The face box grown by ``factor`` about its centre, clipped to the image, as ints."""
    cx, cy = face.center
    half_w, half_h = face.width * factor / 2, face.height * factor / 2
    x0 = int(max(0, np.floor(cx - half_w)))
    y0 = int(max(0, np.floor(cy - half_h)))
    x1 = int(min(width, np.ceil(cx + half_w)))
    y1 = int(min(height, np.ceil(cy + half_h)))
    return x0, y0, x1, y1


def sharpen_region(rgb: np.ndarray, region: np.ndarray, amount: float) -> np.ndarray:
    """Unsharp mask applied only where faces were swapped (``region`` is the soft face alpha).

    Swapped faces are the soft part of the picture (the neural swapper works at 128 px, the
    landmark engine resamples the source); sharpening the whole frame would also change pixels
    the client did not ask to touch. The scale (x1.5) matches the Lanczos upscaler's mapping
    of the seed's small floats.
    """
    if amount <= 0 or not region.any():
        return rgb
    img = rgb.astype(np.float32)
    blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=1.5)
    sharp = np.clip(img + 1.5 * amount * (img - blurred), 0, 255)
    return alpha_blend(sharp, img, region)


def upscale_faces(
    rgb: np.ndarray, faces: Sequence[Face], region: np.ndarray, upscaler: Upscaler
) -> np.ndarray:
    """Run the caller's super-resolution on each swapped face and blend it back at the same size.

    The output keeps the target's size (``max_side`` stays a promise): each face crop is
    upscaled, then brought back to the crop size with Lanczos, which keeps the detail the
    super-resolution model restored while the face mask decides where it lands.
    """
    out = rgb.copy()
    height, width = rgb.shape[:2]
    for face in faces:
        x0, y0, x1, y1 = expand_box(face, 1.6, width, height)
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        crop = Image.fromarray(out[y0:y1, x0:x1])
        result = upscaler(crop)
        if not isinstance(result, Image.Image):
            raise EngineError("the upscaler did not return an image", code="upscale_failed")
        result = result.convert("RGB")
        if result.size != crop.size:
            result = result.resize(crop.size, Image.Resampling.LANCZOS)
        out[y0:y1, x0:x1] = alpha_blend(np.asarray(result), out[y0:y1, x0:x1], region[y0:y1, x0:x1])
    return out


# ---------------------------------------------------------------------------------------------
# The operations


def _check_index(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise InvalidInput(f"{field} must be a non-negative integer, got {value!r}", field=field)
    return int(value)


class Detector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[Face]: ...


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
    ) -> np.ndarray:
        """Put each prepared source of ``pairs`` onto face ``index`` of ``rgb``, then enhance and
        sharpen only the swapped faces. One frame's work: the image and video paths share it."""
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
    ) -> EngineResult:
        """Put the source's face onto faces of the target.

        The largest face of ``source`` (preferring one with landmarks) is used. ``max_faces``
        = 0 swaps every face found in the target (up to the engine's cap); n > 0 swaps the n
        largest, and n above the cap is refused. ``upscaler`` (optional) restores detail on the
        swapped faces; ``sharpen`` in [0, 1] sharpens them.
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
            target_rgb, target_alpha, target_faces, pairs, sharpen=sharpen, upscaler=upscaler, control=control
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
    ) -> EngineResult:
        out = self.swap_onto(
            target_rgb, target_faces, pairs, sharpen=sharpen, upscaler=upscaler, control=control
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


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) taking ``src`` points to ``dst``.

    Umeyama's closed form, the estimate the ArcFace/inswapper alignment was trained with. It is
    used instead of ``cv2.estimateAffinePartial2D`` because that one is a robust (RANSAC/LMedS)
    estimator: with five landmarks it may drop a point, and with two (the Haar eyes) it has no
    sample to vote with. Returns the 2x3 matrix for ``cv2.warpAffine``.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1, 1] = -1  # a reflection is not a similarity; flip the weakest axis instead
    rotation = u @ d @ vt
    var = (src_c**2).sum() / len(src)
    scale = (s * np.diag(d)).sum() / var if var > 0 else 1.0
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix
