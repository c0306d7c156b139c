"""A NOTIFY carries the event itself when its statement logged one event on that channel

Revision ID: 0015
Revises: 0014

Until now every notification named job ids only, and the stream hub that heard it read the log
for them (one statement per wake-up, on the path of every event to its stream). A move logs one
event, so its notification now carries that event as a JSON array ``[id, job_id, data]`` (the
same three columns the hub reads), and the hub sends it without reading. A statement that logs
several events on a channel (a batch cancelled, a sweep), or an event too large for a
notification's payload (Postgres refuses 8,000 bytes and more), still sends job ids, 200 to a
notification, as migration 0014 did. The job's first event is still announced to nobody.
"""

import importlib.util
from pathlib import Path

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

CARRIED = """
CREATE OR REPLACE FUNCTION aiorch_notify_job_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bucket text;
    events bigint;
    carried text;
    ids text;
BEGIN
    FOR bucket, events IN
        SELECT left(md5(job_id), 1), count(*) FROM logged WHERE seq > 1 GROUP BY 1
    LOOP
        carried := NULL;
        IF events = 1 THEN
            SELECT json_build_array(id, job_id, data)::text INTO carried
              FROM logged WHERE seq > 1 AND left(md5(job_id), 1) = bucket;
        END IF;
        IF carried IS NOT NULL AND octet_length(carried) < 7900 THEN
            PERFORM pg_notify('aiorch_job_event_' || bucket, carried);
            CONTINUE;
        END IF;
        FOR ids IN
            SELECT string_agg(job_id, ',')
              FROM (SELECT job_id, (row_number() OVER ()) / 200 AS chunk
                      FROM (SELECT DISTINCT job_id FROM logged
                             WHERE seq > 1 AND left(md5(job_id), 1) = bucket) AS jobs
                   ) AS numbered
             GROUP BY chunk
        LOOP
            PERFORM pg_notify('aiorch_job_event_' || bucket, ids);
        END LOOP;
    END LOOP;
    RETURN NULL;
END
$$
"""


def _by_job() -> str:
    """Migration 0014's function (job ids only), from its own file: a revision's module name starts
    with a digit, so it is loaded by path."""
    path = Path(__file__).with_name("0014_event_channels_by_job.py")
    spec = importlib.util.spec_from_file_location("aiorch_migration_0014", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.BY_JOB)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CARRIED)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_by_job())
