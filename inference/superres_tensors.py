"""The image work around a super-resolution network, done where the network runs.

An 8-bit plane goes to the device as uint8 (a quarter of the bytes of fp32), is normalised,
reordered to NCHW and cast there; an output that needs nothing but rounding is clamped, rounded
and cast to uint8 there too, and comes back in one copy, into pinned memory on CUDA so the copy
is a plain DMA. A tiled run writes each tile's centre into an output canvas on the device and
waits for the device once, at the end, instead of once per tile.

Every conversion gives, bit for bit, what the engine's host-side float32 arithmetic gave before
it moved here: inputs go through a 256-entry table computed by the very numpy expression the host
used (CUDA divides by a Python scalar as a multiply by its reciprocal, which is one ulp off for
126 of the 256 byte values in fp32); outputs are multiplied by 255 in float32, rounded half to
even and clipped, as ``np.clip(np.rint(x * 255), 0, 255)`` did. Only the network's own arithmetic
may differ between devices.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from inference.base import RunControl, check_stop

Network = Callable[[torch.Tensor], torch.Tensor]


class DevicePass:
    """Runs one image-to-image network on its device, fed and read as the module says.

    A plane is an HxWx3 or HxW (grey, sent as three equal channels) numpy array, uint8 or float32
    in [0, 1]. A result comes back as uint8 HxWx3 when it is asked ``quantize``d, else as float32
    HxWx3 in [0, 1], always C-contiguous (numpy's matmul sums a strided view in another order, so
    the layout is fixed for the host-side finishing to give stable results).

    On CUDA the network runs in ``channels_last`` when asked (tensor-core convolutions read NHWC
    natively, and an image uploaded as HWC already is NHWC, so the input needs no reorder), and
    with ``cudnn.benchmark`` on during its passes. On the CPU both are off: there is no cuDNN,
    and NHWC input makes oneDNN sum in another order, so CPU results would drift from the host
    float path they match bit for bit (the GPU's never did: its convolutions are cuDNN's anyway).
    """

    def __init__(
        self,
        network: Network,
        *,
        device: torch.device,
        dtype: torch.dtype,
        scale: int,
        channels_last: bool = True,
        cudnn_benchmark: bool = True,
    ):
        self._network = network
        self.device = device
        self.dtype = dtype
        self.scale = scale
        self._cuda = device.type == "cuda"
        self.channels_last = self._cuda and channels_last
        self._memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self._cudnn_benchmark = self._cuda and cudnn_benchmark
        # byte value -> model input, cast to the model's dtype from float32 as the host's array was.
        unit = np.arange(256, dtype=np.float32) / 255.0
        self._unit = torch.from_numpy(unit).to(device, dtype)
        self._cpu_forward_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def reset_clock(self) -> None:
        self._cpu_forward_s = 0.0
        self._events.clear()

    @property
    def forward_s(self) -> float:
        """Seconds the network ran since ``reset_clock``. On CUDA it is read from events recorded
        around each pass, so measuring adds no synchronisation; read it once the results are back."""
        seconds = self._cpu_forward_s
        for start, end in self._events:
            end.synchronize()
            seconds += start.elapsed_time(end) / 1000
        return seconds

    def run_batch(self, planes: Sequence[np.ndarray], quantize: Sequence[bool]) -> list[np.ndarray]:
        """One forward pass over same-size planes."""
        with self._running():
            batch = torch.cat([self._to_input(plane) for plane in planes])
            result = self._forward(batch.contiguous(memory_format=self._memory_format))
            outputs: dict[int, np.ndarray] = {}
            # At most two copies back: the rounded results together, the float ones together.
            for as_uint8 in (True, False):
                picked = [k for k, wanted in enumerate(quantize) if wanted == as_uint8]
                if not picked:
                    continue
                part = result if len(picked) == len(planes) else result[picked]  # indexing copies
                batch_size, _, height, width = part.shape
                host = self._to_host(
                    _write_hwc(part, self._canvas(batch_size, height, width, as_uint8), as_uint8)
                )
                outputs.update(zip(picked, host, strict=True))
            return [outputs[k] for k in range(len(planes))]

    def run_tiled(
        self,
        plane: np.ndarray,
        *,
        quantize: bool,
        tile_size: int | None,
        overlap: int,
        control: RunControl,
        span: tuple[float, float],
    ) -> tuple[np.ndarray, int]:
        """Run the network over one plane in tiles of at most ``tile_size`` input pixels (``None``
        never tiles), each extended by ``overlap`` pixels of context on every side; returns the
        native-scale result and the number of tiles."""
        height, width = plane.shape[:2]
        n = self.scale
        boxes = [
            (y0, y1, x0, x1) for y0, y1 in _splits(height, tile_size) for x0, x1 in _splits(width, tile_size)
        ]
        with self._running():
            image = self._to_input(plane)
            canvas = self._canvas(1, height * n, width * n, quantize)[0]
            for done, (y0, y1, x0, x1) in enumerate(boxes):
                check_stop(control)
                py0, py1 = max(y0 - overlap, 0), min(y1 + overlap, height)
                px0, px1 = max(x0 - overlap, 0), min(x1 + overlap, width)
                result = self._forward(image[:, :, py0:py1, px0:px1])
                # Keep only the tile's own area: the overlap served as context for the network.
                core = result[0, :, (y0 - py0) * n : (y1 - py0) * n, (x0 - px0) * n : (x1 - px0) * n]
                _write_hwc(core, canvas[y0 * n : y1 * n, x0 * n : x1 * n], quantize)
                # On CUDA this runs ahead of the device by as many tiles as its launch queue holds.
                control.progress(span[0] + (span[1] - span[0]) * (done + 1) / len(boxes))
            return self._to_host(canvas), len(boxes)

    @contextmanager
    def _running(self) -> Iterator[None]:
        with torch.inference_mode():
            if not self._cudnn_benchmark:
                yield
                return
            # Process-wide flag, set for this network's passes only: other engines in the worker
            # keep their own choice. cuDNN times its algorithms once per new conv shape.
            previous = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            try:
                yield
            finally:
                torch.backends.cudnn.benchmark = previous

    def _to_input(self, plane: np.ndarray) -> torch.Tensor:
        """A plane as a (1, 3, H, W) tensor of the model's dtype, in [0, 1], on the device."""
        host = torch.from_numpy(np.ascontiguousarray(plane))
        if self._cuda:
            host = host.pin_memory()  # so the upload is asynchronous
        values = host.to(self.device, non_blocking=True)
        if values.dtype == torch.uint8:
            values = torch.take(self._unit, values.long())
        else:
            values = values.to(self.dtype)  # 16-bit input, normalised on the host as float32
        if values.ndim == 2:
            values = values[..., None].expand(-1, -1, 3)
        return values.permute(2, 0, 1)[None].contiguous(memory_format=self._memory_format)

    def _canvas(self, batch_size: int, height: int, width: int, quantize: bool) -> torch.Tensor:
        """Where results are assembled: on the device, in their final layout and dtype."""
        dtype = torch.uint8 if quantize else torch.float32
        return torch.empty((batch_size, height, width, 3), dtype=dtype, device=self.device)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if not self._cuda:
            started = time.perf_counter()
            result = self._network(batch)
            self._cpu_forward_s += time.perf_counter() - started
            return result
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = self._network(batch)
        end.record()
        self._events.append((start, end))
        return result

    def _to_host(self, tensor: torch.Tensor) -> np.ndarray:
        """One copy to the host, into pinned memory on CUDA, then wait for the device."""
        if not self._cuda:
            return tensor.cpu().numpy()  # the canvas itself on the CPU: no copy
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.numpy()


def _write_hwc(planes: torch.Tensor, out: torch.Tensor, quantize: bool) -> torch.Tensor:
    """Write (..., 3, H, W) network output into ``out`` (..., H, W, 3), uint8 rounded exactly as
    the host's float32 ``clip(rint(x * 255), 0, 255)`` or float32, and return ``out``.

    Overwrites ``planes`` when they are float32 already: the callers pass outputs nobody reads
    again, and scaling in place spares a full-size temporary (fresh memory is slow on the CPU).
    """
    if quantize:
        planes = planes.float()
        planes.mul_(255).round_().clamp_(0, 255)  # whole numbers in [0, 255]: the cast is exact
    return out.copy_(planes.movedim(-3, -1))


def _splits(length: int, tile: int | None) -> list[tuple[int, int]]:
    """Cut ``length`` into near-equal parts of at most ``tile``, so no sliver tile is left over."""
    if tile is None or length <= tile:
        return [(0, length)]
    count = math.ceil(length / tile)
    edges = [round(i * length / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))
