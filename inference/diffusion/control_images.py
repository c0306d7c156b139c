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
- ``openpose``: OpenPose's body network (CMU's ``body_pose_model.pth``, lllyasviel's annotator
  weights) installed in the model store as the openpose annotator (``inference/pose``): every
  person's 18-point COCO skeleton drawn in OpenPose's colours on black. The network, its
  decoding and its drawing live in their own package; ``controlnet`` runs it.

Each preprocessor draws at the output size, so edges are one output pixel wide.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

CANNY_LOW, CANNY_HIGH = 100, 200
# The difference of Gaussians of lineart, in output pixels: the fine one smooths pixel noise, the
# coarse one is the surroundings a stroke is darker than (a wider one thickens every stroke).
LINEART_SIGMAS = (0.8, 2.0)
# Strokes are stretched so that the top 1 % are white; what stays under 1/8 of that is texture.
LINEART_TOP_PERCENTILE = 99.0
LINEART_FLOOR = 32

# What ``result.meta.controlnets[].preprocessor`` says ran (depth and openpose add their
# annotator's id).
PREPROCESSORS = {
    "canny": "opencv-canny",
    "lineart": "opencv-dog-lines",
    "tile": "resize",
    "depth": "depth-estimation",
    "openpose": "openpose-body",
}


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
