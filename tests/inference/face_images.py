"""Test pictures for the face engines, built from the real face scikit-image ships.

``skimage.data.astronaut()`` (Eileen Collins) is bundled in the wheel, so these work offline.
Group pictures are made by pasting the face at known places on a plain canvas; a coloured disc
on the source's chin marks "this came from the source" in the swapped result.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from skimage import data

# The head and shoulders of the astronaut (rows, cols) and where her chin lies inside that crop.
HEAD = (slice(40, 300), slice(130, 330))
MARK_AT = (95, 100)  # (x, y) inside the 200x260 head crop: just under the mouth
MARK_RADIUS = 9

GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
CANVAS = (200, 200, 200)


def astronaut() -> np.ndarray:
    return data.astronaut()


def head() -> np.ndarray:
    return np.ascontiguousarray(astronaut()[HEAD])


def marked_source(colour: tuple[int, int, int]) -> np.ndarray:
    """The full astronaut photo with a saturated disc on her chin."""
    image = astronaut().copy()
    x = HEAD[1].start + MARK_AT[0]
    y = HEAD[0].start + MARK_AT[1]
    cv2.circle(image, (x, y), MARK_RADIUS, colour, -1)
    return image


def group(
    places: list[tuple[int, int, float]], size: tuple[int, int] = (600, 1000)
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Paste the head at each (x, y, scale); return the canvas and each head's (x0, y0, x1, y1)."""
    canvas = np.empty((*size, 3), np.uint8)
    canvas[:] = CANVAS
    rects = []
    for x, y, scale in places:
        piece = cv2.resize(head(), None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        h, w = piece.shape[:2]
        canvas[y : y + h, x : x + w] = piece
        rects.append((x, y, x + w, y + h))
    return canvas, rects


def colour_pixels(rgb: np.ndarray, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> int:
    """How many pixels inside ``box`` are dominated by the marker's channel.

    Colour matching shifts the marker's exact value (the blue disc comes out violet on warm
    skin), but a green or blue channel standing well above the mean of the other two never
    occurs in skin, hair or the grey canvas.
    """
    x0, y0, x1, y1 = (max(0, int(v)) for v in box)
    region = rgb[y0:y1, x0:x1].astype(int)
    channel = int(np.argmax(colour))
    others = np.delete(region, channel, axis=2).mean(axis=2)
    return int((region[..., channel] - others > 50).sum())


def swap_named_faces(engine: Any, canvas: np.ndarray, rects: list[tuple[int, int, int, int]]) -> np.ndarray:
    """``faceswap_multi`` of the green source onto face 2 and the blue one onto face 0 of ``canvas``
    (faces at ``rects``), checked the same way for every engine: each named face got its own source,
    and face 1, not named, is unchanged to the pixel. Returns the output for engine-specific checks."""
    from PIL import Image

    result = engine.faceswap_multi(
        [Image.fromarray(marked_source(GREEN)), Image.fromarray(marked_source(BLUE))],
        Image.fromarray(canvas),
        swap_faces_index=[0, 0],
        target_faces_index=[2, 0],
    )
    out = np.asarray(result.images[0].image)
    assert result.images[0].meta["swapped_faces_index"] == [2, 0]
    assert colour_pixels(out, GREEN, rects[2]) > 40 and colour_pixels(out, BLUE, rects[2]) == 0
    assert colour_pixels(out, BLUE, rects[0]) > 40 and colour_pixels(out, GREEN, rects[0]) == 0
    x0, y0, x1, y1 = rects[1]
    assert np.array_equal(out[y0:y1, x0:x1], canvas[y0:y1, x0:x1])
    return out
