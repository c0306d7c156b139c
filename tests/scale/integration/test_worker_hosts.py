"""Two worker hosts, each in a network namespace and a mount namespace of its own, against one
broker and one database reached over their veth links (``tests/support/hosts.py``).

- both hosts register and take jobs, and ``/diag/backends`` lists every worker of both;
- a host's outputs stay on its own disk (the API's storage folder is not theirs);
- a host cut off mid-job (link down, then its processes killed): every job ends exactly once, the
  cut-off host's running jobs re-run on the other host with ``attempts`` 2, within the broker's
  heartbeat detection plus the job's own time; the host, given its link and new worker processes,
  rejoins and takes jobs with no operator step.
"""

from __future__ import annotations

import time

import requests
from flower.events import EventsState
from PIL import Image

from tasks.celery_app import create_celery
from tests.conftest import KEYS
from tests.scale.integration.conftest import HEARTBEAT
from tests.support.hosts import Host, Hosts
from tests.support.images import data_uri
from tests.support.outages import all_final, finished_events
from tests.support.platform import Platform
from tests.support.worker_events import worker_events

KEY = KEYS[0][1]


def submit_sleepers(platform: Platform, count: int, seconds: float) -> list[str]:
    ids = []
    for _ in range(count):
        answer = platform.submit(KEY, "debug_sleep", {"seconds": seconds})
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["job_id"])
    return ids


def received(platform: Platform, host: Host, since: int = 0) -> str:
    """What the host's GPU worker logged (after byte ``since``): task ids start with job ids."""
    path = platform.logs / f"h{host.index}-gpu.log"
    return path.read_bytes()[since:].decode(errors="replace") if path.exists() else ""


def test_every_host_registers_and_takes_jobs_and_diag_and_flower_list_all_of_them(
    platform: Platform, hosts: Hosts
) -> None:
    events: list[dict] = []
    # The workers' events as Flower receives them (Celery's receiver on the broker, in the
    # machine's namespace), replayed into Flower's own state.
    with worker_events(create_celery(platform.settings), events.append):
        ids = submit_sleepers(platform, 24, 0.3)
        jobs = all_final(platform, KEY, ids, within=60)
    flower = EventsState()
    for event in list(events):
        flower.event(dict(event))
    expected = {f"{role}@{host.namespace}" for host in hosts.hosts for role in ("gpu", "cpu")}
    assert expected <= set(flower.workers), sorted(flower.workers)
    succeeded_on = {task.worker.hostname for _, task in flower.itertasks() if task.state == "SUCCESS"}
    assert {f"gpu@{host.namespace}" for host in hosts.hosts} <= succeeded_on
    assert {j["status"] for j in jobs.values()} == {"succeeded"}
    assert {j["attempts"] for j in jobs.values()} == {1}
    for host in hosts.hosts:
        ran = [job_id for job_id in ids if job_id in received(platform, host)]
        assert ran, f"host {host.namespace} took none of the jobs"
    backends = requests.get(
        platform.base_url + "/diag/backends", headers=platform.headers(KEY), timeout=30
    ).json()
    names = {worker["name"] for worker in backends["workers"]}
    assert names == expected


def test_an_output_stays_on_the_disk_of_the_host_that_made_it(platform: Platform, hosts: Hosts) -> None:
    image = data_uri(Image.new("RGB", (24, 24), (200, 40, 90)))
    job_id = platform.submit(KEY, "upscale", {"image_url": image, "scale": 2}).json()["job_id"]
    job = platform.wait(KEY, job_id, timeout=60)
    assert job["status"] == "succeeded", job
    name = job["result"]["filename"]
    storage = platform.settings.storage_dir
    holding = [h for h in hosts.hosts if h.run("test", "-f", str(storage / "files" / name)).returncode == 0]
    assert len(holding) == 1  # written on one host's private disk ...
    assert not (storage / "files" / name).exists()  # ... which is not the API's


def test_a_host_cut_off_mid_job_loses_nothing_runs_nothing_twice_and_rejoins(
    platform: Platform, hosts: Hosts
) -> None:
    victim, survivor = hosts.hosts
    seconds = 3.0
    ids = submit_sleepers(platform, 8, seconds)
    # Wait until the victim runs some of them (both hosts take the first ones together).
    deadline = time.monotonic() + 30
    while not [i for i in ids if i in received(platform, victim)]:
        assert time.monotonic() < deadline, "the victim never took a job"
        time.sleep(0.05)
    time.sleep(0.5)  # claimed and running
    held = [i for i in ids if i in received(platform, victim) and platform.job(KEY, i)["status"] == "running"]
    assert held, "no job running on the victim at the cut"
    cut = time.time()
    hosts.link_down(victim)  # the partition: its workers are still alive, but talk to nobody
    time.sleep(1.0)
    hosts.kill(victim)  # ... then the host dies (its link still down: no FIN, no RST reaches anyone)
    # RabbitMQ returns the victim's unacknowledged messages when its heartbeat timeout expires
    # (between one and two timeouts after the last frame); the survivor then runs them in full.
    bound = 2 * HEARTBEAT + 2 * seconds + 10
    jobs = all_final(platform, KEY, ids, within=bound + len(ids) * seconds / 2)
    assert {j["status"] for j in jobs.values()} == {"succeeded"}, jobs
    assert finished_events(platform.settings.database_url, ids) == dict.fromkeys(ids, 1)  # once each
    rerun = {i for i, j in jobs.items() if j["attempts"] == 2}
    assert rerun == set(held), (rerun, held)
    assert all(jobs[i]["result"]["attempt"] == jobs[i]["attempts"] for i in ids)
    recovered = max(jobs[i]["finished_at_ms"] for i in held) / 1000 - cut
    assert recovered <= bound, f"the cut-off host's jobs ended {recovered:.1f} s after the cut (> {bound} s)"

    # The host comes back: link up, new worker processes; no operator step on the platform.
    hosts.link_up(victim)
    since = (platform.logs / f"h{victim.index}-gpu.log").stat().st_size
    hosts.start(victim)
    after = submit_sleepers(platform, 12, 0.5)
    jobs = all_final(platform, KEY, after, within=60)
    assert {j["status"] for j in jobs.values()} == {"succeeded"}
    took = [i for i in after if i in received(platform, victim, since)]
    assert took, "the host that came back took no job"
    assert [i for i in after if i in received(platform, survivor)], "the survivor took no job"
