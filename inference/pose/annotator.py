"""The OpenPose body annotator: a picture in, its people's skeletons out, as the openpose
ControlNets' control image.

The picture is brought to a 512 px shorter side (the annotator's detect resolution, where the
maps are decoded), then shown to the network at 184 px high (CMU's 368 px box at scale 0.5, the
one scale lllyasviel's annotator runs), as BGR scaled to [-0.5, 0.5) and padded with grey to a
multiple of the network's stride. The maps are brought back to the 512 px picture (bicubic),
decoded into people (``decode``) and drawn at the output size (``skeleton``).

The network runs in float32 whatever the worker's dtype: it is small (200 MB), and the decoding
thresholds were set on float32 maps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from inference.pose.decode import decode_poses
from inference.pose.network import STRIDE, BodyPoseNet, load_body_pose_net
from inference.pose.skeleton import Pose, draw_poses

DETECT_SIDE = 512
NETWORK_HEIGHT = 184
PAD_VALUE = 128


@dataclass
class BodyPoseAnnotator:
    """A loaded body network on its device (used by one thread at a time)."""

    net: BodyPoseNet
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_body_pose_annotator(path: str | Path, device: torch.device | str) -> BodyPoseAnnotator:
    return BodyPoseAnnotator(load_body_pose_net(path, device), torch.device(device))


def _detect_size(width: int, height: int) -> tuple[int, int]:
    scale = DETECT_SIDE / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _network_input(rgb: np.ndarray, device: torch.device) -> tuple[torch.Tensor, tuple[int, int]]:
    """The network's input batch and the size (height, width) of the picture inside its padding."""
    height, width = rgb.shape[:2]
    scaled_w = max(1, round(width * NETWORK_HEIGHT / height))
    scaled = np.asarray(Image.fromarray(rgb).resize((scaled_w, NETWORK_HEIGHT), Image.Resampling.BICUBIC))
    pad_h, pad_w = -NETWORK_HEIGHT % STRIDE, -scaled_w % STRIDE
    bgr = np.pad(scaled[..., ::-1], ((0, pad_h), (0, pad_w), (0, 0)), constant_values=PAD_VALUE)
    batch = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1))).float()[None]
    return (batch / 256.0 - 0.5).to(device), (NETWORK_HEIGHT, scaled_w)


def detect_poses(annotator: BodyPoseAnnotator, image: Image.Image) -> list[Pose]:
    """The people in ``image``, each 18 points as fractions of its width and height (or None)."""
    width, height = _detect_size(*image.size)
    rgb = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))
    batch, (inner_h, inner_w) = _network_input(rgb, annotator.device)
    with annotator.lock, torch.inference_mode():
        pafs, heatmaps = annotator.net(batch)
        maps = torch.cat([heatmaps, pafs], dim=1)
        maps = F.interpolate(maps, scale_factor=STRIDE, mode="bicubic", align_corners=False)
        maps = maps[:, :, :inner_h, :inner_w]
        maps = F.interpolate(maps, size=(height, width), mode="bicubic", align_corners=False)
        maps_hwc = maps[0].permute(1, 2, 0).float().cpu().numpy()
    return decode_poses(maps_hwc[..., : heatmaps.shape[1]], maps_hwc[..., heatmaps.shape[1] :])


def body_pose_map(annotator: BodyPoseAnnotator, image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The skeletons of the people in ``image`` drawn at ``size`` (black where none is found)."""
    return draw_poses(detect_poses(annotator, image), size)
