"""scheduling columns: a job's predicted start and finish, the priority steps aging gave it, a
worker's ready time (its model loaded: the cold start is ready_at - started_at)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 17:00:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0008'
down_revision: Union[str, None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # nullable columns and a constant default: no table rewrite on Postgres, whatever its size
    op.add_column('jobs', sa.Column('eta_start_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('eta_finish_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('aged', sa.SmallInteger(), server_default='0', nullable=False))
    op.add_column('workers', sa.Column('ready_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers') as b:
        b.drop_column('ready_at')
    with op.batch_alter_table('jobs') as b:
        b.drop_column('aged')
        b.drop_column('eta_finish_at')
        b.drop_column('eta_start_at')
