"""`aiorch models list|add|pull|remove` and what the API sees of the store while it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from app import create_app
from app.cli import main
from config import Settings
from tests.conftest import KEYS


@pytest.fixture
def sr_weights(tmp_path: Path) -> Path:
    import torch

    from tests.inference.tiny_vision import TinyRRDBNet, save_sr_checkpoint

    torch.manual_seed(0)
    return save_sr_checkpoint(TinyRRDBNet(scale=2), tmp_path / "RealESRGAN_x2plus.pth")


def run(models_dir: Path, *args: str):
    result = CliRunner().invoke(main, ["models", *args], env={"AIORCH_MODELS_DIR": str(models_dir)})
    return result


def test_add_detects_the_type_and_list_shows_it(tmp_path: Path, sr_weights: Path) -> None:
    models = tmp_path / "models"
    added = run(models, "add", str(sr_weights), "--id", "x2")
    assert added.exit_code == 0, added.output
    assert "realesrgan" in added.output and "upscale" in added.output
    listed = run(models, "list")
    assert "x2\trealesrgan\tupscale" in listed.output and "lanczos" in listed.output
    assert run(models, "add", str(tmp_path / "missing.pth")).exit_code != 0
    assert run(models, "remove", "x2").exit_code == 0
    assert "x2" not in run(models, "list").output


def test_pull_offline_registers_a_snapshot_from_the_local_cache(tmp_path: Path, sr_weights: Path) -> None:
    models = tmp_path / "models"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = models / "hub" / "models--acme--tiny-x2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "RealESRGAN_x2plus.pth").write_bytes(sr_weights.read_bytes())
    pulled = run(models, "pull", "acme/tiny-x2", "--offline")
    assert pulled.exit_code == 0, pulled.output
    assert "tiny-x2" in run(models, "list").output
    missing = run(models, "pull", "acme/absent", "--offline")
    assert missing.exit_code != 0 and "pull failed" in missing.output


def test_a_model_added_while_the_api_runs_is_listed_without_restart(
    settings: Settings, tmp_path: Path, sr_weights: Path
) -> None:
    models = tmp_path / "models"
    client = create_app(settings.with_overrides(models_dir=models)).test_client()
    headers = {"X-API-Key": KEYS[0][1]}
    before = client.get("/v1/models?type=realesrgan", headers=headers).get_json()
    assert before == {"data": [], "have_next": False}
    assert run(models, "add", str(sr_weights), "--id", "x2").exit_code == 0
    after = client.get("/v1/models?type=realesrgan", headers=headers).get_json()["data"]
    assert [m["id"] for m in after] == ["x2"] and after[0]["tasks"] == ["upscale"]
    assert set(after[0]) >= {"id", "name", "type", "tasks", "base_model_type"}
    paged = client.get("/v1/models?size=1&offset=0", headers=headers).get_json()
    assert len(paged["data"]) == 1 and paged["have_next"] is True
    caps = client.get("/v1/capabilities", headers=headers).get_json()["tasks"]
    assert next(t for t in caps if t["task"] == "generate")["installed"] is False
