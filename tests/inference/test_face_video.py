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


def test_audio_mp4_cannot_carry_is_re_encoded_as_aac(tmp_path: Path) -> None:
    from fractions import Fraction

    from tests.inference.face_images import group

    # AVI with MPEG-4 video and 16-bit PCM sound: PCM has no place in an MP4.
    path = tmp_path / "clip.avi"
    with av.open(str(path), "w", format="avi") as container:
        video = container.add_stream("mpeg4", rate=8)
        video.width, video.height, video.pix_fmt = 480, 360, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=16000)
        audio.layout = "mono"
        for i in range(4):
            canvas, _ = group([(60, 50, 1.0)], size=(360, 480))
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 8)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        tone = (3000 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 300)).astype(np.int16)[None, :]
        sound = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
        sound.sample_rate, sound.pts, sound.time_base = 16000, 0, Fraction(1, 16000)
        container.mux(audio.encode(sound))
        container.mux(audio.encode(None))
    out = tmp_path / "out.mp4"
    result = VideoFaceSwapper(LandmarkFaceSwapper())(path, out, source=Image.fromarray(marked_source(GREEN)))
    assert result.files[0].meta["audio_copied"] is False and result.files[0].meta["frames"] == 4
    with av.open(str(out)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
        assert sum(1 for _ in container.decode(audio=0)) > 0
    frames, _ = read_video(out)
    assert len(frames) == 4
