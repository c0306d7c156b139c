"""job_status_counts: how many jobs each client has in each task and status, kept by triggers on
jobs; newest-first indexes that give the listing's exact order: (created_at, id) for every
client's jobs (an admin's), (client_id, created_at, id) for one client's

Revision ID: 0010
Revises: 0009

``/stats`` counted a client's jobs (every job, for an admin) with GROUP BY on every call: 161 ms at a
million jobs, growing with history. It now sums ``job_status_counts`` (``models.stats``), whose rows
the database keeps in step with every write of ``jobs``, whoever makes it: the lifecycle's INSERTs
and COPY, its moves, the deletes of a job, of a batch's jobs and of the sweep's pruning.

Postgres: statement triggers with transition tables for INSERT (a COPY of 1,000 jobs costs one
aggregated upsert) and DELETE (idem), a row trigger for an UPDATE that changes a job's status (or,
never done today, its client or task): ``WHEN`` filters in the executor, so the touches (heartbeats,
polls) and the progress moves call no function at all; TRUNCATE empties the counts. Each write adds
to the rows of its transaction's shard (``txid mod 16``): concurrent submits of one client land on
different rows instead of queueing on one, and read sums the shards. A statement touches its rows
in key order, so two writers never wait on each other in a cycle.

SQLite (the embedded default): row triggers doing the same, on shard 0 (SQLite has one writer at a
time). Note for later migrations: a SQLite batch operation that *rebuilds* jobs (move-and-copy)
drops these triggers with the old table; such a migration must create them again (``_SQLITE``).

``GET /v1/jobs`` and ``/stats`` list newest first, ``id`` breaking ties. Every client's jobs (an
admin key) had no index in that order: a page sorted the whole table (267 ms at a million jobs).
``ix_jobs_created`` gives it; ``ix_jobs_client_created`` gains ``id``, so a client's page is one
backward walk of its own index, which the planner then always prefers to walking every client's
newest jobs through ``ix_jobs_created`` (which it would pick for a big client, and which goes
through the whole history for a client whose jobs are all old).

The upgrade takes a SHARE ROW EXCLUSIVE lock on jobs (Postgres) before it creates the triggers and
back-fills the counts, so writers running meanwhile wait for it and nothing is counted twice or
missed. It builds the two indexes under that lock too (a few seconds per million jobs).
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

SHARDS = 16
KEY = "client_id, task, engine_task, status"
UPSERT = (
    f"INSERT INTO job_status_counts AS counted ({KEY}, shard, n) "
    "{rows} "
    f"ON CONFLICT ({KEY}, shard) DO UPDATE SET n = counted.n + excluded.n"
)

_POSTGRES_FUNCTIONS = {
    # A statement's rows, added (INSERT) or taken away (DELETE) per key, in key order.
    "aiorch_count_inserted_jobs": UPSERT.format(
        rows=f"SELECT {KEY}, CAST(mod(txid_current(), {SHARDS}) AS smallint), count(*) FROM added "
        f"GROUP BY {KEY} ORDER BY {KEY}"
    ),
    "aiorch_count_deleted_jobs": UPSERT.format(
        rows=f"SELECT {KEY}, CAST(mod(txid_current(), {SHARDS}) AS smallint), -count(*) FROM removed "
        f"GROUP BY {KEY} ORDER BY {KEY}"
    ),
    # One row whose status (or client or task) changed: -1 under the old key, +1 under the new.
    "aiorch_count_moved_job": UPSERT.format(
        rows=f"SELECT {KEY}, CAST(mod(txid_current(), {SHARDS}) AS smallint), n FROM (VALUES "
        "(OLD.client_id, OLD.task, OLD.engine_task, OLD.status, CAST(-1 AS bigint)), "
        "(NEW.client_id, NEW.task, NEW.engine_task, NEW.status, CAST(1 AS bigint))"
        f") AS moved ({KEY}, n) ORDER BY {KEY}"
    ),
    "aiorch_count_truncated_jobs": "DELETE FROM job_status_counts",
}
_CHANGED = (
    "OLD.status IS DISTINCT FROM NEW.status OR OLD.client_id IS DISTINCT FROM NEW.client_id "
    "OR OLD.task IS DISTINCT FROM NEW.task OR OLD.engine_task IS DISTINCT FROM NEW.engine_task"
)
_POSTGRES_TRIGGERS = {
    "jobs_count_inserted": "AFTER INSERT ON jobs REFERENCING NEW TABLE AS added "
    "FOR EACH STATEMENT EXECUTE FUNCTION aiorch_count_inserted_jobs()",
    "jobs_count_deleted": "AFTER DELETE ON jobs REFERENCING OLD TABLE AS removed "
    "FOR EACH STATEMENT EXECUTE FUNCTION aiorch_count_deleted_jobs()",
    "jobs_count_moved": "AFTER UPDATE OF status, client_id, task, engine_task ON jobs FOR EACH ROW "
    f"WHEN ({_CHANGED}) EXECUTE FUNCTION aiorch_count_moved_job()",
    "jobs_count_truncated": "AFTER TRUNCATE ON jobs FOR EACH STATEMENT "
    "EXECUTE FUNCTION aiorch_count_truncated_jobs()",
}


def _sqlite_add(row: str, n: int) -> str:
    return (
        f"INSERT INTO job_status_counts ({KEY}, shard, n) "
        f"VALUES ({row}.client_id, {row}.task, {row}.engine_task, {row}.status, 0, {n}) "
        f"ON CONFLICT ({KEY}, shard) DO UPDATE SET n = n + excluded.n;"
    )


_SQLITE_CHANGED = _CHANGED.replace("IS DISTINCT FROM", "IS NOT")
_SQLITE = {
    "jobs_count_inserted": f"AFTER INSERT ON jobs FOR EACH ROW BEGIN {_sqlite_add('NEW', 1)} END",
    "jobs_count_deleted": f"AFTER DELETE ON jobs FOR EACH ROW BEGIN {_sqlite_add('OLD', -1)} END",
    "jobs_count_moved": "AFTER UPDATE OF status, client_id, task, engine_task ON jobs FOR EACH ROW "
    f"WHEN {_SQLITE_CHANGED} BEGIN {_sqlite_add('OLD', -1)} {_sqlite_add('NEW', 1)} END",
}


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == 'postgresql'
    if postgres:
        # Writers wait until this commits: the back-fill and the triggers see the same jobs.
        op.execute('LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE')
    op.create_table('job_status_counts',
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('task', sa.String(length=64), nullable=False),
    sa.Column('engine_task', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('shard', sa.SmallInteger(), nullable=False),
    sa.Column('n', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('client_id', 'task', 'engine_task', 'status', 'shard')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_created', ['created_at', 'id'], unique=False)
        batch_op.drop_index('ix_jobs_client_created')
        batch_op.create_index('ix_jobs_client_created', ['client_id', 'created_at', 'id'], unique=False)
    if postgres:
        for name, body in _POSTGRES_FUNCTIONS.items():
            op.execute(
                f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN {body}; RETURN NULL; END $$"
            )
        for name, definition in _POSTGRES_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {definition}")
    else:
        for name, definition in _SQLITE.items():
            op.execute(f"CREATE TRIGGER {name} {definition}")
    op.execute(
        f"INSERT INTO job_status_counts ({KEY}, shard, n) SELECT {KEY}, 0, count(*) FROM jobs GROUP BY {KEY}"
    )


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == 'postgresql'
    triggers = _POSTGRES_TRIGGERS if postgres else _SQLITE
    for name in triggers:
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (" ON jobs" if postgres else ""))
    if postgres:
        for name in _POSTGRES_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_client_created')
        batch_op.create_index('ix_jobs_client_created', ['client_id', 'created_at'], unique=False)
        batch_op.drop_index('ix_jobs_created')
    op.drop_table('job_status_counts')
