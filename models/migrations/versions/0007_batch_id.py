"""jobs.batch_id: the batch a job was submitted in (POST /v1/jobs/batch), indexed per client

Revision ID: 0007
Revises: 0006

Nullable, no back-fill: jobs submitted one by one belong to no batch. The index is on (client_id,
batch_id), since every read of a batch is one client's (its status, its jobs, its cancel).
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode, as in 0001, so SQLite (which cannot ALTER much) gets the same schema.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch_id', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_jobs_client_batch', ['client_id', 'batch_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_client_batch')
        batch_op.drop_column('batch_id')
