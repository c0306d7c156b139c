"""``make test-scale`` (second half): throughput with 1, 2 and 4 worker hosts, each in a network
namespace and a mount namespace of its own (``tests/support/hosts.py``), against one broker and
one database reached over their veth links; the API in the machine's namespace.

    python -m bench.scale                      # 1, 2, 4 hosts x 2 slots (needs root)
    python -m bench.scale --hosts 1,2 --rounds 3
    python -m bench.scale --host-loss          # also: cut a host off under the broker's own heartbeat
    python -m bench.scale --s3                 # storage in a bucket: every upscale output downloaded

1. ``debug_sleep`` jobs that hold a slot for ``--job-seconds``: ``rounds x slots x hosts`` of them
   submitted in one batch; throughput = jobs / (last ``finished_at`` - first ``created_at``), and
   the speed-up over one host (goal >= 0.9 x hosts).
2. Tiny real jobs: ``upscale`` of a 32x32 ``data:`` PNG, ``--upscales`` per host count: how many
   succeeded and the throughput. With local storage the outputs stay on each host's private disk
   and are only counted; with ``--s3`` (moto's stand-alone server on 127.0.0.1,
   ``tests/support/s3.py``, which the hosts reach over their links) each one is then downloaded
   through the API's ``/files/<name>`` and checked (a 64x64 PNG), after the throughput's clock.
3. ``--host-loss``: with every host busy, one host's link goes down and its processes are killed;
   how long until its jobs have run again elsewhere, with the broker's heartbeat as it is
   configured (RabbitMQ's default 60 s; the tests use a node of their own with 5 s).

A private database and vhost on the machine's Postgres and RabbitMQ (dropped after). Writes
``bench-results/scale-<timestamp>.json`` and prints a table. On a machine with few cores every
process shares them: the sleeping jobs measure the platform's scheduling across hosts, the real
jobs what the cores allow.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from PIL import Image

from bench import infra
from config import Settings
from models.db import Database
from models.migrate import upgrade
from tests.support.hosts import Hosts, namespaces_unavailable
from tests.support.images import data_uri
from tests.support.platform import FINAL, ROOT, Platform, free_port

KEY = "scale-key-0123456789"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="1,2,4", help="host counts, increasing (default 1,2,4)")
    parser.add_argument("--slots", type=int, default=2, help="GPU-queue processes per host")
    parser.add_argument("--job-seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5, help="sleeping jobs per slot")
    parser.add_argument("--upscales", type=int, default=40, help="tiny upscale jobs per host count")
    parser.add_argument("--host-loss", action="store_true", help="also measure a host cut off")
    parser.add_argument("--s3", action="store_true", help="storage in an S3 bucket (moto); download outputs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    return parser.parse_args(argv)


class Client:
    def __init__(self, plat: Platform):
        self.plat = plat
        self.http = requests.Session()
        self.http.headers["X-API-Key"] = KEY

    def submit(self, task: str, payload: dict[str, Any], n: int) -> list[str]:
        body: dict[str, Any] = {"jobs": [{"task": task, "payload": payload} for _ in range(n)]}
        response = self.http.post(f"{self.plat.base_url}/v1/jobs/batch", json=body, timeout=120)
        response.raise_for_status()
        return [entry["job_id"] for entry in response.json()["jobs"]]

    def jobs(self, ids: list[str]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), 50):
            url = f"{self.plat.base_url}/v1/jobs?ids={','.join(ids[start : start + 50])}"
            response = self.http.get(url, timeout=30)
            response.raise_for_status()
            found += response.json()["jobs"]
        return found

    def all_final(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(ids)
            if all(job["status"] in FINAL for job in jobs) or time.monotonic() > deadline:
                return jobs
            time.sleep(0.25)

    def downloaded(self, jobs: list[dict[str, Any]], size: tuple[int, int]) -> int:
        """How many succeeded jobs' outputs the API serves as a PNG of ``size``."""
        good = 0
        for job in jobs:
            if job["status"] != "succeeded":
                continue
            answer = self.http.get(job["result"]["url"], timeout=30)
            if answer.status_code == 200:
                with contextlib.suppress(OSError):
                    image = Image.open(io.BytesIO(answer.content))
                    good += (image.format, image.size) == ("PNG", size)
        return good

    def workers(self) -> list[str]:
        answer = self.http.get(f"{self.plat.base_url}/diag/backends", timeout=30).json()
        return sorted(worker["name"] for worker in answer["workers"])


def throughput(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [j for j in jobs if j["status"] == "succeeded"]
    if not done:
        return {"jobs": len(jobs), "succeeded": 0, "per_second": 0.0}
    start = min(j["created_at_ms"] for j in jobs) / 1000
    end = max(j["finished_at_ms"] for j in done) / 1000
    return {
        "jobs": len(jobs),
        "succeeded": len(done),
        "other": sorted({j["status"] for j in jobs} - {"succeeded"}),
        "attempts_over_1": sum(1 for j in jobs if (j["attempts"] or 0) > 1),
        "seconds": round(end - start, 2),
        "per_second": round(len(done) / (end - start), 3),
    }


def host_loss(client: Client, hosts: Hosts, slots: int, job_seconds: float) -> dict[str, Any]:
    """Every slot busy with long jobs; the last host cut off (link down, processes killed 1 s
    later); seconds from the cut until its jobs ended elsewhere."""
    victim = hosts.hosts[-1]
    log = hosts.platform.logs / f"h{victim.index}-gpu.log"
    ids = client.submit("debug_sleep", {"seconds": job_seconds * 3}, slots * len(hosts.hosts) * 2)
    deadline = time.monotonic() + 60
    held: list[str] = []
    while not held and time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        held = [j["job_id"] for j in client.jobs(ids) if j["status"] == "running" and j["job_id"] in text]
        time.sleep(0.2)
    cut = time.time()
    hosts.link_down(victim)
    time.sleep(1.0)
    hosts.kill(victim)
    jobs = client.all_final(ids, timeout=600)
    by_id = {j["job_id"]: j for j in jobs}
    ended = [by_id[i]["finished_at_ms"] / 1000 for i in held if by_id[i]["finished_at_ms"]]
    return {
        "held_by_cut_host": len(held),
        "jobs": len(ids),
        "succeeded": sum(1 for j in jobs if j["status"] == "succeeded"),
        "rerun_attempts_2": sum(1 for i in held if by_id[i]["attempts"] == 2),
        "seconds_until_its_jobs_ended": round(max(ended) - cut, 1) if ended else None,
        "job_seconds": job_seconds * 3,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = namespaces_unavailable()
    if reason is not None:
        print(f"bench.scale skipped: {reason}")
        return 0
    counts = [int(n) for n in args.hosts.split(",")]
    run_id = uuid.uuid4().hex[:10]
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {**vars(args), "out": str(args.out)},
        "sleep": {},
        "upscale": {},
    }
    tiny = data_uri(Image.new("RGB", (32, 32), (30, 120, 200)))
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aiorch-scale-")))
        port = free_port()
        settings = Settings(
            var_dir=tmp,
            port=port,
            public_url=f"http://127.0.0.1:{port}",
            api_keys=(("scale", KEY),),
            debug_tasks=True,
            storage_dir=tmp / "storage",
            database_url=stack.enter_context(infra.private_database(f"aiorch_scale_{run_id}")),
            broker_url=stack.enter_context(infra.private_vhost(f"aiorch_scale_{run_id}")),
        )
        if args.s3:
            from tests.support.s3 import s3_server  # moto (the dev extra): only when asked

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's line per request
            s3 = stack.enter_context(s3_server())
            settings = s3.settings(settings, s3.new_bucket())
        db = Database(settings)
        upgrade(db)
        db.dispose()
        plat = Platform(settings, tmp / "logs")
        stack.callback(plat.stop)
        plat.start_api()
        hosts = stack.enter_context(Hosts(plat, slots=args.slots))
        client = Client(plat)
        for count in counts:
            while len(hosts.hosts) < count:
                hosts.start(hosts.add())
            workers = client.workers()
            n = args.rounds * args.slots * count
            ids = client.submit("debug_sleep", {"seconds": args.job_seconds}, n)
            sleep = throughput(client.all_final(ids, timeout=args.rounds * args.job_seconds * 4 + 120))
            sleep["ideal_per_second"] = round(args.slots * count / args.job_seconds, 3)
            sleep["workers"] = workers
            results["sleep"][count] = sleep
            ids = client.submit("upscale", {"image_url": tiny, "scale": 2}, args.upscales)
            jobs = client.all_final(ids, timeout=600)
            results["upscale"][count] = up = throughput(jobs)
            if args.s3:
                up["downloaded"] = client.downloaded(jobs, (64, 64))
            fetched = f" ({up['downloaded']} downloaded)" if args.s3 else ""
            print(f"{count} host(s): sleep {sleep['per_second']}/s  upscale {up['per_second']}/s{fetched}")
        if args.host_loss:
            results["host_loss"] = host_loss(client, hosts, args.slots, args.job_seconds)
    one = results["sleep"][counts[0]]["per_second"] / counts[0]
    one_up = results["upscale"][counts[0]]["per_second"] / counts[0]
    print(
        f"aiorch scale bench  slots/host={args.slots}  job={args.job_seconds}s  (shared machine: indicative)"
    )
    head = ("hosts", "sleep jobs/s", "speed-up", "goal", "ok", "upscale jobs/s", "speed-up", "done")
    print("{:>5} {:>12} {:>9} {:>6} {:>4} {:>15} {:>9} {:>9}".format(*head))
    for count in counts:
        sleep, up = results["sleep"][count], results["upscale"][count]
        speedup = sleep["per_second"] / one if one else 0.0
        up_speedup = up["per_second"] / one_up if one_up else 0.0
        sleep["speed_up"], up["speed_up"] = round(speedup, 2), round(up_speedup, 2)
        ok = "PASS" if speedup >= 0.9 * count and sleep["succeeded"] == sleep["jobs"] else "FAIL"
        print(
            f"{count:>5} {sleep['per_second']:>12} {speedup:>9.2f} {0.9 * count:>6.1f} {ok:>4} "
            f"{up['per_second']:>15} {up_speedup:>9.2f} {up['succeeded']:>4}/{up['jobs']:<4}"
        )
    if "host_loss" in results:
        print("host loss:", json.dumps(results["host_loss"]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
