"""What the outage tests share: jobs that hold a slot for a while, submitted before the fault, and
the wait for every one of them to end once the service is back."""

from __future__ import annotations

import time
from typing import Any

import psycopg2
import requests

from tests.support.platform import FINAL, Platform


def sleepers_running(platform: Platform, key: str, count: int, seconds: float) -> list[str]:
    """Submit ``count`` ``debug_sleep`` jobs; returns their ids once the first one runs."""
    ids = []
    for _ in range(count):
        answer = platform.submit(key, "debug_sleep", {"seconds": seconds})
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["job_id"])
    deadline = time.monotonic() + 30
    while platform.job(key, ids[0])["status"] == "queued":
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.05)
    return ids


def all_final(platform: Platform, key: str, ids: list[str], within: float) -> dict[str, dict[str, Any]]:
    """Every job's final object, waited for at most ``within`` seconds (the API may still be
    reconnecting: a failed read is tried again)."""
    start = time.monotonic()
    jobs: dict[str, dict[str, Any]] = {}
    while len(jobs) < len(ids):
        if time.monotonic() - start > within:
            stuck = [platform.job(key, i) for i in ids if i not in jobs]
            raise AssertionError(
                f"not final {within:g} s after the fault: {stuck}\n" + platform.log("gpu")[-3000:]
            )
        for job_id in ids:
            if job_id not in jobs:
                try:
                    job = platform.job(key, job_id)
                except requests.RequestException:
                    continue
                if job.get("status") in FINAL:
                    jobs[job_id] = job
        time.sleep(0.2)
    return jobs


def finished_events(database_url: str, job_ids: list[str]) -> dict[str, int]:
    """How many ``job.finished`` events each job logged (one each: it ended exactly once)."""
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT job_id, count(*) FROM job_events WHERE type = 'job.finished' AND job_id = ANY(%s) "
                "GROUP BY job_id",
                (job_ids,),
            )
            return dict(cur.fetchall())
    finally:
        conn.close()
