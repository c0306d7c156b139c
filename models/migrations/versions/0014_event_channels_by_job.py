"""NOTIFY each job's events on one of 16 channels, chosen by its id, instead of one for all; none
for the event that creates a job

Revision ID: 0014
Revises: 0013

A listener (an API process's stream hub) LISTENs only to the channels of the jobs it watches
(``models.feed.channel_of``: ``aiorch_job_event_`` and the first hex digit of the md5 of the job's
id). With one channel, every submit anywhere woke every API process that had a stream open. One
NOTIFY per statement, channel and 200 jobs: a move sends one.

A job's first event (``seq`` 1, ``job.queued``, written by the statement that creates the job) is
announced to nobody: no stream and no waiter can follow a job before it exists, and each NOTIFY
costs its commit Postgres' queue of notifications (its commits take turns through a lock held
until they are flushed, and every listening session is signalled to read the entry). A submit,
and a batch of 500, now send none.
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

BY_JOB = """
CREATE OR REPLACE FUNCTION aiorch_notify_job_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    channel text;
    ids text;
BEGIN
    FOR channel, ids IN
        SELECT 'aiorch_job_event_' || bucket, string_agg(job_id, ',')
          FROM (SELECT job_id, bucket, (row_number() OVER (PARTITION BY bucket)) / 200 AS chunk
                  FROM (SELECT DISTINCT job_id, left(md5(job_id), 1) AS bucket FROM logged
                         WHERE seq > 1) AS jobs
               ) AS numbered
         GROUP BY bucket, chunk
    LOOP
        PERFORM pg_notify(channel, ids);
    END LOOP;
    RETURN NULL;
END
$$
"""

ONE_CHANNEL = """
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
    if op.get_bind().dialect.name == "postgresql":
        op.execute(BY_JOB)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(ONE_CHANNEL)
