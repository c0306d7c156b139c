"""jobs.next_poll_at: when a remote job is next due to be polled (batched polls)

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

import models.db

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode, as in 0001, so SQLite (which cannot ALTER much) gets the same schema.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('next_poll_at', models.db.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('next_poll_at')
