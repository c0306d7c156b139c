"""jobs.remote_id: the provider's id of a job served by a remote backend

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode, as in 0001, so SQLite (which cannot ALTER much) gets the same schema.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('remote_id', sa.String(length=512), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_remote_id'), ['remote_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_remote_id'))
        batch_op.drop_column('remote_id')
