"""``python -m bench.encode`` (the first line of ``make bench-gpu``): what encoding an output costs.

    python -m bench.encode                 # 512x512 and 2048x2048, 11 timed rounds
    python -m bench.encode --repeats 5 --sides 512

A job's time includes encoding its output image (``tasks.storage.encode_image``), which for a 2048x2048
PNG can rival the GPU work that made it. This times, on a real photo (``skimage.data.astronaut``,
512x512, and the same photo upscaled to 2048x2048 with Lanczos, as an upscaler's output would be):

- PIL PNG at ``compress_level`` 0, 1, 3 and 6 (``optimize=False``): lossless, checked by decoding;
- PIL JPEG quality 95 with 4:4:4 chroma (``subsampling=0``), the platform's JPEG, and with 4:2:0
  (``subsampling=2``) for comparison with torchvision's;
- PIL WebP quality 95 at ``method`` 0, 2, 4 (Pillow's default) and 6;
- ``torchvision.io.encode_jpeg`` quality 95 on a CPU tensor, and on a CUDA tensor (nvJPEG) when
  CUDA is available (skipped, and said so, otherwise). It always subsamples chroma 4:2:0 (it has
  no option for 4:4:4) and is deprecated since torchvision 0.29 (TorchCodec replaces it);
- ``tasks.storage.encode_image`` itself for png, jpg and webp: the defaults the platform uses.

Each codec runs once unmeasured, then ``--repeats`` rounds in which every codec runs once (so a
change in the machine's load hits all of them alike); the table has the median and the 10th..90th
percentile of the wall milliseconds, the median CPU milliseconds, the size in bytes, bytes per pixel
and the PSNR of the decoded pixels against the original (lossless encodings are checked to decode
exactly). Writes
``bench-results/bench-encode-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform as host_platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.stats import percentile
from tasks.storage import encode_image
from tests.support.platform import ROOT

PNG_LEVELS = (0, 1, 3, 6)
WEBP_METHODS = (0, 2, 4, 6)
CUDA_JPEG = "torchvision encode_jpeg q95 4:2:0 (CUDA, nvJPEG)"
QUALITY = 95


def photo(side: int) -> Any:
    """The astronaut photo (512x512 RGB) at ``side`` x ``side``, resized with Lanczos."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut())
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.LANCZOS)
    return image


def pil_encoder(fmt: str, **options: Any) -> Callable[[Any], bytes]:
    def encode(image: Any) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    return encode


def torchvision_jpeg(device: str) -> Callable[[Any], bytes]:
    """``torchvision.io.encode_jpeg`` of a tensor already on ``device`` (as an engine's output
    would be before it reaches the host): the timed part is the encode and the copy of the bytes
    back, not the upload of the pixels."""
    import numpy as np
    import torch
    from torchvision.io import encode_jpeg

    tensors: dict[int, Any] = {}

    def encode(image: Any) -> bytes:
        key = id(image)
        if key not in tensors:
            tensors.clear()
            tensors[key] = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().to(device)
        out = encode_jpeg(tensors[key], quality=QUALITY)
        assert isinstance(out, torch.Tensor)
        return bytes(out.cpu().numpy().tobytes())

    return encode


def codecs(cuda: bool) -> list[tuple[str, bool, Callable[[Any], bytes]]]:
    """(name, lossless, encode) for every variant measured."""
    found: list[tuple[str, bool, Callable[[Any], bytes]]] = [
        (f"PIL PNG level {level}", True, pil_encoder("PNG", optimize=False, compress_level=level))
        for level in PNG_LEVELS
    ]
    found.append(("PIL JPEG q95 4:4:4", False, pil_encoder("JPEG", quality=QUALITY, subsampling=0)))
    found.append(("PIL JPEG q95 4:2:0", False, pil_encoder("JPEG", quality=QUALITY, subsampling=2)))
    found += [
        (f"PIL WebP q95 method {m}", False, pil_encoder("WEBP", quality=QUALITY, method=m))
        for m in WEBP_METHODS
    ]
    found.append(("torchvision encode_jpeg q95 4:2:0 (CPU tensor)", False, torchvision_jpeg("cpu")))
    if cuda:
        found.append((CUDA_JPEG, False, torchvision_jpeg("cuda")))
    for fmt in ("png", "jpg", "webp"):
        found.append((f"platform encode_image({fmt!r})", fmt == "png", _platform(fmt)))
    return found


def _platform(fmt: str) -> Callable[[Any], bytes]:
    return lambda image: encode_image(image, fmt)


def first_look(image: Any, encode: Callable[[Any], bytes], lossless: bool) -> dict[str, Any]:
    """The unmeasured first call (codec set-up, CUDA context, tensor upload): its size, and the
    PSNR of its decoded pixels against the original; a lossless codec must decode exactly."""
    import numpy as np
    from PIL import Image

    data = encode(image)
    original = np.asarray(image)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert(image.mode))
    if lossless and not np.array_equal(decoded, original):
        raise AssertionError("a lossless encoding did not decode to the same pixels")
    mse = float(np.mean((decoded.astype(np.float64) - original.astype(np.float64)) ** 2))
    return {
        "bytes": len(data),
        "bytes_per_pixel": round(len(data) / (image.width * image.height), 3),
        "lossless": lossless,
        "psnr_db": None if mse == 0 else round(10 * math.log10(255**2 / mse), 2),
    }


def timed(image: Any, encode: Callable[[Any], bytes]) -> tuple[float, float]:
    """Wall and CPU milliseconds of one encode (CPU time is what a busy shared machine distorts
    least; for the CUDA encoder it is only the host's share)."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    encode(image)
    return (time.perf_counter() - t0) * 1000, (time.process_time() - cpu0) * 1000


def summarize(wall: list[float], cpu: list[float]) -> dict[str, Any]:
    def at(samples: list[float], q: float) -> float:
        return round(percentile(samples, q) or 0.0, 2)

    return {
        "ms_median": at(wall, 50),
        "ms_p10": at(wall, 10),
        "ms_p90": at(wall, 90),
        "cpu_ms_median": at(cpu, 50),
        "ms": [round(t, 2) for t in wall],
    }


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    header = (
        f"{'image':<10} {'codec':<50} {'ms median':>10} {'p10..p90':>17} {'cpu ms':>8} {'bytes':>11} "
        f"{'B/px':>6} {'PSNR dB':>8}"
    )
    lines = [header, "-" * len(header)]
    for label, rows in results.items():
        for name, r in rows.items():
            if "skipped" in r:
                lines.append(f"{label:<10} {name:<50} skipped: {r['skipped']}")
                continue
            spread = f"{r['ms_p10']:.1f}..{r['ms_p90']:.1f}"
            lines.append(
                f"{label:<10} {name:<50} {r['ms_median']:>10.1f} {spread:>17} {r['cpu_ms_median']:>8.1f} "
                f"{r['bytes']:>11,} {r['bytes_per_pixel']:>6.2f} "
                f"{'lossless' if r['psnr_db'] is None else format(r['psnr_db'], '.2f'):>8}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.encode", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=11, help="timed rounds over every codec and image (default 11)"
    )
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 2048], help="image sides (square)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="where the JSON goes")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    images = {f"{side}x{side}": photo(side) for side in args.sides}
    variants = codecs(cuda)
    results: dict[str, dict[str, dict[str, Any]]] = {label: {} for label in images}
    for label, image in images.items():
        for name, lossless, encode in variants:
            results[label][name] = first_look(image, encode, lossless)
    # Rounds: every codec once per round, so drift in the machine's load falls on all alike.
    wall: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    for turn in range(args.repeats):
        for label, image in images.items():
            for name, _lossless, encode in variants:
                w, c = timed(image, encode)
                wall.setdefault((label, name), []).append(w)
                cpu.setdefault((label, name), []).append(c)
        print(f"[encode] round {turn + 1}/{args.repeats}", file=sys.stderr)
    for (label, name), samples in wall.items():
        results[label][name].update(summarize(samples, cpu[label, name]))
    for label in images:
        if not cuda:
            results[label][CUDA_JPEG] = {"skipped": "no CUDA on this machine"}
    device = torch.cuda.get_device_name(0) if cuda else "none (CUDA not available)"
    report = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "image": "skimage.data.astronaut(), Lanczos-resized to each side",
        "repeats": args.repeats,
        "host": {
            "cpus": os.cpu_count(),
            "processor": host_platform.processor() or host_platform.machine(),
            "python": host_platform.python_version(),
            "torch": torch.__version__,
            "gpu": device,
            "loadavg": os.getloadavg(),
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-encode-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\naiorch bench-encode  cpus={os.cpu_count()}  gpu={device}  repeats={args.repeats}")
    print(table(results))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
