"""A random-weight OpenPose body model saved as CMU's ``body_pose_model.pth`` is (a plain state
dict with the Caffe layer names, float32), and synthetic maps of people whose keypoints are
known, for the decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from inference.pose.network import BodyPoseNet
from inference.pose.skeleton import LIMB_PAFS, LIMBS


def save_random_body_pose_model(path: Path, *, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(BodyPoseNet().state_dict(), path)
    return path


def standing_person(centre_x: int) -> list[tuple[int, int]]:
    """18 keypoints (pixels) of a person facing the camera, 20-125 px down a 144 px map."""
    c = centre_x
    return [
        (c, 20), (c, 36), (c - 11, 36), (c - 14, 58), (c - 16, 78), (c + 11, 36), (c + 14, 58),
        (c + 16, 78), (c - 6, 76), (c - 7, 100), (c - 8, 125), (c + 6, 76), (c + 7, 100),
        (c + 8, 125), (c - 3, 16), (c + 3, 16), (c - 7, 19), (c + 7, 19),
    ]  # fmt: skip


def synthetic_maps(
    people: list[list[tuple[int, int]]], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (H, W, 19) with a Gaussian at each keypoint and the background as the rest, and
    PAFs (H, W, 38) holding each limb's unit vector within 2 px of its segment: the maps a
    perfect network would give for ``people``."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    heatmaps = np.zeros((height, width, 19), np.float32)
    pafs = np.zeros((height, width, 38), np.float32)
    for points in people:
        for part, (x, y) in enumerate(points):
            blob = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.0**2))
            heatmaps[..., part] = np.maximum(heatmaps[..., part], blob)
        for (a, b), (cx, cy) in zip(LIMBS, LIMB_PAFS, strict=True):
            (xa, ya), (xb, yb) = points[a], points[b]
            length = float(np.hypot(xb - xa, yb - ya))
            ux, uy = (xb - xa) / length, (yb - ya) / length
            along = (xs - xa) * ux + (ys - ya) * uy
            across = np.abs((xs - xa) * uy - (ys - ya) * ux)
            band = (along >= 0) & (along <= length) & (across <= 2)
            pafs[..., cx][band] = ux
            pafs[..., cy][band] = uy
    heatmaps[..., 18] = 1 - heatmaps[..., :18].max(axis=2)
    return heatmaps, pafs
