"""The API on S3-compatible storage (moto's server over HTTP), through Flask's test client on the
run's real Postgres: ``/files/<name>`` streams outputs from the bucket (length, ETag, conditional
and range requests), uploads land in the bucket and are read back with their owner's key, and
``/readyz`` checks the bucket."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from app import create_app
from config import Settings
from tests.conftest import KEYS
from tests.support.s3 import S3Server

ALICE = {"X-API-Key": KEYS[0][1]}
BOB = {"X-API-Key": KEYS[1][1]}


def png(side: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def app(settings: Settings, s3: S3Server, bucket: str, tmp_path: Path) -> Iterator[Flask]:
    application = create_app(s3.settings(settings.with_overrides(storage_dir=tmp_path / "api"), bucket))
    yield application
    application.extensions["aiorch"].db.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_files_streams_an_output_from_the_bucket_privately(app: Flask, client: FlaskClient) -> None:
    data = png()
    saved = app.extensions["aiorch"].storage.save_output(data, "png")
    response = client.get(f"/files/{saved.name}")
    assert response.status_code == 200 and response.data == data
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Cache-Control"] == "private"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    etag = response.headers["ETag"]
    assert client.get(f"/files/{saved.name}", headers={"If-None-Match": etag}).status_code == 304
    ranged = client.get(f"/files/{saved.name}", headers={"Range": "bytes=1-3"})
    assert ranged.status_code == 206 and ranged.data == data[1:4]
    assert ranged.headers["Content-Range"] == f"bytes 1-3/{len(data)}"


def test_files_is_404_for_a_missing_object_an_upload_or_a_made_up_name(
    app: Flask, client: FlaskClient
) -> None:
    upload = app.extensions["aiorch"].storage.save_upload(png(), "png")
    for name in ("0" * 32 + ".png", upload.name, "x.png", ".." + upload.name):
        response = client.get(f"/files/{name}")
        assert response.status_code == 404 and response.get_json()["error"]["code"] == "file_not_found"


def test_an_upload_lands_in_the_bucket_and_only_its_owner_reads_it_back(
    client: FlaskClient, s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    data = png(40)
    response = client.post(
        "/v1/assets",
        data={"file": [(io.BytesIO(data), "holiday.png")]},
        headers=ALICE,
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    asset = response.get_json()["assets"][0]
    [key] = s3.keys(bucket)
    assert key.startswith("aiorch/uploads/") and s3.read(bucket, key) == data
    assert not any(path.is_file() for path in tmp_path.rglob("*"))  # nothing on the API's disk
    content = client.get(f"/v1/assets/{asset['asset_id']}/content", headers=ALICE)
    assert content.status_code == 200 and content.data == data
    assert content.headers["Content-Disposition"] == "inline; filename=holiday.png"
    assert content.headers["Cache-Control"] == "private"
    assert client.get(f"/v1/assets/{asset['asset_id']}/content", headers=BOB).status_code == 404
    assert client.delete(f"/v1/assets/{asset['asset_id']}", headers=ALICE).status_code == 204
    assert s3.keys(bucket) == []


def test_readyz_checks_the_bucket(app: Flask, client: FlaskClient, settings: Settings, s3: S3Server) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"]["storage"] == "ok"
    gone = create_app(s3.settings(settings, "no-such-bucket-at-all"))
    try:
        answer = gone.test_client().get("/readyz")
        assert answer.status_code == 503
        assert answer.get_json()["error"]["details"]["storage"] == "unreachable"
    finally:
        gone.extensions["aiorch"].db.dispose()


def test_a_bucket_that_cannot_be_reached_is_503_with_retry_after_not_a_500(settings: Settings) -> None:
    # Port 1 on loopback refuses at once: an S3 endpoint that is down or restarting.
    down = settings.with_overrides(
        storage_url="s3://aiorch-down",
        s3_endpoint_url="http://127.0.0.1:1",
        s3_access_key_id="k",
        s3_secret_access_key="s",
    )
    app = create_app(down)
    try:
        client = app.test_client()
        for response in (
            client.get(f"/files/{'a' * 32}.png"),
            client.post(
                "/v1/assets",
                data={"file": [(io.BytesIO(png()), "a.png")]},
                headers=ALICE,
                content_type="multipart/form-data",
            ),
        ):
            assert response.status_code == 503, response.get_data(as_text=True)
            assert response.get_json()["error"]["code"] == "storage_unavailable"
            assert response.headers["Retry-After"] == "5"
    finally:
        app.extensions["aiorch"].db.dispose()
