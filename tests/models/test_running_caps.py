"""``models.client_limits.running_caps``: a client's max_running (its own, else
AIORCH_MAX_RUNNING_PER_CLIENT) as the fair-share dispatcher's cap on one queue, less its jobs in
flight on the other queues, so the limit holds across all workers. On the run's Postgres."""

from __future__ import annotations

from config import Settings
from models.client_limits import running_caps
from models.db import Database, utcnow
from models.jobstore import new_id
from tests.support.factories import make_client_limit, make_job

QUEUE = "gpu.superres"


def client() -> str:
    return f"cap-{new_id()[:10]}"


def in_flight(db: Database, client_id: str, queue: str, running: bool) -> None:
    """A job holding a slot of ``queue``: running on a local engine, or sent and not claimed."""
    if running:
        make_job(db, client_id=client_id, queue=queue, status="running", stage="local")
    else:
        make_job(db, client_id=client_id, queue=queue, status="queued", stage="run", dispatched_at=utcnow())


def test_caps_are_the_clients_max_running_less_its_jobs_in_flight_on_other_queues(
    db: Database, settings: Settings
) -> None:
    two, one, free, unlimited = client(), client(), client(), client()
    make_client_limit(db, two, rate_per_minute=None, max_running=2)
    make_client_limit(db, one, rate_per_minute=None, max_running=1)
    make_client_limit(db, unlimited, rate_per_minute=None, max_running=0)
    in_flight(db, two, "gpu.vision", running=True)  # counts: another queue
    in_flight(db, two, QUEUE, running=False)  # not subtracted: the dispatcher counts this queue itself
    make_job(db, client_id=two, queue="gpu.vision", status="queued", stage="run")  # waiting: holds no slot
    make_job(db, client_id=two, queue="gpu.vision", status="succeeded", stage="done")  # over
    in_flight(db, one, "gpu.vision", running=False)
    in_flight(db, one, "gpu.diffusion", running=True)  # two elsewhere, over its limit of one: 0, not -1

    with db.session() as session:
        caps = running_caps(session, QUEUE, [two, one, free, unlimited, two], settings)
    assert caps == {two: 1, one: 0}  # no limit (the default 0, or its own 0): no cap

    # AIORCH_MAX_RUNNING_PER_CLIENT caps every client without a max_running of its own.
    with db.session() as session:
        caps = running_caps(
            session, QUEUE, [two, free, unlimited], settings.with_overrides(max_running_per_client=3)
        )
    assert caps == {two: 1, free: 3}
    with db.session() as session:
        assert running_caps(session, QUEUE, [], settings) == {}
