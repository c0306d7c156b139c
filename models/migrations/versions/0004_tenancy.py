"""tenancy: assets on stored_files, JWT access keys, webhook events and per-client secrets

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

import models.db

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('stored_files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('asset_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='output'))
        batch_op.add_column(sa.Column('filename', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('width', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('height', sa.Integer(), nullable=True))
        batch_op.alter_column('job_id', existing_type=sa.String(length=32), nullable=True)
        batch_op.create_unique_constraint('uq_stored_files_asset_id', ['asset_id'])
        batch_op.create_index('ix_stored_files_client_created', ['client_id', 'created_at'], unique=False)
    # Outputs stored before assets existed: their file name (already public) gives their id.
    op.execute("UPDATE stored_files SET asset_id = substr(name, 1, 32), filename = name WHERE asset_id IS NULL")
    with op.batch_alter_table('stored_files', schema=None) as batch_op:
        batch_op.alter_column('kind', existing_type=sa.String(length=16), server_default=None)

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('access_key', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('secret_key', sa.Text(), nullable=True))
        batch_op.create_unique_constraint('uq_api_keys_access_key', ['access_key'])

    op.create_table('webhook_events',
    sa.Column('event_id', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('created_at', models.db.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('event_id')
    )
    with op.batch_alter_table('webhook_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_webhook_events_job_id'), ['job_id'], unique=False)

    op.create_table('webhook_secrets',
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('secret', sa.Text(), nullable=False),
    sa.Column('previous_secret', sa.Text(), nullable=True),
    sa.Column('rotated_at', models.db.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('client_id')
    )


def downgrade() -> None:
    op.drop_table('webhook_secrets')
    with op.batch_alter_table('webhook_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhook_events_job_id'))
    op.drop_table('webhook_events')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_constraint('uq_api_keys_access_key', type_='unique')
        batch_op.drop_column('secret_key')
        batch_op.drop_column('access_key')
    op.execute("DELETE FROM stored_files WHERE job_id IS NULL")
    with op.batch_alter_table('stored_files', schema=None) as batch_op:
        batch_op.drop_index('ix_stored_files_client_created')
        batch_op.drop_constraint('uq_stored_files_asset_id', type_='unique')
        batch_op.alter_column('job_id', existing_type=sa.String(length=32), nullable=False)
        batch_op.drop_column('height')
        batch_op.drop_column('width')
        batch_op.drop_column('filename')
        batch_op.drop_column('kind')
        batch_op.drop_column('asset_id')
