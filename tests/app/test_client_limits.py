"""Per-client limits (issue 14): kept with the client by `aiorch keys create|update CLIENT
--rate-per-minute N --max-queued N --max-running N --max-priority P`, shown by `aiorch keys list`,
and applied by the API: 429 with Retry-After and X-RateLimit-* over a limit, a priority above the
client's cap lowered (and the answer says so). On the run's Postgres and RabbitMQ (unit vhost),
the CLI in-process as in tests/app/test_keys_cli.py."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result
from flask.testing import FlaskClient
from sqlalchemy import event

from app import create_app
from app.cli import main
from config import Settings
from config.settings import SettingsError
from models.client_limits import ClientLimits, Limits, LimitsCache
from models.db import Database
from tests.conftest import KEYS

IMG = "http://images.example.com/a.png"
BODY = {"task": "upscale", "payload": {"image_url": IMG}}


def cli(settings: Settings, *args: str, **env: str) -> Result:
    environ = {"AIORCH_DATABASE_URL": settings.database_url, "AIORCH_VAR_DIR": str(settings.var_dir), **env}
    umask = os.umask(0o022)  # the CLI sets 0o077 for its process, which is pytest's here
    try:
        return CliRunner().invoke(main, ["keys", *args], env=environ)
    finally:
        os.umask(umask)


def new_client() -> str:
    return f"lim-{uuid.uuid4().hex[:10]}"


def created_key(result: Result) -> dict[str, str]:
    assert result.exit_code == 0, result.output
    return {"X-API-Key": result.output.strip().splitlines()[-1]}


@pytest.fixture
def app_for(settings: Settings) -> Iterator[Any]:
    """An API app on ``settings`` with overrides, built after the CLI changed the limits (each app
    has its own limits cache); disposed at the end."""
    apps: list[Any] = []

    def build(**overrides: Any) -> FlaskClient:
        app = create_app(settings.with_overrides(**overrides))
        apps.append(app)
        return app.test_client()

    yield build
    for app in apps:
        app.extensions["aiorch"].db.dispose()


def submit(client: FlaskClient, headers: dict[str, str], **extra: Any) -> Any:
    return client.post("/v1/jobs", json={**BODY, **extra}, headers=headers)


# -- the CLI --------------------------------------------------------------------------------------


def test_create_and_update_keep_limits_with_the_client_and_list_shows_them(settings: Settings) -> None:
    client = new_client()
    first = cli(settings, "create", client, "--rate-per-minute", "30", "--max-priority", "4")
    assert first.exit_code == 0, first.output
    assert "limits rate-per-minute=30* max-queued=0 max-running=0 max-priority=4*" in first.output
    # A second key of the same client has the same limits: they belong to the client.
    second = cli(settings, "create", client, "--label", "another")
    assert "limits rate-per-minute=30* max-queued=0 max-running=0 max-priority=4*" in second.output

    updated = cli(settings, "update", client, "--max-running", "2", "--rate-per-minute", "default")
    assert updated.exit_code == 0, updated.output
    assert updated.output.strip() == f"{client} rate-per-minute=0 max-queued=0 max-running=2* max-priority=4*"
    # The environment's defaults fill what the client has not set.
    listed = cli(settings, "list", AIORCH_MAX_QUEUED_PER_CLIENT="7", AIORCH_RATE_LIMIT_PER_MINUTE="100")
    assert listed.exit_code == 0, listed.output
    line = next(row for row in listed.output.splitlines() if row.startswith(f"{client}\t"))
    assert line == f"{client}\trate-per-minute=100 max-queued=7 max-running=2* max-priority=4*"
    assert ClientLimits(Database(settings)).own(client) == {
        "rate_per_minute": None,
        "max_queued": None,
        "max_running": 2,
        "max_priority": 4,
    }


def test_limits_of_a_client_with_only_static_keys_can_be_set_and_0_exempts_from_a_default(
    settings: Settings,
) -> None:
    client = new_client()
    updated = cli(settings, "update", client, "--max-queued", "0", AIORCH_MAX_QUEUED_PER_CLIENT="5")
    assert updated.exit_code == 0, updated.output
    assert f"{client} rate-per-minute=0 max-queued=0* " in updated.output
    assert any(row.startswith(f"{client}\t") for row in cli(settings, "list").output.splitlines())


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-priority", "10"], ["--max-priority", "between 0 and 9", "10"]),
        (["--max-priority", "nine"], ["--max-priority", "whole number", "nine"]),
        (["--rate-per-minute", "-1"], ["--rate-per-minute", "between 0 and", "0 = no limit"]),
        (["--max-queued", "abc"], ["--max-queued", "whole number"]),
        (["--max-running", "1.5"], ["--max-running", "whole number"]),
        (["--max-queued", "99999999999"], ["--max-queued", "between 0 and 1000000000"]),
    ],
)
def test_a_nonsense_limit_is_refused_with_a_message_naming_the_option_and_nothing_is_written(
    settings: Settings, args: list[str], words: list[str]
) -> None:
    client = new_client()
    for command in ("create", "update"):
        refused = cli(settings, command, client, *args)
        assert refused.exit_code == 2, refused.output  # click's usage error: no traceback
        assert "Traceback" not in refused.output
        for word in words:
            assert word in refused.output, refused.output
    listed = cli(settings, "list").output
    assert client not in listed  # no key was created, no limit stored
    assert ClientLimits(Database(settings)).own(client) == dict.fromkeys(
        ("rate_per_minute", "max_queued", "max_running", "max_priority")
    )


def test_update_without_a_limit_says_which_options_there_are(settings: Settings) -> None:
    refused = cli(settings, "update", new_client())
    assert refused.exit_code == 2
    assert "--rate-per-minute" in refused.output and "--max-priority" in refused.output


def test_the_environment_defaults_are_checked_at_start_up() -> None:
    defaults = Settings.from_env({})
    assert (defaults.max_running_per_client, defaults.max_priority) == (0, 9)
    parsed = Settings.from_env({"AIORCH_MAX_RUNNING_PER_CLIENT": "3", "AIORCH_MAX_PRIORITY": "5"})
    assert (parsed.max_running_per_client, parsed.max_priority) == (3, 5)
    for name, value in (("AIORCH_MAX_PRIORITY", "10"), ("AIORCH_MAX_RUNNING_PER_CLIENT", "-1")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


# -- the API --------------------------------------------------------------------------------------


def test_a_client_over_its_own_rate_limit_gets_429_with_rate_limit_headers_and_no_job_is_lost(
    settings: Settings, app_for: Any
) -> None:
    client = new_client()
    static_key = f"{client}-static-key"
    # Only a static key (AIORCH_API_KEYS): no key row, the limit is kept with the client all the same.
    assert cli(settings, "update", client, "--rate-per-minute", "2").exit_code == 0
    api = app_for(api_keys=(*KEYS, (client, static_key)), rate_limit_per_minute=1)
    mine = {"X-API-Key": static_key}

    first, second = submit(api, mine), submit(api, mine)
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.headers["X-RateLimit-Limit"] == "2" and first.headers["X-RateLimit-Remaining"] == "1"
    assert second.headers["X-RateLimit-Remaining"] == "0"
    assert 55 <= int(first.headers["X-RateLimit-Reset"]) <= 60

    refused = submit(api, mine)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "rate_limited"
    headers = refused.headers
    assert headers["X-RateLimit-Limit"] == "2" and headers["X-RateLimit-Remaining"] == "0"
    assert headers["Retry-After"] == headers["X-RateLimit-Reset"] and 1 <= int(headers["Retry-After"]) <= 60
    # The two accepted jobs exist, the refused one does not: nothing lost, nothing extra.
    listed = api.get("/v1/jobs", headers=mine).get_json()["jobs"]
    assert {job["job_id"] for job in listed} == {first.get_json()["job_id"], second.get_json()["job_id"]}

    # The environment's default (1 a minute here) still holds for a client without limits of its own.
    other = created_key(cli(settings, "create", new_client()))
    assert submit(api, other).headers["X-RateLimit-Limit"] == "1"
    assert submit(api, other).status_code == 429


def test_a_client_exempted_with_0_is_not_limited_and_sees_no_rate_headers(
    settings: Settings, app_for: Any
) -> None:
    client = new_client()
    key = created_key(cli(settings, "create", client, "--rate-per-minute", "0", "--max-queued", "0"))
    api = app_for(rate_limit_per_minute=1, max_queued_per_client=1)
    answers = [submit(api, key) for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert "X-RateLimit-Limit" not in answers[0].headers


def test_a_client_over_its_own_max_queued_gets_429_with_headers_and_a_batch_is_held_to_it(
    settings: Settings, app_for: Any
) -> None:
    key = created_key(cli(settings, "create", new_client(), "--max-queued", "2"))
    api = app_for()
    assert [submit(api, key).status_code for _ in range(2)] == [202, 202]
    refused = submit(api, key)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "too_many_queued_jobs"
    assert refused.headers["Retry-After"] == "5"
    assert (refused.headers["X-RateLimit-Limit"], refused.headers["X-RateLimit-Remaining"]) == ("2", "0")
    assert refused.headers["X-RateLimit-Reset"] == "5"
    assert len(api.get("/v1/jobs", headers=key).get_json()["jobs"]) == 2

    other = created_key(cli(settings, "create", new_client(), "--max-queued", "2", "--rate-per-minute", "10"))
    answer = api.post("/v1/jobs/batch", json={"jobs": [BODY, BODY, BODY]}, headers=other)
    entries = answer.get_json()["jobs"]
    assert ["job_id" in entry for entry in entries] == [True, True, False]
    error = entries[2]["error"]
    assert error["code"] == "too_many_queued_jobs" and error["details"]["retry_after"] == 5
    # The batch's answer carries the per-minute limit after its two jobs.
    assert (answer.headers["X-RateLimit-Limit"], answer.headers["X-RateLimit-Remaining"]) == ("10", "8")


def test_a_priority_above_the_clients_max_priority_is_lowered_and_the_answer_says_so(
    settings: Settings, app_for: Any
) -> None:
    key = created_key(cli(settings, "create", new_client(), "--max-priority", "3"))
    api = app_for()
    lowered = submit(api, key, priority=7)
    assert lowered.status_code == 202
    job = lowered.get_json()
    assert (job["priority"], job["requested_priority"]) == (3, 7)
    stored = api.get(f"/v1/jobs/{job['job_id']}", headers=key).get_json()
    assert stored["priority"] == 3 and "requested_priority" not in stored
    within = submit(api, key, priority=2).get_json()
    assert within["priority"] == 2 and "requested_priority" not in within

    entries = api.post(
        "/v1/jobs/batch", json={"jobs": [{**BODY, "priority": 9}, {**BODY, "priority": 1}]}, headers=key
    ).get_json()["jobs"]
    assert [(e["priority"], e.get("requested_priority")) for e in entries] == [(3, 9), (1, None)]

    # AIORCH_MAX_PRIORITY caps a client without a cap of its own; a client's own cap wins over it.
    capped_by_default = app_for(max_priority=4)
    plain = created_key(cli(settings, "create", new_client()))
    assert submit(capped_by_default, plain, priority=9).get_json()["priority"] == 4
    trusted = created_key(cli(settings, "create", new_client(), "--max-priority", "9"))
    answer = submit(capped_by_default, trusted, priority=9).get_json()
    assert answer["priority"] == 9 and "requested_priority" not in answer


def test_a_clients_limits_are_read_once_per_ttl_so_a_submit_costs_no_extra_query(
    settings: Settings, db: Database, app_for: Any
) -> None:
    client = new_client()
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    cache = LimitsCache(db, settings, ttl=0.3)
    event.listen(db.engine, "before_cursor_execute", record)
    try:
        assert cache.get(client) == Limits(0, 0, 0, 9)  # the defaults: no row of its own
        assert cache.get(client) == Limits(0, 0, 0, 9)
        assert len(statements) == 1  # the second read came from the cache
        ClientLimits(db).set(client, {"max_priority": 2})
        assert cache.get(client).max_priority == 9  # within the ttl: still the cached value
        time.sleep(0.35)
        assert cache.get(client).max_priority == 2  # past it: read again
    finally:
        event.remove(db.engine, "before_cursor_execute", record)

    # Through the API: one read of the client's limits for three submits.
    api = app_for()
    engine = api.application.extensions["aiorch"].db.engine
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    key = created_key(cli(settings, "create", client))
    assert [submit(api, key).status_code for _ in range(3)] == [202, 202, 202]
    assert len([s for s in seen if re.search(r"\bclient_limits\b", s)]) == 1
