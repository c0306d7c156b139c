"""Fetching and checking input images, on the cpu queue, before any engine sees them.

Three rules hold for every input: the bytes come from an allowed place (the SSRF guard of
``tasks/outbound.py``: no private, loopback or link-local address unless the operator allows it,
checked on the address actually dialled, so DNS rebinding cannot slip past), they stay under a
byte cap while streaming, and the image's header is checked for format and pixel count before it
is decoded, so a decompression bomb never gets expanded.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import urllib3
from PIL import Image, ImageOps

from config import Settings
from tasks.outbound import (
    PrivateAddressError,
    UnresolvableHost,
    UrlPolicy,
    describe_network_error,
    http_pool,
    refused_host_reason,
    tls_failure_reason,
)

ALLOWED_FORMATS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
    "GIF": "gif",
    "MPO": "jpg",
}
MAX_REDIRECTS = 5
CHUNK = 64 * 1024


class InputProblem(Exception):
    """The input is unusable: the job fails with this code, naming the field
    (``tasks.failures.failure_of``)."""

    def __init__(self, code: str, message: str, field: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class TransientFetchError(Exception):
    """A network failure worth retrying (timeout, reset, 5xx, 429) while fetching ``field``."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class FetchCancelled(Exception):
    pass


@dataclass(frozen=True)
class StoredAsset:
    """An ``asset://`` input as storage holds it: its recorded size (checked before any byte is
    read) and how to read it (None when the file is gone)."""

    size: int
    read: Callable[[], bytes | None]


# ``asset://<id>`` of a client -> its stored file, or None (missing, expired, or another client's).
ResolveAsset = Callable[[str, str], StoredAsset | None]


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    ext: str
    width: int
    height: int


class Fetcher:
    """Loads input references (http(s), ``data:``, ``asset://``) into checked bytes."""

    def __init__(self, settings: Settings, resolve_asset: ResolveAsset | None = None):
        self.settings = settings
        self.pool = http_pool(settings)
        self.url_policy = UrlPolicy.from_settings(settings)
        self.resolve_asset = resolve_asset
        self._video_fetcher: Fetcher | None = None

    def load(
        self,
        ref: str,
        field: str,
        should_stop: Callable[[], bool] = lambda: False,
        owner: str | None = None,
    ) -> CheckedImage:
        """``owner``: the client whose ``asset://`` ids may be read (none without it)."""
        return check_image(self._bytes(ref, field, should_stop, owner), field, self.settings)

    def load_video(
        self,
        ref: str,
        field: str,
        should_stop: Callable[[], bool] = lambda: False,
        owner: str | None = None,
    ) -> CheckedVideo:
        """A video input: fetched under the video byte cap, then probed (see ``check_video``)."""
        if self._video_fetcher is None:
            # The same fetch rules with the videos' own byte cap.
            self._video_fetcher = Fetcher(
                self.settings.with_overrides(max_input_bytes=self.settings.max_video_bytes),
                self.resolve_asset,
            )
        data = self._video_fetcher._bytes(ref, field, should_stop, owner)
        return check_video(data, field, self.settings)

    def _bytes(
        self, ref: str, field: str, should_stop: Callable[[], bool], owner: str | None = None
    ) -> bytes:
        if ref.startswith("data:"):
            return self._data_uri(ref, field)
        if ref.startswith("asset://"):
            return self._asset(ref, field, owner)
        return self._http(ref, field, should_stop)

    def _data_uri(self, ref: str, field: str) -> bytes:
        header, sep, body = ref.partition(",")
        if not sep:
            raise InputProblem("invalid_input", "the data: URI has no comma before its data", field)
        if len(body) > self.settings.max_input_bytes * 4 // 3 + 4:
            raise InputProblem(
                "input_too_large", f"the input is over {self.settings.max_input_bytes} bytes", field
            )
        try:
            if header.endswith(";base64"):
                return base64.b64decode(body, validate=True)
            return unquote_to_bytes(body)
        except (binascii.Error, ValueError):
            raise InputProblem("invalid_input", "the data: URI is not valid base64", field) from None

    def _asset(self, ref: str, field: str, owner: str | None) -> bytes:
        asset_id = ref[len("asset://") :]
        # Only the owner's assets resolve; another client's is "not found", word for word.
        found = self.resolve_asset(asset_id, owner) if self.resolve_asset and owner else None
        if found is None:
            raise InputProblem("input_not_found", f"asset {asset_id!r} does not exist", field)
        if found.size > self.settings.max_input_bytes:
            raise InputProblem(
                "input_too_large", f"the input is over {self.settings.max_input_bytes} bytes", field
            )
        data = found.read()
        if data is None:
            raise InputProblem("input_not_found", f"asset {asset_id!r} does not exist", field)
        return data

    def _http(self, url: str, field: str, should_stop: Callable[[], bool]) -> bytes:
        deadline = time.monotonic() + self.settings.fetch_timeout * 2
        timeout = urllib3.Timeout(
            connect=min(5.0, self.settings.fetch_timeout), read=self.settings.fetch_timeout
        )
        for _ in range(MAX_REDIRECTS + 1):
            self._check_url(url, field)
            try:
                response = self.pool.request(
                    "GET",
                    url,
                    preload_content=False,
                    redirect=False,
                    timeout=timeout,
                    headers={"User-Agent": "aiorch-fetch/1"},
                )
            except urllib3.exceptions.HTTPError as exc:
                raise self._failure(exc, url, field) from None
            try:
                if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                    url = urljoin(url, response.headers["Location"])
                    continue
                if response.status == 429 or response.status >= 500:
                    raise TransientFetchError(f"{url} answered HTTP {response.status}", field)
                if response.status == 404 or response.status == 410:
                    raise InputProblem("input_not_found", f"{url} answered HTTP {response.status}", field)
                if response.status >= 400:
                    raise InputProblem("input_http_error", f"{url} answered HTTP {response.status}", field)
                return self._read_capped(response, url, field, deadline, should_stop)
            finally:
                # An answer not read to its end (an error status, a redirect's body, a cap or a
                # cancel) leaves its kept-alive connection mid-stream: close it, or the next
                # request on it would fail.
                if not response.closed:
                    response.close()
                response.release_conn()
        raise InputProblem("invalid_input", f"more than {MAX_REDIRECTS} redirects", field)

    def _check_url(self, url: str, field: str) -> None:
        """Scheme and host, before any connection: the API's check, again on every redirect."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            raise InputProblem("invalid_input", f"{field} is not a valid URL", field) from None
        if parts.scheme not in ("http", "https"):
            raise InputProblem("invalid_input", f"unsupported URL scheme {parts.scheme!r}", field)
        if not host:
            raise InputProblem("invalid_input", f"{field} has no host", field)
        reason = refused_host_reason(host, self.url_policy)
        if reason is not None:
            raise InputProblem("private_address", f"refused: the host of {field} {reason}", field)

    def _failure(self, exc: urllib3.exceptions.HTTPError, url: str, field: str) -> Exception:
        """What a failed request means for the job: refusals and broken TLS are final (retrying
        cannot change them), anything else on the way is worth another try."""
        if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
            exc = exc.reason  # type: ignore[assignment]
        if isinstance(exc, UnresolvableHost):
            return InputProblem("input_unreachable", f"refused: the host of {field} {exc.reason}", field)
        if isinstance(exc, PrivateAddressError):
            return InputProblem("private_address", f"refused: the host of {field} {exc.reason}", field)
        if isinstance(exc, urllib3.exceptions.LocationParseError):
            return InputProblem("invalid_input", f"{field} is not a valid URL", field)
        if isinstance(exc, urllib3.exceptions.SSLError):
            # The certificate does not name the host, or no trusted CA signed it
            # (AIORCH_CA_BUNDLE adds CAs): a server's configuration, not a passing failure.
            reason = tls_failure_reason(exc)
            return InputProblem("input_tls_error", f"TLS with the host of {field} failed: {reason}", field)
        return TransientFetchError(f"cannot reach {url}: {describe_network_error(exc)}", field)

    def _read_capped(
        self, response: Any, url: str, field: str, deadline: float, should_stop: Callable[[], bool]
    ) -> bytes:
        cap = self.settings.max_input_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise InputProblem(
                "input_too_large", f"the input is {declared} bytes, over the {cap} limit", field
            )
        buffer = bytearray()
        last_check = time.monotonic()
        try:
            for chunk in response.stream(CHUNK):
                buffer.extend(chunk)
                if len(buffer) > cap:
                    raise InputProblem("input_too_large", f"the input is over the {cap} byte limit", field)
                now = time.monotonic()
                if now > deadline:
                    raise TransientFetchError(f"downloading {url} took too long", field)
                # A cancel must not wait for a slow download to end; check twice a second.
                if now - last_check > 0.5:
                    last_check = now
                    if should_stop():
                        raise FetchCancelled()
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError) as exc:
            raise TransientFetchError(
                f"downloading {url} failed: {describe_network_error(exc)}", field
            ) from None
        return bytes(buffer)


@dataclass(frozen=True)
class CheckedVideo:
    data: bytes
    ext: str
    width: int
    height: int
    frames: int
    duration: float
    has_audio: bool


# Containers a video input may come in (PyAV's format names) and the extension it is stored with.
VIDEO_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4", "matroska,webm": "mkv", "avi": "avi"}


def check_video(data: bytes, field: str, settings: Settings) -> CheckedVideo:
    """Container, byte size, pixel count and frame count from the header, before any decode."""
    if not data:
        raise InputProblem("input_not_video", "the input is empty", field)
    if len(data) > settings.max_video_bytes:
        raise InputProblem(
            "input_too_large", f"the video is over the {settings.max_video_bytes} byte limit", field
        )
    try:
        import av
    except ImportError:
        raise InputProblem(
            "video_unsupported", "this platform cannot read videos (install aiorch[video])", field
        ) from None
    try:
        with av.open(io.BytesIO(data), "r") as container:
            fmt = container.format.name
            if not container.streams.video:
                raise InputProblem("input_not_video", "the input has no video stream", field)
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / 1_000_000
            frames = int(stream.frames or round(duration * rate))
            has_audio = bool(container.streams.audio)
    except InputProblem:
        raise
    except Exception:  # av raises InvalidDataError and friends for anything it cannot demux
        raise InputProblem(
            "input_not_video", "the input is not a video in a supported format", field
        ) from None
    if fmt not in VIDEO_CONTAINERS:
        raise InputProblem("input_not_video", f"video container {fmt} is not supported", field)
    if width * height > settings.max_input_pixels or min(width, height) < settings.min_input_side:
        raise InputProblem("input_too_many_pixels", f"the video is {width}x{height}", field)
    if frames <= 0:
        raise InputProblem("input_not_video", "the video's length cannot be read from its header", field)
    if frames > settings.max_video_frames:
        raise InputProblem(
            "input_too_long",
            f"the video has {frames} frames, over the {settings.max_video_frames} frame limit",
            field,
        )
    return CheckedVideo(data, VIDEO_CONTAINERS[fmt], width, height, frames, duration, has_audio)


def decode_image(data: bytes) -> Image.Image:
    """The checked bytes as the picture a person sees: EXIF orientation applied.

    Phones store portraits as landscape pixels plus an Orientation tag; an engine given the raw
    pixels would find faces lying on their side and return boxes in the wrong frame.
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    return ImageOps.exif_transpose(image)


def check_image(data: bytes, field: str, settings: Settings) -> CheckedImage:
    """Format, pixel count and integrity, from the header first and only then a full decode."""
    if not data:
        raise InputProblem("input_not_image", "the input is empty", field)
    if len(data) > settings.max_input_bytes:
        raise InputProblem(
            "input_too_large", f"the input is over the {settings.max_input_bytes} byte limit", field
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format or ""
            width, height = image.size
    except Image.DecompressionBombError:
        raise InputProblem("input_too_many_pixels", "the image has too many pixels", field) from None
    except Exception:
        raise InputProblem(
            "input_not_image", "the input is not an image in a supported format", field
        ) from None
    if fmt not in ALLOWED_FORMATS:
        raise InputProblem("input_not_image", f"image format {fmt or 'unknown'} is not supported", field)
    if width * height > settings.max_input_pixels:
        raise InputProblem(
            "input_too_many_pixels",
            f"the image is {width}x{height}, over the {settings.max_input_pixels} pixel limit",
            field,
        )
    if min(width, height) < settings.min_input_side:
        raise InputProblem(
            "input_too_small",
            f"the image is {width}x{height}; the smallest side must be at least {settings.min_input_side} px",
            field,
        )
    try:
        image.load()
    except Exception:
        raise InputProblem("input_not_image", "the image data is truncated or corrupt", field) from None
    return CheckedImage(data, ALLOWED_FORMATS[fmt], width, height)
