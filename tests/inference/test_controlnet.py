"""ControlNets on ``generate``: tiny random-weight ControlNets saved in the diffusers format,
detected at ``aiorch models add`` and run through the real loader; the control images made from
a real photo (skimage's astronaut)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from inference.base import InvalidInput
from inference.diffusion import DiffusionModels, ImageGenerator
from inference.diffusion import control_images as ci
from inference.diffusion.controlnet import ControlNets, check_controlnets
from inference.model_cache import ModelCache
from inference.model_files import ModelStoreError
from inference.model_store import ModelStore
from tests.inference.tiny_controlnet import save_tiny_controlnet, save_tiny_depth_annotator
from tests.inference.tiny_diffusion import save_tiny_sd

FAST: dict[str, Any] = {"steps": 2, "width": 64, "height": 64, "seed": 11}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    store.add(save_tiny_sd(root / "tiny-sd"), id="tiny-sd")
    # Types read from the folder names, as an operator's downloads are named.
    store.add(save_tiny_controlnet(root / "sd-controlnet-canny", seed=1), id="tiny-canny")
    store.add(save_tiny_controlnet(root / "control_v11p_sd15_lineart", seed=2), id="tiny-lineart")
    store.add(save_tiny_controlnet(root / "controlnet-depth", seed=3), id="tiny-depth")
    return store


@pytest.fixture(scope="module")
def models(store: ModelStore) -> DiffusionModels:
    return DiffusionModels(store, ModelCache(512 * 2**20), device="cpu")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# -- the model store -------------------------------------------------------------------------


def test_a_diffusers_controlnet_folder_is_detected_with_its_type_and_base_model(store: ModelStore) -> None:
    entry = store.get("tiny-canny")
    assert entry.type == "controlnet" and entry.tasks == ("generate",)
    assert entry.extra["control_type"] == "canny"
    # The tiny UNet's 32-wide text features read like SD 1.5's (not 1024: SD 2.x, not SDXL).
    assert entry.base_model_type == "sd15" and entry.extra["cross_attention_dim"] == 32
    assert store.get("tiny-lineart").extra["control_type"] == "lineart"


def test_the_control_type_is_given_at_add_or_the_controlnet_is_refused(tmp_path: Path) -> None:
    folder = save_tiny_controlnet(tmp_path / "my-controlnet")
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelStoreError, match="control-type"):
        store.add(folder, id="unnamed")
    entry = store.add(folder, id="unnamed", control_type="tile")
    assert entry.extra["control_type"] == "tile"
    # The id tells when the folder does not.
    assert store.add(folder, id="cn-openpose").extra["control_type"] == "openpose"
    with pytest.raises(ModelStoreError, match="unknown control type"):
        store.add(folder, id="x", control_type="scribble")
    with pytest.raises(ModelStoreError, match="for ControlNet models"):
        store.add(save_tiny_depth_annotator(tmp_path / "dpt"), id="dpt", control_type="canny")


def test_models_add_takes_control_type_and_pull_reads_it_from_the_repository(tmp_path: Path) -> None:
    from app.cli import main

    models = tmp_path / "models"

    def run(*args: str):
        return CliRunner().invoke(main, ["models", *args], env={"AIORCH_MODELS_DIR": str(models)})

    added = run("add", str(save_tiny_controlnet(tmp_path / "cn")), "--id", "cn-a", "--control-type", "tile")
    assert added.exit_code == 0, added.output
    assert "controlnet" in added.output
    assert ModelStore(models).get("cn-a").extra["control_type"] == "tile"
    # A pulled snapshot's folder is a commit hash: the repository's name tells the type.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = models / "hub" / "models--acme--sd-controlnet-canny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    save_tiny_controlnet(repo / "snapshots" / commit)
    pulled = run("pull", "acme/sd-controlnet-canny", "--offline")
    assert pulled.exit_code == 0, pulled.output
    assert ModelStore(models).get("sd-controlnet-canny").extra["control_type"] == "canny"


def test_a_transformers_depth_model_is_the_depth_annotator(tmp_path: Path) -> None:
    entry = ModelStore(tmp_path).add(save_tiny_depth_annotator(tmp_path / "dpt-tiny"), id="dpt")
    assert entry.type == "annotator"
    assert entry.extra == {"annotates": "depth", "architecture": "DPTForDepthEstimation"}


# -- control images --------------------------------------------------------------------------


def test_canny_on_a_photo_gives_a_binary_edge_map_along_its_strong_gradients(astronaut) -> None:
    import cv2

    edges = np.asarray(ci.canny_map(astronaut, (256, 256)))
    assert edges.shape == (256, 256, 3) and set(np.unique(edges)) == {0, 255}
    assert np.array_equal(edges[..., 0], edges[..., 2])
    share = (edges[..., 0] == 255).mean()
    assert 0.02 < share < 0.4, share
    grey = cv2.cvtColor(np.asarray(astronaut.resize((256, 256))), cv2.COLOR_RGB2GRAY).astype(np.float32)
    gradient = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    on_edges = gradient[edges[..., 0] == 255].mean()
    assert on_edges > 3 * gradient[edges[..., 0] == 0].mean()


def test_lineart_draws_white_strokes_on_black_along_the_contours(astronaut) -> None:
    import cv2

    lines = np.asarray(ci.lineart_map(astronaut, (256, 256)))[..., 0].astype(np.float32)
    assert np.median(lines) == 0 and lines.max() == 255  # mostly black, strokes white
    # A stroke runs along the dark side of a contour: within 2 px of a Canny edge.
    edges = np.asarray(ci.canny_map(astronaut, (256, 256)))[..., 0]
    near = cv2.dilate(edges, np.ones((5, 5), np.uint8)) > 0
    assert lines[near].mean() > 5 * lines[~near].mean()


def test_tile_is_the_picture_at_the_output_size(astronaut) -> None:
    tile = ci.tile_map(astronaut, (128, 96))
    assert tile.size == (128, 96) and tile.mode == "RGB"


def test_depth_comes_from_the_installed_annotator_at_the_output_size(tmp_path: Path, astronaut) -> None:
    store = ModelStore(tmp_path)
    store.add(save_tiny_depth_annotator(tmp_path / "dpt"), id="dpt")
    models = DiffusionModels(store, ModelCache(64 * 2**20), device="cpu")
    (request,) = check_controlnets([{"type": "depth", "image": astronaut}])
    nets = ControlNets(models)
    annotator = nets._annotator_for(request, None)
    assert annotator is not None and annotator.id == "dpt"
    depth = np.asarray(nets.control_images([_control(request, annotator)], (96, 64))[0])
    assert depth.shape == (64, 96, 3) and depth.min() == 0 and depth.max() == 255


def test_a_preprocessed_image_is_the_control_image_as_sent(models, astronaut) -> None:
    (request,) = check_controlnets([{"type": "canny", "image": astronaut, "preprocessed": True}])
    (image,) = ControlNets(models).control_images([_control(request)], (64, 64))
    assert image is astronaut


def _control(request, annotator=None):
    from inference.diffusion.controlnet import Control
    from inference.model_store import ModelEntry

    entry = ModelEntry(id="any", name="any", type="controlnet", tasks=("generate",), path=None)
    return Control(request, entry, annotator)


# -- generation ------------------------------------------------------------------------------


def test_one_controlnet_changes_the_image_of_the_same_seed_and_is_listed(models, astronaut) -> None:
    generate = ImageGenerator(models)
    plain = generate("a cat", **FAST)
    steered = generate("a cat", **FAST, controlnets=[{"type": "canny", "image": astronaut}])
    assert np.abs(pixels(plain.images[0].image) - pixels(steered.images[0].image)).mean() > 1
    meta = steered.images[0].meta
    assert meta["controlnets"] == [
        {
            "type": "canny",
            "model": "tiny-canny",
            "scale": 1.0,
            "start": 0.0,
            "end": 1.0,
            "preprocessor": "opencv-canny",
        }
    ]
    assert "controlnets" not in plain.images[0].meta
    # The base pipeline is shared, not changed: the plain run after is the plain run before.
    again = generate("a cat", **FAST)
    assert np.array_equal(pixels(plain.images[0].image), pixels(again.images[0].image))


def test_two_controlnets_run_together_each_with_its_own_scale_and_span(models, astronaut) -> None:
    generate = ImageGenerator(models)
    one = generate("a cat", **FAST, controlnets=[{"type": "canny", "image": astronaut}])
    two = generate(
        "a cat",
        **FAST,
        controlnets=[
            {"type": "canny", "image": astronaut},
            {"type": "lineart", "image": astronaut, "scale": 0.7, "start": 0.0, "end": 0.5},
        ],
    )
    assert np.abs(pixels(one.images[0].image) - pixels(two.images[0].image)).mean() > 1
    listed = two.images[0].meta["controlnets"]
    assert [c["model"] for c in listed] == ["tiny-canny", "tiny-lineart"]
    assert listed[1]["scale"] == 0.7 and listed[1]["end"] == 0.5


def test_without_a_size_the_output_takes_the_control_images_shape(models) -> None:
    wide = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 128, 3), dtype=np.uint8))
    result = ImageGenerator(models)("a cat", steps=2, seed=1, controlnets=[{"type": "canny", "image": wide}])
    assert result.images[0].image.size == (128, 64)


def test_img2img_takes_a_controlnet_too(models, astronaut) -> None:
    photo = astronaut.resize((64, 64))
    result = ImageGenerator(models)(
        "a cat", steps=4, seed=1, image=photo, controlnets=[{"type": "lineart", "image": astronaut}]
    )
    assert result.images[0].meta["mode"] == "img2img" and result.images[0].image.size == (64, 64)


@pytest.mark.parametrize(
    ("controlnets", "field"),
    [
        ([{"type": "canny"}] * 4, "controlnets"),
        ([{"type": "scribble"}], "controlnets[0].type"),
        ([{"type": "canny"}, {"type": "canny", "start": 0.6, "end": 0.6}], "controlnets[1].start"),
        ([{"type": "canny", "scale": 2.5}], "controlnets[0].scale"),
        ([{"type": "canny", "image": None}], "controlnets[0].image_url"),
        # Nothing of that type is installed, and a model of another kind or type named.
        ([{"type": "tile"}], "controlnets[0].type"),
        ([{"type": "canny", "model": "tiny-sd"}], "controlnets[0].model"),
        ([{"type": "canny", "model": "tiny-lineart"}], "controlnets[0].model"),
        ([{"type": "canny", "model": "nope"}], "controlnets[0].model"),
    ],
)
def test_bad_controlnets_are_refused_naming_the_field_before_any_load(
    models, astronaut, controlnets, field
) -> None:
    items = [{"image": astronaut, **item} for item in controlnets]
    loads = models.cache.loads
    with pytest.raises(InvalidInput) as info:
        ImageGenerator(models)("a cat", **FAST, controlnets=items)
    assert info.value.field == field
    assert models.cache.loads == loads


def test_depth_without_its_annotator_names_the_missing_annotator_unless_preprocessed(
    models, astronaut
) -> None:
    with pytest.raises(InvalidInput) as info:
        ImageGenerator(models)("a cat", **FAST, controlnets=[{"type": "depth", "image": astronaut}])
    assert info.value.field == "controlnets[0].type" and info.value.code == "annotator_missing"
    assert "depth annotator" in str(info.value)
    depth_map = astronaut.convert("L").convert("RGB")
    done = ImageGenerator(models)(
        "a cat", **FAST, controlnets=[{"type": "depth", "image": depth_map, "preprocessed": True}]
    )
    assert done.images[0].meta["controlnets"][0]["preprocessor"] == "none"


def test_an_sdxl_controlnet_is_read_as_sdxl_and_runs_on_sdxl_models_only(tmp_path: Path, astronaut) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from tests.inference.tiny_diffusion import save_tiny_sdxl

    store = ModelStore(tmp_path)
    store.add(save_tiny_sdxl(tmp_path / "tiny-xl"), id="tiny-xl")
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "tiny-xl" / "unet"))
    xl = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    xl.save_pretrained(str(tmp_path / "controlnet-canny-sdxl"))
    assert store.add(tmp_path / "controlnet-canny-sdxl", id="xl-canny").base_model_type == "sdxl"
    store.add(save_tiny_controlnet(tmp_path / "sd-controlnet-canny"), id="sd15-canny")
    generate = ImageGenerator(DiffusionModels(store, ModelCache(512 * 2**20), device="cpu"))
    result = generate("a cat", **FAST, controlnets=[{"type": "canny", "image": astronaut}])
    assert result.images[0].meta["controlnets"][0]["model"] == "xl-canny"  # the one for sdxl
    with pytest.raises(InvalidInput) as info:
        generate("a cat", **FAST, controlnets=[{"type": "canny", "image": astronaut, "model": "sd15-canny"}])
    assert info.value.field == "controlnets[0].model" and "sd15" in str(info.value)
