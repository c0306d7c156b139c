"""job_counters: the /metrics counters, kept by the moves that end jobs, back-filled from the jobs

Revision ID: 0006
Revises: 0005

Until now ``/metrics`` aggregated the whole jobs table on every scrape. The counters it reads now
(``models.counters``) start from what that aggregate said at the upgrade: the final jobs by engine
task and status, the run-time and estimate histograms of the jobs that ran, and the stored webhook
attempts. Run it with the workers stopped, as 0005 asks: a job ending during the upgrade under
the old code would not be counted.
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# models.counters.BOUNDS at this revision, and its labels (format(bound, "g")).
BOUNDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
FINAL = "('succeeded', 'failed', 'rejected', 'cancelled', 'expired')"


def _bucket(seconds: str) -> str:
    """The label of the bucket of ``seconds``, as ``models.counters.bucket_of`` makes it."""
    whens = " ".join(f"WHEN {seconds} <= {bound!r} THEN '{format(bound, 'g')}'" for bound in BOUNDS)
    return f"CASE {whens} ELSE '+Inf' END"


def _backfill_histogram(metric: str, seconds: str, condition: str) -> None:
    """One row per engine task and bucket: the jobs that ran (and ``condition``) observed there."""
    ran = (
        f"SELECT engine_task AS task, CASE WHEN {seconds} < 0 THEN 0.0 ELSE {seconds} END AS seconds "
        f"FROM jobs WHERE status IN {FINAL} AND started_at IS NOT NULL AND finished_at IS NOT NULL"
        f"{condition}"
    )
    op.execute(
        "INSERT INTO job_counters (metric, task, label, value, total) "
        f"SELECT '{metric}', task, label, COUNT(*), SUM(seconds) FROM ("
        f"SELECT task, seconds, {_bucket('seconds')} AS label FROM ({ran}) AS ran"
        ") AS observed GROUP BY task, label"
    )


def upgrade() -> None:
    op.create_table('job_counters',
    sa.Column('metric', sa.String(length=32), nullable=False),
    sa.Column('task', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=32), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.Column('total', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('metric', 'task', 'label')
    )
    if op.get_bind().dialect.name == 'postgresql':
        run_time = "EXTRACT(EPOCH FROM finished_at - started_at)"
    else:
        run_time = "(julianday(finished_at) - julianday(started_at)) * 86400.0"
    op.execute(
        "INSERT INTO job_counters (metric, task, label, value, total) "
        f"SELECT 'jobs_finished', engine_task, status, COUNT(*), 0.0 FROM jobs WHERE status IN {FINAL} "
        "GROUP BY engine_task, status"
    )
    _backfill_histogram('job_duration_seconds', run_time, "")
    _backfill_histogram('job_predict_time_seconds', "predict_time", " AND predict_time IS NOT NULL")
    op.execute(
        "INSERT INTO job_counters (metric, task, label, value, total) "
        "SELECT 'webhook_attempts', '', outcome, COUNT(*), 0.0 FROM ("
        "SELECT CASE WHEN ok THEN 'success' ELSE 'failure' END AS outcome FROM webhook_deliveries"
        ") AS attempts GROUP BY outcome"
    )


def downgrade() -> None:
    op.drop_table('job_counters')
