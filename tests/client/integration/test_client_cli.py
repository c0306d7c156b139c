"""The client and its CLI against the real platform (gunicorn API, Celery workers, Postgres,
RabbitMQ): ``aiorch batch run`` interrupted with Ctrl-C and resumed, a batch with bad lines, a
``429`` waited out, ``aiorch jobs submit --wait --out``. The CLI runs as a subprocess, as a
person or a script runs it; the jobs are tiny Lanczos upscales, so the suite stays quick.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from aiorch import AsyncClient, Client, Conflict, NotFound
from aiorch.batch import REPORT, RunState
from config import Settings
from tests.conftest import KEYS
from tests.support.platform import ROOT, Platform
from tests.support.platform_fixtures import platform_settings

# A client of this module's own: its queued-jobs limit must count only the jobs these tests make,
# not whatever other modules left queued in the shared database for alice.
SCRIPTS = ("scripts", "scripts-key-0123456789")
ALICE = SCRIPTS[1]
BOB = KEYS[1][1]
UPSCALE = {"model": "lanczos", "scale": 2}
MAX_QUEUED = 5  # per client: above the 4 in flight of the tests below, so only the 429 test meets it


@pytest.fixture(scope="module")
def platform(
    base_settings: Settings, worker_amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """This module's platform: conftest's, with at most ``MAX_QUEUED`` queued jobs per client."""
    tmp = tmp_path_factory.mktemp("platform")
    settings = platform_settings(
        base_settings,
        tmp,
        broker_url=worker_amqp_url,
        max_queued_per_client=MAX_QUEUED,
        api_keys=(*KEYS, SCRIPTS),
    )
    plat = Platform(settings, tmp / "logs")
    try:
        plat.start_api()
        plat.start_workers()
        yield plat
    finally:
        plat.stop()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIORCH_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def aiorch(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def connection(platform: Platform, key: str = ALICE) -> list[str]:
    return ["--url", platform.base_url, "--key", key]


def tiny_images(astronaut: Path, folder: Path, count: int) -> list[Path]:
    """``count`` different 24x24 images (crops of the astronaut)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = Image.open(astronaut).convert("RGB")
    paths = []
    for n in range(count):
        path = folder / f"{n:02d}.png"
        source.crop((n, n // 2, n + 48, n // 2 + 48)).resize((24, 24)).save(path)
        paths.append(path)
    return paths


def read_report(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / REPORT).read_text().splitlines()]


def done_records(out: Path) -> list[dict[str, Any]]:
    path = out / ".aiorch-batch" / "journal.jsonl"
    records = []
    for raw in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # a record being written
        if record.get("t") == "done":
            records.append(record)
    return records


def test_a_batch_interrupted_after_20_lines_resumes_and_ends_every_line_exactly_once(
    platform: Platform, astronaut_png: Path, tmp_path: Path
) -> None:
    images = tiny_images(astronaut_png, tmp_path / "img", 50)
    jobs_file = tmp_path / "jobs.jsonl"
    # Relative paths: looked up beside the JSONL file.
    jobs_file.write_text(
        "".join(
            json.dumps({"task": "upscale", "payload": {"image_url": f"img/{p.name}", **UPSCALE}}) + "\n"
            for p in images
        )
    )
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "app.cli", "batch", "run", str(jobs_file), "--out", str(out)]
    argv += ["--concurrency", "4", *connection(platform)]
    first = subprocess.Popen(
        argv, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while len(done_records(out)) < 20:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "20 lines did not finish in 120 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr
    assert "run the same command" in stderr
    interrupted = read_report(out)
    assert [r["line"] for r in interrupted] == list(range(1, 51))
    finished_first = {r["line"] for r in done_records(out)}
    assert 20 <= len(finished_first) < 50
    assert any(r["status"] == "pending" for r in interrupted)  # some lines never submitted

    second = aiorch(*argv[3:])
    assert second.returncode == 0, second.stderr

    report = read_report(out)
    assert [r["line"] for r in report] == list(range(1, 51))
    assert {r["status"] for r in report} == {"succeeded"}
    assert all(r["error"] is None for r in report)
    for record in report:
        (name,) = record["files"]
        assert name == f"{record['line']:06d}-{record['job_id'][:8]}.png"
        assert Image.open(out / name).size == (48, 48)
    # Every line ended once: the finished ones were not journalled (nor submitted) again.
    done = [r["line"] for r in done_records(out)]
    assert sorted(done) == list(range(1, 51))
    # And the server holds exactly one job per line: a re-run never duplicates.
    job_ids = {r["job_id"] for r in report}
    assert len(job_ids) == 50
    state = RunState.load(out)
    assert state.batch_id is not None
    with Client(platform.base_url, ALICE) as client:
        batch = client.batch(state.batch_id)
        assert (batch["total"], batch["counts"]) == (50, {"succeeded": 50})
        assert {j["job_id"] for j in client.list(batch_id=state.batch_id)} == job_ids
    # 50 files, each uploaded once across both runs.
    assert len(state.assets) == 50

    status = aiorch("batch", "status", str(out), *connection(platform))
    assert status.returncode == 0, status.stderr
    assert "succeeded" in status.stdout and "50" in status.stdout

    # A line added at the top moves every other one down: only the new one runs. An output
    # removed meanwhile is fetched again, its job not run again.
    (out / report[9]["files"][0]).unlink()
    text = jobs_file.read_text()
    jobs_file.write_text(
        json.dumps(
            {"task": "upscale", "payload": {"image_url": "img/00.png", "model": "lanczos", "scale": 3}}
        )
        + "\n"
        + text
    )
    third = aiorch(*argv[3:])
    assert third.returncode == 0, third.stderr
    moved = read_report(out)
    assert [r["line"] for r in moved] == list(range(1, 52))
    assert [r["job_id"] for r in moved[1:]] == [r["job_id"] for r in report]
    assert moved[10]["files"] == [f"000011-{report[9]['job_id'][:8]}.png"]
    for record in moved:
        (name,) = record["files"]
        assert Image.open(out / name).size == ((72, 72) if record["line"] == 1 else (48, 48))
    assert len(list(out.glob("*.png"))) == 51
    with Client(platform.base_url, ALICE) as client:
        assert client.batch(state.batch_id)["total"] == 51


def test_a_batch_with_bad_lines_reports_each_and_runs_the_rest(
    platform: Platform, astronaut_png: Path, tmp_path: Path
) -> None:
    (good,) = tiny_images(astronaut_png, tmp_path, 1)
    lines = [
        {"task": "upscale", "payload": {"image_url": good.name, **UPSCALE}},
        "{this is not json",
        {"task": "upscale", "payload": {"image_url": "missing.png", **UPSCALE}},
        {"task": "no_such_task", "payload": {}},
        {"task": "upscale", "payload": {"image_url": good.name, "model": "lanczos", "scale": 9}},
        {"task": "upscale", "payload": {"image_url": str(good), **UPSCALE}, "metadata": {"n": 6}},
    ]
    jobs_file = tmp_path / "mixed.jsonl"
    jobs_file.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    out = tmp_path / "out"
    result = aiorch("batch", "run", str(jobs_file), "--out", str(out), *connection(platform))
    assert result.returncode == 1, result.stderr
    assert "4 line(s) did not succeed" in result.stderr
    report = {r["line"]: r for r in read_report(out)}
    assert sorted(report) == [1, 2, 3, 4, 5, 6]
    assert [report[n]["status"] for n in (1, 6)] == ["succeeded", "succeeded"]
    assert report[1]["job_id"] != report[6]["job_id"]
    assert (out / report[6]["files"][0]).exists()
    bad = {n: report[n]["error"]["code"] for n in (2, 3, 4, 5)}
    assert bad == {2: "invalid_json", 3: "input_not_found", 4: "unknown_task", 5: "invalid_payload"}
    assert all(report[n]["status"] == "invalid" and report[n]["job_id"] is None for n in bad)
    assert report[3]["error"]["details"] == {"payload": {"image_url": ["no such file"]}}
    assert "scale" in json.dumps(report[5]["error"]["details"])


def test_jobs_submit_uploads_a_local_file_waits_and_saves_the_output(
    platform: Platform, astronaut_png: Path, tmp_path: Path
) -> None:
    (image,) = tiny_images(astronaut_png, tmp_path, 1)
    payload = json.dumps({"image_url": str(image), **UPSCALE})
    out = tmp_path / "results"
    # Where the server is and the key come from the environment here.
    submitted = aiorch(
        "jobs", "submit", "upscale", "--payload", payload, "--wait", "--out", str(out),
        AIORCH_URL=platform.base_url, AIORCH_API_KEY=ALICE,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["status"] == "succeeded"
    (saved,) = out.iterdir()
    assert saved.name == job["result"]["filename"]
    assert Image.open(saved).size == (48, 48)

    got = aiorch("jobs", "get", job["job_id"], *connection(platform))
    assert got.returncode == 0 and json.loads(got.stdout)["job_id"] == job["job_id"]
    # Another client's job is not found, with the API's error shape in the message.
    hidden = aiorch("jobs", "get", job["job_id"], *connection(platform, BOB))
    assert hidden.returncode == 1 and "404" in hidden.stderr and "Traceback" not in hidden.stderr


def test_a_429_is_waited_out_as_retry_after_says_by_the_client_and_by_batch_run(
    platform: Platform, astronaut_png: Path, tmp_path: Path
) -> None:
    (image,) = tiny_images(astronaut_png, tmp_path, 1)
    # Enough retries to outlast the workers' restart on a loaded machine (each 429 says 5 s).
    client = Client(platform.base_url, ALICE, retries=24)
    asset = client.upload(image)
    payload = {"image_url": f"asset://{asset['asset_id']}", **UPSCALE}
    mark = {"test": tmp_path.name}
    # Without workers the jobs stay queued and fill the client's limit.
    platform.kill("cpu", signal.SIGTERM)
    platform.kill("gpu", signal.SIGTERM)
    for _ in range(MAX_QUEUED):
        client.submit("upscale", payload, metadata=mark)
    threading.Timer(1.0, platform.start_workers).start()
    started = time.monotonic()
    last = client.submit("upscale", payload, metadata=mark)  # 429, Retry-After: 5, until they drain
    assert client.transport.retried >= 1
    assert time.monotonic() - started >= 4.5
    assert client.wait(last, timeout=60)["status"] == "succeeded"
    recent = client.list(task="upscale", limit=MAX_QUEUED + 10)
    assert sum(1 for job in recent if job["metadata"] == mark) == MAX_QUEUED + 1  # no extra job

    # The bulk endpoint refuses the items over the limit one by one; batch run sends them again.
    jobs_file = tmp_path / "ten.jsonl"
    line = json.dumps({"task": "upscale", "payload": {"image_url": image.name, **UPSCALE}})
    jobs_file.write_text(f"{line}\n" * 10)
    out = tmp_path / "out"
    result = aiorch(
        "batch", "run", str(jobs_file), "--out", str(out), "--concurrency", "10", *connection(platform)
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"limits deferred [1-9]\d* submission", result.stderr), result.stderr
    report = read_report(out)
    assert [r["status"] for r in report] == ["succeeded"] * 10
    assert client.batch(RunState.load(out).batch_id or "")["total"] == 10
    client.close()


def test_the_async_client_uploads_submits_follows_and_downloads_jobs_concurrently(
    platform: Platform, astronaut_png: Path, tmp_path: Path
) -> None:
    images = tiny_images(astronaut_png, tmp_path / "img", 3)

    async def scenario() -> dict[str, Any]:
        async with AsyncClient(platform.base_url, ALICE) as client:
            assets = await asyncio.gather(*(client.upload(path) for path in images))
            payloads = [{"image_url": f"asset://{asset['asset_id']}", **UPSCALE} for asset in assets]
            jobs = await asyncio.gather(*(client.submit("upscale", p) for p in payloads))
            changes = [change async for change in client.watch(jobs, timeout=60)]
            final = await client.wait(jobs, timeout=60)
            newest = [job async for job in client.list(limit=2)]
            saved = await asyncio.gather(*(client.download(job, tmp_path / "out") for job in final))
            with pytest.raises(Conflict):
                await client.cancel(final[0])
            with pytest.raises(NotFound):
                await client.get("0" * 32)
            return {"jobs": jobs, "changes": changes, "final": final, "newest": newest, "saved": saved}

    seen = asyncio.run(scenario())
    ids = [job["job_id"] for job in seen["jobs"]]
    assert len(set(ids)) == 3
    assert [job["status"] for job in seen["final"]] == ["succeeded"] * 3
    # The watch ended with each job's final object, as the synchronous client's does.
    last = {change["job_id"]: change["status"] for change in seen["changes"]}
    assert last == dict.fromkeys(ids, "succeeded")
    assert {job["job_id"] for job in seen["newest"]} <= set(ids) and len(seen["newest"]) == 2
    for (path,) in seen["saved"]:
        assert Image.open(path).size == (48, 48)


def test_a_job_submitted_and_followed_in_one_request_is_seen_to_its_end(
    platform: Platform, astronaut_png: Path, tmp_path: Path
) -> None:
    """``submit_and_follow`` against the real API (its stream handed to the stream hub): the new
    job's first object, its changes in order, its final object; ``run`` without a timeout too."""
    (image,) = tiny_images(astronaut_png, tmp_path, 1)
    order = ["queued", "running", "succeeded"]
    with Client(platform.base_url, ALICE) as client:
        asset = client.upload(image)
        payload = {"image_url": f"asset://{asset['asset_id']}", **UPSCALE}
        changes = list(client.submit_and_follow("upscale", payload))
        statuses = [change["status"] for change in changes]
        assert statuses[-1] == "succeeded" and statuses[0] in ("queued", "running"), statuses
        assert statuses == sorted(statuses, key=order.index), statuses
        assert len({change["job_id"] for change in changes}) == 1
        assert client.get(changes[0])["status"] == "succeeded"
        ran = client.run("upscale", payload)
        assert ran["status"] == "succeeded" and ran["job_id"] != changes[0]["job_id"]
