"""The routes file: parsed and checked at settings load, errors name the entry, secrets never show."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from config import Settings, SettingsError
from config.routes import LOCAL
from tasks import catalog

SECRET = "sk-very-secret-0123456789"


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "timeout": 600,
        "providers": {
            "st": {
                "kind": "sensetime",
                "base_url": "https://mhapi.example.com/",
                "access_key": "ak-1",
                "secret_key": SECRET,
                "read_timeout": 10,
            },
            "zn": {"kind": "zhinian", "base_url": "https://zn.example.com", "api_key": SECRET},
        },
        "routes": {
            "gg_image": [
                {"backend": "st", "task": "generate", "options": {"model_id": "m1"}},
                {"backend": "zn"},
                {"backend": "local"},
            ],
            "upscale": {"backends": [{"backend": "zn"}], "timeout": 30, "poll_interval": 0.5},
        },
    }
    doc.update(changes)
    return doc


def load(tmp_path: Path, doc: Any) -> Settings:
    path = tmp_path / "routes.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return Settings.from_env({"AIORCH_VAR_DIR": str(tmp_path), "AIORCH_ROUTES_FILE": str(path)})


def test_a_routes_file_is_parsed_with_defaults_and_per_route_overrides(tmp_path: Path) -> None:
    routes = load(tmp_path, document()).routes
    gg = routes.routes["gg_image"]
    assert [s.backend for s in gg.steps] == ["st", "zn", LOCAL]
    assert gg.steps[0].task == "generate" and gg.steps[0].options == {"model_id": "m1"}
    assert gg.remote_first and gg.timeout == 600
    upscale = routes.for_task("upscale")
    assert upscale is not None and upscale.timeout == 30 and upscale.poll_interval == 0.5
    st = routes.providers["st"]
    assert st.base_url == "https://mhapi.example.com"
    assert st.client_kwargs() == {
        "base_url": "https://mhapi.example.com",
        "read_timeout": 10.0,
        "access_key": "ak-1",
        "secret_key": SECRET,
    }


def test_no_routes_file_means_every_task_runs_locally(tmp_path: Path) -> None:
    settings = Settings.from_env({"AIORCH_VAR_DIR": str(tmp_path)})
    assert not settings.routes and settings.routes.for_task("gg_image") is None


def test_credentials_never_show_in_repr(tmp_path: Path) -> None:
    settings = load(tmp_path, document())
    assert SECRET not in repr(settings) and SECRET not in repr(settings.routes)
    assert "ak-1" not in repr(settings.routes.providers["st"])


@pytest.mark.parametrize(
    ("doc", "entry"),
    [
        (document(routes={"gg_image": [{"backend": "nope"}]}), "routes.gg_image[0].backend"),
        (document(routes={"gg_image": []}), "routes.gg_image"),
        (document(routes={"upscale": [{"backend": "local"}, {"backend": "st"}]}), "routes.upscale[0]"),
        (document(routes={"upscale": [{"backend": "st", "options": []}]}), "routes.upscale[0].options"),
        (
            document(routes={"upscale": {"backends": [{"backend": "st"}], "timeout": 0}}),
            "routes.upscale.timeout",
        ),
        (document(routes={"upscale": [{"backend": "st", "task": 5}]}), "routes.upscale[0].task"),
        (document(routes={"upscale": [{"backend": "st", "retries": 2}]}), "routes.upscale[0]: unknown key"),
        (document(providers={"st": {"kind": "openai", "base_url": "https://x"}}), "providers.st.kind"),
        (document(providers={"st": {"kind": "sensetime", "base_url": "ftp://x"}}), "providers.st.base_url"),
        (
            document(providers={"st": {"kind": "sensetime", "base_url": "https://x", "access_key": "a"}}),
            "providers.st.secret_key is required",
        ),
        (document(providers={"local": {"kind": "upstream"}}), "providers.local"),
        (document(extra=1), "the routes file: unknown key"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_bad_routes_file_is_a_settings_error_naming_the_entry(tmp_path: Path, doc: Any, entry: str) -> None:
    with pytest.raises(SettingsError, match="AIORCH_ROUTES_FILE") as caught:
        load(tmp_path, doc)
    assert entry in str(caught.value)


def test_a_bad_credential_is_named_but_never_echoed(tmp_path: Path) -> None:
    doc = document()
    doc["providers"]["st"]["secret_key"] = ["leaked-" + SECRET]
    with pytest.raises(SettingsError, match=r"providers\.st\.secret_key") as caught:
        load(tmp_path, doc)
    assert SECRET not in str(caught.value)


def test_a_missing_routes_file_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.from_env({"AIORCH_ROUTES_FILE": str(tmp_path / "absent.json")})


def test_remote_only_tasks_exist_only_through_a_route_with_a_provider(tmp_path: Path) -> None:
    with pytest.raises(catalog.TaskUnavailable, match="route"):
        catalog.resolve("gg_image")
    routes = load(tmp_path, document()).routes
    assert catalog.resolve("gg_image", routes=routes).name == "generate"
    with pytest.raises(catalog.TaskUnavailable, match="route"):
        catalog.resolve("cx_image", routes=routes)
    # ahv_video is a task of its own, on the cpu queue, that only a provider route can serve.
    with pytest.raises(catalog.TaskUnavailable, match="'ahv_video' needs a remote provider route"):
        catalog.resolve("ahv_video", routes=routes)
    video = load(tmp_path, document(routes={"ahv_video": [{"backend": "zn"}]})).routes
    spec = catalog.resolve("ahv_video", routes=video)
    assert (spec.name, spec.queue, spec.output) == ("ahv_video", "cpu", "video")
    local_video = load(tmp_path, document(routes={"ahv_video": [{"backend": "local"}]})).routes
    with pytest.raises(catalog.TaskUnavailable, match="route"):
        catalog.resolve("ahv_video", routes=local_video)
    local_only = load(tmp_path, document(routes={"gg_image": [{"backend": "local"}]})).routes
    with pytest.raises(catalog.TaskUnavailable):
        catalog.resolve("gg_image", routes=local_only)


def test_a_remote_first_route_needs_no_local_model_but_a_local_route_does(tmp_path: Path) -> None:
    def no_model(_spec: catalog.TaskSpec) -> bool:
        return False

    with pytest.raises(catalog.TaskUnavailable, match="model"):
        catalog.resolve("ahv_image", has_model=no_model)
    routes = load(tmp_path, document(routes={"ahv_image": [{"backend": "st"}]})).routes
    assert catalog.resolve("ahv_image", has_model=no_model, routes=routes).name == "generate"
    # The canonical task's route serves its aliases too.
    routes = load(tmp_path, document(routes={"generate": [{"backend": "zn"}]})).routes
    assert catalog.resolve("ahv_image", has_model=no_model, routes=routes).name == "generate"


@pytest.mark.parametrize(
    "raw", ["alice:alice-key-1,sk-live-0123456789abcdef", "alice:sk-live-0123456789abcdef,:x"]
)
def test_a_malformed_api_keys_entry_is_named_by_position_and_never_echoed(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"AIORCH_API_KEYS": raw})
    message = str(caught.value)
    assert "AIORCH_API_KEYS entry 2" in message
    assert "sk-live-0123456789abcdef" not in message and "alice-key-1" not in message
