"""files and batches: stored file bodies in parts, OpenAI batches, one row per batch line

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09 12:00:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


revision: str = '0007'
down_revision: Union[str, None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UPLOADING = "status = 'uploading'"
OPEN = "status IN ('validating','in_progress','finalizing','cancelling')"
STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")


def upgrade() -> None:
    op.create_table(
        'files',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('tenant', sa.String(length=128), nullable=False),
        sa.Column('filename', sa.String(length=512), nullable=False),
        sa.Column('purpose', sa.String(length=32), nullable=False),
        sa.Column('bytes', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('lines', sa.Integer(), server_default='0', nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_files')),
    )
    op.create_index(op.f('ix_files_tenant_created_at_id'), 'files', ['tenant', 'created_at', 'id'], unique=False)
    op.create_index('ix_files_uploading', 'files', ['created_at'], unique=False,
                    postgresql_where=sa.text(UPLOADING), sqlite_where=sa.text(UPLOADING))
    op.create_table(
        'file_parts',
        sa.Column('file_id', sa.String(length=64), nullable=False),
        sa.Column('part', sa.Integer(), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint('file_id', 'part', name=op.f('pk_file_parts')),
    )
    op.create_table(
        'batches',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('tenant', sa.String(length=128), nullable=False),
        sa.Column('name', sa.String(length=256), nullable=True),
        sa.Column('endpoint', sa.String(length=64), nullable=False),
        sa.Column('input_file_id', sa.String(length=64), nullable=False),
        sa.Column('input_sha256', sa.String(length=64), nullable=True),
        sa.Column('completion_window', sa.String(length=8), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('priority', sa.SmallInteger(), nullable=False),
        sa.Column('task_type', sa.String(length=32), nullable=True),
        sa.Column('model', sa.String(length=128), nullable=True),
        sa.Column('options', JSONType, nullable=True),
        sa.Column('batch_metadata', JSONType, nullable=True),
        sa.Column('errors', JSONType, nullable=True),
        sa.Column('output_file_id', sa.String(length=64), nullable=True),
        sa.Column('error_file_id', sa.String(length=64), nullable=True),
        sa.Column('total', sa.Integer(), server_default='0', nullable=False),
        sa.Column('bad', sa.Integer(), server_default='0', nullable=False),
        sa.Column('superseded', sa.Integer(), server_default='0', nullable=False),
        sa.Column('completed_count', sa.Integer(), server_default='0', nullable=False),
        sa.Column('failed_count', sa.Integer(), server_default='0', nullable=False),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('lease_owner', sa.String(length=32), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('in_progress_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finalizing_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('failed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('expired_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('cancelling_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN (" + ",".join(f"'{s}'" for s in STATUSES) + ")",
                           name=op.f('ck_batches_status_valid')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_batches')),
        sa.UniqueConstraint('tenant', 'name', name=op.f('uq_batches_tenant_name')),
    )
    op.create_index(op.f('ix_batches_tenant_created_at_id'), 'batches', ['tenant', 'created_at', 'id'], unique=False)
    op.create_index('ix_batches_open', 'batches', ['status'], unique=False,
                    postgresql_where=sa.text(OPEN), sqlite_where=sa.text(OPEN))
    op.create_table(
        'batch_lines',
        sa.Column('batch_id', sa.String(length=64), nullable=False),
        sa.Column('line', sa.Integer(), nullable=False),
        sa.Column('custom_id', sa.String(length=512), nullable=True),
        sa.Column('job_id', sa.Uuid(as_uuid=False), nullable=True),
        sa.Column('attempt', sa.Integer(), server_default='0', nullable=False),
        sa.Column('error', JSONType, nullable=True),
        sa.PrimaryKeyConstraint('batch_id', 'line', name=op.f('pk_batch_lines')),
    )


def downgrade() -> None:
    op.drop_table('batch_lines')
    op.drop_index('ix_batches_open', table_name='batches')
    op.drop_index(op.f('ix_batches_tenant_created_at_id'), table_name='batches')
    op.drop_table('batches')
    op.drop_table('file_parts')
    op.drop_index('ix_files_uploading', table_name='files')
    op.drop_index(op.f('ix_files_tenant_created_at_id'), table_name='files')
    op.drop_table('files')
