"""Object scanning: torchvision detectors built empty, saved as state dicts with a label map, loaded
back through ObjectScanner on CPU and compared with the network's own output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import detection

from inference.base import EngineError, InvalidInput
from inference.detection import FASTER_RCNN, FASTER_RCNN_320, SSDLITE, ObjectScanner
from tests.inference.tiny_vision import liven_detector, smooth_rgb, write_label_map

LABELS = ["__background__", "cat", "dog", "kite"]
PICTURE = Image.fromarray(smooth_rgb(48, 64, seed=5))


@pytest.fixture(scope="module")
def ssdlite(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A 3-class SSDlite saved as a bare state dict, the way torchvision's COCO file is."""
    torch.manual_seed(0)
    model = liven_detector(
        detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    ).eval()
    path = tmp_path_factory.mktemp("det") / "ssdlite-coco-tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def faster_rcnn(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(1)
    model = liven_detector(
        detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=4)
    ).eval()
    # As torchvision's reference scripts save it, and without the num_batches_tracked buffers the
    # pretrained COCO files (FrozenBatchNorm2d models) lack.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("det") / "frcnn.pth"
    torch.save({"model": state, "epoch": 7}, path)
    return path, model


@pytest.fixture(scope="module")
def scanner(ssdlite) -> ObjectScanner:
    return ObjectScanner(ssdlite[0], LABELS)


@pytest.fixture(scope="module")
def baseline(scanner):
    """One scan of the test picture at min_score 0.3, shared by the tests that compare against it
    (an SSDlite pass costs about a second on a busy 2-core machine)."""
    return scanner(PICTURE, min_score=0.3)


def raw_detections(model: torch.nn.Module, image: Image.Image) -> list[tuple[str, float, list[float]]]:
    tensor = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()).float() / 255
    with torch.no_grad():
        found = model([tensor])[0]
    rows = [
        (LABELS[int(label)], float(score), box.tolist())
        for label, score, box in zip(found["labels"], found["scores"], found["boxes"], strict=True)
    ]
    return sorted(rows, key=lambda row: -row[1])


def test_ssdlite_state_dict_with_label_list_gives_the_networks_detections(ssdlite, scanner, baseline):
    assert scanner.arch == SSDLITE
    assert baseline.backend == "ssdlite320_mobilenet_v3_large:ssdlite-coco-tiny"
    assert baseline.images == [] and set(baseline.data) == {"objects", "width", "height"}
    objects = baseline.data["objects"]
    expected = [row for row in raw_detections(ssdlite[1], PICTURE) if row[1] >= 0.3][:100]
    assert len(objects) == len(expected) > 3
    for found, (label, score, box) in zip(objects, expected, strict=True):
        assert found["label"] == label and found["score"] == pytest.approx(score, abs=1e-4)
        assert [found["box"][k] for k in ("x1", "y1", "x2", "y2")] == [round(v) for v in box]
    scores = [o["score"] for o in objects]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1


def test_min_score_and_max_objects_filter_and_cap_and_boxes_stay_in_the_image(scanner, baseline):
    loose = scanner(PICTURE, min_score=0.0, max_objects=100).data["objects"]
    strict = scanner(PICTURE, min_score=0.5, max_objects=100).data["objects"]
    capped = scanner(PICTURE, min_score=0.0, max_objects=3).data["objects"]

    assert all(o["score"] >= 0.5 for o in strict) and len(strict) < len(baseline.data["objects"])
    assert (
        strict == loose[: len(strict)] and baseline.data["objects"] == loose[: len(baseline.data["objects"])]
    )
    assert capped == loose[:3]
    for found in loose:
        box = found["box"]
        assert 0 <= box["x1"] <= box["x2"] <= 64 and 0 <= box["y1"] <= box["y2"] <= 48
        assert found["label"] in LABELS[1:]


def test_faster_rcnn_reference_checkpoint_and_json_label_object_load(faster_rcnn, tmp_path):
    path, model = faster_rcnn
    labels = write_label_map(tmp_path / "labels.json", {"1": "cat", "2": "dog", "3": "kite"})
    scanner = ObjectScanner(path, labels, arch=FASTER_RCNN_320)
    objects = scanner(PICTURE, min_score=0.05, max_objects=100).data["objects"]

    # 0.05 is also the floor the raw model was built with (torchvision's default box_score_thresh).
    expected = raw_detections(model, PICTURE)
    assert len(objects) > 3
    assert [(o["label"], o["score"]) for o in objects] == [(lab, round(s, 4)) for lab, s, _ in expected]
    assert scanner.backend == "fasterrcnn_mobilenet_v3_large_320_fpn:frcnn"


def test_label_list_without_background_entry_is_offset_by_one(ssdlite, baseline):
    assert ObjectScanner(ssdlite[0], LABELS[1:])(PICTURE, min_score=0.3).data == baseline.data


def test_nothing_is_downloaded_and_faster_rcnn_is_recognised_by_its_keys(faster_rcnn, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    scanner = ObjectScanner(faster_rcnn[0], LABELS)
    assert scanner.arch == FASTER_RCNN  # the full-size variant unless the 320 one is named
    assert scanner(PICTURE, min_score=0.0).data["objects"]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["cat"], "lists 1 names"),
        ({"1": "cat", "3": "kite"}, "no class for ids \\[2\\]"),
        ({"one": "cat"}, "keys must be class ids"),
    ],
)
def test_label_map_that_does_not_fit_the_weights_is_refused(ssdlite, labels, message):
    with pytest.raises(EngineError, match=message) as caught:
        ObjectScanner(ssdlite[0], labels)
    assert caught.value.code == "invalid_model"


def test_files_that_are_not_detector_weights_are_refused_clearly(tmp_path, faster_rcnn):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"nope")
    other = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 3).state_dict(), other)
    for path, message in ((garbage, "not a readable state-dict"), (other, "neither an SSDlite nor")):
        with pytest.raises(EngineError, match=message) as caught:
            ObjectScanner(path, LABELS)
        assert caught.value.code == "invalid_model"
    with pytest.raises(EngineError, match="not ssdlite320"):
        ObjectScanner(faster_rcnn[0], LABELS, arch=SSDLITE)
    with pytest.raises(EngineError) as caught:
        ObjectScanner(tmp_path / "absent.pth", LABELS)
    assert caught.value.code == "model_not_found"


def test_bad_call_arguments_and_tiny_images_are_refused(scanner):
    with pytest.raises(InvalidInput) as caught:
        scanner(PICTURE, min_score=1.5)
    assert caught.value.field == "min_score"
    with pytest.raises(InvalidInput) as caught:
        scanner(PICTURE, max_objects=0)
    assert caught.value.field == "max_objects"
    with pytest.raises(InvalidInput, match="too small"):
        scanner(Image.new("RGB", (4, 4)))


def test_greyscale_sixteen_bit_and_rgba_inputs_are_scanned(scanner, baseline):
    grey16 = Image.fromarray(np.asarray(PICTURE.convert("L")).astype(np.uint16) * 257)
    as_rgb = scanner(PICTURE.convert("L").convert("RGB"), min_score=0.3).data
    assert scanner(grey16, min_score=0.3).data == as_rgb
    assert scanner(PICTURE.convert("RGBA"), min_score=0.3).data == baseline.data


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_same_objects_as_cpu(ssdlite, baseline):
    cpu = baseline.data["objects"]
    gpu = ObjectScanner(ssdlite[0], LABELS, device="cuda")(PICTURE, min_score=0.3).data["objects"]
    assert [o["label"] for o in gpu] == [o["label"] for o in cpu]
    assert [o["score"] for o in gpu] == pytest.approx([o["score"] for o in cpu], abs=1e-3)


def test_api_and_engine_agree_on_the_max_objects_limit(ssdlite, settings, tmp_path):
    from app import create_app
    from config.limits import SCAN_MAX_OBJECTS as MAX_OBJECTS
    from inference.base import NullControl
    from inference.engines.detection import run_scan_objects
    from inference.model_store import ModelStore
    from inference.registry import EngineCall
    from tests.conftest import KEYS

    models = tmp_path / "models"
    models.mkdir()
    (models / "det.pth").write_bytes(ssdlite[0].read_bytes())
    write_label_map(models / "det.labels.json", LABELS)
    ModelStore(models).add(models / "det.pth", id="det")
    local = settings.with_overrides(models_dir=models)

    app = create_app(local)
    try:
        client = app.test_client()
        headers = {"X-API-Key": KEYS[0][1]}

        def submit(max_objects: int):
            payload = {"image_url": "https://example.com/a.png", "max_objects": max_objects}
            return client.post("/v1/jobs", json={"task": "scan_objects", "payload": payload}, headers=headers)

        over = submit(MAX_OBJECTS + 1)
        assert over.status_code == 422, over.get_json()
        assert "max_objects" in over.get_json()["error"]["details"]["payload"]
        assert submit(MAX_OBJECTS).status_code == 202
    finally:
        app.extensions["aiorch"].db.dispose()

    # What the API lets through, the worker's detector serves.
    call = EngineCall(
        "scan_objects",
        {"min_score": 0.0, "max_objects": MAX_OBJECTS},
        {"image_url": PICTURE},
        NullControl(),
        1,
        local,
    )
    result = run_scan_objects(call)
    assert 0 < len(result.data["objects"]) <= MAX_OBJECTS  # type: ignore[index]
