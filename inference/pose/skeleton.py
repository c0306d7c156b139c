"""OpenPose's COCO body skeleton and its rendering, as the openpose ControlNets were trained on
it (lllyasviel's annotator): 18 keypoints, 19 limbs (the last two, ear to shoulder, help assemble
people but are not drawn), each limb's pair of PAF channels, and the 18 colours.

A pose is 18 points, each (x, y) as fractions of the picture's width and height, or None where
that keypoint was not found.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

KEYPOINTS = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
# The limbs as keypoint pairs, in the network's order (its PAF channels follow it).
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
    (2, 16), (5, 17),
)  # fmt: skip
# The (x, y) PAF channels of each limb above, in the 38 the network gives.
LIMB_PAFS = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5),
    (6, 7), (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37),
    (18, 19), (26, 27),
)  # fmt: skip
DRAWN_LIMBS = 17  # the ear-shoulder limbs are left out of the picture
COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# Limbs are ellipses of this half-width and joints discs of this radius on a 512 px picture (the
# annotator's detect resolution), scaled with the picture's shorter side.
STICK_HALF_WIDTH = 4
JOINT_RADIUS = 4
REFERENCE_SIDE = 512
LIMB_BRIGHTNESS = 0.6

Point = tuple[float, float]
Pose = tuple[Point | None, ...]


def draw_poses(poses: list[Pose], size: tuple[int, int]) -> Image.Image:
    """The poses drawn at ``size`` on black, as OpenPose renders them: each limb an ellipse in its
    colour at 60 % brightness, then each joint a disc in its full colour on top."""
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    scale = min(width, height) / REFERENCE_SIDE
    half_width = max(1, round(STICK_HALF_WIDTH * scale))
    radius = max(1, round(JOINT_RADIUS * scale))
    for limb, (a, b) in enumerate(LIMBS[:DRAWN_LIMBS]):
        colour = tuple(int(c * LIMB_BRIGHTNESS) for c in COLOURS[limb])
        for pose in poses:
            start, end = pose[a], pose[b]
            if start is None or end is None:
                continue
            (x0, y0), (x1, y1) = (start[0] * width, start[1] * height), (end[0] * width, end[1] * height)
            length = math.hypot(x1 - x0, y1 - y0)
            angle = math.degrees(math.atan2(y1 - y0, x1 - x0))
            centre = (round((x0 + x1) / 2), round((y0 + y1) / 2))
            polygon = cv2.ellipse2Poly(centre, (round(length / 2), half_width), round(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, np.asarray(polygon, dtype=np.int32), colour)
    for pose in poses:
        for index, point in enumerate(pose):
            if point is not None:
                centre = (round(point[0] * width), round(point[1] * height))
                cv2.circle(canvas, centre, radius, COLOURS[index], thickness=-1)
    return Image.fromarray(canvas)
