"""Super-resolution's image work on the device: uint8 up, uint8 back, tiles assembled there.

Moving the conversions off the host must not change a pixel. The reference below is the engine's
former host-side float32 path, written out: decode to float32 / 255 on the host, run the same
network (loaded by spandrel from the same file) tile by tile into a float32 canvas on the host,
then luma, Lanczos and ``clip(rint(x * 255), 0, 255)`` in numpy. On the CPU in fp32 the engine
must match it bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from spandrel import ModelLoader

from inference.superres import Upscaler, UpscaleRequest
from tests.inference.tiny_vision import TinyCompactNet, TinyRRDBNet, save_sr_checkpoint

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sr-device")
    torch.manual_seed(0)
    nets = {
        "rrdb-x4": (TinyRRDBNet(scale=4, num_block=1), "params_ema"),
        "rrdb-x2": (TinyRRDBNet(scale=2, num_block=1), "params_ema"),
        "compact-x4": (TinyCompactNet(scale=4), "params"),
        "identity-x4": (TinyCompactNet(scale=4).zero_residual(), "params"),
    }
    return {name: save_sr_checkpoint(net, folder / f"{name}.pth", key) for name, (net, key) in nets.items()}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 56x48 crop of a real photo (face edge, hair, fabric): plenty of values near .5 roundings."""
    return Image.fromarray(data.astronaut()[120:168, 200:256])


def legacy_native(path: Path, rgb: np.ndarray, tile: int | None, overlap: int) -> np.ndarray:
    """The former host path of one HxWx3 float32 plane: tiles into a float32 host canvas."""
    model = ModelLoader("cpu").load_from_file(path).eval()
    n = model.scale
    height, width = rgb.shape[:2]
    tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
    out = np.empty((height * n, width * n, 3), dtype=np.float32)

    def splits(length: int) -> list[tuple[int, int]]:
        count = 1 if tile is None or length <= tile else -(-length // tile)
        edges = [round(i * length / count) for i in range(count + 1)]
        return list(zip(edges[:-1], edges[1:], strict=True))

    for y0, y1 in splits(height):
        for x0, x1 in splits(width):
            py0, py1 = max(y0 - overlap, 0), min(y1 + overlap, height)
            px0, px1 = max(x0 - overlap, 0), min(x1 + overlap, width)
            with torch.inference_mode():
                result = model(tensor[:, :, py0:py1, px0:px1])[0].float()
            core = result[:, (y0 - py0) * n : (y1 - py0) * n, (x0 - px0) * n : (x1 - px0) * n]
            out[y0 * n : y1 * n, x0 * n : x1 * n] = core.permute(1, 2, 0).numpy()
    return out


def legacy_upscale(
    path: Path, image: Image.Image, scale: float, tile: int | None, overlap: int
) -> np.ndarray:
    """The former engine for L, RGB and RGBA (alpha through the model) images, as a uint8 array."""
    array = np.asarray(image).astype(np.float32) / 255.0
    size = (round(image.width * scale), round(image.height * scale))

    def resize(plane: np.ndarray) -> np.ndarray:
        if plane.shape[:2] == size[::-1]:
            return plane
        if plane.ndim == 3:
            return np.stack([resize(plane[..., c]) for c in range(plane.shape[2])], axis=2)
        return np.asarray(Image.fromarray(plane).resize(size, Image.Resampling.LANCZOS))

    def through_model(plane: np.ndarray) -> np.ndarray:
        rgb = np.repeat(plane[..., None], 3, axis=2) if plane.ndim == 2 else plane
        return legacy_native(path, rgb, tile, overlap)

    if image.mode == "L":
        planes = [resize(through_model(array) @ LUMA)]
    elif image.mode == "RGB":
        planes = [resize(through_model(array))]
    else:
        planes = [resize(through_model(array[..., :3])), resize(through_model(array[..., 3]) @ LUMA)]
    stacked = np.dstack(planes)
    out = np.clip(np.rint(stacked * 255), 0, 255).astype(np.uint8)
    return out[..., 0] if out.shape[2] == 1 else out


def with_alpha(photo: Image.Image) -> Image.Image:
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.asarray(photo)[..., 1]))  # varying: goes through the model
    return rgba


@pytest.mark.parametrize("model", ["rrdb-x4", "compact-x4", "rrdb-x2"])
@pytest.mark.parametrize(("tile", "overlap"), [(None, 0), (24, 6)])
def test_rgb_at_the_native_factor_is_bit_identical_to_the_former_host_float_path(
    weights, photo, model, tile, overlap
):
    upscaler = Upscaler(weights[model], tile_size=tile, tile_overlap=overlap)
    scale = upscaler.native_scale
    out = upscaler(photo, scale).images[0]

    expected = legacy_upscale(weights[model], photo, scale, tile, overlap)
    assert out.image.mode == "RGB" and out.meta["tiles"] == (1 if tile is None else 6)
    assert np.array_equal(np.asarray(out.image), expected)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
@pytest.mark.parametrize(("tile", "overlap"), [(None, 0), (24, 6)])
def test_alpha_and_grey_are_bit_identical_to_the_former_host_float_path(weights, photo, mode, tile, overlap):
    image = with_alpha(photo) if mode == "RGBA" else photo.convert("L")
    out = Upscaler(weights["rrdb-x4"], tile_size=tile, tile_overlap=overlap)(image, 4).images[0].image

    assert out.mode == mode
    assert np.array_equal(np.asarray(out), legacy_upscale(weights["rrdb-x4"], image, 4, tile, overlap))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_resized_outputs_are_bit_identical_to_the_former_host_float_path(weights, photo, mode):
    image = {"RGB": photo, "RGBA": with_alpha(photo), "L": photo.convert("L")}[mode]
    out = Upscaler(weights["compact-x4"], tile_size=24, tile_overlap=6)(image, 3).images[0].image

    assert out.mode == mode and out.size == (168, 144)
    assert np.array_equal(np.asarray(out), legacy_upscale(weights["compact-x4"], image, 3, 24, 6))


def test_constant_alpha_keeps_its_exact_value(weights, photo):
    image = photo.convert("RGBA")
    image.putalpha(128)
    out = Upscaler(weights["rrdb-x4"], tile_size=None)(image, 4).images[0].image

    assert out.mode == "RGBA" and set(np.unique(np.asarray(out.getchannel("A")))) == {128}
    assert np.array_equal(
        np.asarray(out.convert("RGB")), legacy_upscale(weights["rrdb-x4"], photo, 4, None, 0)
    )


def test_eight_bit_rgb_crosses_to_and_from_torch_as_uint8_only(weights, photo, monkeypatch):
    handed: list[np.dtype] = []
    returned: list[torch.dtype] = []
    from_numpy, to_numpy = torch.from_numpy, torch.Tensor.numpy

    def spy_from_numpy(array: np.ndarray) -> torch.Tensor:
        handed.append(array.dtype)
        return from_numpy(array)

    def spy_numpy(tensor: torch.Tensor, *args, **kwargs) -> np.ndarray:
        returned.append(tensor.dtype)
        return to_numpy(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "from_numpy", spy_from_numpy)
    monkeypatch.setattr(torch.Tensor, "numpy", spy_numpy)
    upscaler = Upscaler(weights["rrdb-x4"], tile_size=24, tile_overlap=6)
    handed.clear()  # loading the weights is not the image path
    returned.clear()
    upscaler(photo, 4)
    assert handed == [np.dtype(np.uint8)] and returned == [torch.uint8]

    # A grey image still comes back as float32 (its luma is taken on the host): the spies see it.
    handed.clear()
    returned.clear()
    upscaler(photo.convert("L"), 4)
    assert handed == [np.dtype(np.uint8)] and returned == [torch.float32]


def test_batched_eight_bit_rgb_comes_back_as_uint8_and_matches_single_runs(weights, photo):
    upscaler = Upscaler(weights["rrdb-x4"], tile_size=None)
    grey = photo.convert("L")
    outcomes = upscaler.upscale_batch([UpscaleRequest(photo, 4), UpscaleRequest(grey, 4)], max_batch=1)
    for image, outcome in zip((photo, grey), outcomes, strict=True):
        assert not isinstance(outcome, Exception), outcome
        single = upscaler(image, 4).images[0].image
        assert np.array_equal(np.asarray(outcome.images[0].image), np.asarray(single))


def test_cuda_only_settings_leave_a_cpu_run_untouched(weights, photo):
    benchmark = torch.backends.cudnn.benchmark
    upscaler = Upscaler(weights["rrdb-x4"], device="cpu", channels_last=True, cudnn_benchmark=True)
    upscaler(photo, 4)
    convs = [m.weight for m in upscaler.network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous() for w in convs)  # NCHW, not channels_last
    assert torch.backends.cudnn.benchmark == benchmark


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [None, 24])
def test_identity_network_returns_exactly_the_nearest_upscaled_pixels(weights, photo, device, tile):
    # x / 255 survives fp16 well enough to round back to x, so this is exact on CUDA in fp16 too:
    # it checks upload, normalisation, channels_last, tiling on the device and the pinned copy.
    upscaler = Upscaler(weights["identity-x4"], device=device, tile_size=tile, tile_overlap=6)
    result = upscaler(photo, 4).images[0]

    expected = np.kron(np.asarray(photo), np.ones((4, 4, 1), dtype=np.uint8))
    assert np.array_equal(np.asarray(result.image), expected)
    assert 0 < result.meta["timing"]["forward_s"] <= result.meta["timing"]["engine_s"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_out_of_memory_still_retries_with_smaller_tiles_and_halves_batches(weights):
    image = Image.fromarray(data.astronaut()[:300, :300])
    upscaler = Upscaler(weights["identity-x4"], device="cuda", tile_size=512, tile_overlap=8)
    seen: list[tuple[int, ...]] = []

    def refuse_large(_module, args):
        seen.append(tuple(args[0].shape))
        if args[0].shape[0] > 1 or max(args[0].shape[2:]) > 200:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = upscaler.network.register_forward_pre_hook(refuse_large)
    try:
        tiled = upscaler(image, 4).images[0]
        small = Image.fromarray(data.astronaut()[:40, :40])
        batched = upscaler.upscale_batch([UpscaleRequest(small, 4), UpscaleRequest(small, 4)])
    finally:
        hook.remove()
    assert tiled.meta["tiles"] == 4  # 300 px: refused whole, then run as 150 px tiles
    expected = np.kron(np.asarray(image), np.ones((4, 4, 1), dtype=np.uint8))
    assert np.array_equal(np.asarray(tiled.image), expected)
    assert [o.images[0].meta["batch_size"] for o in batched] == [2, 2]  # type: ignore[union-attr]
    assert (2, 3, 40, 40) in seen and seen.count((1, 3, 40, 40)) == 2
