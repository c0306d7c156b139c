"""`aiorch keys create|list|revoke` against the run's Postgres, and the API accepting exactly the
keys that are active."""

from __future__ import annotations

import re

from click.testing import CliRunner

from app import create_app
from app.cli import main
from config import Settings


def keys(settings: Settings, *args: str):
    env = {"AIORCH_DATABASE_URL": settings.database_url, "AIORCH_VAR_DIR": str(settings.var_dir)}
    return CliRunner().invoke(main, ["keys", *args], env=env)


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
