"""The assets API (ARCHITECTURE.md "Assets") through Flask's test client on the run's real Postgres,
and the worker's owner-only ``asset://`` look-up on the same database."""

from __future__ import annotations

import base64
import io
import os
import stat
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select, update

from app import create_app
from config import Settings
from models.db import utcnow
from models.jobs import Job, StoredFile
from models.jobstore import JobStore
from tasks.inputs import InputProblem
from tasks.prepare import load_inputs
from tasks.runtime import Runtime
from tasks.storage import Storage
from tests.conftest import KEYS
from tests.support.factories import make_job
from tests.support.servers import ImageServer, bomb_png

ALICE = {"X-API-Key": KEYS[0][1]}
BOB = {"X-API-Key": KEYS[1][1]}
ASSET_FIELDS = {"asset_id", "filename", "content_type", "size", "width", "height", "created_at", "expires_at"}


def png(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def noisy_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 bytes per pixel."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def make_app(settings: Settings, **overrides: Any) -> Flask:
    # The SSRF guard on, as in production, with loopback allowed for the local image server.
    return create_app(
        settings.with_overrides(
            allow_private_urls=False, allow_private_networks=("127.0.0.0/8",), **overrides
        )
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    application = make_app(settings)
    yield application
    application.extensions["aiorch"].db.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def new_client(app: Flask) -> dict[str, str]:
    """A client of its own (a fresh key), so lists and quotas start empty."""
    _row, key = app.extensions["aiorch"].keyring.create(f"assets-{uuid.uuid4().hex[:12]}")
    return {"X-API-Key": key}


def upload(client: FlaskClient, headers: dict[str, str], *files: tuple[bytes, str]) -> Any:
    data = {"file": [(io.BytesIO(content), name) for content, name in files]}
    return client.post("/v1/assets", data=data, headers=headers, content_type="multipart/form-data")


def uploaded(client: FlaskClient, headers: dict[str, str], *files: tuple[bytes, str]) -> list[dict[str, Any]]:
    response = upload(client, headers, *files)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["assets"]


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def stored_row(app: Flask, asset_id: str) -> StoredFile:
    with app.extensions["aiorch"].db.session() as session:
        row = session.scalar(select(StoredFile).where(StoredFile.asset_id == asset_id))
        assert row is not None
        return row


def upload_path(app: Flask, asset_id: str) -> Path:
    row = stored_row(app, asset_id)
    path = app.extensions["aiorch"].storage.asset_path(row.kind, row.name)
    assert path is not None
    return path


# -- upload ------------------------------------------------------------------------------------------


def test_a_multipart_upload_is_201_with_the_asset_object_and_a_private_file(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    content = png(64, 48)
    before = utcnow()
    (asset,) = uploaded(client, ALICE, (content, "holiday/cat.png"))
    assert set(asset) == ASSET_FIELDS
    assert len(asset["asset_id"]) == 32 and int(asset["asset_id"], 16) >= 0
    assert asset["filename"] == "cat.png"  # a label: the client's path is not kept
    assert (asset["content_type"], asset["size"]) == ("image/png", len(content))
    assert (asset["width"], asset["height"]) == (64, 48)
    created = datetime.fromisoformat(asset["created_at"])
    expires = datetime.fromisoformat(asset["expires_at"])
    assert before <= created <= utcnow()
    assert expires - created == timedelta(seconds=settings.result_retention)  # retention like outputs
    assert client.get(f"/v1/assets/{asset['asset_id']}", headers=ALICE).get_json() == asset
    # Nothing in the answer is a path or the storage name.
    row = stored_row(app, asset["asset_id"])
    assert row.kind == "upload" and row.job_id is None and row.name[:32] != asset["asset_id"]
    assert row.name not in str(asset) and str(settings.storage_dir) not in str(asset)
    # 0600 file in a 0700 folder: no other local user reads a tenant's image.
    path = upload_path(app, asset["asset_id"])
    assert path.read_bytes() == content
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_multipart_upload_of_several_files_makes_one_asset_each_in_order(client: FlaskClient) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(jpeg, "JPEG")
    assets = uploaded(
        client, ALICE, (png(20, 20), "a.png"), (jpeg.getvalue(), "b.jpg"), (png(33, 17), "c.png")
    )
    assert [a["filename"] for a in assets] == ["a.png", "b.jpg", "c.png"]
    assert [a["content_type"] for a in assets] == ["image/png", "image/jpeg", "image/png"]
    assert [(a["width"], a["height"]) for a in assets] == [(20, 20), (40, 30), (33, 17)]
    assert len({a["asset_id"] for a in assets}) == 3


def test_a_url_is_fetched_through_the_guard_and_checked_like_a_job_input(
    client: FlaskClient, image_server: ImageServer, astronaut_png: Path
) -> None:
    response = client.post("/v1/assets", json={"url": image_server.url("img/a.png")}, headers=ALICE)
    assert response.status_code == 201, response.get_data(as_text=True)
    (asset,) = response.get_json()["assets"]
    assert asset["filename"] == "a.png" and (asset["width"], asset["height"]) == (96, 96)
    content = client.get(f"/v1/assets/{asset['asset_id']}/content", headers=ALICE)
    assert content.data == astronaut_png.read_bytes()

    for path, status, code in [
        ("text", 422, "input_not_image"),
        ("bomb.png", 422, "input_too_many_pixels"),
        ("status/404", 422, "input_not_found"),
    ]:
        error = assert_error(
            client.post("/v1/assets", json={"url": image_server.url(path)}, headers=ALICE), status, code
        )
        assert set(error["details"]) == {"url"}
    bad = client.post("/v1/assets", json={"url": "ftp://example.com/a.png"}, headers=ALICE)
    assert "url" in assert_error(bad, 422, "validation_error")["details"]
    extra = client.post("/v1/assets", json={"url": image_server.url("img/a.png"), "x": 1}, headers=ALICE)
    assert "x" in assert_error(extra, 422, "validation_error")["details"]


def test_a_url_on_a_private_network_the_operator_did_not_allow_is_refused(
    settings: Settings, image_server: ImageServer
) -> None:
    app = create_app(settings.with_overrides(allow_private_urls=False, allow_private_networks=()))
    hits = len(image_server.hits)
    try:
        url = image_server.url("img/a.png")
        response = app.test_client().post("/v1/assets", json={"url": url}, headers=ALICE)
        assert response.status_code == 422, response.get_data(as_text=True)
        assert "url" in response.get_json()["error"]["details"]
        assert len(image_server.hits) == hits  # refused before any connection
    finally:
        app.extensions["aiorch"].db.dispose()


def test_an_upload_over_the_byte_limit_is_413_and_nothing_is_stored(settings: Settings) -> None:
    big = noisy_png(80)  # ~19 KB
    app = make_app(settings, max_input_bytes=8 * 1024)
    try:
        client = app.test_client()
        headers = new_client(app)
        error = assert_error(
            upload(client, headers, (png(), "ok.png"), (big, "big.png")), 413, "input_too_large"
        )
        assert set(error["details"]) == {"file[1]"}
        assert client.get("/v1/assets", headers=headers).get_json()["assets"] == []  # all or nothing
    finally:
        app.extensions["aiorch"].db.dispose()


def test_a_non_image_or_too_many_pixels_is_422_naming_the_part(app: Flask, client: FlaskClient) -> None:
    headers = new_client(app)
    error = assert_error(
        upload(client, headers, (png(), "a.png"), (b"%PDF-1.4", "b.pdf")), 422, "input_not_image"
    )
    assert set(error["details"]) == {"file[1]"}
    error = assert_error(upload(client, headers, (bomb_png(), "bomb.png")), 422, "input_too_many_pixels")
    assert set(error["details"]) == {"file[0]"}
    assert client.get("/v1/assets", headers=headers).get_json()["assets"] == []


def test_an_upload_without_file_parts_or_with_other_fields_is_422(client: FlaskClient) -> None:
    empty = client.post("/v1/assets", data={}, headers=ALICE, content_type="multipart/form-data")
    assert "file" in assert_error(empty, 422, "validation_error")["details"]
    other = client.post(
        "/v1/assets",
        data={"file": (io.BytesIO(png()), "a.png"), "note": "hi"},
        headers=ALICE,
        content_type="multipart/form-data",
    )
    assert "note" in assert_error(other, 422, "validation_error")["details"]
    text = client.post("/v1/assets", data=b"hello", headers={**ALICE, "Content-Type": "image/png"})
    assert_error(text, 415, "unsupported_media_type")
    assert_error(client.post("/v1/assets", data={}, content_type="multipart/form-data"), 401, "unauthorized")


def test_the_quota_counts_the_clients_uploads_only(settings: Settings) -> None:
    first, second = noisy_png(40), noisy_png(41)
    app = make_app(settings, asset_quota_bytes=len(first) + len(second) // 2)
    try:
        client = app.test_client()
        headers = new_client(app)
        (kept,) = uploaded(client, headers, (first, "one.png"))
        error = assert_error(upload(client, headers, (second, "two.png")), 413, "quota_exceeded")
        assert error["details"]["quota_bytes"] == len(first) + len(second) // 2
        assert error["details"]["used_bytes"] == len(first)
        # Another client has a quota of its own.
        uploaded(client, new_client(app), (second, "two.png"))
        # Outputs are not counted: a big output of this client changes nothing.
        client_id = stored_row(app, kept["asset_id"]).client_id
        with app.extensions["aiorch"].db.session() as session:
            session.add(
                StoredFile(
                    name=f"{uuid.uuid4().hex}.png",
                    asset_id=uuid.uuid4().hex,
                    kind="output",
                    job_id=make_job(app.extensions["aiorch"].db, client_id=client_id),
                    client_id=client_id,
                    content_type="image/png",
                    size=10**9,
                )
            )
        # Deleting an upload frees its bytes.
        assert client.delete(f"/v1/assets/{kept['asset_id']}", headers=headers).status_code == 204
        uploaded(client, headers, (second, "two.png"))
    finally:
        app.extensions["aiorch"].db.dispose()


# -- read, list, delete ------------------------------------------------------------------------------


def test_the_list_is_newest_first_and_pages_with_before(app: Flask, client: FlaskClient) -> None:
    headers = new_client(app)
    ids = [
        a["asset_id"] for a in uploaded(client, headers, *[(png(20 + i, 20), f"{i}.png") for i in range(5)])
    ]
    newest_first = ids[::-1]
    page = client.get("/v1/assets?limit=2", headers=headers).get_json()
    assert [a["asset_id"] for a in page["assets"]] == newest_first[:2] and page["have_next"] is True
    seen = [a["asset_id"] for a in page["assets"]]
    while page["have_next"]:
        before = page["assets"][-1]["created_at"]
        page = client.get(
            "/v1/assets", query_string={"limit": 2, "before": before}, headers=headers
        ).get_json()
        seen += [a["asset_id"] for a in page["assets"]]
    assert seen == newest_first
    whole = client.get("/v1/assets", headers=headers).get_json()
    assert [a["asset_id"] for a in whole["assets"]] == newest_first and whole["have_next"] is False
    assert_error(client.get("/v1/assets?limit=0", headers=headers), 422, "validation_error")
    assert_error(client.get("/v1/assets?limit=201", headers=headers), 422, "validation_error")
    assert_error(client.get("/v1/assets?before=yesterday", headers=headers), 422, "validation_error")
    assert (
        "kind"
        in assert_error(client.get("/v1/assets?kind=upload", headers=headers), 422, "validation_error")[
            "details"
        ]
    )


def test_content_is_the_bytes_with_private_caching_and_needs_the_key(app: Flask, client: FlaskClient) -> None:
    content = png(30, 40)
    (asset,) = uploaded(client, ALICE, (content, "x.png"))
    response = client.get(f"/v1/assets/{asset['asset_id']}/content", headers=ALICE)
    assert response.status_code == 200 and response.data == content
    assert response.mimetype == "image/png"
    assert response.headers["Cache-Control"] == "private"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert_error(client.get(f"/v1/assets/{asset['asset_id']}/content"), 401, "unauthorized")
    # An upload is never served by /files (the name would be enough there).
    row = stored_row(app, asset["asset_id"])
    assert client.get(f"/files/{row.name}").status_code == 404


def test_delete_removes_the_row_and_the_file(app: Flask, client: FlaskClient) -> None:
    (asset,) = uploaded(client, ALICE, (png(), "gone.png"))
    path = upload_path(app, asset["asset_id"])
    assert client.delete(f"/v1/assets/{asset['asset_id']}", headers=ALICE).status_code == 204
    assert not path.exists()
    assert_error(client.get(f"/v1/assets/{asset['asset_id']}", headers=ALICE), 404, "asset_not_found")
    assert_error(client.get(f"/v1/assets/{asset['asset_id']}/content", headers=ALICE), 404, "asset_not_found")
    assert_error(client.delete(f"/v1/assets/{asset['asset_id']}", headers=ALICE), 404, "asset_not_found")


def test_another_clients_asset_is_404_exactly_like_a_missing_one(app: Flask, client: FlaskClient) -> None:
    (asset,) = uploaded(client, ALICE, (png(), "mine.png"))
    missing = uuid.uuid4().hex
    for method, suffix in (("get", ""), ("get", "/content"), ("delete", "")):
        theirs = getattr(client, method)(f"/v1/assets/{asset['asset_id']}{suffix}", headers=BOB)
        nothing = getattr(client, method)(f"/v1/assets/{missing}{suffix}", headers=BOB)
        assert theirs.status_code == nothing.status_code == 404
        strip = {"message"}  # the message names the id asked for, nothing else differs
        assert {k: v for k, v in theirs.get_json()["error"].items() if k not in strip} == {
            k: v for k, v in nothing.get_json()["error"].items() if k not in strip
        }
        assert (
            theirs.get_json()["error"]["message"].replace(asset["asset_id"], missing)
            == (nothing.get_json()["error"]["message"])
        )
    assert all(
        a["asset_id"] != asset["asset_id"] for a in client.get("/v1/assets", headers=BOB).get_json()["assets"]
    )
    assert client.get(f"/v1/assets/{asset['asset_id']}", headers=ALICE).status_code == 200
    for odd in ("nope", "a" * 31 + "\x00", "%00"):
        assert_error(client.get(f"/v1/assets/{odd}", headers=ALICE), 404, "asset_not_found")


def test_an_expired_upload_is_gone_and_the_sweep_deletes_its_file(app: Flask, client: FlaskClient) -> None:
    (asset,) = uploaded(client, ALICE, (png(), "old.png"))
    path = upload_path(app, asset["asset_id"])
    db = app.extensions["aiorch"].db
    with db.session() as session:
        session.execute(
            update(StoredFile)
            .where(StoredFile.asset_id == asset["asset_id"])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert_error(client.get(f"/v1/assets/{asset['asset_id']}", headers=ALICE), 404, "asset_not_found")
    storage: Storage = app.extensions["aiorch"].storage
    removed = JobStore(db).expired_files()
    assert ("upload", path.name) in removed
    storage.delete_files(removed)  # what the sweep does with them
    assert not path.exists()


# -- jobs and data: inputs ---------------------------------------------------------------------------


def data_uri(content: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(content).decode()


def stored_payload(app: Flask, job_id: str) -> dict[str, Any]:
    with app.extensions["aiorch"].db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return dict(job.payload)


def test_a_large_data_input_is_stored_as_an_asset_and_the_row_holds_asset_ref(
    app: Flask, client: FlaskClient
) -> None:
    headers = new_client(app)
    content = noisy_png(160)  # ~77 KB, ~100 KB of base64: over the inline limit
    body = {"task": "upscale", "payload": {"image_url": data_uri(content), "scale": 2}}
    response = client.post("/v1/jobs", json=body, headers={**headers, "Idempotency-Key": "k1"})
    assert response.status_code == 202, response.get_data(as_text=True)
    job_id = response.get_json()["job_id"]
    payload = stored_payload(app, job_id)
    assert payload["scale"] == 2 and payload["image_url"].startswith("asset://")
    asset_id = payload["image_url"][len("asset://") :]
    listed = client.get("/v1/assets", headers=headers).get_json()["assets"]
    assert [(a["asset_id"], a["filename"], a["size"]) for a in listed] == [
        (asset_id, "image_url.png", len(content))
    ]
    assert client.get(f"/v1/assets/{asset_id}/content", headers=headers).data == content
    # The idempotency fingerprint is the body the client sent: the same body is the same job.
    again = client.post("/v1/jobs", json=body, headers={**headers, "Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.get_json()["job_id"] == job_id
    assert len(client.get("/v1/assets", headers=headers).get_json()["assets"]) == 1
    # A small data: input stays inline.
    small = data_uri(png(20, 20))
    job = client.post("/v1/jobs", json={"task": "upscale", "payload": {"image_url": small}}, headers=headers)
    assert stored_payload(app, job.get_json()["job_id"])["image_url"] == small


def test_a_list_input_of_large_data_is_converted_item_by_item(app: Flask, client: FlaskClient) -> None:
    headers = new_client(app)
    big, small = data_uri(noisy_png(160)), data_uri(png(20, 20))
    body = {"task": "faceswap_multi", "payload": {"source_urls": [small, big], "target_url": big}}
    response = client.post("/v1/jobs", json=body, headers=headers)
    if response.status_code == 501:
        pytest.skip("faceswap_multi is not installed here")
    assert response.status_code == 202, response.get_data(as_text=True)
    payload = stored_payload(app, response.get_json()["job_id"])
    assert payload["source_urls"][0] == small
    assert payload["source_urls"][1].startswith("asset://") and payload["target_url"].startswith("asset://")
    assert payload["source_urls"][1] != payload["target_url"]


def test_a_data_input_over_the_byte_limit_is_413_at_post(settings: Settings) -> None:
    app = make_app(settings, max_input_bytes=16 * 1024)
    try:
        client = app.test_client()
        headers = new_client(app)
        for content in (noisy_png(80), noisy_png(200)):  # base64 under and over the inline limit
            body = {"task": "upscale", "payload": {"image_url": data_uri(content)}}
            error = assert_error(client.post("/v1/jobs", json=body, headers=headers), 413, "input_too_large")
            assert error["details"] == {"payload": {"image_url": [error["message"]]}}
        with app.extensions["aiorch"].db.session() as session:
            client_id = app.extensions["aiorch"].keyring.client_for(headers["X-API-Key"])
            assert session.scalar(select(Job.id).where(Job.client_id == client_id)) is None
        assert client.get("/v1/assets", headers=headers).get_json()["assets"] == []
    finally:
        app.extensions["aiorch"].db.dispose()


def test_a_large_data_input_that_is_no_image_is_422_at_post(client: FlaskClient) -> None:
    not_image = "data:image/png;base64," + base64.b64encode(os.urandom(100 * 1024)).decode()
    body = {"task": "upscale", "payload": {"image_url": not_image}}
    error = assert_error(client.post("/v1/jobs", json=body, headers=ALICE), 422, "input_not_image")
    assert error["details"] == {"payload": {"image_url": [error["message"]]}}


def test_a_multipart_job_is_415_pointing_to_json_and_the_assets_api(client: FlaskClient) -> None:
    response = client.post(
        "/v1/jobs",
        data={"task": "upscale", "file": (io.BytesIO(png()), "a.png")},
        headers=ALICE,
        content_type="multipart/form-data",
    )
    error = assert_error(response, 415, "unsupported_media_type")
    assert "/v1/assets" in error["message"] and "JSON" in error["message"]


# -- the worker's asset:// -----------------------------------------------------------------------------


def test_asset_refs_resolve_for_their_owner_only(app: Flask, client: FlaskClient, settings: Settings) -> None:
    content = png(50, 40)
    (asset,) = uploaded(client, ALICE, (content, "in.png"))
    rt = Runtime(settings)
    try:
        payload = {"image_url": f"asset://{asset['asset_id']}", "scale": 2}
        theirs = rt.store.get(make_job(rt.db, client_id="bob", payload=payload))
        with pytest.raises(InputProblem) as refused:
            load_inputs(rt, theirs)
        missing = rt.store.get(make_job(rt.db, client_id="bob", payload={"image_url": "asset://" + "0" * 32}))
        with pytest.raises(InputProblem) as absent:
            load_inputs(rt, missing)
        assert refused.value.code == absent.value.code == "input_not_found"
        assert refused.value.field == "image_url"

        mine = rt.store.get(make_job(rt.db, client_id="alice", payload=payload))
        inputs = load_inputs(rt, mine)
        path = Path(inputs["image_url"]["path"])
        assert path.read_bytes() == content and (
            inputs["image_url"]["width"],
            inputs["image_url"]["height"],
        ) == (50, 40)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        rt.db.dispose()


def test_files_serves_outputs_privately(app: Flask, client: FlaskClient) -> None:
    saved = app.extensions["aiorch"].storage.save_output(png(), "png")
    response = client.get(f"/files/{saved.name}")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "private"
    assert "public" not in response.headers["Cache-Control"]
    assert stat.S_IMODE(saved.path.stat().st_mode) == 0o600


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory, astronaut_png: Path) -> Iterator[ImageServer]:
    folder = tmp_path_factory.mktemp("asset-images")
    (folder / "a.png").write_bytes(astronaut_png.read_bytes())
    server = ImageServer(folder).start()
    yield server
    server.stop()
