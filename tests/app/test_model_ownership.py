"""Models of a client (a LoRA it trained): only that client sees one, names one, or deletes one;
another client gets exactly what a model that does not exist gets; an admin sees and removes every
model. Through the real API (the Flask app on the run's database) and the real model store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from app import create_app
from config import Settings
from inference.model_store import ModelNotFound, ModelStore, ModelStoreError
from tests.conftest import KEYS
from tests.inference.tiny_diffusion import save_tiny_lora, save_tiny_sd

ALICE_ID, BOB_ID = KEYS[0][0], KEYS[1][0]
ALICE = {"X-API-Key": KEYS[0][1]}
BOB = {"X-API-Key": KEYS[1][1]}
OPS = {"X-API-Key": "ops-admin-key-0123456789"}
IMAGES = [f"http://images.example.com/{i}.png" for i in range(4)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with an operator's base model and LoRA, and a LoRA of Alice's (where train_lora puts
    one: trained/<id>/)."""
    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    store.add(save_tiny_sd(root / "tiny-sd"), id="tiny-sd")
    store.add(save_tiny_lora(root / "house-style"), id="house-style", type="lora")
    # As train_lora registers one: its folder.
    alices = save_tiny_lora(root / "trained" / "lora-alice", seed=2).parent
    store.add(alices, id="lora-alice", type="lora", owner=ALICE_ID)
    return root


@pytest.fixture
def store(models: Path, tmp_path: Path) -> ModelStore:
    """A fresh copy of the store per test (deleting changes it)."""
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    return ModelStore(copy)


@pytest.fixture
def client(settings: Settings, store: ModelStore) -> Iterator[FlaskClient]:
    app = create_app(
        settings.with_overrides(models_dir=store.models_dir, admin_keys=(("ops", OPS["X-API-Key"]),))
    )
    yield app.test_client()
    app.extensions["aiorch"].db.dispose()


def ids(client: FlaskClient, headers: dict[str, str]) -> set[str]:
    response = client.get("/v1/models?size=200", headers=headers)
    assert response.status_code == 200
    return {entry["id"] for entry in response.get_json()["data"]}


def test_the_store_shows_a_clients_model_to_that_client_and_the_operator_only(store: ModelStore) -> None:
    assert store.get("lora-alice", client=ALICE_ID).owner == ALICE_ID
    assert store.get("lora-alice").owner == ALICE_ID  # the operator's view
    with pytest.raises(ModelNotFound):
        store.get("lora-alice", client=BOB_ID)
    assert "lora-alice" not in {e.id for e in store.list(client=BOB_ID)}
    assert {"house-style", "lora-alice"} <= {e.id for e in store.list(type="lora", client=ALICE_ID)}
    # Bob cannot remove it (it does not exist for him), nor the operator's models.
    with pytest.raises(ModelNotFound):
        store.remove("lora-alice", client=BOB_ID)
    with pytest.raises(ModelStoreError, match="operator"):
        store.remove("house-style", client=ALICE_ID)


def test_listing_shows_each_client_its_own_models_and_an_admin_every_model_with_its_owner(
    client: FlaskClient,
) -> None:
    assert {"tiny-sd", "house-style", "lora-alice", "lanczos"} <= ids(client, ALICE)
    assert "lora-alice" not in ids(client, BOB) and {"tiny-sd", "house-style"} <= ids(client, BOB)
    every = {e["id"]: e for e in client.get("/v1/models?size=200", headers=OPS).get_json()["data"]}
    assert every["lora-alice"]["owner"] == ALICE_ID and every["house-style"]["owner"] is None


def test_a_client_deletes_its_own_model_with_its_files_and_nobody_elses(
    client: FlaskClient, store: ModelStore
) -> None:
    folder = store.models_dir / "trained" / "lora-alice"
    assert folder.is_dir()
    # Bob: the same 404 as a model that does not exist.
    for model_id in ("lora-alice", "no-such-model"):
        response = client.delete(f"/v1/models/{model_id}", headers=BOB)
        assert response.status_code == 404 and response.get_json()["error"]["code"] == "not_found"
    # An operator's model: seen, not removable by a client.
    response = client.delete("/v1/models/house-style", headers=ALICE)
    assert response.status_code == 403 and "admin" in response.get_json()["error"]["message"]
    assert client.delete("/v1/models/lora-alice", headers=ALICE).status_code == 204
    assert not folder.exists()  # a client's model goes with its files
    assert "lora-alice" not in ids(client, ALICE)
    assert client.delete("/v1/models/lora-alice", headers=ALICE).status_code == 404


def test_an_admin_removes_any_model_and_an_operators_files_stay(
    client: FlaskClient, store: ModelStore
) -> None:
    assert client.delete("/v1/models/house-style", headers=OPS).status_code == 204
    assert (store.models_dir / "house-style").is_dir()  # the operator's files are the operator's
    assert client.delete("/v1/models/lora-alice", headers=OPS).status_code == 204
    assert not (store.models_dir / "trained" / "lora-alice").exists()


def train(**payload: Any) -> dict[str, Any]:
    return {"task": "train_lora", "payload": {"images": IMAGES, "trigger_word": "sks", **payload}}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"images": IMAGES[:3]}, "images"),
        ({"images": IMAGES * 51}, "images"),
        ({"rank": 2}, "rank"),
        ({"rank": 256}, "rank"),
        ({"steps": 0}, "steps"),
        ({"steps": 10001}, "steps"),
        ({"resolution": 500}, "resolution"),
        ({"learning_rate": 1.0}, "learning_rate"),
        ({"trigger_word": None, "captions": ["a"] * 3}, "captions"),
        ({"trigger_word": None}, "captions"),
        ({"base_model": "house-style"}, "base_model"),  # a LoRA, not a diffusers model
        ({"base_model": "no-such-model"}, "base_model"),
    ],
)
def test_a_bad_training_request_is_a_422_naming_the_field(
    client: FlaskClient, payload: dict[str, Any], field: str
) -> None:
    body = train(**{"base_model": "tiny-sd", **payload})
    body["payload"] = {k: v for k, v in body["payload"].items() if v is not None}
    response = client.post("/v1/jobs", headers=ALICE, json=body)
    assert response.status_code == 422, response.get_json()
    assert field in response.get_json()["error"]["details"]["payload"], response.get_json()


def test_another_clients_model_is_an_unknown_base_model(client: FlaskClient, store: ModelStore) -> None:
    # Alice's model named by Bob: the same words as a model that does not exist.
    mine = client.post("/v1/jobs", headers=BOB, json=train(base_model="lora-alice")).get_json()
    nothing = client.post("/v1/jobs", headers=BOB, json=train(base_model="lora-nobody")).get_json()
    assert mine["error"]["details"]["payload"]["base_model"] == ["unknown model 'lora-alice'"]
    assert nothing["error"]["details"]["payload"]["base_model"] == ["unknown model 'lora-nobody'"]
