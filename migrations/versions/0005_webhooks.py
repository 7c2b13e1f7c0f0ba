"""webhooks: deliveries and per-tenant secrets

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 10:00:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

UNDELIVERED = "delivered_at IS NULL AND given_up_at IS NULL"


def upgrade() -> None:
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.Uuid(as_uuid=False), nullable=False),
        sa.Column('tenant', sa.String(length=128), nullable=False),
        sa.Column('kind', sa.String(length=8), nullable=False),
        sa.Column('job_id', sa.Uuid(as_uuid=False), nullable=True),
        sa.Column('batch_id', sa.String(length=64), nullable=True),
        sa.Column('url', sa.String(length=2048), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('first_attempt_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_status', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('given_up_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("(kind = 'job' AND job_id IS NOT NULL AND batch_id IS NULL) OR "
                           "(kind = 'batch' AND batch_id IS NOT NULL AND job_id IS NULL)",
                           name=op.f('ck_webhook_deliveries_target')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    )
    op.create_index(op.f('ix_webhook_deliveries_next_attempt_at'), 'webhook_deliveries', ['next_attempt_at'],
                    unique=False, postgresql_where=sa.text(UNDELIVERED), sqlite_where=sa.text(UNDELIVERED))
    op.create_index(op.f('ix_webhook_deliveries_tenant_created_at'), 'webhook_deliveries',
                    ['tenant', 'created_at'], unique=False)
    op.create_index(op.f('ix_webhook_deliveries_job_id'), 'webhook_deliveries', ['job_id'], unique=False)
    op.create_table(
        'webhook_secrets',
        sa.Column('tenant', sa.String(length=128), nullable=False),
        sa.Column('secret', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('tenant', name=op.f('pk_webhook_secrets')),
    )


def downgrade() -> None:
    op.drop_table('webhook_secrets')
    op.drop_index(op.f('ix_webhook_deliveries_job_id'), table_name='webhook_deliveries')
    op.drop_index(op.f('ix_webhook_deliveries_tenant_created_at'), table_name='webhook_deliveries')
    op.drop_index(op.f('ix_webhook_deliveries_next_attempt_at'), table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
