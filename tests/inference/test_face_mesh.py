"""The mediapipe face mesh engine (``landmark-mediapipe-mesh``) on the real faces packages ship.

mediapipe 0.10.21 carries its face detector and 468-point mesh inside the wheel, so these run
offline; they are skipped where mediapipe is not installed (the Haar engine then serves, see
tests/inference/test_face_tasks.py). Group pictures paste the astronaut's head at known places; a green or
blue disc on the source's chin marks "this came from the source" in a result.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image

from inference.base import EngineError, InvalidInput
from inference.faceswap import KEYPOINT_NAMES, MeshFaceSwapper
from inference.faceswap.mesh import MESH_POINTS, triangulate, warp_triangles
from tests.inference.face_images import (
    CANVAS,
    GREEN,
    HEAD,
    astronaut,
    colour_pixels,
    group,
    marked_source,
    swap_named_faces,
)

PLACES = [(60, 60, 1.0), (420, 300, 0.8), (720, 50, 1.1)]


@pytest.fixture(scope="module")
def engine() -> MeshFaceSwapper:
    try:
        return MeshFaceSwapper()
    except EngineError as exc:
        pytest.skip(f"mediapipe face mesh unavailable: {exc}")


@pytest.fixture(scope="module")
def trio() -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    return group(PLACES)


def grace_hopper() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.any(before != after, axis=2)


def _inside(mask: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> bool:
    """Every set pixel of ``mask`` lies in one of ``boxes``."""
    allowed = np.zeros_like(mask)
    for x0, y0, x1, y1 in boxes:
        allowed[max(0, y0) : y1, max(0, x0) : x1] = True
    return not (mask & ~allowed).any()


def _grown(box: dict[str, int], factor: float) -> tuple[int, int, int, int]:
    cx, cy = (box["x1"] + box["x2"]) / 2, (box["y1"] + box["y2"]) / 2
    hw, hh = (box["x2"] - box["x1"]) * factor / 2, (box["y2"] - box["y1"]) * factor / 2
    return int(cx - hw), int(cy - hh), int(cx + hw) + 1, int(cy + hh) + 1


# ---------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize("picture", [astronaut, grace_hopper])
def test_mesh_detector_fits_468_landmarks_on_a_real_face(engine, picture):
    rgb = picture()
    faces = engine.detect(rgb)
    assert len(faces) == 1
    face = faces[0]
    assert face.mesh is not None and face.mesh.shape == (MESH_POINTS, 2)
    height, width = rgb.shape[:2]
    assert (face.mesh >= 0).all() and (face.mesh[:, 0] < width).all() and (face.mesh[:, 1] < height).all()
    # The box is the mesh's own box; the five named points sit where a face has them.
    x0, y0, x1, y1 = face.box
    assert (x0, y0) == tuple(face.mesh.min(axis=0)) and (x1, y1) == tuple(face.mesh.max(axis=0))
    left_eye, right_eye, nose, mouth_left, mouth_right = face.kps
    assert x0 < left_eye[0] < nose[0] < right_eye[0] < x1
    assert mouth_left[0] < nose[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1]) < y1
    assert 0.5 < face.score <= 1


def test_face_detect_finds_each_pasted_face_left_to_right(engine, trio):
    canvas, rects = trio
    result = engine.face_detect(Image.fromarray(canvas))
    assert result.backend == "landmark-mediapipe-mesh"
    faces = result.data["faces"]
    assert [f["index"] for f in faces] == [0, 1, 2]
    for face, (x0, y0, x1, y1) in zip(faces, rects, strict=True):
        box = face["box"]
        assert x0 <= box["x1"] < box["x2"] <= x1 and y0 <= box["y1"] < box["y2"] <= y1, (
            box,
            (x0, y0, x1, y1),
        )
        assert list(face["landmarks"]) == list(KEYPOINT_NAMES)


@pytest.mark.parametrize(
    ("places", "size"),
    [
        ([(60, 150, 1.0), (420, 140, 1.1), (760, 160, 0.9)], (600, 1000)),
        ([(100, 200, 2.0), (600, 250, 1.8), (1100, 200, 2.0), (1500, 300, 1.6)], (1080, 1920)),
        ([(20, 60, 0.6), (300, 60, 0.7), (600, 60, 0.8)], (400, 900)),
    ],
)
def test_every_face_of_a_wide_group_picture_is_found(engine, places, size):
    # On the whole 1000 x 600 frame the detector misses the left face of the first picture;
    # the square tiles find it.
    canvas, rects = group(places, size)
    faces = engine.detect(canvas)
    assert len(faces) == len(rects)
    for face, (x0, y0, x1, y1) in zip(faces, rects, strict=True):
        assert x0 < face.center[0] < x1 and y0 < face.center[1] < y1


def test_indices_are_stable_across_calls_sizes_and_stacked_faces(engine, trio):
    canvas, _ = trio
    first = engine.face_detect(Image.fromarray(canvas)).data["faces"]
    assert engine.face_detect(Image.fromarray(canvas)).data["faces"] == first
    big = Image.fromarray(canvas).resize((2000, 1200), Image.Resampling.LANCZOS)
    scaled = engine.face_detect(big, max_side=1000).data["faces"]
    assert len(scaled) == 3
    for a, b in zip(first, scaled, strict=True):
        assert all(abs(2 * a["box"][k] - b["box"][k]) <= 12 for k in ("x1", "y1", "x2", "y2")), (a, b)
    # A column of two (the lower one a little further left) comes before the face to its right,
    # top to bottom inside the column.
    stacked, rects = group([(70, 320, 0.9), (80, 20, 0.9), (400, 150, 0.9)], size=(600, 700))
    faces = engine.face_detect(Image.fromarray(stacked)).data["faces"]
    tops = [f["box"]["y1"] for f in faces]
    lefts = [f["box"]["x1"] for f in faces]
    assert len(faces) == 3 and tops[0] < rects[0][1] and tops[1] > rects[0][1] and lefts[2] > 400


def test_face_detect_on_a_blank_image_returns_no_faces(engine):
    assert engine.face_detect(Image.new("RGB", (320, 240), CANVAS)).data["faces"] == []


def test_detector_keeps_the_largest_faces_up_to_max_faces(trio):
    canvas, _ = trio
    try:
        two = MeshFaceSwapper(max_faces=2)
    except EngineError as exc:
        pytest.skip(str(exc))
    faces = two.detect(canvas)
    # PLACES scales 1.0, 0.8, 1.1: the 0.8 face (the middle one) is the one dropped.
    assert len(faces) == 2 and faces[0].center[0] < 300 and faces[1].center[0] > 700


# ---------------------------------------------------------------------------------------------
# The Delaunay warp


def test_triangulation_of_the_mesh_tiles_its_convex_hull(engine):
    mesh = engine.detect(astronaut())[0].mesh
    triangles = triangulate(mesh)
    hull = cv2.convexHull(mesh.astype(np.float32))
    # Euler: n points, h of them on the hull, make 2n - 2 - h triangles; convexHull leaves out
    # points lying (almost) on a hull edge, so its h is a lower bound.
    assert 2 * MESH_POINTS - 2 - len(hull) - 3 <= len(triangles) <= 2 * MESH_POINTS - 2 - len(hull)
    assert set(triangles.ravel()) == set(range(MESH_POINTS))
    # No gaps, no overlaps: the triangles' areas add up to the hull's area.
    a, b, c = (mesh[triangles[:, i]].astype(np.float64) for i in range(3))
    (abx, aby), (acx, acy) = (b - a).T, (c - a).T
    areas = np.abs(abx * acy - aby * acx) / 2
    assert areas.sum() == pytest.approx(cv2.contourArea(hull), rel=1e-3)


def test_warp_by_triangles_equals_the_affine_warp_when_the_points_move_affinely():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 255, (200, 200, 3), np.uint8)
    source = cv2.GaussianBlur(source, (0, 0), 3)
    points = rng.uniform(40, 160, (40, 2)).astype(np.float32)
    matrix = np.array([[0.9, -0.2, 20.0], [0.25, 1.1, -5.0]])
    moved = points @ matrix[:, :2].T + matrix[:, 2]
    warped, mask = warp_triangles(source, points, moved, triangulate(points), (220, 220))
    expected = cv2.warpAffine(
        source, cv2.invertAffineTransform(matrix), (220, 220), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    )
    inside = cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0
    assert inside.sum() > 5000
    assert np.abs(warped[inside].astype(int) - expected[inside]).max() <= 2
    # Only pixels inside the moved points' hull are covered.
    hull = cv2.fillConvexPoly(np.zeros_like(mask), cv2.convexHull(np.round(moved).astype(np.int32)), 255)
    assert not (mask & ~cv2.dilate(hull, np.ones((3, 3), np.uint8))).any()


def test_the_swapped_face_takes_the_target_faces_shape(engine):
    # Grace Hopper's face onto the astronaut: the mesh fitted to the result lies on the
    # astronaut's own mesh, because every triangle was mapped onto the target's landmarks.
    target = astronaut()
    before = engine.detect(target)[0]
    out = np.asarray(
        engine.faceswap(Image.fromarray(grace_hopper()), Image.fromarray(target)).images[0].image
    )
    after = engine.detect(out)[0]
    error = np.linalg.norm(after.mesh - before.mesh, axis=1)
    assert float(np.median(error)) < 0.04 * before.width, float(np.median(error))
    # And it is a different face there now, not a copy of the target.
    x0, y0, x1, y1 = (int(v) for v in before.box)
    assert np.abs(out[y0:y1, x0:x1].astype(int) - target[y0:y1, x0:x1]).mean() > 8


# ---------------------------------------------------------------------------------------------
# Swaps


def test_faceswap_changes_every_target_face_and_no_pixel_far_from_them(engine, trio):
    canvas, rects = trio
    result = engine.faceswap(Image.fromarray(marked_source(GREEN)), Image.fromarray(canvas))
    assert result.backend == "landmark-mediapipe-mesh"
    out = np.asarray(result.images[0].image)
    meta = result.images[0].meta
    assert out.shape == canvas.shape
    assert meta["swapped_faces_index"] == [0, 1, 2] and meta["faces_in_target"] == 3
    faces = engine.face_detect(Image.fromarray(canvas)).data["faces"]
    changed = _changed(canvas, out)
    assert _inside(changed, [_grown(f["box"], 1.4) for f in faces])
    for face, rect in zip(faces, rects, strict=True):
        x0, y0, x1, y1 = _grown(face["box"], 0.6)
        assert changed[y0:y1, x0:x1].mean() > 0.9
        assert colour_pixels(out, GREEN, rect) > 40, rect
    assert colour_pixels(canvas, GREEN, (0, 0, 1000, 600)) == 0


def test_faceswap_multi_swaps_exactly_the_named_faces_by_face_detect_index(engine, trio):
    canvas, rects = trio
    faces = engine.face_detect(Image.fromarray(canvas)).data["faces"]
    out = swap_named_faces(engine, canvas, rects)
    assert _inside(_changed(canvas, out), [_grown(faces[i]["box"], 1.4) for i in (0, 2)])


def test_a_face_of_a_group_source_is_taken_by_its_index(engine, trio):
    canvas, rects = trio
    # The source is a group of two: its face 1 (the right one) is the green-marked one.
    source, _ = group([(60, 60, 1.0), (720, 50, 1.1)])
    piece = cv2.resize(marked_source(GREEN)[HEAD], None, fx=1.1, fy=1.1, interpolation=cv2.INTER_AREA)
    source[50 : 50 + piece.shape[0], 720 : 720 + piece.shape[1]] = piece
    out = engine.faceswap_multi([Image.fromarray(source)], Image.fromarray(canvas), [1], [0])
    assert colour_pixels(np.asarray(out.images[0].image), GREEN, rects[0]) > 40
    plain = engine.faceswap_multi([Image.fromarray(source)], Image.fromarray(canvas), [0], [0])
    assert colour_pixels(np.asarray(plain.images[0].image), GREEN, rects[0]) == 0


def test_max_faces_max_side_sharpen_and_upscaler_behave_as_on_the_haar_engine(engine, trio):
    canvas, rects = trio
    source = Image.fromarray(marked_source(GREEN))
    one = engine.faceswap(source, Image.fromarray(canvas), max_faces=1)
    out = np.asarray(one.images[0].image)
    assert one.images[0].meta["swapped_faces_index"] == [2]
    for x0, y0, x1, y1 in rects[:2]:
        assert np.array_equal(out[y0:y1, x0:x1], canvas[y0:y1, x0:x1])
    big = Image.fromarray(canvas).resize((1500, 900), Image.Resampling.LANCZOS)
    assert engine.faceswap(source, big, max_side=700).images[0].image.size == (700, 420)

    seen = []

    def double(image: Image.Image) -> Image.Image:
        seen.append(image.size)
        return image.resize((image.width * 2, image.height * 2), Image.Resampling.LANCZOS)

    faces = engine.face_detect(Image.fromarray(canvas)).data["faces"]
    near = [_grown(f["box"], 1.4) for f in faces]
    upscaled = np.asarray(engine.faceswap(source, Image.fromarray(canvas), upscaler=double).images[0].image)
    assert len(seen) == 3 and _inside(_changed(canvas, upscaled), near)
    sharp = np.asarray(engine.faceswap(source, Image.fromarray(canvas), sharpen=0.8).images[0].image)
    plain = np.asarray(engine.faceswap(source, Image.fromarray(canvas)).images[0].image)
    assert _inside(_changed(canvas, sharp), near)
    for face in faces:
        x0, y0, x1, y1 = _grown(face["box"], 0.5)

        def detail(rgb: np.ndarray, box=(x0, y0, x1, y1)) -> float:
            gray = rgb[box[1] : box[3], box[0] : box[2]].astype(np.float32).mean(axis=2)
            return float(np.abs(np.diff(gray, axis=1)).mean())

        assert detail(sharp) > detail(plain) * 1.2


# ---------------------------------------------------------------------------------------------
# Errors


def test_no_face_in_source_or_target_is_a_named_error(engine, trio):
    canvas, _ = trio
    blank = Image.new("RGB", (400, 300), CANVAS)
    source = Image.fromarray(marked_source(GREEN))
    cases = [
        (lambda: engine.faceswap(blank, Image.fromarray(canvas)), ("no_face_in_source", "source_url")),
        (lambda: engine.faceswap(source, blank), ("no_face_in_target", "target_url")),
        (
            lambda: engine.faceswap_multi([source, blank], Image.fromarray(canvas), [0, 0], [0, 1]),
            ("no_face_in_source", "source_urls[1]"),
        ),
        (
            lambda: engine.faceswap_multi([source], Image.fromarray(canvas), [0], [3]),
            ("index_out_of_range", "target_faces_index[0]"),
        ),
    ]
    for call, expected in cases:
        with pytest.raises(InvalidInput) as excinfo:
            call()
        assert (excinfo.value.code, excinfo.value.field) == expected
