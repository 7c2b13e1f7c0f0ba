"""api keys, tenant indexes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:00:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', sa.Uuid(as_uuid=False), nullable=False),
        sa.Column('tenant', sa.String(length=128), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=True),
        sa.Column('prefix', sa.String(length=16), nullable=False),
        sa.Column('hash', sa.String(length=64), nullable=False),
        sa.Column('admin', sa.Boolean(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
        sa.UniqueConstraint('prefix', name=op.f('uq_api_keys_prefix')),
    )
    op.create_index(op.f('ix_api_keys_tenant'), 'api_keys', ['tenant'], unique=False)
    op.create_index(op.f('ix_jobs_tenant_created_at_id'), 'jobs', ['tenant', 'created_at', 'id'], unique=False)
    op.create_index(op.f('ix_jobs_tenant_status'), 'jobs', ['tenant', 'status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_jobs_tenant_status'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_tenant_created_at_id'), table_name='jobs')
    op.drop_index(op.f('ix_api_keys_tenant'), table_name='api_keys')
    op.drop_table('api_keys')
