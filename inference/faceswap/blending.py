"""Putting a face into a picture: colour matching, Poisson cloning, feathered blending, and the
enhancements applied to the swapped faces only (super-resolution, sharpening).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from inference.base import EngineError
from inference.faceswap.faces import Face, expand_box

Upscaler = Callable[[Image.Image], Image.Image]
# Restores the swapped faces (a face restorer, inference/face_restore.py): the picture, the faces
# swapped in it and the soft alpha of the swap, to a picture changed only inside that alpha.
FaceEnhancer = Callable[[np.ndarray, Sequence[Face], np.ndarray], np.ndarray]


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
