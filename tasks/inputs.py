"""Fetching and checking input images, on the cpu queue, before any engine sees them.

Three rules hold for every input: the bytes come from an allowed place (no private, loopback or
link-local address unless ``AIORCH_ALLOW_PRIVATE_URLS``, checked on the address actually dialled,
so DNS rebinding cannot slip past), they stay under a byte cap while streaming, and the image's
header is checked for format and pixel count before it is decoded, so a decompression bomb never
gets expanded.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import urllib3
from PIL import Image, ImageOps
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from config import Settings

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
    """The input is unusable: the job fails with this code, naming the field."""

    def __init__(self, code: str, message: str, field: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": {"field": self.field}}


class TransientFetchError(Exception):
    """A network failure worth retrying (timeout, reset, 5xx, 429)."""


class FetchCancelled(Exception):
    pass


class PrivateAddressError(urllib3.exceptions.HTTPError):
    pass


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _PinnedMixin:
    """Resolve once, refuse non-public addresses, then dial exactly the address that was checked."""

    _dns_host: str
    port: int

    def _new_conn(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self._dns_host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise urllib3.exceptions.NameResolutionError(self._dns_host, self, exc) from exc  # type: ignore[arg-type]
        addresses: list[str] = []
        for *_, sockaddr in infos:
            address = sockaddr[0]
            # A Python built without IPv6 reports an AF_INET6 address as (int, bytes): it can be
            # neither checked nor dialled, so it is refused like a private one.
            if not isinstance(address, str) or not _is_public(address):
                raise PrivateAddressError(f"{self._dns_host} resolves to a non-public address ({address})")
            addresses.append(address)
        self._dns_host = addresses[0]
        return super()._new_conn()  # type: ignore[misc]


class _PinnedHTTPConnection(_PinnedMixin, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedMixin, HTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


def http_pool(allow_private: bool) -> urllib3.PoolManager:
    pool = urllib3.PoolManager(num_pools=20, maxsize=4, retries=False)
    if not allow_private:
        pool.pool_classes_by_scheme = {"http": _PinnedHTTPPool, "https": _PinnedHTTPSPool}
    return pool


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    ext: str
    width: int
    height: int


class Fetcher:
    """Loads input references (http(s), ``data:``, ``asset://``) into checked bytes."""

    def __init__(self, settings: Settings, resolve_asset: Callable[[str], Path | None] | None = None):
        self.settings = settings
        self.pool = http_pool(settings.allow_private_urls)
        self.resolve_asset = resolve_asset
        self._video_fetcher: Fetcher | None = None

    def load(self, ref: str, field: str, should_stop: Callable[[], bool] = lambda: False) -> CheckedImage:
        return check_image(self._bytes(ref, field, should_stop), field, self.settings)

    def load_video(
        self, ref: str, field: str, should_stop: Callable[[], bool] = lambda: False
    ) -> CheckedVideo:
        """A video input: fetched under the video byte cap, then probed (see ``check_video``)."""
        if self._video_fetcher is None:
            # The same fetch rules with the videos' own byte cap.
            self._video_fetcher = Fetcher(
                self.settings.with_overrides(max_input_bytes=self.settings.max_video_bytes),
                self.resolve_asset,
            )
        data = self._video_fetcher._bytes(ref, field, should_stop)
        return check_video(data, field, self.settings)

    def _bytes(self, ref: str, field: str, should_stop: Callable[[], bool]) -> bytes:
        if ref.startswith("data:"):
            return self._data_uri(ref, field)
        if ref.startswith("asset://"):
            return self._asset(ref, field)
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

    def _asset(self, ref: str, field: str) -> bytes:
        asset_id = ref[len("asset://") :]
        path = self.resolve_asset(asset_id) if self.resolve_asset else None
        if path is None or not path.is_file():
            raise InputProblem("input_not_found", f"asset {asset_id!r} does not exist", field)
        if path.stat().st_size > self.settings.max_input_bytes:
            raise InputProblem(
                "input_too_large", f"the input is over {self.settings.max_input_bytes} bytes", field
            )
        return path.read_bytes()

    def _http(self, url: str, field: str, should_stop: Callable[[], bool]) -> bytes:
        deadline = time.monotonic() + self.settings.fetch_timeout * 2
        timeout = urllib3.Timeout(
            connect=min(5.0, self.settings.fetch_timeout), read=self.settings.fetch_timeout
        )
        for _ in range(MAX_REDIRECTS + 1):
            scheme = urlsplit(url).scheme
            if scheme not in ("http", "https"):
                raise InputProblem("invalid_input", f"unsupported URL scheme {scheme!r}", field)
            try:
                response = self.pool.request(
                    "GET",
                    url,
                    preload_content=False,
                    redirect=False,
                    timeout=timeout,
                    headers={"User-Agent": "aiorch-fetch/1"},
                )
            except PrivateAddressError as exc:
                raise InputProblem("private_address", f"refused: {exc}", field) from None
            except urllib3.exceptions.MaxRetryError as exc:
                if isinstance(exc.reason, PrivateAddressError):
                    raise InputProblem("private_address", f"refused: {exc.reason}", field) from None
                if isinstance(exc.reason, urllib3.exceptions.NameResolutionError):
                    raise InputProblem(
                        "input_unreachable", f"cannot resolve the host of {url}", field
                    ) from None
                raise TransientFetchError(f"cannot reach {url}: {exc.reason}") from None
            except urllib3.exceptions.HTTPError as exc:
                raise TransientFetchError(f"cannot reach {url}: {exc}") from None
            try:
                if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                    url = urljoin(url, response.headers["Location"])
                    continue
                if response.status == 429 or response.status >= 500:
                    raise TransientFetchError(f"{url} answered HTTP {response.status}")
                if response.status == 404 or response.status == 410:
                    raise InputProblem("input_not_found", f"{url} answered HTTP {response.status}", field)
                if response.status >= 400:
                    raise InputProblem("input_http_error", f"{url} answered HTTP {response.status}", field)
                return self._read_capped(response, url, field, deadline, should_stop)
            finally:
                response.release_conn()
        raise InputProblem("invalid_input", f"more than {MAX_REDIRECTS} redirects", field)

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
                    raise TransientFetchError(f"downloading {url} took too long")
                # A cancel must not wait for a slow download to end; check twice a second.
                if now - last_check > 0.5:
                    last_check = now
                    if should_stop():
                        raise FetchCancelled()
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError) as exc:
            raise TransientFetchError(f"downloading {url} failed: {exc}") from None
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
