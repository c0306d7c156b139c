"""Background removal: ONNX segmentation models written with the onnx helper API and run with
onnxruntime on CPU, and the weight-free GrabCut engine on a real photograph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from inference.background import BackgroundRemover, GrabCutBackgroundRemover
from inference.base import Cancelled, EngineError, InvalidInput
from tests.inference.tiny_vision import brightness_saliency_onnx


def bright_box(width: int = 80, height: int = 48) -> tuple[Image.Image, np.ndarray]:
    """A dark frame with a bright rectangle in it, and the rectangle's boolean mask."""
    pixels = np.full((height, width, 3), 20, np.uint8)
    inside = np.zeros((height, width), bool)
    inside[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True
    pixels[inside] = (230, 220, 210)
    return Image.fromarray(pixels), inside


@pytest.fixture(scope="module")
def u2net_like(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seg")
    return brightness_saliency_onnx(folder / "u2net.onnx", 64, extra_outputs=6)


@pytest.fixture(scope="module")
def birefnet_like(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seg")
    return brightness_saliency_onnx(folder / "birefnet.onnx", dynamic=True, logits=True)


class StopAtOnce:
    def progress(self, percent: float) -> None:
        pass

    def should_stop(self) -> bool:
        return True


def test_u2net_style_model_cuts_out_the_salient_region_into_rgba(u2net_like):
    image, inside = bright_box()
    remover = BackgroundRemover(u2net_like, family="u2net", device="cpu")
    result = remover(image)

    out = result.images[0].image
    alpha = np.asarray(out.getchannel("A"))
    assert result.backend == "onnx-segmentation:u2net"
    assert out.mode == "RGBA" and out.size == image.size
    assert remover.preset.size == 64  # taken from the model's fixed input shape
    # Away from the rectangle's edge (where the mask is resized) the cut is clean.
    core = np.zeros_like(inside)
    core[16:32, 24:56] = True
    assert alpha[core].min() >= 250
    assert alpha[:8].max() <= 5 and alpha[-8:].max() <= 5 and alpha[:, :12].max() <= 5
    # Colour is passed through untouched.
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(image))
    assert result.images[0].meta["device"] == "cpu" and remover.providers == ["CPUExecutionProvider"]


def test_main_output_is_the_first_of_several(u2net_like):
    # The side outputs of the test model are the inverse map; reading one of them would invert
    # the cut-out.
    image, inside = bright_box()
    alpha = np.asarray(BackgroundRemover(u2net_like)(image).images[0].image.getchannel("A"))
    assert alpha[inside].mean() > 200 and alpha[~inside].mean() < 40


def test_return_mask_adds_a_greyscale_mask_equal_to_the_alpha(u2net_like):
    image, _ = bright_box()
    result = BackgroundRemover(u2net_like)(image, return_mask=True)
    cutout, mask = result.images
    assert mask.image.mode == "L" and mask.meta["kind"] == "mask"
    assert np.array_equal(np.asarray(mask.image), np.asarray(cutout.image.getchannel("A")))


def test_logit_model_with_dynamic_input_gets_the_preset_size_and_a_sigmoid(birefnet_like):
    image, inside = bright_box()
    remover = BackgroundRemover(birefnet_like, family="birefnet", input_size=96)
    alpha = np.asarray(remover(image).images[0].image.getchannel("A")).astype(int)
    assert remover.preset.size == 96
    # gain 8 * normalised mean brightness: ~+15 inside, ~-14 outside; sigmoid maps them to ~1 and ~0.
    assert alpha[18:30, 30:50].min() >= 250 and alpha[:6].max() <= 5


def test_existing_transparency_of_the_input_is_kept(u2net_like):
    image, _ = bright_box()
    rgba = image.convert("RGBA")
    half = np.full((48, 80), 255, np.uint8)
    half[:, 40:] = 0
    rgba.putalpha(Image.fromarray(half))
    alpha = np.asarray(BackgroundRemover(u2net_like)(rgba).images[0].image.getchannel("A"))
    assert alpha[:, 40:].max() == 0 and alpha[20:28, 24:36].min() >= 250


def test_sixteen_bit_and_greyscale_inputs_are_accepted(u2net_like):
    image, _ = bright_box()
    grey16 = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    assert grey16.mode == "I;16"
    remover = BackgroundRemover(u2net_like)
    for variant in (grey16, image.convert("L")):
        out = remover(variant).images[0].image
        assert out.mode == "RGBA" and np.asarray(out.getchannel("A"))[20:28, 24:56].min() >= 250


def test_input_size_that_contradicts_a_fixed_model_shape_is_refused(u2net_like):
    with pytest.raises(EngineError, match="fixes its input at 64"):
        BackgroundRemover(u2net_like, input_size=320)


def test_files_that_are_not_onnx_models_are_refused_clearly(tmp_path):
    garbage = tmp_path / "u2net.onnx"
    garbage.write_bytes(b"\x08\x07 definitely not protobuf")
    with pytest.raises(EngineError, match="not a loadable ONNX segmentation model") as caught:
        BackgroundRemover(garbage)
    assert caught.value.code == "invalid_model"
    with pytest.raises(EngineError) as caught:
        BackgroundRemover(tmp_path / "absent.onnx")
    assert caught.value.code == "model_not_found"


def test_too_small_image_is_refused(u2net_like):
    with pytest.raises(InvalidInput, match="too small"):
        BackgroundRemover(u2net_like)(Image.new("RGB", (5, 40)))


def test_cancellation_is_honoured_before_inference(u2net_like):
    with pytest.raises(Cancelled):
        BackgroundRemover(u2net_like)(bright_box()[0], control=StopAtOnce())


def test_grabcut_on_a_real_photo_separates_the_subject_from_the_border():
    photo = Image.fromarray(skdata.astronaut())  # 512x512 portrait against flag and backdrop
    result = GrabCutBackgroundRemover(work_side=160)(photo, return_mask=True)

    cutout, mask = result.images
    alpha = np.asarray(mask.image)
    assert result.backend == "opencv-grabcut"
    assert cutout.image.mode == "RGBA" and cutout.image.size == (512, 512)
    ring = np.concatenate(
        [alpha[:16].ravel(), alpha[-16:].ravel(), alpha[:, :16].ravel(), alpha[:, -16:].ravel()]
    )
    assert (ring == 0).mean() > 0.95
    # The face sits at roughly rows 90-190, columns 170-250 of this photo.
    assert (alpha[90:190, 170:250] > 127).mean() > 0.6
    assert 0.1 < (alpha > 127).mean() < 0.7


def test_grabcut_cuts_a_box_from_a_plain_background():
    rng = np.random.default_rng(1)
    pixels = (rng.normal(60, 8, (64, 64, 3))).clip(0, 255).astype(np.uint8)
    pixels[16:48, 20:44] = rng.normal((200, 60, 40), 8, (32, 24, 3)).clip(0, 255).astype(np.uint8)
    alpha = np.asarray(GrabCutBackgroundRemover()(Image.fromarray(pixels)).images[0].image.getchannel("A"))
    assert alpha[18:46, 22:42].min() == 255
    outside = np.ones((64, 64), bool)
    outside[14:50, 18:46] = False
    assert alpha[outside].max() == 0


def test_grabcut_reports_an_image_with_nothing_to_cut_out():
    flat = Image.new("RGB", (48, 48), (90, 90, 90))
    with pytest.raises(EngineError, match="no foreground") as caught:
        GrabCutBackgroundRemover()(flat)
    assert caught.value.code == "no_foreground"


def test_grabcut_stops_when_cancelled():
    with pytest.raises(Cancelled):
        GrabCutBackgroundRemover()(Image.fromarray(skdata.astronaut()[::4, ::4]), control=StopAtOnce())


# -- which preset a file gets ------------------------------------------------------------------


def _with_mid_grey(level: int = 122) -> tuple[Image.Image, int]:
    """The bright box on a dark frame, plus a grey patch where a sigmoid and a stretched map
    disagree (the patch's normalised brightness gives a logit near +1)."""
    image, _ = bright_box(160, 96)
    pixels = np.asarray(image).copy()
    pixels[8:24, 8:40] = level
    return Image.fromarray(pixels), level


def _sigmoid_alpha(level: int, gain: float = 8.0) -> float:
    normalised = (level / 255.0 - np.array((0.485, 0.456, 0.406))) / np.array((0.229, 0.224, 0.225))
    return 255.0 / (1.0 + np.exp(-gain * normalised.mean()))


def test_family_comes_from_the_file_name_else_from_the_graph(tmp_path):
    from inference.model_files import segmentation_family

    named = {
        "BiRefNet-general-epoch_244.onnx": "birefnet",
        "RMBG-2.0.onnx": "birefnet",
        "rmbg-1.4.onnx": "rmbg",
        "isnet-general-use.onnx": "rmbg",
        "u2netp.onnx": "u2net",
    }
    for name, family in named.items():
        assert segmentation_family(brightness_saliency_onnx(tmp_path / name, 64)) == family, name
    graph = {
        "a.onnx": ({"size": 1024, "logits": True}, "birefnet"),  # one logit map at 1024 px
        "b.onnx": ({"size": 1024, "extra_outputs": 6}, "rmbg"),  # IS-Net: side outputs
        "c.onnx": ({"size": 320, "extra_outputs": 6}, "u2net"),
        "d.onnx": ({"dynamic": True}, None),  # nothing to tell by
    }
    for name, (options, family) in graph.items():
        assert segmentation_family(brightness_saliency_onnx(tmp_path / name, **options)) == family, name
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    assert segmentation_family(tmp_path / "junk.onnx") is None


def test_signature_reader_leaves_out_weights_that_old_exports_list_as_inputs(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from inference.model_files import read_onnx_signature

    path = brightness_saliency_onnx(tmp_path / "m.onnx", 1024, logits=True)
    model = onnx.load(str(path))
    model.graph.input.append(helper.make_tensor_value_info("gain", TensorProto.FLOAT, []))
    onnx.save(model, str(path))
    signature = read_onnx_signature(path)
    assert signature.inputs == (("input", (1, 3, 1024, 1024)),) and signature.outputs == ("d0",)


def test_a_birefnet_style_model_added_by_file_or_by_family_runs_with_birefnet_processing(tmp_path):
    from click.testing import CliRunner

    from app.cli import main
    from config import Settings
    from inference.base import NullControl
    from inference.engines.background import run_remove_background
    from inference.model_store import ModelStore
    from inference.registry import EngineCall

    models = tmp_path / "models"
    models.mkdir()
    # As RMBG-2.0 ships it: "model.onnx", 1024 px, logits without a sigmoid. Its name says nothing,
    # so the operator names the family.
    brightness_saliency_onnx(models / "model.onnx", 1024, logits=True)
    added = CliRunner().invoke(
        main,
        ["models", "add", str(models / "model.onnx"), "--id", "rmbg2", "--family", "birefnet"],
        env={"AIORCH_MODELS_DIR": str(models)},
    )
    assert added.exit_code == 0, added.output
    entry = ModelStore(models).get("rmbg2")
    assert entry.tasks == ("remove_background",) and entry.extra == {"family": "birefnet"}

    image, level = _with_mid_grey()
    settings = Settings(models_dir=models)
    call = EngineCall(
        "remove_background", {"model": "rmbg2"}, {"image_url": image}, NullControl(), 1, settings
    )
    result = run_remove_background(call)
    assert result.backend == "onnx-segmentation:rmbg2" and result.images[0].meta["family"] == "birefnet"
    alpha = np.asarray(result.images[0].image.getchannel("A")).astype(float)
    expected = _sigmoid_alpha(level)
    assert abs(alpha[12:20, 14:34].mean() - expected) < 4
    # U2-Net's processing of the same file (no sigmoid, the map stretched) gives another answer.
    as_u2net = BackgroundRemover(models / "model.onnx", family="u2net")(image).images[0].image
    assert abs(np.asarray(as_u2net.getchannel("A"))[12:20, 14:34].mean() - expected) > 40
    assert alpha[40:56, 60:100].min() >= 250 and alpha[-6:].max() <= 5

    # A file whose name names its task but not the family: the graph (1024 px, one map) tells.
    brightness_saliency_onnx(models / "silueta-large.onnx", 1024, logits=True)
    brightness_saliency_onnx(models / "modnet-like.onnx", 1024, logits=True)
    assert ModelStore(models).add(models / "modnet-like.onnx").extra == {"family": "birefnet"}
    assert ModelStore(models).add(models / "silueta-large.onnx").extra == {"family": "u2net"}  # name wins
    bad = CliRunner().invoke(
        main,
        ["models", "add", str(models / "model.onnx"), "--family", "deeplab"],
        env={"AIORCH_MODELS_DIR": str(models)},
    )
    assert bad.exit_code != 0 and "deeplab" in bad.output


def test_families_of_the_store_are_the_presets_of_the_engine():
    from inference.background import PRESETS
    from inference.model_files import SEGMENTATION_FAMILIES

    assert set(SEGMENTATION_FAMILIES) == set(PRESETS)


def test_onnx_super_resolution_files_are_not_offered_for_upscale(tmp_path):
    from inference.model_store import ModelStore

    store = ModelStore(tmp_path)
    entry = store.add(brightness_saliency_onnx(tmp_path / "RealESRGAN_x4plus.onnx", 64))
    assert entry.type == "onnx" and entry.tasks == ()
    assert store.list(task="upscale", type="onnx") == []


# -- where ONNX runs ---------------------------------------------------------------------------


def test_provider_selection_puts_cuda_first_when_offered_and_cpu_here():
    import onnxruntime as ort

    from inference.runtime import onnx_providers

    here = ort.get_available_providers()
    assert "CUDAExecutionProvider" not in here  # this machine has no GPU build
    assert onnx_providers(here) == ["CPUExecutionProvider"]
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(gpu_build) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(gpu_build, "cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(gpu_build, "cpu") == ["CPUExecutionProvider"]
    with pytest.raises(EngineError, match="no CUDA provider"):
        onnx_providers(here, "cuda")
    with pytest.raises(ValueError, match="device"):
        onnx_providers(here, "tpu")


def test_a_session_opened_here_uses_the_providers_chosen(u2net_like):
    import onnxruntime as ort

    from inference.runtime import onnx_providers

    remover = BackgroundRemover(u2net_like)
    assert remover.providers == onnx_providers(ort.get_available_providers()) and remover.device == "cpu"


def test_the_gpu_worker_image_swaps_in_onnxruntime_gpu():
    dockerfile = (Path(__file__).resolve().parents[2] / "docker" / "Dockerfile.worker-gpu").read_text()
    swap = dockerfile.index("pip uninstall -y onnxruntime")
    assert dockerfile.index("pip install '.[gpu]'") < swap < dockerfile.index('"onnxruntime-gpu==')
    assert "'CUDAExecutionProvider' in ort.get_available_providers()" in dockerfile
