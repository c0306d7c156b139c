"""Inbound hardening (issue 11, findings 5-7): no body is read before the key is checked, bodies
are capped at the input limit plus an envelope, JSON nesting is bounded, seed 001-style JWT
(AK/SK) auth refuses every malformed or stale token, Flower's password stays off the command
line, and an aiorch process's files are its user's only.

Through Flask's test client on the run's Postgres, except where a real process is the point
(umask, Flower)."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import jwt
import pytest
import requests
from flask.testing import FlaskClient

from app import create_app
from app.cli import flower_command
from app.schemas import BODY_ENVELOPE_BYTES, MAX_JSON_DEPTH, max_body_bytes
from config import Settings
from models.db import Database
from models.jobs import ApiKey
from models.keys import MAX_TOKEN_LIFETIME, KeyRing
from tests.conftest import KEYS
from tests.support.platform import ROOT, free_port

ALICE = {"X-API-Key": KEYS[0][1]}
IMG = "http://images.example.com/a.png"


@pytest.fixture
def app_client(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["aiorch"].db.dispose()


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.is_json, response.get_data(as_text=True)[:300]
    error = response.get_json()["error"]
    assert set(error) <= {"code", "message", "details"} and error["message"]
    if code:
        assert error["code"] == code, error
    return error


class CountingBody(io.RawIOBase):
    """A request body of ``size`` bytes that counts how many of them the server read (seekable
    only because werkzeug's test client measures a stream by seeking to its end)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0
        self.taken = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence] + offset
        return self.position

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.size - self.position))
        buffer[:n] = b"x" * n
        self.position += n
        self.taken += n
        return n


def post_counted(client: FlaskClient, path: str, size: int, headers: dict[str, str] | None = None) -> Any:
    body = CountingBody(size)
    response = client.post(
        path, input_stream=body, content_length=size, content_type="text/plain", headers=headers or {}
    )
    return response, body


# -- authentication before the body ----------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}])
def test_an_unauthenticated_body_is_answered_401_without_being_read(
    app_client: FlaskClient, headers: dict[str, str]
) -> None:
    response, body = post_counted(app_client, "/v1/jobs", 40 << 20, headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert body.taken == 0


def test_a_body_sent_to_an_unknown_url_is_not_read_either(app_client: FlaskClient) -> None:
    response, body = post_counted(app_client, "/v1/no-such-thing", 40 << 20)
    assert_error(response, 404)
    assert body.taken == 0


def test_a_body_without_a_key_on_a_public_url_is_capped_small(app_client: FlaskClient) -> None:
    # The provider webhook authenticates by a signature over its body, so it must read it: a few
    # ids, never megabytes.
    response, body = post_counted(app_client, "/v1/providers/zhinian/webhook", 1 << 20)
    assert_error(response, 413, "payload_too_large")
    assert body.taken == 0


# -- the body cap -----------------------------------------------------------------------------------


def sized_job_body(size: int) -> bytes:
    """A job body of exactly ``size`` bytes (the padding is in ``metadata``)."""
    head = b'{"task":"upscale","payload":{"image_url":"' + IMG.encode() + b'"},"metadata":{"pad":"'
    tail = b'"}}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def test_the_body_cap_is_the_input_limit_as_base64_plus_the_envelope(settings: Settings) -> None:
    small = settings.with_overrides(max_input_bytes=30_000)
    app = create_app(small)
    client = app.test_client()
    cap = max_body_bytes(small.max_input_bytes)
    assert cap == 40_000 + BODY_ENVELOPE_BYTES == app.config["MAX_CONTENT_LENGTH"]
    json_headers = {**ALICE, "Content-Type": "application/json"}

    over = client.post("/v1/jobs", data=sized_job_body(cap + 1), headers=json_headers)
    assert_error(over, 413, "payload_too_large")
    # At the cap the body is read and judged by the schema (16 KiB of metadata at most).
    at = client.post("/v1/jobs", data=sized_job_body(cap), headers=json_headers)
    assert "metadata" in assert_error(at, 422)["details"]
    # A key comes first all the same: without one, the size does not matter.
    assert_error(client.post("/v1/jobs", data=sized_job_body(cap + 1)), 401)
    app.extensions["aiorch"].db.dispose()


# -- JSON depth -----------------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def job_with_metadata(raw: str) -> str:
    return '{"task":"upscale","payload":{"image_url":"' + IMG + '"},"metadata":{"a":' + raw + "}}"


def test_json_up_to_32_levels_is_accepted(app_client: FlaskClient) -> None:
    # body (1) > metadata (2) > 30 arrays: 32 levels in all.
    body = job_with_metadata(nested(MAX_JSON_DEPTH - 2))
    response = app_client.post("/v1/jobs", data=body, headers={**ALICE, "Content-Type": "application/json"})
    assert response.status_code == 202, response.get_data(as_text=True)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 1, 960, 100_000])
def test_json_nested_deeper_than_32_is_422_json_too_deep(app_client: FlaskClient, depth: int) -> None:
    # 960 levels used to pass the API and then crash the worker loading the job (RecursionError);
    # 100 000 is past the parser's own recursion limit.
    headers = {**ALICE, "Content-Type": "application/json"}
    error = assert_error(
        app_client.post("/v1/jobs", data=job_with_metadata(nested(depth)), headers=headers),
        422,
        "json_too_deep",
    )
    assert "32" in error["message"]
    # The blocking endpoints read their body with Flask's get_json(silent=True): refused the same.
    blocking = '{"image_url":"' + IMG + '","x":' + nested(depth + 1) + "}"
    assert_error(app_client.post("/upscale", data=blocking, headers=headers), 422, "json_too_deep")


def test_deep_json_without_a_json_content_type_is_refused_the_same(app_client: FlaskClient) -> None:
    response = app_client.post("/v1/jobs", data=job_with_metadata(nested(200)), headers=ALICE)
    assert_error(response, 422, "json_too_deep")


# -- JWT (AK/SK) ----------------------------------------------------------------------------------


@pytest.fixture
def jwt_key(db: Database) -> ApiKey:
    row, _key = KeyRing(db).create("jwt-client", "sdk", jwt_auth=True)
    assert row.access_key and row.secret_key
    return row


def token(row: ApiKey, secret: str | None = None, algorithm: str = "HS256", **claims: Any) -> str:
    """A token as seed 001 builds one: iss = AK, exp = now + 1800, nbf = now - 5, HS256 with SK."""
    now = int(time.time())
    payload = {"iss": row.access_key, "exp": now + 1800, "nbf": now - 5, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret or row.secret_key, algorithm=algorithm, headers={"typ": "JWT"})


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def unsigned(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def test_a_seed_001_token_authenticates_as_the_keys_client(app_client: FlaskClient, jwt_key: ApiKey) -> None:
    body = {"task": "upscale", "payload": {"image_url": IMG}}
    created = app_client.post("/v1/jobs", json=body, headers=bearer(token(jwt_key)))
    assert created.status_code == 202, created.get_data(as_text=True)
    job_id = created.get_json()["job_id"]
    assert app_client.get(f"/v1/jobs/{job_id}", headers=bearer(token(jwt_key))).status_code == 200
    assert_error(app_client.get(f"/v1/jobs/{job_id}", headers=ALICE), 404)  # another client's job
    # nbf is optional in seed 001; exp is not.
    assert app_client.get("/v1/jobs", headers=bearer(token(jwt_key, nbf=None))).status_code == 200


# The HS512 token is signed with a 46-byte secret, which PyJWT finds short for SHA-512: it is
# refused for its algorithm before any key length matters.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_refused_tokens_are_401_invalid_token(app_client: FlaskClient, db: Database, jwt_key: ApiKey) -> None:
    now = int(time.time())
    other, _ = KeyRing(db).create("someone-else", jwt_auth=True)
    refused = {
        "wrong secret": token(jwt_key, secret="sk_not-the-secret-key-of-this-access-key"),
        "another key's secret": token(jwt_key, secret=other.secret_key),
        "expired": token(jwt_key, exp=now - 60, nbf=now - 120),
        "not yet valid": token(jwt_key, nbf=now + 60),
        "issued in the future": token(jwt_key, iat=now + 60),
        "no exp": token(jwt_key, exp=None),
        "exp too far ahead": token(jwt_key, exp=now + MAX_TOKEN_LIFETIME + 600),
        "no iss": token(jwt_key, iss=None),
        "unknown iss": token(jwt_key, iss="ak_nobody"),
        "alg none": unsigned({"iss": jwt_key.access_key, "exp": now + 600}),
        "HS512": token(jwt_key, algorithm="HS512"),
        "garbage claims": token(jwt_key, exp="tomorrow"),
    }
    for name, value in refused.items():
        response = app_client.get("/v1/jobs", headers=bearer(value))
        error = assert_error(response, 401, "invalid_token")
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"], name
        assert jwt_key.secret_key not in error["message"], name
    expired = app_client.get("/v1/jobs", headers=bearer(refused["expired"]))
    assert "expired" in assert_error(expired, 401)["message"]


def test_a_revoked_keys_tokens_stop_working(app_client: FlaskClient, db: Database, jwt_key: ApiKey) -> None:
    assert app_client.get("/v1/jobs", headers=bearer(token(jwt_key))).status_code == 200
    assert KeyRing(db).revoke(jwt_key.id)
    assert_error(app_client.get("/v1/jobs", headers=bearer(token(jwt_key))), 401, "invalid_token")


def test_a_token_is_not_a_key_and_a_key_without_ak_sk_signs_nothing(
    app_client: FlaskClient, db: Database
) -> None:
    row, key = KeyRing(db).create("plain-client")
    assert row.access_key is None and row.secret_key is None
    # The key itself used as an HMAC secret, with the key as iss: nothing to verify against.
    forged = jwt.encode({"iss": key, "exp": int(time.time()) + 60}, key, algorithm="HS256")
    assert_error(app_client.get("/v1/jobs", headers=bearer(forged)), 401, "invalid_token")
    assert app_client.get("/v1/jobs", headers=bearer(key)).status_code == 200


# -- Flower ---------------------------------------------------------------------------------------


def test_flowers_argv_carries_no_credentials(settings: Settings) -> None:
    flower = settings.with_overrides(
        flower_password="pw-9f2c1d", flower_broker_api="http://mgmt:mgmt-pw-77@127.0.0.1:15672/api/"
    )
    argv, env = flower_command(flower, "pw-9f2c1d")
    assert not [arg for arg in argv if "pw-9f2c1d" in arg or "mgmt-pw-77" in arg], argv
    assert env["FLOWER_BASIC_AUTH"] == f"{flower.flower_user}:pw-9f2c1d"
    assert env["FLOWER_BROKER_API"] == flower.flower_broker_api
    # Flower splits FLOWER_BASIC_AUTH on commas: "a,b" would make "b" a credential of its own.
    with pytest.raises(click.ClickException):
        flower_command(flower, "half,other-half")


def test_flower_runs_with_its_password_only_in_its_environment(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    password = "flower-pw-" + os.urandom(6).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIORCH_", "FLOWER_"))}
    env.update(
        AIORCH_VAR_DIR=str(tmp_path / "var"),
        AIORCH_BROKER_URL=settings.broker_url,
        AIORCH_DATABASE_URL=settings.database_url,
        AIORCH_FLOWER_PORT=str(port),
        AIORCH_FLOWER_PASSWORD=password,
        PYTHONPATH=str(ROOT),
    )
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 (the process owns it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "flower"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "/healthcheck", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
            time.sleep(0.3)
        # The same process (aiorch flower execs Flower): its argv, as every local user sees it.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert "flower" in cmdline and password not in cmdline
        assert requests.get(url + "/api/workers?refresh=0", timeout=10).status_code == 401
        authed = requests.get(url + "/api/workers?refresh=0", auth=("admin", password), timeout=10)
        assert authed.status_code == 200, authed.text[:300]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


# -- files private --------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_python(args: list[str], env_extra: dict[str, str], umask: int = 0o022) -> str:
    """A child with the permissive umask of a typical login, so only aiorch's own umask counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIORCH_")}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        umask=umask,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_an_aiorch_command_creates_var_0700_and_its_files_0600(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh" / "var"
    run_python(["-m", "app.cli", "migrate"], {"AIORCH_VAR_DIR": str(fresh)})
    assert mode(fresh) == 0o700
    assert mode(fresh / "aiorch.db") == 0o600  # the embedded SQLite database
    # A var/ left world-readable by an earlier version is tightened.
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    run_python(["-m", "app.cli", "migrate"], {"AIORCH_VAR_DIR": str(old)})
    assert mode(old) == 0o700


def test_a_celery_worker_process_writes_private_files(tmp_path: Path) -> None:
    # What `celery -A tasks.worker` (the Docker images, Flower) imports first; the embedded
    # broker's folders are created as the app is built.
    var = tmp_path / "var"
    out = run_python(
        ["-c", "import os, tasks.worker; print(oct(os.umask(0)))"],
        {"AIORCH_VAR_DIR": str(var)},
    )
    assert out.strip() == "0o77"
    folders = [p for p in var.rglob("*") if p.is_dir()]
    assert folders and all(mode(p) == 0o700 for p in [var, *folders]), [(p, oct(mode(p))) for p in folders]
