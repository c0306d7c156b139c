"""client_limits: a client's own rate, queued, running and priority limits

Revision ID: 0011
Revises: 0010

One row per client that has limits of its own (``aiorch keys create|update CLIENT
--rate-per-minute N --max-queued N --max-running N --max-priority P``); a NULL column, or no row,
means the environment's default (``AIORCH_RATE_LIMIT_PER_MINUTE`` etc.). Kept per client, not per
key: a client may have several keys, or only static ones that have no row.
"""

import sqlalchemy as sa
from alembic import op

import models.db

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('client_limits',
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('rate_per_minute', sa.Integer(), nullable=True),
    sa.Column('max_queued', sa.Integer(), nullable=True),
    sa.Column('max_running', sa.Integer(), nullable=True),
    sa.Column('max_priority', sa.Integer(), nullable=True),
    sa.Column('updated_at', models.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('client_id')
    )


def downgrade() -> None:
    op.drop_table('client_limits')
