"""dashboard indexes: the most recent failures, every tenant's batches newest first; retry columns

jobs.attempt_budget (the submit's max_attempts, kept at an operator's retry so that every retry
gives the job's own budget again) and jobs.attempts_at_retry (the attempts at the last retry: the
/metrics rollup counts the retries of each finish), both null until a job is first retried.

ix_jobs_failed_finished_at_id holds only failed rows, newest last: the dashboard's "recent
failures" panel reads its 20 entries backwards, however many succeeded jobs the table holds
(ix_jobs_finished_at_id would be walked past every success since the last failure).
ix_batches_created_at_id: an admin's batches panel across tenants, newest first (the
(tenant, created_at, id) index serves one tenant's).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 19:00:00.000000

Built CONCURRENTLY on Postgres, as 0006's: a failed build leaves an INVALID index; drop it
(`DROP INDEX CONCURRENTLY name`) and upgrade again.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0010'
down_revision: Union[str, None] = '0009'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

FAILED = "status = 'failed'"

INDEXES = [  # (name, table, columns, options)
    ('ix_jobs_failed_finished_at_id', 'jobs', ['finished_at', 'id'],
     dict(postgresql_where=sa.text(FAILED), sqlite_where=sa.text(FAILED))),
    ('ix_batches_created_at_id', 'batches', ['created_at', 'id'], {}),
]


def upgrade() -> None:
    op.add_column('jobs', sa.Column('attempt_budget', sa.Integer(), nullable=True))
    op.add_column('jobs', sa.Column('attempts_at_retry', sa.Integer(), nullable=True))
    with op.get_context().autocommit_block():  # CONCURRENTLY cannot run inside a transaction
        for name, table, columns, options in INDEXES:
            op.create_index(name, table, columns, unique=False, postgresql_concurrently=True, **options)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, _, _ in reversed(INDEXES):
            op.drop_index(name, table_name=table, postgresql_concurrently=True)
    with op.batch_alter_table('jobs') as batch:  # (SQLite: a table copy)
        batch.drop_column('attempts_at_retry')
        batch.drop_column('attempt_budget')
