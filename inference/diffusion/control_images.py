"""Control images for ``generate``'s ControlNets: what each ControlNet type is conditioned on,
made from the job's picture, with no weights where none are needed.

- ``canny``: OpenCV's Canny edge detector (thresholds 100/200, lllyasviel's annotator defaults and
  the SenseTime seed's), white edges on black.
- ``lineart``: a difference of Gaussians in OpenCV (σ 0.8 and 2 output pixels): how much darker
  each pixel is than its surroundings, which marks the dark side of every contour and thin dark
  lines but not flat shading, stretched to white strokes on black (the polarity the lineart
  ControlNets take), faint texture dropped. A ratio (a colour-dodge sketch) was tried and left:
  it blows up noise in dark areas. No learned line extractor: coarser than lllyasviel's, but
  weight-free.
- ``tile``: the picture itself at the output size (tile ControlNets refine what they are shown).
- ``depth``: a transformers depth-estimation model (DPT, Depth Anything...) installed in the model
  store as the depth annotator; relative depth normalised to 0-255, near bright (MiDaS' layout).
- ``openpose``: MediaPipe's BlazePose (bundled in the mediapipe wheel, the face engine's package),
  its landmarks mapped onto OpenPose's 18-point COCO skeleton and drawn in OpenPose's colours on
  black. One person, the most prominent.

Each preprocessor draws at the output size, so edges are one output pixel wide.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image

CANNY_LOW, CANNY_HIGH = 100, 200
# The difference of Gaussians of lineart, in output pixels: the fine one smooths pixel noise, the
# coarse one is the surroundings a stroke is darker than (a wider one thickens every stroke).
LINEART_SIGMAS = (0.8, 2.0)
# Strokes are stretched so that the top 1 % are white; what stays under 1/8 of that is texture.
LINEART_TOP_PERCENTILE = 99.0
LINEART_FLOOR = 32

# What ``result.meta.controlnets[].preprocessor`` says ran (depth adds its annotator's id).
PREPROCESSORS = {
    "canny": "opencv-canny",
    "lineart": "opencv-dog-lines",
    "tile": "resize",
    "depth": "depth-estimation",
    "openpose": "mediapipe-pose",
}

# OpenPose's 18 COCO keypoints (nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/
# wrist, right hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right ear, left ear) as
# BlazePose landmark indices; the neck, which BlazePose lacks, is the shoulders' midpoint.
NECK = -1
OPENPOSE_FROM_BLAZEPOSE = (0, NECK, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
# OpenPose's limbs (pairs of the keypoints above) and its keypoint colours, as the openpose
# ControlNets were trained on them (lllyasviel's annotator).
OPENPOSE_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
OPENPOSE_COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
POSE_MIN_VISIBILITY = 0.5


def _rgb_at(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize(size, Image.Resampling.LANCZOS))


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def canny_map(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """White Canny edges on black at ``size``."""
    # Canny on the three channels keeps the edges between colours of equal brightness.
    return _grey_to_rgb(cv2.Canny(_rgb_at(image, size), CANNY_LOW, CANNY_HIGH))


def lineart_map(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """White strokes on black at ``size``: where the picture is darker than its surroundings."""
    grey = cv2.cvtColor(_rgb_at(image, size), cv2.COLOR_RGB2GRAY).astype(np.float32)
    fine, coarse = (cv2.GaussianBlur(grey, (0, 0), sigma) for sigma in LINEART_SIGMAS)
    darker = np.clip(coarse - fine, 0, None)
    top = float(np.percentile(darker, LINEART_TOP_PERCENTILE))
    # Stretched so the strongest strokes are white whatever the picture's contrast.
    lines = np.clip(darker * (255.0 / top), 0, 255) if top > 0 else darker
    lines[lines < LINEART_FLOOR] = 0
    return _grey_to_rgb(lines.astype(np.uint8))


def tile_map(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(_rgb_at(image, size))


# -- annotators (models) ---------------------------------------------------------------------


@dataclass
class DepthAnnotator:
    """A loaded transformers depth-estimation model and its image processor."""

    model: Any
    processor: Any
    device: Any
    dtype: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_depth_annotator(path: str, device: Any, dtype: Any) -> DepthAnnotator:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForDepthEstimation.from_pretrained(path, local_files_only=True, dtype=dtype)
    return DepthAnnotator(model.to(device).eval(), processor, device, dtype)


def depth_map(annotator: DepthAnnotator, image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Relative depth at ``size``, normalised to 0-255 (the models predict inverse depth, so near
    is bright, the layout the depth ControlNets were trained on)."""
    import torch

    inputs = annotator.processor(images=image.convert("RGB"), return_tensors="pt")
    pixels = inputs["pixel_values"].to(annotator.device, annotator.dtype)
    with annotator.lock, torch.inference_mode():
        predicted = annotator.model(pixel_values=pixels).predicted_depth
    depth = torch.nn.functional.interpolate(
        predicted[:, None].float(), size=(size[1], size[0]), mode="bicubic", align_corners=False
    )[0, 0]
    low, high = depth.min(), depth.max()
    depth = (depth - low) / (high - low) if float(high - low) > 0 else torch.zeros_like(depth)
    return _grey_to_rgb((depth * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy())


@dataclass
class PoseAnnotator:
    """MediaPipe's pose landmarker (one graph, used by one thread at a time)."""

    pose: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_pose_annotator() -> PoseAnnotator:
    import mediapipe as mp  # installed apart from the extras (see the Makefile); checked first

    return PoseAnnotator(mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1))


def pose_map(annotator: PoseAnnotator, image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The OpenPose skeleton of the most prominent person, drawn at ``size`` (black when none)."""
    with annotator.lock:
        found = annotator.pose.process(np.asarray(image.convert("RGB")))
    landmarks = found.pose_landmarks.landmark if found.pose_landmarks is not None else []
    return draw_openpose(openpose_keypoints(landmarks), size)


def openpose_keypoints(landmarks: Any) -> list[tuple[float, float] | None]:
    """BlazePose's landmarks (x, y in 0-1 and a visibility) as OpenPose's 18 keypoints, None
    for each one BlazePose did not see."""
    if not landmarks:
        return [None] * len(OPENPOSE_FROM_BLAZEPOSE)

    def seen(index: int) -> tuple[float, float] | None:
        mark = landmarks[index]
        return (mark.x, mark.y) if mark.visibility >= POSE_MIN_VISIBILITY else None

    points: list[tuple[float, float] | None] = []
    for index in OPENPOSE_FROM_BLAZEPOSE:
        if index != NECK:
            points.append(seen(index))
            continue
        right, left = seen(12), seen(11)
        points.append(((right[0] + left[0]) / 2, (right[1] + left[1]) / 2) if right and left else None)
    return points


def draw_openpose(points: list[tuple[float, float] | None], size: tuple[int, int]) -> Image.Image:
    """OpenPose's rendering of 18 keypoints (x, y in 0-1): coloured limbs at 60 % brightness
    under coloured joints, on black."""
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    thick = max(2, round(min(width, height) / 128))
    pixel = {i: (round(p[0] * width), round(p[1] * height)) for i, p in enumerate(points) if p is not None}
    for limb, (a, b) in enumerate(OPENPOSE_LIMBS):
        if a in pixel and b in pixel:
            colour = tuple(int(c * 0.6) for c in OPENPOSE_COLOURS[limb])
            cv2.line(canvas, pixel[a], pixel[b], colour, thick * 2, cv2.LINE_AA)
    for index, centre in pixel.items():
        cv2.circle(canvas, centre, thick * 2, OPENPOSE_COLOURS[index], -1, cv2.LINE_AA)
    return Image.fromarray(canvas)
