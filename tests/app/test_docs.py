"""The interactive docs work offline, and the OpenAPI document says what the server enforces:
the public endpoints are in it, every error an operation answers is listed, URL fields carry the
forms they accept. No database or broker is touched (serving the docs needs neither)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import swagger_ui_bundle
from flask.testing import FlaskClient

from app import create_app
from app.blocking import ENDPOINTS
from config import Settings
from tasks.payloads.base import INPUT_PATTERN


@pytest.fixture(scope="module")
def client() -> FlaskClient:
    return create_app(
        Settings(database_url="postgresql://postgres@127.0.0.1:1/none", broker_url="memory://")
    ).test_client()


@pytest.fixture(scope="module")
def spec(client: FlaskClient) -> dict[str, Any]:
    return client.get("/v1/openapi.json").get_json()


def test_the_docs_page_loads_every_asset_from_this_server_out_of_the_installed_bundle(
    client: FlaskClient,
) -> None:
    page = client.get("/v1/docs")  # no key, like the spec
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "//" not in re.sub(r"<script>.*?</script>", "", html, flags=re.S)  # no scheme, no host
    assert "http" not in html and "cdn" not in html.lower()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) == 3 and all(a.startswith("/v1/docs/assets/") for a in assets), assets
    bundle = Path(swagger_ui_bundle.swagger_ui_path)
    for url in assets:
        served = client.get(url)
        assert served.status_code == 200, url
        assert served.data == (bundle / url.rsplit("/", 1)[1]).read_bytes()
    # Swagger UI's default validator badge would load from an online service.
    assert '"validatorUrl": null' in html


@pytest.mark.parametrize("name", ["index.html", "..%2Fsetup.cfg", "swagger-initializer.js", "nope.js"])
def test_only_the_pages_assets_are_served(client: FlaskClient, name: str) -> None:
    response = client.get(f"/v1/docs/assets/{name}")
    assert response.status_code == 404 and response.is_json


def test_health_readiness_and_files_are_in_the_spec_without_a_key(spec: dict[str, Any]) -> None:
    for path in ("/healthz", "/readyz", "/files/{name}"):
        operation = spec["paths"][path]["get"]
        assert operation["security"] == [], path
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]
    assert "404" in spec["paths"]["/files/{name}"]["get"]["responses"]


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_blocking_endpoints_document_every_error_they_answer(spec: dict[str, Any], path: str) -> None:
    responses = spec["paths"][path]["post"]["responses"]
    for status in ("400", "401", "409", "413", "422", "429", "501", "503", "504"):
        assert status in responses, (path, status)
    assert "task_not_installed" in responses["501"]["description"]


def test_submits_document_their_errors(spec: dict[str, Any]) -> None:
    single = spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"400", "409", "413", "415", "422", "429", "501", "503"} <= set(single)
    batch = spec["paths"]["/v1/jobs/batch"]["post"]["responses"]
    assert {"200", "413", "422", "503"} <= set(batch)


def test_url_fields_carry_the_forms_they_accept(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["UpscalePayload"]["properties"]["image_url"]["pattern"] == INPUT_PATTERN
    assert schemas["FaceswapMultiPayload"]["properties"]["source_urls"]["items"]["pattern"] == INPUT_PATTERN
    for name in ("JobCreate", "BatchJob"):
        assert schemas[name]["properties"]["webhook_url"]["pattern"].startswith("^https?://")
    assert schemas["AssetUrl"]["properties"]["url"]["pattern"].startswith("^https?://")
    assert re.match(INPUT_PATTERN, "data:image/png;base64,iVBORw0KGgo=")
    assert re.match(INPUT_PATTERN, "asset://" + "0" * 32) and re.match(
        INPUT_PATTERN, "https://h.example/a.png"
    )
    assert not re.match(INPUT_PATTERN, "ftp://h.example/a.png")


def test_a_cancel_takes_exactly_one_of_ids_and_batch_id(spec: dict[str, Any]) -> None:
    schema = spec["components"]["schemas"]["JobCancelMany"]
    assert schema["oneOf"] == [{"required": ["ids"]}, {"required": ["batch_id"]}]
