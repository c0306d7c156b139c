"""NOTIFY aiorch_job_event on every INSERT into job_events (Postgres only): the wake-up of live
streams and blocking waiters (models/feed.py); the fair-share dispatcher's indexes and the
queue_slots table (models/dispatch.py)

Revision ID: 0009
Revises: 0008

A statement trigger with a transition table: one NOTIFY per statement and per 200 distinct jobs
(the payload, comma-separated job ids, stays far below Postgres' 8000-byte limit), so a move sends
one and a bulk insert of 1000 jobs five. NOTIFY is delivered on COMMIT. SQLite has no NOTIFY; its
readers follow the log by id instead.

Dispatch: ``ix_jobs_waiting`` (jobs waiting for a slot, in each client's order) and
``ix_jobs_in_flight`` (jobs holding a slot) are partial, so they hold only live jobs; jobs queued
before this revision were all sent already, so they count as holding a slot until they run.
"""

import sqlalchemy as sa
from alembic import op

import models.db

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


IN_FLIGHT = "(status = 'queued' AND dispatched_at IS NOT NULL) OR (status = 'running' AND stage = 'local')"
WAITING = "status = 'queued' AND dispatched_at IS NULL"


def upgrade() -> None:
    op.create_table(
        'queue_slots',
        sa.Column('node', sa.String(length=255), nullable=False),
        sa.Column('queue', sa.String(length=64), nullable=False),
        sa.Column('slots', sa.Integer(), nullable=False),
        sa.Column('seen_at', models.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('node', 'queue'),
    )
    op.create_table(
        'dispatch_turns',
        sa.Column('queue', sa.String(length=64), nullable=False),
        sa.Column('client_id', sa.String(length=64), nullable=False),
        sa.Column('last_at', models.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('queue', 'client_id'),
    )
    columns = ['queue', 'client_id', 'priority', 'created_at', 'id']
    waiting, in_flight = sa.text(WAITING), sa.text(IN_FLIGHT)
    op.create_index('ix_jobs_waiting', 'jobs', columns, postgresql_where=waiting, sqlite_where=waiting)
    op.create_index(
        'ix_jobs_in_flight', 'jobs', ['queue', 'client_id'], postgresql_where=in_flight, sqlite_where=in_flight
    )
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(FUNCTION)
    op.execute(
        'CREATE TRIGGER job_events_notify AFTER INSERT ON job_events '
        'REFERENCING NEW TABLE AS logged FOR EACH STATEMENT EXECUTE FUNCTION aiorch_notify_job_events()'
    )


def downgrade() -> None:
    op.drop_index('ix_jobs_in_flight', table_name='jobs')
    op.drop_index('ix_jobs_waiting', table_name='jobs')
    op.drop_table('dispatch_turns')
    op.drop_table('queue_slots')
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute('DROP TRIGGER IF EXISTS job_events_notify ON job_events')
    op.execute('DROP FUNCTION IF EXISTS aiorch_notify_job_events()')
