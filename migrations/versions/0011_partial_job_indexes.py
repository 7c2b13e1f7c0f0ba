"""jobs: the indexes over some rows only cover those rows (fewer index entries per job)

Every job writes three row versions (the submit's INSERT, the claim, the finish), none of them
HOT (each changes an indexed column), and each version adds an entry to every index whose
predicate it meets. Four full indexes served only some rows:

- ix_jobs_status_model (status, model) → ix_jobs_open_status_model, the same columns over queued
  and running rows: the counts of open jobs (demand, ETA, /metrics, the dashboard) read only
  those; the finished rows are counted by the rollup and ix_jobs_finished_at_id.
- ix_jobs_status_worker_id (status, worker_id) → ix_jobs_running_worker_id (worker_id) over
  running rows: the reconciler's running jobs and a worker's own.
- ix_jobs_batch_id → ix_jobs_of_batch, over rows with a batch.
- ix_jobs_conversation_id_created_at → ix_jobs_of_conversation, over rows with a conversation.

A job of no batch and no conversation (most of them) now adds 5 index entries fewer over its
life, a finished job none to the first two. Queries that need a partial index's predicate to
match write the statuses as SQL literals (manager._status_in), so that every plan, a generic
one too, can use it; `batch_id = ...` and `conversation_id = ...` imply NOT NULL by themselves.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 12:00:00.000000

Built CONCURRENTLY on Postgres, as 0006's: a failed build leaves an INVALID index; drop it
(`DROP INDEX CONCURRENTLY name`) and upgrade again. The old indexes are dropped only after the
new ones exist; each step is IF [NOT] EXISTS, so an upgrade stopped part way runs again as is.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0011'
down_revision: Union[str, None] = '0010'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

OPEN = "status IN ('queued','running')"
RUNNING = "status = 'running'"


def _where(text: str) -> dict:
    return dict(postgresql_where=sa.text(text), sqlite_where=sa.text(text))


INDEXES = [  # (name, table, columns, options): created by the upgrade
    ('ix_jobs_open_status_model', 'jobs', ['status', 'model'], _where(OPEN)),
    ('ix_jobs_running_worker_id', 'jobs', ['worker_id'], _where(RUNNING)),
    ('ix_jobs_of_batch', 'jobs', ['batch_id'], _where("batch_id IS NOT NULL")),
    ('ix_jobs_of_conversation', 'jobs', ['conversation_id', 'created_at'], _where("conversation_id IS NOT NULL")),
]

REPLACED = [  # dropped by the upgrade (after their replacements exist), made again by the downgrade
    ('ix_jobs_status_model', 'jobs', ['status', 'model'], {}),
    ('ix_jobs_status_worker_id', 'jobs', ['status', 'worker_id'], {}),
    ('ix_jobs_batch_id', 'jobs', ['batch_id'], {}),
    ('ix_jobs_conversation_id_created_at', 'jobs', ['conversation_id', 'created_at'], {}),
]


def upgrade() -> None:
    with op.get_context().autocommit_block():  # CONCURRENTLY cannot run inside a transaction
        for name, table, columns, options in INDEXES:
            op.create_index(name, table, columns, unique=False, postgresql_concurrently=True, if_not_exists=True,
                            **options)
        for name, table, _, _ in REPLACED:
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, columns, options in REPLACED:
            op.create_index(name, table, columns, unique=False, postgresql_concurrently=True, if_not_exists=True,
                            **options)
        for name, table, _, _ in reversed(INDEXES):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
