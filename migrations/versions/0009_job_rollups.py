"""job rollups: finished jobs folded per (UTC day, model, task, tenant, status) for /metrics, ended
webhook deliveries per (UTC day, tenant, outcome), the one-row watermark that says how far the
fold has gone, and a partial index each on webhook_deliveries' delivered_at and given_up_at

New tables, and two indexes over the ended deliveries (built in the migration's transaction: the
deliveries table, one row per job that asked for a webhook, is written to only by submits with a
webhook and by the deliverer, which wait for the build); nothing is read or rewritten in `jobs`.
The first fold after the upgrade (a scrape of /metrics or a reconciler pass) folds the jobs and
deliveries already there, one day per transaction (llmos/rollup.py).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 19:20:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0009'
down_revision: Union[str, None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ENDED = ('delivered_at', 'given_up_at')
"""The columns of webhook_deliveries a partial index each gets (the fold of ended deliveries)."""

HISTOGRAMS = {'queue_wait': 18, 'compute': 18, 'latency': 18, 'batch_size': 9}
"""Each histogram and its number of buckets (llmos.db.ROLLUP_HISTOGRAMS at this revision)."""


def _histogram_columns() -> list:
    cols = []
    for name, n in HISTOGRAMS.items():
        cols.append(sa.Column(f'{name}_n', sa.BigInteger(), server_default='0', nullable=False))
        cols.append(sa.Column(f'{name}_sum', sa.Float(), server_default='0', nullable=False))
        cols.extend(sa.Column(f'{name}_le_{i:02d}', sa.BigInteger(), server_default='0', nullable=False)
                    for i in range(n))
    return cols


def upgrade() -> None:
    op.create_table(
        'job_rollups',
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('model', sa.String(length=128), nullable=False),
        sa.Column('task_type', sa.String(length=32), nullable=False),
        sa.Column('tenant', sa.String(length=128), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('jobs', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('retries', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('tokens_in', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('tokens_out', sa.BigInteger(), server_default='0', nullable=False),
        *_histogram_columns(),
        sa.PrimaryKeyConstraint('day', 'model', 'task_type', 'tenant', 'status', name=op.f('pk_job_rollups')),
    )
    op.create_table(
        'job_rollup_watermark',
        sa.Column('id', sa.SmallInteger(), nullable=False),
        sa.Column('folded_to', sa.DateTime(timezone=True), nullable=True),
        sa.Column('refreshed_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint('id = 1', name=op.f('ck_job_rollup_watermark_one_row')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_job_rollup_watermark')),
    )
    op.execute("INSERT INTO job_rollup_watermark (id) VALUES (1)")
    op.create_table(
        'webhook_rollups',
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('tenant', sa.String(length=128), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('deliveries', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('attempts', sa.BigInteger(), server_default='0', nullable=False),
        sa.PrimaryKeyConstraint('day', 'tenant', 'outcome', name=op.f('pk_webhook_rollups')),
    )
    for ended in ENDED:
        op.create_index(f'ix_webhook_deliveries_{ended}', 'webhook_deliveries', [ended], unique=False,
                        postgresql_where=sa.text(f'{ended} IS NOT NULL'), sqlite_where=sa.text(f'{ended} IS NOT NULL'))


def downgrade() -> None:
    for ended in ENDED:
        op.drop_index(f'ix_webhook_deliveries_{ended}', table_name='webhook_deliveries')
    op.drop_table('webhook_rollups')
    op.drop_table('job_rollup_watermark')
    op.drop_table('job_rollups')
