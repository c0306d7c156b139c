"""NOTIFY aiorch_job_event on every INSERT into job_events (Postgres only): the wake-up of live
streams and blocking waiters (models/feed.py)

Revision ID: 0009
Revises: 0008

A statement trigger with a transition table: one NOTIFY per statement and per 200 distinct jobs
(the payload, comma-separated job ids, stays far below Postgres' 8000-byte limit), so a move sends
one and a bulk insert of 1000 jobs five. NOTIFY is delivered on COMMIT. SQLite has no NOTIFY; its
readers follow the log by id instead.
"""

from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

FUNCTION = """
CREATE OR REPLACE FUNCTION aiorch_notify_job_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids text;
BEGIN
    FOR ids IN
        SELECT string_agg(job_id, ',')
          FROM (SELECT job_id, (row_number() OVER ()) / 200 AS chunk
                  FROM (SELECT DISTINCT job_id FROM logged) AS jobs) AS numbered
         GROUP BY chunk
    LOOP
        PERFORM pg_notify('aiorch_job_event', ids);
    END LOOP;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(FUNCTION)
    op.execute(
        'CREATE TRIGGER job_events_notify AFTER INSERT ON job_events '
        'REFERENCING NEW TABLE AS logged FOR EACH STATEMENT EXECUTE FUNCTION aiorch_notify_job_events()'
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute('DROP TRIGGER IF EXISTS job_events_notify ON job_events')
    op.execute('DROP FUNCTION IF EXISTS aiorch_notify_job_events()')
