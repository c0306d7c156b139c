"""Real-ESRGAN-family upscaling: tiny random-weight networks saved as the official checkpoints are,
loaded through spandrel, run on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference.base import Cancelled, EngineError, InvalidInput
from inference.lanczos import LanczosUpscaler
from inference.superres import Upscaler, choose_sr_model, default_upscaler
from tests.inference.tiny_vision import (
    TinyCompactNet,
    TinyRRDBNet,
    reference_upscale,
    save_sr_checkpoint,
    smooth_rgb,
)


@pytest.fixture(scope="module")
def nets() -> dict[str, tuple[torch.nn.Module, str]]:
    """One tiny network per official model, with the key its official file wraps weights in."""
    torch.manual_seed(0)
    return {
        "RealESRGAN_x4plus": (TinyRRDBNet(scale=4, num_block=1), "params_ema"),
        "RealESRGAN_x2plus": (TinyRRDBNet(scale=2, num_block=1), "params_ema"),
        "RealESRGAN_x4plus_anime_6B": (TinyRRDBNet(scale=4, num_feat=8, num_block=6), "params_ema"),
        "realesr-general-x4v3": (TinyCompactNet(scale=4), "params"),
        "identity-x4v3": (TinyCompactNet(scale=4).zero_residual(), "params"),
    }


@pytest.fixture(scope="module")
def weights(nets, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sr")
    return {name: save_sr_checkpoint(net, folder / f"{name}.pth", key) for name, (net, key) in nets.items()}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(smooth_rgb(40, 48))


def as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float32) / 255.0


class RecordingControl:
    def __init__(self, stop_after: int | None = None):
        self.reports: list[float] = []
        self.stop_after = stop_after

    def progress(self, percent: float) -> None:
        self.reports.append(percent)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.reports) > self.stop_after


@pytest.mark.parametrize(
    ("model_id", "native"),
    [("RealESRGAN_x4plus", 4), ("RealESRGAN_x2plus", 2), ("RealESRGAN_x4plus_anime_6B", 4)],
)
def test_rrdb_checkpoints_load_with_their_native_factor_and_compute_the_reference_network(
    nets, weights, photo, model_id, native
):
    upscaler = Upscaler(weights[model_id], model_id=model_id, tile_size=None)
    result = upscaler(photo, native)

    out = result.images[0].image
    assert upscaler.native_scale == native and upscaler.arch == "rrdb"
    assert out.size == (48 * native, 40 * native) and out.mode == "RGB"
    assert result.backend == f"realesrgan:{model_id}"
    expected = reference_upscale(nets[model_id][0], as_float(photo))
    assert np.abs(as_float(out) - expected).max() <= 1 / 255 + 1e-6


def test_compact_general_model_wrapped_in_params_loads_and_matches_reference(nets, weights, photo):
    upscaler = Upscaler(weights["realesr-general-x4v3"], tile_size=None)
    result = upscaler(photo, 4)

    assert upscaler.arch == "compact" and upscaler.native_scale == 4
    assert result.backend == "realesrgan:realesr-general-x4v3"  # id defaults to the file stem
    expected = reference_upscale(nets["realesr-general-x4v3"][0], as_float(photo))
    assert np.abs(as_float(result.images[0].image) - expected).max() <= 1 / 255 + 1e-6


def test_non_native_scale_runs_the_native_factor_then_resizes(weights, photo):
    upscaler = Upscaler(weights["identity-x4v3"], tile_size=None)
    result = upscaler(photo, 3)

    out = result.images[0].image
    assert out.size == (144, 120)
    assert result.images[0].meta["native_scale"] == 4 and result.images[0].meta["scale"] == 3
    # The identity network is a nearest x4; brought down to x3 it must look like a plain x3 resize.
    plain = photo.resize(out.size, Image.Resampling.LANCZOS)
    assert np.abs(as_float(out) - as_float(plain)).mean() < 2 / 255


def test_fractional_scale_rounds_the_output_size(weights, photo):
    out = Upscaler(weights["RealESRGAN_x2plus"], tile_size=None)(photo, 1.5).images[0].image
    assert out.size == (72, 60)


def test_tiled_and_untiled_runs_agree_and_overlap_is_what_removes_the_seams(weights):
    image = Image.fromarray(smooth_rgb(40, 48, seed=3))
    path = weights["RealESRGAN_x4plus"]
    whole = as_float(Upscaler(path, tile_size=None)(image, 4).images[0].image)
    tiled = Upscaler(path, tile_size=16, tile_overlap=8)(image, 4)
    seamed = Upscaler(path, tile_size=16, tile_overlap=0)(image, 4)

    assert tiled.images[0].meta["tiles"] == 9
    inner = (slice(8, -8), slice(8, -8))
    assert np.abs(as_float(tiled.images[0].image) - whole)[inner].max() <= 1 / 255 + 1e-6
    # Without overlap the network sees zero padding at every tile edge; the test must notice that.
    assert np.abs(as_float(seamed.images[0].image) - whole)[inner].max() >= 3 / 255


def test_alpha_is_upscaled_separately_and_kept(weights, photo):
    rgba = photo.copy()
    ramp = np.tile(np.linspace(0, 255, 48, dtype=np.float32), (40, 1))
    rgba.putalpha(Image.fromarray(ramp.astype(np.uint8)))

    by_lanczos = Upscaler(weights["RealESRGAN_x4plus"], tile_size=None, alpha_upsampler="lanczos")(rgba, 2)
    by_model = Upscaler(weights["identity-x4v3"], tile_size=None)(rgba, 4)

    out = by_lanczos.images[0].image
    assert out.mode == "RGBA" and out.size == (96, 80)
    expected_alpha = np.asarray(rgba.getchannel("A").resize((96, 80), Image.Resampling.LANCZOS))
    assert np.abs(np.asarray(out.getchannel("A")).astype(int) - expected_alpha).max() <= 1
    # The colour must not be changed by carrying alpha along.
    plain = Upscaler(weights["RealESRGAN_x4plus"], tile_size=None)(photo, 2).images[0].image
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(plain))

    model_out = by_model.images[0].image
    nearest = rgba.getchannel("A").resize((192, 160), Image.Resampling.NEAREST)
    assert model_out.mode == "RGBA"
    assert np.abs(np.asarray(model_out.getchannel("A")).astype(int) - np.asarray(nearest)).max() <= 1


def test_opaque_alpha_stays_fully_opaque(weights, photo):
    out = Upscaler(weights["RealESRGAN_x4plus"], tile_size=None)(photo.convert("RGBA"), 2).images[0].image
    assert out.mode == "RGBA" and np.asarray(out.getchannel("A")).min() == 255


def test_sixteen_bit_greyscale_keeps_sixteen_bit_precision(weights):
    # Values on a fine ramp, most of them not representable in 8 bits.
    ramp = np.linspace(1000, 64000, 24 * 20).reshape(20, 24).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"

    out = Upscaler(weights["identity-x4v3"], tile_size=None)(image, 4).images[0].image
    values = np.asarray(out).astype(np.int64)
    expected = np.kron(ramp.astype(np.int64), np.ones((4, 4), dtype=np.int64))
    assert out.mode == "I;16" and out.size == (96, 80)
    assert np.abs(values - expected).max() <= 2
    assert np.count_nonzero(values % 257) > values.size // 2  # not squeezed through 8 bits


def test_greyscale_stays_greyscale(weights, photo):
    grey = photo.convert("L")
    out = Upscaler(weights["identity-x4v3"], tile_size=None)(grey, 4).images[0].image
    assert out.mode == "L" and out.size == (192, 160)
    nearest = grey.resize((192, 160), Image.Resampling.NEAREST)
    assert np.abs(np.asarray(out).astype(int) - np.asarray(nearest)).max() <= 1


def test_palette_and_grey_alpha_images_are_handled(weights, photo):
    upscaler = Upscaler(weights["RealESRGAN_x2plus"], tile_size=None)
    assert upscaler(photo.convert("P"), 2).images[0].image.mode == "RGB"
    assert upscaler(photo.convert("LA"), 2).images[0].image.mode == "LA"


@pytest.mark.parametrize("scale", [1, 0.5, 4.5])
def test_scale_outside_one_to_four_is_refused(weights, photo, scale):
    with pytest.raises(InvalidInput) as caught:
        Upscaler(weights["identity-x4v3"])(photo, scale)
    assert caught.value.field == "scale"


def test_too_small_image_is_refused(weights):
    with pytest.raises(InvalidInput, match="too small"):
        Upscaler(weights["identity-x4v3"])(Image.new("RGB", (4, 30)), 2)


def test_output_above_max_side_is_capped_to_it_keeping_the_aspect_ratio(weights, photo):
    upscaler = Upscaler(weights["identity-x4v3"], max_side=100)
    result = upscaler(photo, 3, control=RecordingControl())  # asks 144x120

    out = result.images[0]
    assert out.image.size == (100, 83)
    assert out.meta["capped"] is True and (out.meta["width"], out.meta["height"]) == (100, 83)
    assert upscaler(photo, 2).images[0].meta["capped"] is False  # 96x80 fits


def test_lanczos_caps_its_output_the_same_way():
    result = LanczosUpscaler(max_side=100)(Image.new("RGB", (48, 40)), 3)
    assert result.images[0].image.size == (100, 83) and result.images[0].meta["capped"] is True


def test_lanczos_keeps_sixteen_bit_greyscale_values_instead_of_clipping_them():
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)  # up to 61380
    out = LanczosUpscaler()(Image.fromarray(ramp), 2).images[0].image
    values = np.asarray(out)
    assert out.size == (64, 64) and values.dtype == np.uint16
    assert values.max() > 60000 and abs(float(values.mean()) - float(ramp.mean())) < 300


def test_native_intermediate_above_limit_is_refused(weights, photo):
    with pytest.raises(InvalidInput, match="too large"):
        Upscaler(weights["identity-x4v3"], max_native_pixels=10_000)(photo, 2)


def test_safetensors_weights_load_too(nets, tmp_path, photo):
    from safetensors.torch import save_file

    path = tmp_path / "realesr-general-x4v3.safetensors"
    save_file(nets["realesr-general-x4v3"][0].state_dict(), str(path))
    out = Upscaler(path, tile_size=None)(photo, 4).images[0].image
    expected = reference_upscale(nets["realesr-general-x4v3"][0], as_float(photo))
    assert np.abs(as_float(out) - expected).max() <= 1 / 255 + 1e-6


def test_files_that_are_not_real_esrgan_models_are_refused_clearly(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EngineError, match="not a readable Real-ESRGAN model file") as caught:
        Upscaler(garbage)
    assert caught.value.code == "invalid_model"

    unknown = tmp_path / "classifier.pth"
    torch.save({"params_ema": torch.nn.Linear(4, 2).state_dict()}, unknown)
    with pytest.raises(EngineError) as caught:
        Upscaler(unknown)
    assert caught.value.code == "invalid_model"

    with pytest.raises(EngineError) as caught:
        Upscaler(tmp_path / "missing.pth")
    assert caught.value.code == "model_not_found"


def test_face_enhance_without_a_restoration_model_is_a_clear_error(weights, photo):
    with pytest.raises(InvalidInput, match="no.*face-restoration|face-restoration model") as caught:
        Upscaler(weights["identity-x4v3"])(photo, 2, face_enhance=True)
    assert caught.value.field == "face_enhance"


def test_face_enhance_runs_the_given_restorer_and_names_it_in_backend(weights, photo):
    class Inverting:
        """Stands in for GFPGAN: any same-size RGB-to-RGB model satisfies the protocol."""

        name = "invert"

        def __call__(self, image):
            return Image.fromarray(255 - np.asarray(image))

    upscaler = Upscaler(weights["identity-x4v3"], face_restorer=Inverting())
    plain = upscaler(photo, 2).images[0].image
    result = upscaler(photo, 2, face_enhance=True)
    assert result.backend == "realesrgan:identity-x4v3+invert"
    assert np.array_equal(np.asarray(result.images[0].image), 255 - np.asarray(plain))


def test_progress_is_reported_per_tile_and_cancellation_stops_between_tiles(weights, photo):
    control = RecordingControl()
    Upscaler(weights["RealESRGAN_x4plus"], tile_size=16, tile_overlap=4)(photo, 2, control=control)
    assert control.reports == sorted(control.reports) and control.reports[-1] == 100
    assert len(control.reports) >= 9 + 1  # one report per tile, at least

    stopping = RecordingControl(stop_after=2)
    with pytest.raises(Cancelled):
        Upscaler(weights["RealESRGAN_x4plus"], tile_size=16, tile_overlap=4)(photo, 2, control=stopping)
    assert len(stopping.reports) == 3


def test_cpu_run_uses_fp32_and_reports_device(nets, weights, photo):
    upscaler = Upscaler(weights["realesr-general-x4v3"], device="cpu")
    meta = upscaler(photo, 2).images[0].meta
    assert upscaler.dtype == torch.float32
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    net = nets["realesr-general-x4v3"][0]
    assert upscaler.memory_bytes == sum(p.numel() * 4 for p in net.parameters())


def test_default_model_is_the_best_installed_candidate(weights, tmp_path):
    candidates = {
        "RealESRGAN_x4plus_anime_6B": weights["RealESRGAN_x4plus_anime_6B"],
        "RealESRGAN_x2plus": weights["RealESRGAN_x2plus"],
        "realesr-general-x4v3": weights["realesr-general-x4v3"],
        "RealESRGAN_x4plus": tmp_path / "not-installed.pth",
    }
    assert [m for m, _ in choose_sr_model(candidates, scale=4)] == [
        "realesr-general-x4v3",
        "RealESRGAN_x2plus",
        "RealESRGAN_x4plus_anime_6B",
    ]
    # For small factors the x2 model wins: a quarter of the trunk pixels and no downscale.
    assert choose_sr_model(candidates, scale=1.5)[0][0] == "RealESRGAN_x2plus"

    # The model store only allows lowercase ids; they rank like the official names.
    store_ids = {
        "realesrgan_x2plus": weights["RealESRGAN_x2plus"],
        "realesr_general_x4v3": weights["realesr-general-x4v3"],
    }
    assert [m for m, _ in choose_sr_model(store_ids, scale=3)] == [
        "realesr_general_x4v3",
        "realesrgan_x2plus",
    ]

    picked = default_upscaler(candidates, scale=4)
    assert isinstance(picked, Upscaler) and picked.backend == "realesrgan:realesr-general-x4v3"


def test_default_falls_back_past_broken_files_to_lanczos(tmp_path, photo):
    broken = tmp_path / "RealESRGAN_x4plus.pth"
    broken.write_bytes(b"\x00" * 64)
    picked = default_upscaler({"RealESRGAN_x4plus": broken, "realesr-general-x4v3": tmp_path / "absent.pth"})
    assert isinstance(picked, LanczosUpscaler)
    assert picked(photo, 2).backend == "lanczos"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runs_in_fp16_and_agrees_with_cpu(weights, photo):
    gpu = Upscaler(weights["RealESRGAN_x4plus"], device="cuda", tile_size=32)
    cpu = Upscaler(weights["RealESRGAN_x4plus"], device="cpu", tile_size=32)
    assert gpu.dtype == torch.float16
    out_gpu = as_float(gpu(photo, 4).images[0].image)
    out_cpu = as_float(cpu(photo, 4).images[0].image)
    assert np.abs(out_gpu - out_cpu).max() <= 3 / 255


def _batch_inputs() -> list[Image.Image]:
    """Four same-size images (two RGB, one grey, one with varying alpha) and one other size."""
    rgba = Image.fromarray(smooth_rgb(40, 48, seed=3)).convert("RGBA")
    rgba.putalpha(Image.fromarray(smooth_rgb(40, 48, seed=4)[..., 0]))
    return [
        Image.fromarray(smooth_rgb(40, 48, seed=1)),
        Image.fromarray(smooth_rgb(40, 48, seed=2)),
        Image.fromarray(smooth_rgb(40, 48, seed=5)).convert("L"),
        rgba,
        Image.fromarray(smooth_rgb(24, 32, seed=6)),
    ]


def test_batched_run_stacks_same_size_images_into_one_forward_and_matches_single_runs(weights):
    from inference.superres import UpscaleRequest

    upscaler = Upscaler(weights["RealESRGAN_x4plus"], model_id="RealESRGAN_x4plus")
    images = _batch_inputs()
    scales = [2, 4, 3, 2, 2]
    shapes: list[tuple[int, ...]] = []
    hook = upscaler.network.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    try:
        batched = upscaler.upscale_batch([UpscaleRequest(i, s) for i, s in zip(images, scales, strict=True)])
    finally:
        hook.remove()
    # Four 40x48 colour planes plus the RGBA image's alpha plane: one pass of 5; the 24x32 alone.
    assert sorted(shapes) == [(1, 3, 24, 32), (5, 3, 40, 48)]
    for image, scale, outcome in zip(images, scales, batched, strict=True):
        assert not isinstance(outcome, Exception), outcome
        single = upscaler(image, scale).images[0]
        got = outcome.images[0]
        assert got.image.size == single.image.size and got.image.mode == single.image.mode == image.mode
        assert np.abs(as_float(got.image) - as_float(single.image)).max() <= 1 / 255 + 1e-6
        assert got.meta["batch_size"] == (1 if image.size == (32, 24) else 5)
    assert upscaler(images[0], 2).images[0].meta["batch_size"] == 1


def test_batched_run_respects_max_batch_and_refuses_bad_requests_one_by_one(weights):
    from inference.superres import UpscaleRequest

    upscaler = Upscaler(weights["realesr-general-x4v3"], model_id="realesr-general-x4v3")
    good = [Image.fromarray(smooth_rgb(20, 20, seed=s)) for s in range(5)]
    requests = [UpscaleRequest(i, 2) for i in good] + [
        UpscaleRequest(Image.new("RGB", (4, 4)), 2),
        UpscaleRequest(good[0], 7),
    ]
    sizes: list[int] = []
    hook = upscaler.network.register_forward_hook(lambda _m, args, _o: sizes.append(args[0].shape[0]))
    try:
        outcomes = upscaler.upscale_batch(requests, max_batch=2)
    finally:
        hook.remove()
    assert sizes == [2, 2, 1]
    timing = outcomes[0].images[0].meta["timing"]  # type: ignore[union-attr]
    assert 0 < timing["forward_s"] <= timing["engine_s"] and timing["peak_device_bytes"] is None
    assert [o.images[0].meta["batch_size"] for o in outcomes[:5]] == [2, 2, 2, 2, 1]  # type: ignore[union-attr]
    assert isinstance(outcomes[5], InvalidInput) and "too small" in str(outcomes[5])
    assert isinstance(outcomes[6], InvalidInput) and outcomes[6].field == "scale"


def test_batched_run_tiles_large_images_alone_and_can_be_cancelled(weights):
    from inference.superres import UpscaleRequest

    upscaler = Upscaler(weights["identity-x4v3"], tile_size=32, tile_overlap=4)
    big, small = Image.fromarray(smooth_rgb(64, 64)), Image.fromarray(smooth_rgb(16, 16))
    outcomes = upscaler.upscale_batch([UpscaleRequest(big, 2), UpscaleRequest(small, 2)])
    assert [o.images[0].meta["tiles"] for o in outcomes] == [4, 1]  # type: ignore[union-attr]
    with pytest.raises(Cancelled):
        upscaler.upscale_batch([UpscaleRequest(small, 2)], control=RecordingControl(stop_after=0))
