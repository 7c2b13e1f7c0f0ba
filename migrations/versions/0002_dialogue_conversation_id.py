"""dialogue conversation id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 16:12:16.223526
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('conversation_id', sa.String(length=64), nullable=True))
    op.create_index(op.f('ix_jobs_conversation_id_created_at'), 'jobs', ['conversation_id', 'created_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_jobs_conversation_id_created_at'), table_name='jobs')
    op.drop_column('jobs', 'conversation_id')
