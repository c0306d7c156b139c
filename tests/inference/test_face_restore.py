"""Face restoration (issue 16): GFPGAN, RestoreFormer and CodeFormer files read by spandrel,
restoring the faces of the astronaut photo, of an upscale and of a face swap.

The GFPGAN file is the real architecture (spandrel's own class) with random weights, saved as
GFPGAN's releases are (``params_ema``), and loaded through the store and the real loading code. Its
restored faces mean nothing; what is checked is where the pixels change and what the results say.
CodeFormer's file is built the same way from spandrel_extra_arches' class (the dev extra installs
it; without it, a CodeFormer file is refused at ``aiorch models add``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config import Settings
from inference.base import EngineError, InvalidInput, NullControl
from inference.faceswap import FaceDetector, MeshDetector
from inference.faceswap.faces import expand_box
from inference.model_files import ModelStoreError
from inference.model_store import ModelStore
from inference.registry import EngineCall
from tests.inference.face_images import GREEN, astronaut, marked_source
from tests.inference.face_restorers import save_codeformer, save_gfpgan, save_restoreformer

MEDIAPIPE = importlib.util.find_spec("mediapipe") is not None
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("restorers")
    ModelStore(folder).add(save_gfpgan(folder / "GFPGANv1.4.pth"), id="gfpganv1.4")
    return folder


@pytest.fixture(scope="module")
def restorer(models: Path):
    from inference.face_restore import FaceRestorer

    return FaceRestorer(models / "GFPGANv1.4.pth", model_id="gfpganv1.4")


@pytest.fixture(scope="module")
def detector():
    return MeshDetector() if MEDIAPIPE else FaceDetector()


def call(task: str, payload: dict, images: dict, models_dir: Path) -> EngineCall:
    return EngineCall(task, payload, images, NullControl(), 1, Settings(models_dir=models_dir))


def test_a_gfpgan_state_dict_is_a_face_restorer_for_upscale_and_the_swaps(models: Path) -> None:
    entry = ModelStore(models).get("gfpganv1.4")
    assert entry.type == "face_restorer"
    assert entry.tasks == ("upscale", "faceswap", "faceswap_multi")
    assert entry.extra == {"arch": "GFPGAN"}
    assert [e.id for e in ModelStore(models).list(type="face_restorer")] == ["gfpganv1.4"]


def test_a_restoreformer_file_is_detected_and_loads(tmp_path: Path) -> None:
    from inference.face_restore import FaceRestorer

    path = save_restoreformer(tmp_path / "RestoreFormer.pth")
    entry = ModelStore(tmp_path).add(path)
    assert (entry.type, entry.extra) == ("face_restorer", {"arch": "RestoreFormer"})
    assert FaceRestorer(path, model_id=entry.id).name == "restoreformer:restoreformer"


def test_codeformer_without_spandrel_extra_arches_is_refused_at_add_naming_what_it_would_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import inference.model_files

    monkeypatch.setattr(inference.model_files, "extra_arches_available", lambda: False)
    path = tmp_path / "codeformer.pth"
    keys = ("position_emb", "quantize.embedding.weight", "encoder.blocks.0.weight", "idx_pred_layer.1.weight")
    torch.save({"params_ema": {k: torch.zeros(2, 2) for k in keys}}, path)
    with pytest.raises(ModelStoreError, match="CodeFormer.*spandrel_extra_arches.*faces-noncommercial"):
        ModelStore(tmp_path).add(path)


def test_a_codeformer_file_is_a_face_restorer_that_restores_at_the_jobs_fidelity(tmp_path: Path) -> None:
    from inference.engines.faces import face_restorer
    from inference.face_restore import DEFAULT_FIDELITY

    ModelStore(tmp_path).add(save_codeformer(tmp_path / "codeformer.pth"), id="codeformer")
    entry = ModelStore(tmp_path).get("codeformer")
    assert (entry.type, entry.extra) == ("face_restorer", {"arch": "CodeFormer"})
    assert entry.tasks == ("upscale", "faceswap", "faceswap_multi")
    restorer = face_restorer(call("upscale", {"face_enhance": True}, {}, tmp_path))
    assert restorer.name == "codeformer:codeformer" and restorer.fidelity == DEFAULT_FIDELITY
    # The job's fidelity on a view of the same (cached) network, which keeps its own.
    chosen = face_restorer(call("upscale", {"face_enhance": True, "face_fidelity": 0.8}, {}, tmp_path))
    assert chosen.fidelity == 0.8 and chosen.network is restorer.network
    assert restorer.fidelity == DEFAULT_FIDELITY
    # The weight reaches CodeFormer's forward as its ``weight`` (w), with the [-1, 1] input it
    # was trained on.
    seen: list[dict] = []
    hook = chosen.network.register_forward_pre_hook(
        lambda _module, args, kwargs: seen.append({"weight": kwargs["weight"], "low": float(args[0].min())}),
        with_kwargs=True,
    )
    try:
        crop = np.asarray(Image.fromarray(astronaut()).resize((512, 512)))
        (restored,) = chosen.restore_crops([crop])
    finally:
        hook.remove()
    assert len(seen) == 1 and seen[0]["weight"] == 0.8 and seen[0]["low"] < -0.5
    assert restored.shape == (512, 512, 3) and restored.dtype == np.uint8
    with pytest.raises(InvalidInput) as caught:
        restorer.at_fidelity(1.5)
    assert caught.value.field == "face_fidelity"


def test_restoring_the_astronaut_changes_her_face_and_nothing_far_from_it(restorer, detector) -> None:
    photo = Image.fromarray(astronaut())
    restored, count = restorer.restore_image(photo, detector)
    assert count == 1 and restored.size == photo.size and restored.mode == "RGB"
    before, after = np.asarray(photo).astype(int), np.asarray(restored).astype(int)
    (face,) = detector.detect(np.asarray(photo))
    x0, y0, x1, y1 = expand_box(face, 1.0, *photo.size)
    # Random weights paint noise over the aligned square: the face itself changes a lot...
    assert np.abs(after[y0:y1, x0:x1] - before[y0:y1, x0:x1]).mean() > 20
    # ...and beyond the square's reach (about twice the face) not one pixel does.
    gx0, gy0, gx1, gy1 = expand_box(face, 2.6, *photo.size)
    far = np.ones(before.shape[:2], bool)
    far[gy0:gy1, gx0:gx1] = False
    assert np.array_equal(before[far], after[far])
    # StyleGAN's noise is the stored one: the same photo restores to the same pixels.
    again, _ = restorer.restore_image(photo, detector)
    assert np.array_equal(np.asarray(again), np.asarray(restored))


def test_a_picture_without_a_face_comes_back_untouched(restorer, detector) -> None:
    grey = Image.new("RGB", (256, 192), (120, 120, 120))
    restored, count = restorer.restore_image(grey, detector)
    assert count == 0 and restored is grey


def test_face_enhance_on_sixteen_bit_input_is_refused_before_upscaling(models: Path) -> None:
    from inference.engines.upscale import run_upscale

    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 64), (48, 1)).astype(np.uint16))
    payload = {"scale": 2.0, "face_enhance": True, "model": "lanczos"}
    with pytest.raises(InvalidInput) as caught:
        run_upscale(call("upscale", payload, {"image_url": ramp}, models))
    assert caught.value.field == "face_enhance"


def test_the_engine_refuses_face_enhance_when_no_restorer_is_installed(tmp_path: Path) -> None:
    from inference.engines.faces import face_restorer

    with pytest.raises(InvalidInput) as caught:
        face_restorer(call("upscale", {"face_enhance": True}, {}, tmp_path))
    assert caught.value.field == "face_enhance"
    assert face_restorer(call("upscale", {"face_enhance": False}, {}, tmp_path)) is None


def test_a_broken_restorer_is_passed_over_for_a_good_one_and_alone_fails_clearly(
    tmp_path: Path, models: Path
) -> None:
    from inference.engines.faces import face_restorer

    store = ModelStore(tmp_path)
    # "gfpganv1.5" ranks before "gfpganv1.4": the broken file is tried first.
    broken = save_gfpgan(tmp_path / "GFPGANv1.5.pth", seed=1)
    store.add(broken, id="gfpganv1.5")
    broken.write_bytes(b"\x00" * 128)  # broken after it was registered
    store.add(models / "GFPGANv1.4.pth", id="gfpganv1.4")
    chosen = face_restorer(call("faceswap", {"face_enhance": True}, {}, tmp_path))
    assert chosen.name == "gfpgan:gfpganv1.4"
    store.remove("gfpganv1.4")
    with pytest.raises(EngineError) as caught:
        face_restorer(call("faceswap", {"face_enhance": True}, {}, tmp_path))
    assert caught.value.code == "invalid_model"
    assert "GFPGANv1.5.pth is not a readable face restoration model file" in str(caught.value)


def test_faceswap_with_face_enhance_restores_only_inside_the_swapped_face(models: Path) -> None:
    from inference.engines.faces import run_faceswap

    images = {
        "source_url": Image.fromarray(marked_source(GREEN)),
        "target_url": Image.fromarray(astronaut()),
    }
    payload = {"max_side": 1080, "sharpen": 0.0, "max_faces": 0, "upscale": 0}
    plain = run_faceswap(call("faceswap", payload, images, models)).images[0]
    enhanced = run_faceswap(call("faceswap", {**payload, "face_enhance": True}, images, models)).images[0]
    assert enhanced.meta["face_enhance"] == "gfpgan:gfpganv1.4" and enhanced.meta["faces_restored"] == 1
    assert plain.meta["face_enhance"] is None and plain.meta["faces_restored"] == 0
    before, after = np.asarray(plain.image).astype(int), np.asarray(enhanced.image).astype(int)
    changed = np.abs(after - before).max(axis=2) > 0
    assert changed.sum() > 2000
    # Restored inside the swap's own region (the mesh hull, or the Haar engine's face oval), which
    # lies inside the swapped face's box.
    (face,) = (MeshDetector() if MEDIAPIPE else FaceDetector()).detect(astronaut())
    x0, y0, x1, y1 = expand_box(face, 1.3, *plain.image.size)
    assert not changed[:y0].any() and not changed[y1:].any()
    assert not changed[:, :x0].any() and not changed[:, x1:].any()


def test_face_fidelity_outside_zero_to_one_is_a_422_naming_the_field(
    settings: Settings, models: Path
) -> None:
    from app import create_app
    from tests.conftest import KEYS

    app = create_app(settings.with_overrides(models_dir=models))
    try:
        for fidelity, status in ((1.5, 422), (-0.1, 422), (0.7, 202)):
            payload = {
                "image_url": "https://example.com/a.png",
                "face_enhance": True,
                "face_fidelity": fidelity,
            }
            response = app.test_client().post(
                "/v1/jobs", json={"task": "upscale", "payload": payload}, headers={"X-API-Key": KEYS[0][1]}
            )
            assert response.status_code == status, response.get_json()
            if status == 422:
                assert "face_fidelity" in response.get_json()["error"]["details"]["payload"]
    finally:
        app.extensions["aiorch"].db.dispose()


def test_face_enhance_is_a_422_on_faceswap_without_a_restorer_and_accepted_with_one(
    settings: Settings, models: Path
) -> None:
    from app import create_app
    from tests.conftest import KEYS

    body = {
        "task": "faceswap",
        "payload": {
            "source_url": "https://example.com/a.png",
            "target_url": "https://example.com/b.png",
            "face_enhance": True,
        },
    }
    headers = {"X-API-Key": KEYS[0][1]}
    for models_dir, status in ((settings.models_dir, 422), (models, 202)):
        app = create_app(settings.with_overrides(models_dir=models_dir))
        try:
            response = app.test_client().post("/v1/jobs", json=body, headers=headers)
            assert response.status_code == status, response.get_json()
            if status == 422:
                problem = response.get_json()["error"]["details"]["payload"]["face_enhance"]
                assert "face-restoration model" in problem[0]
        finally:
            app.extensions["aiorch"].db.dispose()
