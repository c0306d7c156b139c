"""ix_jobs_waiting in each client's order: higher priority first

Revision ID: 0013
Revises: 0012

The dispatcher reads each client's first waiting jobs (higher priority first, then the older) and a
job's place counts the ones before it. With ``priority`` ascending in the index neither was a
range of it: every look-up read all of a client's waiting jobs and sorted them, so a backlog of
100,000 cost each fill 80 ms. Rebuilt with ``priority DESC``, a client's order is its index order.
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

WAITING = "status = 'queued' AND dispatched_at IS NULL"


def _rebuild(priority: sa.ColumnElement | str) -> None:
    op.drop_index("ix_jobs_waiting", table_name="jobs")
    columns = ["queue", "client_id", priority, "created_at", "id"]
    waiting = sa.text(WAITING)
    op.create_index("ix_jobs_waiting", "jobs", columns, postgresql_where=waiting, sqlite_where=waiting)


def upgrade() -> None:
    _rebuild(sa.desc(sa.column("priority")))


def downgrade() -> None:
    _rebuild("priority")
