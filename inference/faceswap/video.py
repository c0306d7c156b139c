"""Face swap over the frames of a video (seed 000's ``faceswap_video``), with the audio kept.

The mapping is the image tasks' own: one source face onto every face (or the ``max_faces``
largest) of each frame, or ``faceswap_multi``'s source -> target index pairs, the target
indices counted in each frame in the documented order. Sources are prepared once; each frame
is detected and swapped by the engine's ``swap_onto``, so the video and image paths cannot
drift apart. Frames where a named face is missing are passed through unchanged: in a video a
face turning away for a few frames is normal, not an error; a video with no face in any frame
is (``no_face_in_target``).

PyAV does the container work: frames are decoded, swapped and encoded as H.264 (yuv420p, the
profile every player reads) in an MP4; the audio packets are copied as they are when MP4 can
carry their codec, else re-encoded as AAC, so the soundtrack is not resampled for nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from inference.base import (
    EngineError,
    EngineResult,
    InvalidInput,
    NullControl,
    OutputFile,
    RunControl,
    check_stop,
)
from inference.faceswap.blending import Upscaler
from inference.faceswap.engine import DEFAULT_MAX_SIDE, FaceSwapEngine, validate_max_side, validate_sharpen
from inference.faceswap.faces import keep_largest

# Audio codecs an MP4 carries as they are (copied packet for packet).
MP4_AUDIO = {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}


@dataclass(frozen=True)
class VideoInfo:
    """What a container probe tells before any frame is decoded."""

    width: int
    height: int
    frames: int  # from the header, or estimated from duration x rate; 0 when unknown
    duration: float  # seconds
    fps: float
    has_audio: bool
    video_codec: str
    audio_codec: str | None


def probe_video(path: str | Path) -> VideoInfo:
    """Read a video's header: size, frame count, duration, audio. Raises ``InvalidInput`` for a
    file that is not a video PyAV can demux."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidInput("the input has no video stream", field="target_url")
            stream = container.streams.video[0]
            audio = container.streams.audio[0] if container.streams.audio else None
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000  # av.time_base is microseconds
            else:
                duration = 0.0
            frames = int(stream.frames or round(duration * rate))
            return VideoInfo(
                width=int(stream.codec_context.width),
                height=int(stream.codec_context.height),
                frames=frames,
                duration=duration,
                fps=rate,
                has_audio=audio is not None,
                video_codec=stream.codec_context.name,
                audio_codec=audio.codec_context.name if audio is not None else None,
            )
    except InvalidInput:
        raise
    except Exception as exc:  # av raises InvalidDataError, OSError and others for a bad file
        raise InvalidInput(f"the input is not a readable video: {exc}", field="target_url") from None


def _even_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The output size: shrunk to ``max_side`` (never enlarged), each side even (yuv420p)."""
    scale = min(1.0, max_side / max(width, height))
    w, h = max(2, round(width * scale)), max(2, round(height * scale))
    return w - w % 2, h - h % 2


class VideoFaceSwapper:
    """Runs a face engine's swap frame by frame; ``backend`` is the engine's, plus ``+video``."""

    def __init__(self, engine: FaceSwapEngine, *, crf: int = 18, preset: str = "veryfast"):
        self.engine = engine
        self.crf = crf
        self.preset = preset
        self.backend = f"{engine.backend}+video"

    def __call__(
        self,
        video: str | Path,
        output: str | Path,
        *,
        source: Image.Image | None = None,
        sources: Sequence[Image.Image] | None = None,
        swap_faces_index: Sequence[int] | None = None,
        target_faces_index: Sequence[int] | None = None,
        max_side: int = DEFAULT_MAX_SIDE,
        sharpen: float = 0.0,
        max_faces: int = 0,
        upscaler: Upscaler | None = None,
        control: RunControl | None = None,
    ) -> EngineResult:
        """Swap faces in every frame of ``video`` and write an MP4 to ``output``.

        Give ``source`` (one face onto every face of each frame, ``max_faces`` as in faceswap)
        or ``sources`` with ``swap_faces_index``/``target_faces_index`` (as in faceswap_multi).
        """
        import av

        control = control or NullControl()
        max_side = validate_max_side(max_side)
        sharpen = validate_sharpen(sharpen)
        if (source is None) == (sources is None):
            raise InvalidInput("give either source_url or source_urls", field="source_url")
        if isinstance(max_faces, bool) or not isinstance(max_faces, int) or max_faces < 0:
            raise InvalidInput(f"max_faces must be an integer >= 0, got {max_faces!r}", field="max_faces")
        if max_faces > self.engine.max_faces:
            raise InvalidInput(
                f"max_faces must be at most {self.engine.max_faces}, got {max_faces}", field="max_faces"
            )
        info = probe_video(video)
        check_stop(control)
        if source is not None:
            prepared = [self.engine.prepare_source(source)]
            targets: list[int] | None = None
        else:
            sources = list(sources or [])
            swap_idx = list(swap_faces_index or [0] * len(sources))
            targets = list(target_faces_index or range(len(sources)))
            if not sources or len(swap_idx) != len(sources) or len(targets) != len(sources):
                raise InvalidInput(
                    "source_urls, swap_faces_index and target_faces_index must have one entry each",
                    code="length_mismatch",
                    field="target_faces_index",
                )
            if len(set(targets)) != len(targets):
                raise InvalidInput(
                    "target_faces_index names the same target face twice",
                    code="duplicate_index",
                    field="target_faces_index",
                )
            prepared = self.engine.prepare_sources(sources, swap_idx, NullControl())
        control.progress(5)

        width, height = _even_size(info.width, info.height, max_side)
        frames_done = frames_with_faces = 0
        total = max(info.frames, 1)
        try:
            with av.open(str(video)) as src, av.open(str(output), "w", format="mp4") as dst:
                in_video = src.streams.video[0]
                in_audio = src.streams.audio[0] if src.streams.audio else None
                in_video.thread_type = "AUTO"
                rate = in_video.average_rate or in_video.guessed_rate or Fraction(25)
                out_video = dst.add_stream("libx264", rate=rate)
                out_video.width, out_video.height = width, height
                out_video.pix_fmt = "yuv420p"
                out_video.time_base = in_video.time_base
                out_video.options = {"crf": str(self.crf), "preset": self.preset}
                out_audio: Any = None
                copy_audio = False
                if in_audio is not None:
                    copy_audio = in_audio.codec_context.name in MP4_AUDIO
                    if copy_audio:
                        out_audio = dst.add_stream_from_template(in_audio)
                    else:
                        out_audio = dst.add_stream("aac", rate=in_audio.codec_context.sample_rate or 44100)
                streams = [in_video] + ([in_audio] if in_audio is not None else [])
                for packet in src.demux(*streams):
                    if packet.stream.type == "audio":
                        if copy_audio:
                            if packet.dts is None:
                                continue  # the demuxer's flush packet carries no data
                            packet.stream = out_audio
                            dst.mux(packet)
                        else:
                            for sound in packet.decode():
                                if isinstance(sound, av.AudioFrame):
                                    sound.pts = None  # the encoder counts its own samples
                                    dst.mux(out_audio.encode(sound))
                        continue
                    for frame in packet.decode():
                        if not isinstance(frame, av.VideoFrame):
                            continue
                        check_stop(control)
                        rgb: np.ndarray = frame.to_ndarray(format="rgb24")
                        if rgb.shape[1] != width or rgb.shape[0] != height:
                            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
                        swapped, hit = self._swap_frame(rgb, prepared, targets, max_faces, sharpen, upscaler)
                        frames_with_faces += hit
                        out = av.VideoFrame.from_ndarray(swapped, format="rgb24")
                        out.pts, out.time_base = frame.pts, frame.time_base
                        dst.mux(out_video.encode(out))
                        frames_done += 1
                        control.progress(5 + 90 * min(1.0, frames_done / total))
                dst.mux(out_video.encode(None))
                if out_audio is not None and not copy_audio:
                    dst.mux(out_audio.encode(None))
        except (InvalidInput, EngineError):
            raise
        except av.FFmpegError as exc:
            raise EngineError(f"video processing failed: {exc}", code="video_failed") from exc
        if frames_done == 0:
            raise InvalidInput("the video has no frames", field="target_url")
        if frames_with_faces == 0:
            raise InvalidInput(
                "no face was found in any frame of the target video",
                code="no_face_in_target",
                field="target_url",
            )
        control.progress(100)
        meta = {
            "width": width,
            "height": height,
            "frames": frames_done,
            "frames_with_faces": frames_with_faces,
            "fps": float(rate),
            "audio": in_audio is not None,
            "audio_copied": copy_audio,
            "sharpen": sharpen,
            "upscaled": upscaler is not None,
            **self.engine.run_meta(),
        }
        return EngineResult(backend=self.backend, files=[OutputFile(Path(output), "mp4", meta)])

    def _swap_frame(
        self,
        rgb: np.ndarray,
        prepared: list[Any],
        targets: list[int] | None,
        max_faces: int,
        sharpen: float,
        upscaler: Upscaler | None,
    ) -> tuple[np.ndarray, bool]:
        faces = self.engine.detect(rgb)
        if targets is None:
            chosen = faces if max_faces == 0 else keep_largest(faces, max_faces)
            pairs = [(prepared[0], faces.index(face)) for face in chosen]
        else:
            # A face named by index but missing in this frame (turned away, out of shot) is
            # skipped for this frame only.
            pairs = [(p, t) for p, t in zip(prepared, targets, strict=True) if t < len(faces)]
        if not pairs:
            return rgb, False
        return self.engine.swap_onto(rgb, faces, pairs, sharpen=sharpen, upscaler=upscaler), True
