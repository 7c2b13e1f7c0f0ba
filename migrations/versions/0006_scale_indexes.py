"""scale indexes: the reconciler's queued rows, retention's oldest finished rows, recent workers,
a tenant's jobs of one status newest first

ix_jobs_created_at goes: no query needs it, and it led the planner astray on a tenant's first
page (a backward scan of every tenant's newest jobs, filtered). ix_jobs_tenant_status becomes
(tenant, status, created_at, id): the same prefix for the API's queued-jobs count, and a page of
one status costs what any page costs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 12:00:00.000000

On Postgres the indexes are built CONCURRENTLY (outside the migration's transaction), so a task
table of millions of rows keeps taking submits and claims while they build. If a build fails
part way, Postgres leaves an INVALID index behind: drop it (`DROP INDEX CONCURRENTLY name`) and
run the upgrade again.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0006'
down_revision: Union[str, None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

QUEUED = "status = 'queued'"
OPEN_BATCH = "batch_id IS NOT NULL AND status IN ('queued','running')"
FINISHED = "finished_at IS NOT NULL"


def _where(text: str) -> dict:
    return dict(postgresql_where=sa.text(text), sqlite_where=sa.text(text))


INDEXES = [  # (name, table, columns, options): created by the upgrade
    ('ix_jobs_tenant_status_created_at_id', 'jobs', ['tenant', 'status', 'created_at', 'id'], {}),
    ('ix_jobs_finished_at_id', 'jobs', ['finished_at', 'id'], _where(FINISHED)),
    ('ix_jobs_open_batches', 'jobs', ['tenant', 'batch_id'], _where(OPEN_BATCH)),
    ('ix_jobs_queued_deadline', 'jobs', ['deadline'], _where(f"{QUEUED} AND deadline IS NOT NULL")),
    ('ix_jobs_queued_order', 'jobs', ['model', sa.literal_column('priority DESC'), 'queued_at'], _where(QUEUED)),
    ('ix_jobs_queued_run_after', 'jobs', ['run_after'], _where(f"{QUEUED} AND run_after IS NOT NULL")),
    ('ix_workers_last_heartbeat', 'workers', ['last_heartbeat'], {}),
]


REPLACED = [  # dropped by the upgrade (after their replacements exist), made again by the downgrade
    ('ix_jobs_tenant_status', 'jobs', ['tenant', 'status'], {}),
    ('ix_jobs_created_at', 'jobs', ['created_at'], {}),
]


def upgrade() -> None:
    with op.get_context().autocommit_block():  # CONCURRENTLY cannot run inside a transaction
        for name, table, columns, options in INDEXES:
            op.create_index(name, table, columns, unique=False, postgresql_concurrently=True, **options)
        for name, table, _, _ in REPLACED:
            op.drop_index(name, table_name=table, postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, columns, options in REPLACED:
            op.create_index(name, table, columns, unique=False, postgresql_concurrently=True, **options)
        for name, table, _, _ in reversed(INDEXES):
            op.drop_index(name, table_name=table, postgresql_concurrently=True)
