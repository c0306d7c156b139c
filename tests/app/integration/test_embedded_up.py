"""`make run`'s command on a fresh folder: SQLite + the filesystem transport, no servers needed."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.support.platform import ROOT, free_port


def wait_http(url: str, timeout: float, **kw) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = requests.get(url, timeout=2, **kw)
            if response.status_code < 500:
                return response
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never answered")


def test_aiorch_up_runs_a_job_on_the_embedded_default_with_flower(
    tmp_path: Path, astronaut_png: Path
) -> None:
    port, flower_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIORCH_")}
    env.update(
        {
            "AIORCH_VAR_DIR": str(tmp_path / "var"),
            "AIORCH_PORT": str(port),
            "AIORCH_FLOWER_PORT": str(flower_port),
            "AIORCH_FLOWER_PASSWORD": "flower-pw",
            "PYTHONPATH": str(ROOT),
        }
    )
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        key = (tmp_path / "var" / "dev-api-key").read_text().strip()
        assert key in (tmp_path / "up.log").read_text()  # printed for the developer
        headers = {"X-API-Key": key}
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()["checks"]["broker"] == "ok"
        data_uri = "data:image/png;base64," + base64.b64encode(astronaut_png.read_bytes()).decode()
        started = time.monotonic()
        created = requests.post(
            f"http://127.0.0.1:{port}/v1/jobs",
            headers=headers,
            timeout=10,
            json={"task": "upscale", "payload": {"image_url": data_uri, "scale": 2}},
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        while time.monotonic() - started < 60:
            job = requests.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}", headers=headers, timeout=5).json()
            if job["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        assert job["status"] == "succeeded", job
        assert requests.get(job["result"]["url"], timeout=5).status_code == 200
        # Flower sees the three workers (cpu, the GPU queues', training) through the filesystem
        # transport's broadcast.
        auth = ("admin", "flower-pw")
        assert wait_http(f"http://127.0.0.1:{flower_port}/api/workers", 60).status_code == 401
        deadline = time.monotonic() + 60
        workers: dict = {}
        while time.monotonic() < deadline and len(workers) < 3:
            workers = requests.get(
                f"http://127.0.0.1:{flower_port}/api/workers?refresh=1", auth=auth, timeout=10
            ).json()
            time.sleep(1)
        assert {name.split("@")[0] for name in workers} == {"cpu", "gpu", "train"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
