"""api_keys.admin: a key is a client key (false, every key so far) or an admin key

Revision ID: 0008
Revises: 0007

An admin key reads, lists, cancels and deletes every client's jobs and sees every client in /stats
and /diag/backends (contract v1.1, Roles). Existing keys stay client keys.
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode, as in 0001, so SQLite (which cannot ALTER much) gets the same schema; the
    # server default fills the existing rows, then goes (the model sets the value on INSERT).
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('admin', sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.alter_column('admin', existing_type=sa.Boolean(), server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('admin')
