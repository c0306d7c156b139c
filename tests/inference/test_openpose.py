"""The openpose ControlNet's annotator: OpenPose's body network in plain torch (a random-weight
file in ``body_pose_model.pth``'s own layout, detected at ``aiorch models add`` and loaded by the
real loader), its decoding on synthetic maps of two people whose keypoints are known, its
drawing, and the annotator in ``generate`` (skimage's astronaut as the photo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from skimage import data

from app.cli import main
from config import limits
from inference.base import InvalidInput
from inference.diffusion import DiffusionModels, ImageGenerator
from inference.diffusion.controlnet import ANNOTATED_TYPES, ControlNets, check_controlnets
from inference.model_cache import ModelCache
from inference.model_store import ModelStore
from inference.pose import BodyPoseNet, detect_poses, draw_poses, load_body_pose_annotator, load_body_pose_net
from inference.pose.decode import decode_poses
from inference.pose.skeleton import COLOURS, DRAWN_LIMBS, LIMB_BRIGHTNESS, LIMB_PAFS, LIMBS
from tests.inference.tiny_controlnet import save_tiny_controlnet
from tests.inference.tiny_diffusion import save_tiny_sd
from tests.inference.tiny_openpose import save_random_body_pose_model, standing_person, synthetic_maps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAP_SIZE = (128, 144)  # width, height: not square, so a swapped x and y shows
PEOPLE = [standing_person(36), standing_person(92)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_body_pose_model(tmp_path_factory.mktemp("openpose") / "body_pose_model.pth")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((128, 128), Image.Resampling.LANCZOS)


# -- the network -----------------------------------------------------------------------------


def test_the_network_is_cmus_body_model_with_its_caffe_layer_names(weights: Path) -> None:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    # The original file's layout: 184 tensors, 52.3 M float32 parameters (its 209 MB).
    assert len(state) == 184 and sum(t.numel() for t in state.values()) == 52_311_446
    assert state["conv1_1.weight"].shape == (64, 3, 3, 3)
    assert state["conv4_4_CPM.weight"].shape == (128, 256, 3, 3)
    assert state["conv5_5_CPM_L1.weight"].shape == (38, 512, 1, 1)  # stage 1's PAFs
    assert state["conv5_5_CPM_L2.weight"].shape == (19, 512, 1, 1)  # stage 1's heatmaps
    assert state["Mconv1_stage2_L1.weight"].shape == (128, 185, 7, 7)  # 38 + 19 + 128 in
    assert state["Mconv7_stage6_L2.weight"].shape == (19, 128, 1, 1)


def test_the_loader_reads_the_file_as_saved_and_gives_maps_at_an_eighth(weights: Path) -> None:
    net = load_body_pose_net(weights, "cpu")
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    assert torch.equal(net.state_dict()["Mconv7_stage6_L1.bias"], saved["Mconv7_stage6_L1.bias"])
    with torch.inference_mode():
        pafs, heatmaps = net(torch.zeros(1, 3, 128, 96))
    assert pafs.shape == (1, 38, 16, 12) and heatmaps.shape == (1, 19, 16, 12)
    assert torch.isfinite(pafs).all() and torch.isfinite(heatmaps).all()


def test_a_file_missing_a_layer_is_refused_by_the_loader(tmp_path: Path, weights: Path) -> None:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    del state["Mconv7_stage6_L2.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="Mconv7_stage6_L2.weight"):
        load_body_pose_net(tmp_path / "broken.pth", "cpu")


def test_models_add_reads_the_body_pose_file_as_the_openpose_annotator(tmp_path: Path, weights: Path) -> None:
    models = tmp_path / "models"
    env = {"AIORCH_MODELS_DIR": str(models)}
    added = CliRunner().invoke(main, ["models", "add", str(weights), "--id", "openpose-body"], env=env)
    assert added.exit_code == 0, added.output
    assert "annotator" in added.output
    entry = ModelStore(models).get("openpose-body")
    assert entry.type == "annotator" and entry.tasks == ("generate",)
    assert entry.extra == {"annotates": "openpose", "architecture": "OpenPoseBody"}


# -- decoding and drawing --------------------------------------------------------------------


def _matched(found: list, expected: list[tuple[int, int]]) -> tuple:
    """The found pose whose nose is nearest ``expected``'s."""
    width, height = MAP_SIZE
    nose = np.array(expected[0]) / (width, height)
    return min(found, key=lambda pose: np.hypot(*(np.array(pose[0]) - nose)))


def test_two_people_are_decoded_with_every_keypoint_where_it_is() -> None:
    poses = decode_poses(*synthetic_maps(PEOPLE, MAP_SIZE))
    assert len(poses) == 2
    width, height = MAP_SIZE
    for person in PEOPLE:
        pose = _matched(poses, person)
        for (x, y), point in zip(person, pose, strict=True):
            assert point is not None
            assert abs(point[0] * width - x) <= 0.5 and abs(point[1] * height - y) <= 0.5


def test_a_limb_without_its_affinity_field_is_not_joined() -> None:
    heatmaps, pafs = synthetic_maps(PEOPLE, MAP_SIZE)
    # The right forearm's (elbow 3 to wrist 4) field is wiped on the second person only.
    limb = LIMBS.index((3, 4))
    pafs[:, 64:, list(LIMB_PAFS[limb])] = 0
    poses = decode_poses(heatmaps, pafs)
    assert _matched(poses, PEOPLE[0])[4] is not None
    second = _matched(poses, PEOPLE[1])
    assert second[4] is None and second[3] is not None


def test_keypoints_without_limbs_make_no_person() -> None:
    heatmaps, _ = synthetic_maps(PEOPLE, MAP_SIZE)
    assert decode_poses(heatmaps, np.zeros((MAP_SIZE[1], MAP_SIZE[0], 38), np.float32)) == []


def test_each_persons_limbs_are_drawn_in_openpose_colours_and_none_between_people() -> None:
    poses = decode_poses(*synthetic_maps(PEOPLE, MAP_SIZE))
    canvas = np.asarray(draw_poses(poses, (256, 288)))  # twice the maps' size
    assert canvas.shape == (288, 256, 3)

    def at(x: float, y: float) -> tuple[int, ...]:
        return tuple(int(v) for v in canvas[round(y * 2), round(x * 2)])

    for person in PEOPLE:
        # The long limbs, at their middles: the limb's colour at 60 %.
        for limb, (a, b) in enumerate(LIMBS[:13]):
            middle = ((person[a][0] + person[b][0]) / 2, (person[a][1] + person[b][1]) / 2)
            assert at(*middle) == tuple(int(c * LIMB_BRIGHTNESS) for c in COLOURS[limb]), limb
        for part, point in enumerate(person):
            assert at(*point) == COLOURS[part], part
    # Between the two people (x 64) the canvas is black all the way down.
    assert not canvas[:, 126:130].any()
    # The ear-shoulder limbs assemble people but are not drawn.
    assert DRAWN_LIMBS == 17
    ear, shoulder = PEOPLE[0][16], PEOPLE[0][2]
    assert at((ear[0] + shoulder[0]) / 2, (ear[1] + shoulder[1]) / 2) == (0, 0, 0)


def test_no_people_is_a_black_picture_of_the_output_size() -> None:
    image = draw_poses([], (96, 64))
    assert image.size == (96, 64) and not np.asarray(image).any()


# -- the annotator in generate ---------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> DiffusionModels:
    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    store.add(save_tiny_sd(root / "tiny-sd"), id="tiny-sd")
    store.add(save_tiny_controlnet(root / "control_v11p_sd15_openpose", seed=4), id="tiny-openpose")
    store.add(weights, id="body-pose")
    return DiffusionModels(store, ModelCache(1024 * 2**20), device="cpu")


def test_the_annotator_runs_on_a_photo_and_draws_at_the_output_size(weights: Path, astronaut) -> None:
    annotator = load_body_pose_annotator(weights, "cpu")
    poses = detect_poses(annotator, astronaut)  # random weights: any number of people
    assert all(len(pose) == 18 for pose in poses)
    assert all(0 <= p[0] <= 1 and 0 <= p[1] <= 1 for pose in poses for p in pose if p is not None)
    assert isinstance(annotator.net, BodyPoseNet)


def test_openpose_in_generate_uses_the_installed_annotator_and_names_it(models, astronaut) -> None:
    (request,) = check_controlnets([{"type": "openpose", "image": astronaut}])
    nets = ControlNets(models)
    annotator = nets._annotator_for(request, None)
    assert annotator is not None and annotator.id == "body-pose"
    loads = models.cache.loads
    result = ImageGenerator(models)(
        "a dancer",
        steps=2,
        width=64,
        height=64,
        seed=3,
        controlnets=[{"type": "openpose", "image": astronaut}],
    )
    assert result.images[0].image.size == (64, 64)
    (meta,) = result.images[0].meta["controlnets"]
    assert meta["type"] == "openpose" and meta["model"] == "tiny-openpose"
    assert meta["preprocessor"] == "openpose-body:body-pose"
    # The annotator is cached like any model: a second job loads nothing new for it.
    ImageGenerator(models)(
        "a dancer",
        steps=2,
        width=64,
        height=64,
        seed=4,
        controlnets=[{"type": "openpose", "image": astronaut}],
    )
    # The base pipeline, the ControlNet and the annotator, once each.
    assert models.cache.loads - loads == 3


def test_the_engine_and_the_api_agree_on_which_types_need_an_annotator() -> None:
    assert tuple(ANNOTATED_TYPES) == limits.CONTROLNET_ANNOTATED_TYPES


def test_openpose_without_its_annotator_names_the_missing_annotator_unless_preprocessed(
    tmp_path: Path, astronaut
) -> None:
    store = ModelStore(tmp_path)
    store.add(save_tiny_sd(tmp_path / "tiny-sd"), id="tiny-sd")
    store.add(save_tiny_controlnet(tmp_path / "controlnet-openpose"), id="tiny-openpose")
    generate = ImageGenerator(DiffusionModels(store, ModelCache(512 * 2**20), device="cpu"))
    fast: dict[str, Any] = {"steps": 2, "width": 64, "height": 64, "seed": 1}
    loads = generate.models.cache.loads
    with pytest.raises(InvalidInput) as info:
        generate("a dancer", **fast, controlnets=[{"type": "openpose", "image": astronaut}])
    assert info.value.field == "controlnets[0].type" and info.value.code == "annotator_missing"
    assert "openpose annotator" in str(info.value) and "body_pose_model.pth" in str(info.value)
    assert generate.models.cache.loads == loads
    pose = draw_poses([], (64, 64))
    done = generate(
        "a dancer", **fast, controlnets=[{"type": "openpose", "image": pose, "preprocessed": True}]
    )
    assert done.images[0].meta["controlnets"][0]["preprocessor"] == "none"
