"""The model store: manifest, type detection, paging, sharing between processes, pulling."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from inference.model_files import DIFFUSION_TASKS, INPAINT_TASKS
from inference.model_store import MANIFEST_NAME, ModelNotFound, ModelStore, ModelStoreError
from tests.inference.tiny_diffusion import save_tiny_lora, save_tiny_sd

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file or folder of each kind the store recognises, outside any models dir."""
    root = tmp_path_factory.mktemp("weights")
    return {
        "sd": save_tiny_sd(root / "tiny-sd"),
        "sd-inpaint": save_tiny_sd(root / "tiny-sd-inpainting", inpainting=True),
        "lora": save_tiny_lora(root / "lora"),
        "rrdb": _save_rrdb(root / "RealESRGAN_x4plus.pth"),
        "compact": _save_compact(root / "realesr-general-x2v3.pth"),
        "onnx": _save_onnx(root / "u2netp.onnx"),
    }


def _save_rrdb(path: Path) -> Path:
    # The key layout of basicsr's RRDBNet (2 blocks, 8 features): what detection reads.
    f, g = 8, 4
    state = {"conv_first.weight": torch.zeros(f, 3, 3, 3), "conv_first.bias": torch.zeros(f)}
    for b in range(2):
        for r in (1, 2, 3):
            for c in range(1, 6):
                cin = f + (c - 1) * g
                cout = g if c < 5 else f
                state[f"body.{b}.rdb{r}.conv{c}.weight"] = torch.zeros(cout, cin, 3, 3)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        state[f"{name}.weight"] = torch.zeros(f, f, 3, 3)
    state["conv_last.weight"] = torch.zeros(3, f, 3, 3)
    torch.save({"params_ema": state}, path)
    return path


def _save_compact(path: Path) -> Path:
    # SRVGGNetCompact: conv, prelu, (conv, prelu)*n, conv to 3 * scale^2 channels.
    state = {"body.0.weight": torch.zeros(16, 3, 3, 3), "body.0.bias": torch.zeros(16)}
    state["body.1.weight"] = torch.zeros(16)
    state["body.2.weight"] = torch.zeros(16, 16, 3, 3)
    state["body.3.weight"] = torch.zeros(16)
    state["body.4.weight"] = torch.zeros(3 * 2 * 2, 16, 3, 3)
    torch.save({"params": state}, path)
    return path


def _save_onnx(path: Path) -> Path:
    node = helper.make_node("Sigmoid", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    model = helper.make_model(graph)
    model.ir_version = 10  # onnxruntime 1.31 refuses the IR 14 that onnx 1.23 writes
    onnx.save(model, path)
    return path


def test_a_diffusers_folder_is_detected_with_its_base_model_and_tasks(tmp_path, weights):
    store = ModelStore(tmp_path)
    entry = store.add(weights["sd"])
    assert (entry.id, entry.name, entry.type) == ("tiny-sd", "tiny-sd", "diffusers")
    # An SD 1.5 model also trains LoRAs (one text encoder); SDXL and inpainting models do not.
    assert entry.base_model_type == "sd15" and entry.tasks == (*DIFFUSION_TASKS, "train_lora")
    assert entry.size_bytes > 0 and entry.added_at
    inpainting = store.add(weights["sd-inpaint"], id="inpainter")
    assert inpainting.tasks == INPAINT_TASKS  # a 9-channel UNet cannot generate from text
    assert inpainting.extra["unet_in_channels"] == 9
    # A manifest written before stylize and train_lora existed: its diffusers entries serve them
    # (what a diffusers model serves is derived when the manifest is read, never trusted from it).
    import json

    manifest = json.loads(store.manifest_path.read_text())
    for item in manifest["models"]:
        item["tasks"] = ["generate", "inpaint", "remove_object", "outpaint"]
    store.manifest_path.write_text(json.dumps(manifest))
    reread = ModelStore(tmp_path)
    assert reread.get("tiny-sd").tasks == (*DIFFUSION_TASKS, "train_lora")
    assert reread.get("inpainter").tasks == INPAINT_TASKS
    assert {e.id for e in reread.list(task="stylize")} == {"tiny-sd"}


def test_lora_esrgan_and_onnx_files_are_detected(tmp_path, weights):
    store = ModelStore(tmp_path)
    lora = store.add(weights["lora"], id="style")
    assert lora.type == "lora" and "generate" in lora.tasks
    rrdb = store.add(weights["rrdb"])
    assert (rrdb.id, rrdb.type, rrdb.tasks) == ("realesrgan_x4plus", "realesrgan", ("upscale",))
    assert rrdb.extra == {"arch": "RRDBNet", "scale": 4, "num_block": 2}
    compact = store.add(weights["compact"])
    assert compact.type == "realesrgan" and compact.extra == {"arch": "SRVGGNetCompact", "scale": 2}
    net = store.add(weights["onnx"])
    assert (net.type, net.tasks) == ("onnx", ("remove_background",))


def test_explicit_fields_override_detection_and_a_wrong_type_is_refused(tmp_path, weights):
    store = ModelStore(tmp_path)
    entry = store.add(weights["lora"], id="style", type="lora", base_model_type="sdxl", name="Style")
    assert (entry.name, entry.base_model_type) == ("Style", "sdxl")
    with pytest.raises(ModelStoreError, match="looks like a 'onnx' model"):
        store.add(weights["onnx"], type="realesrgan")
    with pytest.raises(ModelStoreError, match="unknown model type"):
        store.add(weights["onnx"], type="checkpoint")


def test_unrecognised_files_are_refused(tmp_path):
    store = ModelStore(tmp_path / "models")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ModelStoreError, match="cannot tell"):
        store.add(notes)
    junk = tmp_path / "junk.pth"
    torch.save({"some": torch.zeros(1)}, junk)
    with pytest.raises(ModelStoreError, match="not a Real-ESRGAN"):
        store.add(junk)
    with pytest.raises(ModelStoreError, match="no such file"):
        store.add(tmp_path / "missing")


def test_ids_are_unique_and_builtins_are_reserved(tmp_path, weights):
    store = ModelStore(tmp_path)
    store.add(weights["onnx"], id="seg")
    with pytest.raises(ModelStoreError, match="already exists"):
        store.add(weights["rrdb"], id="seg")
    assert store.add(weights["rrdb"], id="seg", replace=True).type == "realesrgan"
    with pytest.raises(ModelStoreError, match="built-in"):
        store.add(weights["rrdb"], id="lanczos")
    with pytest.raises(ModelStoreError, match="lowercase"):
        store.add(weights["rrdb"], id="Bad Id")


def test_list_filters_and_pages_with_builtins_first(tmp_path, weights):
    store = ModelStore(tmp_path)
    for key in ("sd", "lora", "rrdb", "compact", "onnx"):
        store.add(weights[key], id=f"m-{key}")
    assert [e.id for e in store.list()][:2] == ["lanczos", "m-compact"]
    assert [e.id for e in store.list(type="realesrgan")] == ["m-compact", "m-rrdb"]
    assert [e.id for e in store.list(task="upscale")] == ["lanczos", "m-compact", "m-rrdb"]
    first = store.page(size=4)
    rest = store.page(size=4, offset=4)
    assert first.have_next and not rest.have_next
    assert [e.id for e in first.data + rest.data] == [e.id for e in store.list()]
    assert len(store.list()) == 6
    with pytest.raises(ModelStoreError):
        store.page(size=0)


def test_get_and_remove(tmp_path, weights):
    store = ModelStore(tmp_path)
    store.add(weights["onnx"], id="seg")
    assert store.get("seg").type == "onnx" and "seg" in store
    assert store.get("lanczos").type == "builtin"
    removed = store.remove("seg")
    assert removed.id == "seg" and "seg" not in store
    assert weights["onnx"].exists()  # the operator's files are left alone
    with pytest.raises(ModelNotFound):
        store.get("seg")
    with pytest.raises(ModelNotFound):
        store.remove("seg")
    with pytest.raises(ModelStoreError):
        store.remove("lanczos")


def test_paths_inside_the_models_dir_are_stored_relative(tmp_path, weights):
    store = ModelStore(tmp_path)
    local = tmp_path / "upscalers" / "x4.pth"
    local.parent.mkdir()
    local.write_bytes(weights["rrdb"].read_bytes())
    entry = store.add(local)
    assert entry.path == "upscalers/x4.pth"
    outside = store.add(weights["onnx"])
    assert Path(outside.path).is_absolute()
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert {m["id"] for m in manifest["models"]} == {"x4", "u2netp"}


def test_another_process_sees_an_added_model_without_restart(tmp_path, weights):
    reader = ModelStore(tmp_path)
    assert reader.list(type="onnx") == []
    script = (
        "import sys; from pathlib import Path; from inference.model_store import ModelStore; "
        "ModelStore(Path(sys.argv[1])).add(sys.argv[2], id='added-elsewhere')"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(weights["onnx"])], check=True, cwd=ROOT)
    assert reader.get("added-elsewhere").type == "onnx"
    ModelStore(tmp_path).remove("added-elsewhere")
    assert "added-elsewhere" not in reader


def test_concurrent_writers_lose_no_entry(tmp_path, weights):
    stores = [ModelStore(tmp_path) for _ in range(6)]
    threads = [
        threading.Thread(target=s.add, args=(weights["onnx"],), kwargs={"id": f"net-{i}"})
        for i, s in enumerate(stores)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.id for e in ModelStore(tmp_path).list(type="onnx")] == [f"net-{i}" for i in range(6)]


def test_a_broken_manifest_is_reported(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelStoreError, match="cannot read the model manifest"):
        ModelStore(tmp_path).list()


def _fill_hf_cache(cache: Path, repo: str, files: dict[str, bytes]) -> str:
    """Lay out ``repo`` the way huggingface_hub's cache stores a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, data in files.items():
        target = repo_dir / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return commit


def test_pull_registers_a_snapshot_from_the_local_hf_cache(tmp_path, weights):
    store = ModelStore(tmp_path)
    _fill_hf_cache(
        tmp_path / "hub",
        "acme/tiny-style",
        {"pytorch_lora_weights.safetensors": weights["lora"].read_bytes()},
    )
    entry = store.pull("acme/tiny-style", local_files_only=True, base_model_type="sd15")
    assert (entry.id, entry.type, entry.source) == ("tiny-style", "lora", "hf:acme/tiny-style")
    assert entry.path.startswith("hub/models--acme--tiny-style/snapshots/")
    assert store.resolve_path(entry).is_file()


def test_pull_of_a_diffusers_repo_registers_the_folder(tmp_path, weights):
    files = {
        str(p.relative_to(weights["sd"])): p.read_bytes() for p in weights["sd"].rglob("*") if p.is_file()
    }
    cache = tmp_path / "elsewhere"
    _fill_hf_cache(cache, "acme/tiny-sd", files)
    store = ModelStore(tmp_path / "models")
    entry = store.pull("acme/tiny-sd", id="sd", cache_dir=cache, local_files_only=True)
    assert entry.type == "diffusers" and entry.base_model_type == "sd15"
    assert (store.resolve_path(entry) / "model_index.json").exists()


# A diffusers repo as the Hub lists it (the SD 1.5 layout): root single-file checkpoints, fp16 and
# non-EMA variants and .bin copies beside the canonical safetensors.
SD15_REPO_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned.safetensors",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
    "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
]


def test_pull_patterns_take_component_safetensors_only_under_the_hubs_own_matching():
    from huggingface_hub.utils import filter_repo_objects

    from inference.model_store import DIFFUSERS_PULL_PATTERNS

    taken = set(filter_repo_objects(SD15_REPO_FILES, allow_patterns=list(DIFFUSERS_PULL_PATTERNS)))
    assert taken == {
        "model_index.json",
        "feature_extractor/preprocessor_config.json",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
    }


def test_pull_of_a_diffusers_repo_skips_root_checkpoints_and_fp16_variants(tmp_path, weights):
    # The cache as an earlier online pull left it: the Hub's listing of the whole repo
    # (trees/<commit>.json) and only the files a pull needs. Offline, huggingface_hub checks
    # every file the patterns ask for against that listing, so patterns that also asked for
    # the root checkpoints or the fp16 variants would find them missing and fail the pull.
    tiny = {
        str(p.relative_to(weights["sd"])): p.read_bytes() for p in weights["sd"].rglob("*") if p.is_file()
    }
    extras = [
        "v1-5-pruned.safetensors",
        "v1-5-pruned-emaonly.safetensors",
        "v1-5-pruned.ckpt",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
    ]
    listing = tiny | {name: b"x" for name in extras}
    cache = tmp_path / "hub"
    commit = _fill_hf_cache(cache, "acme/sd15", tiny)
    tree = cache / "models--acme--sd15" / "trees" / f"{commit}.json"
    tree.parent.mkdir(parents=True)
    tree.write_text(
        json.dumps(
            {
                "format_version": 1,
                "files": {
                    n: {"size": len(d), "blob_id": f"{i:040x}"} for i, (n, d) in enumerate(listing.items())
                },
            }
        )
    )
    store = ModelStore(tmp_path)
    entry = store.pull("acme/sd15", local_files_only=True)
    assert entry.type == "diffusers" and entry.base_model_type == "sd15"
    folder = store.resolve_path(entry)
    assert not list(folder.glob("*.safetensors")) and not list(folder.rglob("*fp16*"))
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_pull_without_network_or_cache_fails_clearly(tmp_path):
    with pytest.raises(ModelStoreError, match="could not pull 'acme/absent'"):
        ModelStore(tmp_path).pull("acme/absent", local_files_only=True)


def test_a_torchvision_detector_needs_its_label_map_beside_it(tmp_path):
    import torch
    from torchvision.models import detection

    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    weights = tmp_path / "det.pth"
    torch.save(model.state_dict(), weights)
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelStoreError, match="label map"):
        store.add(weights)
    (tmp_path / "det.labels.json").write_text('["__background__", "cat", "dog"]')
    entry = store.add(weights)
    assert (entry.type, entry.tasks) == ("detector", ("scan_objects",))
    assert entry.extra["labels"] == "det.labels.json" and entry.extra["arch_family"] == "ssdlite"
