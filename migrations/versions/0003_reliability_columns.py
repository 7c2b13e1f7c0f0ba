"""reliability columns

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 16:27:15.586916
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('timeout_s', sa.Float(), nullable=True))
    op.add_column('jobs', sa.Column('deadline', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('run_after', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('finishes', sa.Integer(), server_default='0', nullable=False))
    op.create_index(op.f('ix_jobs_status_worker_id'), 'jobs', ['status', 'worker_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_jobs_status_worker_id'), table_name='jobs')
    op.drop_column('jobs', 'finishes')
    op.drop_column('jobs', 'dispatched_at')
    op.drop_column('jobs', 'run_after')
    op.drop_column('jobs', 'deadline')
    op.drop_column('jobs', 'timeout_s')
