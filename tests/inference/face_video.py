"""A short synthetic test video: the astronaut's face pasted on a moving canvas, with a sine tone."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from tests.inference.face_images import group


def face_video(
    path: Path, *, frames: int = 8, fps: int = 8, size: tuple[int, int] = (360, 480), tone_hz: float = 440.0
) -> list[tuple[int, int, int, int]]:
    """Write an MP4 (H.264 + AAC) of ``frames`` frames where one face drifts right by 4 px a
    frame; return the face's (x0, y0, x1, y1) in each frame."""
    import av

    rects = []
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.height, video.width = size
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "12", "preset": "veryfast"}
        audio = container.add_stream("aac", rate=44100)
        audio.layout = "mono"
        for i in range(frames):
            canvas, (rect,) = group([(60 + 4 * i, 50, 1.0)], size=size)
            rects.append(rect)
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        samples = int(44100 * frames / fps)
        t = np.arange(samples) / 44100
        tone = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = tone[start : start + 1024][None, :]
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate = 44100
            frame.pts = start
            frame.time_base = Fraction(1, 44100)
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
    return rects


def read_video(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """Every decoded frame (RGB) and the type of every stream."""
    import av

    with av.open(str(path)) as container:
        kinds = [s.type for s in container.streams]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return frames, kinds
