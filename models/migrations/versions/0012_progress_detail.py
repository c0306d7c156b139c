"""jobs.progress_detail: what a long run reports beside its percentage

Revision ID: 0012
Revises: 0011

A train_lora job's step, steps and loss, written with its progress and carried by its events
(``job.progress``) and its job object. NULL for every job before and for the tasks that report a
percentage only.
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('progress_detail', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('progress_detail')
