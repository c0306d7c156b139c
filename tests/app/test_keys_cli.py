"""`aiorch keys create|list|revoke` against the run's Postgres, and the API accepting exactly the
keys that are active."""

from __future__ import annotations

import os
import re
import time

import jwt
from click.testing import CliRunner

from app import create_app
from app.cli import main
from config import Settings
from models.db import Database
from models.webhook_secrets import WebhookSecrets


def keys(settings: Settings, *args: str):
    env = {"AIORCH_DATABASE_URL": settings.database_url, "AIORCH_VAR_DIR": str(settings.var_dir)}
    # Every aiorch command sets the process umask to 0o077; here the process is pytest's, whose
    # umask other tests' expectations (file modes) must not inherit.
    umask = os.umask(0o022)
    try:
        return CliRunner().invoke(main, ["keys", *args], env=env)
    finally:
        os.umask(umask)


def printed(output: str, name: str) -> str | None:
    found = re.search(rf"^{name}=(\S+)$", output, re.M)
    return found.group(1) if found else None


def test_a_created_key_authenticates_lists_by_prefix_only_and_stops_working_once_revoked(
    settings: Settings,
) -> None:
    created = keys(settings, "create", "carol", "--label", "batch scripts")
    assert created.exit_code == 0, created.output
    key_id = int(re.search(r"id=(\d+) client=carol", created.output).group(1))  # type: ignore[union-attr]
    key = created.output.strip().splitlines()[-1]
    assert len(key) >= 32

    listed = keys(settings, "list")
    line = next(row for row in listed.output.splitlines() if row.startswith(f"{key_id}\t"))
    assert "carol" in line and "active" in line and "batch scripts" in line
    assert key not in listed.output  # only a prefix is ever shown (and only a hash is stored)

    app = create_app(settings)
    client = app.test_client()
    assert client.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 200
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    revoked = keys(settings, "revoke", str(key_id))
    assert revoked.exit_code == 0 and f"revoked {key_id}" in revoked.output
    refused = client.get("/v1/jobs", headers={"X-API-Key": key})
    assert refused.status_code == 401 and refused.get_json()["error"]["code"]
    assert "revoked" in next(
        r for r in keys(settings, "list").output.splitlines() if r.startswith(f"{key_id}\t")
    )
    assert keys(settings, "revoke", str(key_id)).exit_code != 0  # already revoked: a clear error
    app.extensions["aiorch"].db.dispose()


def test_create_prints_the_clients_webhook_secret_and_with_jwt_an_access_key_pair_that_signs_tokens(
    settings: Settings,
) -> None:
    plain = keys(settings, "create", "erin")
    assert plain.exit_code == 0, plain.output
    assert printed(plain.output, "access_key") is None and printed(plain.output, "secret_key") is None
    db = Database(settings)
    secret = printed(plain.output, "webhook_secret")
    assert secret and secret.startswith("whsec_")
    assert secret == WebhookSecrets(db, settings).current("erin")  # the secret erin's webhooks carry
    db.dispose()

    created = keys(settings, "create", "frank", "--jwt")
    assert created.exit_code == 0, created.output
    access_key, secret_key = printed(created.output, "access_key"), printed(created.output, "secret_key")
    assert access_key and secret_key and access_key != secret_key
    key = created.output.strip().splitlines()[-1]  # the key stays the last line, for scripts
    assert key.startswith("aio_")
    listed = keys(settings, "list").output
    assert f"ak={access_key}" in listed and secret_key not in listed

    # Exactly seed 001's client code: HS256, iss = AK, exp = now + 1800, nbf = now - 5, key = SK.
    now = int(time.time())
    token = jwt.encode(
        {"iss": access_key, "exp": now + 1800, "nbf": now - 5},
        secret_key,
        headers={"alg": "HS256", "typ": "JWT"},
    )
    app = create_app(settings)
    client = app.test_client()
    created_job = client.post(
        "/v1/jobs",
        json={"task": "upscale", "payload": {"image_url": "http://images.example.com/a.png"}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert created_job.status_code == 202, created_job.get_data(as_text=True)
    job_id = created_job.get_json()["job_id"]
    # The token and the key are the same client.
    assert client.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": key}).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": "alice-key-0123456789"}).status_code == 404
    app.extensions["aiorch"].db.dispose()


def test_create_with_admin_makes_an_admin_key_that_reads_other_clients_jobs_and_metrics(
    settings: Settings,
) -> None:
    plain = keys(settings, "create", "gina")
    assert plain.exit_code == 0 and "role=client" in plain.output
    created = keys(settings, "create", "ops-cli", "--admin", "--label", "on-call")
    assert created.exit_code == 0, created.output
    key_id = int(re.search(r"id=(\d+) client=ops-cli role=admin", created.output).group(1))  # type: ignore[union-attr]
    admin_key = created.output.strip().splitlines()[-1]
    line = next(row for row in keys(settings, "list").output.splitlines() if row.startswith(f"{key_id}\t"))
    assert line.split("\t")[3:6] == ["active", "admin", "on-call"]
    plain_id = re.search(r"id=(\d+) client=gina", plain.output).group(1)  # type: ignore[union-attr]
    assert "\tclient\t" in next(
        r for r in keys(settings, "list").output.splitlines() if r.startswith(f"{plain_id}\t")
    )

    app = create_app(settings)
    client = app.test_client()
    gina = {"X-API-Key": plain.output.strip().splitlines()[-1]}
    job_id = client.post(
        "/v1/jobs",
        json={"task": "upscale", "payload": {"image_url": "http://images.example.com/a.png"}},
        headers=gina,
    ).get_json()["job_id"]
    assert client.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": admin_key}).status_code == 200
    assert client.get("/v1/jobs?client=gina", headers={"X-API-Key": admin_key}).get_json()["jobs"]
    assert client.get("/metrics", headers={"X-API-Key": admin_key}).status_code == 200
    assert client.get("/metrics", headers=gina).status_code == 403
    app.extensions["aiorch"].db.dispose()
