"""the job lifecycle's event log (job_events, jobs.event_seq) and typed phases in jobs.stage

Revision ID: 0005
Revises: 0004

A running job's stage said ``run`` whether it ran on a local engine or at a remote provider; it now
says which (``local``, ``submit``, ``poll``). Rows of running jobs are mapped: a stored remote id
means polling, anything else a local run (a remote submit in flight during the upgrade is then
recovered as a local run, so drain the cpu queue's submits first).
"""

import sqlalchemy as sa
from alembic import op

import models.db

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('event_seq', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('event_seq', existing_type=sa.Integer(), server_default=None)
    op.execute("UPDATE jobs SET stage = 'poll' WHERE status = 'running' AND remote_id IS NOT NULL")
    op.execute("UPDATE jobs SET stage = 'local' WHERE status = 'running' AND stage = 'run'")

    op.create_table('job_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('created_at', models.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('dispatched_at', models.db.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'seq', name='uq_job_events_job_seq')
    )
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.create_index('ix_job_events_created_at', ['created_at'], unique=False)
        batch_op.create_index(
            'ix_job_events_pending',
            ['id'],
            unique=False,
            postgresql_where=sa.text('dispatched_at IS NULL'),
            sqlite_where=sa.text('dispatched_at IS NULL'),
        )
    # The sweep looks for stored webhook events that never had an attempt, by age.
    with op.batch_alter_table('webhook_events', schema=None) as batch_op:
        batch_op.create_index('ix_webhook_events_created_at', ['created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('webhook_events', schema=None) as batch_op:
        batch_op.drop_index('ix_webhook_events_created_at')
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.drop_index('ix_job_events_pending')
        batch_op.drop_index('ix_job_events_created_at')
    op.drop_table('job_events')
    op.execute("UPDATE jobs SET stage = 'run' WHERE stage IN ('local', 'submit', 'poll')")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('event_seq')
