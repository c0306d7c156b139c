"""``AIORCH_STYLES_FILE``: the operator's stylize presets (issue 16), read at start-up from JSON or
TOML, checked field by field with errors naming the preset and field, merged over the built-ins,
and listed with ``style`` by ``GET /v1/capabilities``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config import Settings, SettingsError
from config.styles import StylePreset
from inference.styles import BUILTIN_STYLES, style_presets

NOIR = {
    "prompt": "film noir photograph of {prompt}, high contrast",
    "negative_prompt": "color",
    "description": "Film noir",
    "strength": 0.4,
    "lora": "house-style",
    "lora_weight": 0.8,
}


def styles_file(tmp_path: Path, document: object, name: str = "styles.json") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    return path


def test_a_json_styles_file_is_read_at_start_with_every_field(tmp_path: Path) -> None:
    path = styles_file(tmp_path, {"noir": NOIR, "plain": {"prompt": "{prompt}, plain"}})
    settings = Settings.from_env({"AIORCH_STYLES_FILE": str(path)})
    assert settings.styles_file == path.resolve()
    noir, plain = settings.styles
    assert noir == StylePreset("noir", "Film noir", NOIR["prompt"], "color", 0.4, "house-style", 0.8)
    assert noir.compose("a cat") == "film noir photograph of a cat, high contrast"
    # The optional fields' defaults: no negative prompt, no LoRA, the built-ins' usual strength.
    assert (plain.negative_prompt, plain.description, plain.lora, plain.strength) == ("", "", None, 0.55)


def test_a_toml_styles_file_reads_the_same(tmp_path: Path) -> None:
    toml = '[noir]\nprompt = "film noir photograph of {prompt}"\nlora = "house-style"\nlora_weight = 0.5\n'
    settings = Settings.from_env({"AIORCH_STYLES_FILE": str(styles_file(tmp_path, toml, "styles.toml"))})
    (noir,) = settings.styles
    assert (noir.name, noir.lora, noir.lora_weight) == ("noir", "house-style", 0.5)


def test_without_a_styles_file_the_built_ins_are_the_presets() -> None:
    settings = Settings.from_env({})
    assert settings.styles_file is None and settings.styles == ()
    assert style_presets(settings.styles) == BUILTIN_STYLES


def test_file_presets_replace_built_ins_of_the_same_name_in_place_and_come_after_them(tmp_path: Path) -> None:
    path = styles_file(tmp_path, {"noir": NOIR, "sketch": {"prompt": "charcoal sketch of {prompt}"}})
    presets = style_presets(Settings.from_env({"AIORCH_STYLES_FILE": str(path)}).styles)
    assert list(presets) == [*BUILTIN_STYLES, "noir"]
    assert presets["sketch"].prompt == "charcoal sketch of {prompt}"
    assert presets["anime"] is BUILTIN_STYLES["anime"]


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ({"noir": {**NOIR, "lora_wieght": 1}}, "preset 'noir': unknown field 'lora_wieght'"),
        ({"noir": {"description": "no prompt"}}, "preset 'noir': prompt must be a non-empty string"),
        ({"noir": {"prompt": "film noir"}}, "preset 'noir': prompt must contain {prompt}"),
        ({"noir": {**NOIR, "lora_weight": 2.5}}, "preset 'noir': lora_weight must be a number in (0, 2.0]"),
        ({"noir": {**NOIR, "lora_weight": 0}}, "preset 'noir': lora_weight must be a number in (0, 2.0]"),
        ({"noir": {"prompt": "{prompt}", "lora_weight": 1}}, "preset 'noir': lora_weight needs a lora"),
        ({"noir": {**NOIR, "strength": 1.5}}, "preset 'noir': strength must be a number in (0, 1.0]"),
        ({"noir": {**NOIR, "strength": "high"}}, "preset 'noir': strength must be a number"),
        ({"noir": {**NOIR, "negative_prompt": ["a"]}}, "preset 'noir': negative_prompt must be a string"),
        ({"noir": {**NOIR, "lora": 7}}, "preset 'noir': lora must be a string"),
        ({"no ir": NOIR}, "preset 'no ir': a name is 1-64 letters"),
        ({"noir": "film noir of {prompt}"}, "preset 'noir' must be an object"),
        (["noir"], "must hold an object of presets by name"),
        ('{"noir": ', "is not valid JSON (line 1"),
    ],
)
def test_a_bad_styles_file_stops_the_start_naming_the_preset_and_field(
    tmp_path: Path, document: object, says: str
) -> None:
    path = styles_file(tmp_path, document)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"AIORCH_STYLES_FILE": str(path)})
    assert str(caught.value).startswith("AIORCH_STYLES_FILE: ")
    assert says in str(caught.value)


def test_a_styles_file_that_is_not_there_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="AIORCH_STYLES_FILE: .* is not a readable file"):
        Settings.from_env({"AIORCH_STYLES_FILE": str(tmp_path / "missing.json")})


def test_capabilities_list_the_file_presets_with_style(settings: Settings, tmp_path: Path) -> None:
    from app import create_app
    from tests.conftest import KEYS

    path = styles_file(tmp_path, {"noir": NOIR})
    app = create_app(settings.with_overrides(styles_file=path))
    try:
        response = app.test_client().get("/v1/capabilities", headers={"X-API-Key": KEYS[0][1]})
        assert response.status_code == 200
        stylize = next(t for t in response.get_json()["tasks"] if t["task"] == "stylize")
        style = next(p for p in stylize["parameters"] if p["name"] == "style")
        assert [p["name"] for p in style["presets"]] == [*BUILTIN_STYLES, "noir"]
        assert style["presets"][-1] == {
            "name": "noir",
            "description": "Film noir",
            "strength": 0.4,
            "lora": "house-style",
        }
    finally:
        app.extensions["aiorch"].db.dispose()
