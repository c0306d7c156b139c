"""faceswap_video's engine on a synthetic clip: every frame swapped, audio kept, frames counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.base import InvalidInput
from inference.faceswap import LandmarkFaceSwapper
from tests.inference.face_images import CANVAS, GREEN, colour_pixels, marked_source

av = pytest.importorskip("av")

from inference.faceswap.video import VideoFaceSwapper, probe_video  # noqa: E402
from tests.inference.face_video import face_video, read_video  # noqa: E402


class _Progress:
    def __init__(self) -> None:
        self.seen: list[float] = []

    def progress(self, percent: float) -> None:
        self.seen.append(percent)

    def should_stop(self) -> bool:
        return False


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, int, int, int]]]:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    return path, face_video(path)


def test_probe_reads_size_frames_and_audio(clip) -> None:
    path, _ = clip
    info = probe_video(path)
    assert (info.width, info.height, info.frames) == (480, 360, 8)
    assert info.has_audio and info.audio_codec == "aac" and info.fps == 8


def test_faceswap_video_swaps_every_frame_and_keeps_frame_count_and_audio(clip, tmp_path: Path) -> None:
    path, rects = clip
    out = tmp_path / "out.mp4"
    control = _Progress()
    result = VideoFaceSwapper(LandmarkFaceSwapper())(
        path, out, source=Image.fromarray(marked_source(GREEN)), control=control
    )
    assert result.backend == "landmark-opencv-haar+video"
    meta = result.files[0].meta
    assert result.files[0].path == out and result.files[0].ext == "mp4"
    assert meta["frames"] == 8 and meta["frames_with_faces"] == 8 and meta["audio_copied"] is True
    before, _ = read_video(path)
    after, kinds = read_video(out)
    assert len(after) == len(before) == 8
    assert sorted(kinds) == ["audio", "video"]
    for frame_in, frame_out, rect in zip(before, after, rects, strict=True):
        assert frame_out.shape == frame_in.shape
        # The source's chin mark is in every frame's face; the canvas far from it is as it was.
        assert colour_pixels(frame_out, GREEN, rect) > 20
        assert np.abs(frame_out[:, 400:].astype(int) - frame_in[:, 400:]).mean() < 2
    # Progress by frame: one report per frame, rising to 100.
    assert len(control.seen) >= 8 and control.seen == sorted(control.seen) and control.seen[-1] == 100


def test_faceswap_video_multi_mapping_and_max_side(clip, tmp_path: Path) -> None:
    path, _ = clip
    out = tmp_path / "small.mp4"
    result = VideoFaceSwapper(LandmarkFaceSwapper())(
        path,
        out,
        sources=[Image.fromarray(marked_source(GREEN))],
        swap_faces_index=[0],
        target_faces_index=[0],
        max_side=241,
    )
    frames, _ = read_video(out)
    # 480x360 shrunk to at most 241, then made even for yuv420p.
    assert frames[0].shape[:2] == (180, 240) and result.files[0].meta["width"] == 240
    assert len(frames) == 8


def test_faceswap_video_without_any_face_is_a_named_error(tmp_path: Path) -> None:
    import av as _av

    path = tmp_path / "blank.mp4"
    with _av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for _ in range(3):
            frame = _av.VideoFrame.from_ndarray(np.full((120, 160, 3), CANVAS, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(InvalidInput) as excinfo:
        VideoFaceSwapper(LandmarkFaceSwapper())(
            path, tmp_path / "o.mp4", source=Image.fromarray(marked_source(GREEN))
        )
    assert excinfo.value.code == "no_face_in_target"
    not_video = tmp_path / "x.mp4"
    not_video.write_bytes(b"not a video at all")
    with pytest.raises(InvalidInput):
        probe_video(not_video)
