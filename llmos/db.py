"""The task table's schema (SQLAlchemy Core) and engine setup for SQLite and Postgres.

Every schema change is an Alembic revision under migrations/; `alembic check` stays clean.
Nothing here changes job state: that is `llmos.manager`'s job.
"""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from llmos.constants import DEFAULT_TENANT
from llmos.errors import DatabaseUnavailableError
from llmos.settings import redact


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; they were written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)

metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
})

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.Uuid(as_uuid=False), primary_key=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("task_type", sa.String(32), nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("input", JSONType, nullable=False),
    sa.Column("result", JSONType),
    sa.Column("error", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"),
    sa.Column("tenant", sa.String(128), nullable=False, server_default=DEFAULT_TENANT),
    sa.Column("idempotency_key", sa.String(256)),
    sa.Column("batch_id", sa.String(64)),
    sa.Column("conversation_id", sa.String(64)),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("queued_at", Timestamp),
    sa.Column("started_at", Timestamp),
    sa.Column("finished_at", Timestamp),
    sa.Column("queue_wait_ms", sa.Float),
    sa.Column("compute_ms", sa.Float),
    sa.Column("batch_size", sa.Integer),
    sa.Column("tokens_in", sa.Integer),
    sa.Column("tokens_out", sa.Integer),
    sa.Column("worker_id", sa.String(256)),
    sa.Column("device", sa.String(32)),
    sa.Column("timeout_s", sa.Float),
    sa.Column("deadline", Timestamp),
    sa.Column("run_after", Timestamp),
    sa.Column("dispatched_at", Timestamp),
    sa.Column("finishes", sa.Integer, nullable=False, server_default="0"),
    # llmos/scheduling: the start and finish predicted at submit; the priority steps aging added
    sa.Column("eta_start_at", Timestamp),
    sa.Column("eta_finish_at", Timestamp),
    sa.Column("aged", sa.SmallInteger, nullable=False, server_default="0"),
    # an operator's retry of a failed job (llmos.manager.retry_failed): the submit's max_attempts
    # (each retry gives that many more; null until the first retry), and the attempts at the last
    # retry (the /metrics rollup counts the retries of each finish: attempts - 1 - this)
    sa.Column("attempt_budget", sa.Integer),
    sa.Column("attempts_at_retry", sa.Integer),
    sa.CheckConstraint("priority BETWEEN 0 AND 9", name="priority_range"),
    sa.CheckConstraint(
        "status IN ('queued','running','succeeded','failed','cancelled','expired')",
        name="status_valid"),
    sa.Index(None, "tenant", "created_at", "id"),  # a tenant's jobs newest first (API listing)
    # a tenant's jobs of one status newest first (API listing), its queued jobs (API quota)
    sa.Index(None, "tenant", "status", "created_at", "id"),
    sa.Index(None, "finished_at", "id", postgresql_where=sa.text("finished_at IS NOT NULL"),
             sqlite_where=sa.text("finished_at IS NOT NULL")),  # retention: oldest finished first
    sa.UniqueConstraint("tenant", "idempotency_key"),
)
"""One row per job: the record of its input, state, result and timings."""

# Partial indexes over the few rows that are not final, so that the reconciler's pass, and the
# retention's open-batch check, cost the same with ten million finished jobs as with none.
QUEUED_ROWS = "status = 'queued'"
FAILED_ROWS = "status = 'failed'"
RUNNING_ROWS = "status = 'running'"
OPEN_ROWS = "status IN ('queued','running')"
_partial_jobs_indexes = [  # each attached to `jobs` by its columns
    # the serve order of each model's queued jobs (stale_queued), and which models have any
    sa.Index("ix_jobs_queued_order", jobs.c.model, jobs.c.priority.desc(), jobs.c.queued_at,
             postgresql_where=sa.text(QUEUED_ROWS), sqlite_where=sa.text(QUEUED_ROWS)),
    sa.Index("ix_jobs_queued_deadline", jobs.c.deadline,  # expire_overdue
             postgresql_where=sa.text(f"{QUEUED_ROWS} AND deadline IS NOT NULL"),
             sqlite_where=sa.text(f"{QUEUED_ROWS} AND deadline IS NOT NULL")),
    sa.Index("ix_jobs_queued_run_after", jobs.c.run_after,  # due_retries
             postgresql_where=sa.text(f"{QUEUED_ROWS} AND run_after IS NOT NULL"),
             sqlite_where=sa.text(f"{QUEUED_ROWS} AND run_after IS NOT NULL")),
    sa.Index("ix_jobs_open_batches", jobs.c.tenant, jobs.c.batch_id,  # retention keeps open batches
             postgresql_where=sa.text("batch_id IS NOT NULL AND status IN ('queued','running')"),
             sqlite_where=sa.text("batch_id IS NOT NULL AND status IN ('queued','running')")),
    # migration 0011: indexes that served some rows only now hold only those (fewer entries a job)
    # open jobs counted by status and model (demand, ETA, /metrics, the dashboard)
    sa.Index("ix_jobs_open_status_model", jobs.c.status, jobs.c.model,
             postgresql_where=sa.text(OPEN_ROWS), sqlite_where=sa.text(OPEN_ROWS)),
    # the running jobs of a worker, and all running jobs (the reconciler)
    sa.Index("ix_jobs_running_worker_id", jobs.c.worker_id,
             postgresql_where=sa.text(RUNNING_ROWS), sqlite_where=sa.text(RUNNING_ROWS)),
    sa.Index("ix_jobs_of_batch", jobs.c.batch_id,  # a batch's jobs
             postgresql_where=sa.text("batch_id IS NOT NULL"), sqlite_where=sa.text("batch_id IS NOT NULL")),
    sa.Index("ix_jobs_of_conversation", jobs.c.conversation_id, jobs.c.created_at,  # a dialogue's turns
             postgresql_where=sa.text("conversation_id IS NOT NULL"),
             sqlite_where=sa.text("conversation_id IS NOT NULL")),
    # the dashboard's recent failures, newest first (migration 0010)
    sa.Index("ix_jobs_failed_finished_at_id", jobs.c.finished_at, jobs.c.id,
             postgresql_where=sa.text(FAILED_ROWS), sqlite_where=sa.text(FAILED_ROWS)),
]

workers = sa.Table(
    "workers", metadata,
    sa.Column("id", sa.String(256), primary_key=True),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("device", sa.String(32), nullable=False),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("last_heartbeat", Timestamp, nullable=False),
    sa.Column("stopped_at", Timestamp),
    sa.Column("ready_at", Timestamp),  # its model loaded (cold start = ready_at - started_at)
    sa.Index(None, "model"),
    sa.Index(None, "last_heartbeat"),  # the reconciler's recent workers; retention
)
"""One row per worker process; the heartbeat tells the scheduler and reconciler it lives."""

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.Uuid(as_uuid=False), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("name", sa.String(128)),
    sa.Column("prefix", sa.String(16), nullable=False, unique=True),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("revoked_at", Timestamp),
    sa.Column("last_used_at", Timestamp),
    sa.Index(None, "tenant"),
)
"""One row per API key: its tenant and the sha256 of its secret (the key itself is never stored)."""

MAX_WEBHOOK_URL_CHARS = 2048
"""Longest webhook URL (the `webhook_deliveries.url` column)."""

webhook_deliveries = sa.Table(
    "webhook_deliveries", metadata,
    sa.Column("id", sa.Uuid(as_uuid=False), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),  # 'job' (job_id set) or 'batch' (batch_id set)
    sa.Column("job_id", sa.Uuid(as_uuid=False)),
    sa.Column("batch_id", sa.String(64)),
    sa.Column("url", sa.String(MAX_WEBHOOK_URL_CHARS), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("next_attempt_at", Timestamp, nullable=False),  # also the lease of a claimed delivery
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_attempt_at", Timestamp),
    sa.Column("last_attempt_at", Timestamp),
    sa.Column("last_status", sa.Integer),  # the receiver's HTTP status; null when none answered
    sa.Column("last_error", sa.Text),
    sa.Column("delivered_at", Timestamp),
    sa.Column("given_up_at", Timestamp),
    sa.CheckConstraint("(kind = 'job' AND job_id IS NOT NULL AND batch_id IS NULL) OR "
                       "(kind = 'batch' AND batch_id IS NOT NULL AND job_id IS NULL)", name="target"),
    # the deliverer's poll: undelivered deliveries by due time (delivered ones leave the index)
    sa.Index(None, "next_attempt_at", postgresql_where=sa.text("delivered_at IS NULL AND given_up_at IS NULL"),
             sqlite_where=sa.text("delivered_at IS NULL AND given_up_at IS NULL")),
    sa.Index(None, "tenant", "created_at"),  # a tenant's deliveries newest first (API listing)
    sa.Index(None, "job_id"),
)
"""One row per webhook to deliver: a final job or batch to POST to `url`, its attempts and outcome.

Written in the submit's transaction, so an accepted job's webhook survives any crash.
"""

for _ended in ("delivered_at", "given_up_at"):  # the /metrics rollup folds ended deliveries by time
    sa.Index(f"ix_webhook_deliveries_{_ended}", webhook_deliveries.c[_ended],
             postgresql_where=sa.text(f"{_ended} IS NOT NULL"), sqlite_where=sa.text(f"{_ended} IS NOT NULL"))

webhook_secrets = sa.Table(
    "webhook_secrets", metadata,
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("secret", sa.String(128), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
)
"""One row per tenant: the secret its webhooks are signed with (made on first need, rotatable)."""

MAX_FILE_ID_CHARS = 64
"""Longest file or batch id ("file-<hex>", "batch_<hex>")."""

files = sa.Table(
    "files", metadata,
    sa.Column("id", sa.String(MAX_FILE_ID_CHARS), primary_key=True),  # "file-<32 hex>"
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),  # batch (uploaded), batch_output (written)
    sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lines", sa.Integer, nullable=False, server_default="0"),  # non-blank lines
    sa.Column("sha256", sa.String(64)),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # uploading, processed
    sa.Index(None, "tenant", "created_at", "id"),  # a tenant's files newest first (API listing)
    # uploads (and output files) not finished yet: delete_stale_uploads finds the old ones
    sa.Index("ix_files_uploading", "created_at", postgresql_where=sa.text("status = 'uploading'"),
             sqlite_where=sa.text("status = 'uploading'")),
)
"""One row per stored file (batch input, output, error files); its body is in `file_parts`."""

file_parts = sa.Table(
    "file_parts", metadata,
    sa.Column("file_id", sa.String(MAX_FILE_ID_CHARS), primary_key=True),
    sa.Column("part", sa.Integer, primary_key=True),  # 0, 1, ...: the body in order
    sa.Column("data", sa.LargeBinary, nullable=False),  # about 1 MiB each (the last one less)
)
"""A file's body in chunks of about 1 MiB, so it streams in and out in flat memory."""

BATCH_STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired",
                  "cancelling", "cancelled")
"""OpenAI's batch states, exactly."""

batches = sa.Table(
    "batches", metadata,
    sa.Column("id", sa.String(MAX_FILE_ID_CHARS), primary_key=True),  # "batch_<32 hex>"
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("name", sa.String(256)),  # unique per tenant: the CLI finds a batch again by it
    sa.Column("endpoint", sa.String(64), nullable=False),  # an OpenAI endpoint, or /v1/jobs (plain lines)
    sa.Column("input_file_id", sa.String(MAX_FILE_ID_CHARS), nullable=False),
    sa.Column("input_sha256", sa.String(64)),  # the input's, kept: a resume compares it, even once the file is gone
    sa.Column("completion_window", sa.String(8), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False),
    sa.Column("task_type", sa.String(32)),  # plain lines: the task, model and task options of every line
    sa.Column("model", sa.String(128)),
    sa.Column("options", JSONType),
    sa.Column("batch_metadata", JSONType),  # OpenAI's `metadata`
    sa.Column("errors", JSONType),  # OpenAI's `errors` (a file without one good line)
    sa.Column("output_file_id", sa.String(MAX_FILE_ID_CHARS)),
    sa.Column("error_file_id", sa.String(MAX_FILE_ID_CHARS)),
    sa.Column("total", sa.Integer, nullable=False, server_default="0"),  # lines recorded in batch_lines
    sa.Column("bad", sa.Integer, nullable=False, server_default="0"),  # of them, lines refused
    sa.Column("superseded", sa.Integer, nullable=False, server_default="0"),  # jobs replaced by a retry
    sa.Column("completed_count", sa.Integer, nullable=False, server_default="0"),  # request_counts once final
    sa.Column("failed_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_until", Timestamp),  # a process submitting lines or writing the files holds it
    sa.Column("lease_owner", sa.String(32)),  # which process holds it (a token of its take)
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("in_progress_at", Timestamp),
    sa.Column("expires_at", Timestamp, nullable=False),
    sa.Column("finalizing_at", Timestamp),
    sa.Column("completed_at", Timestamp),
    sa.Column("failed_at", Timestamp),
    sa.Column("expired_at", Timestamp),
    sa.Column("cancelling_at", Timestamp),
    sa.Column("cancelled_at", Timestamp),
    sa.CheckConstraint("status IN (" + ",".join(f"'{s}'" for s in BATCH_STATUSES) + ")", name="status_valid"),
    sa.UniqueConstraint("tenant", "name"),
    sa.Index(None, "tenant", "created_at", "id"),  # a tenant's batches newest first (API listing)
    sa.Index(None, "created_at", "id"),  # every tenant's batches newest first (the dashboard; 0010)
    # the batches someone must advance: the few that are not final
    sa.Index("ix_batches_open", "status", postgresql_where=sa.text(
        "status IN ('validating','in_progress','finalizing','cancelling')"),
        sqlite_where=sa.text("status IN ('validating','in_progress','finalizing','cancelling')")),
)
"""One row per batch: OpenAI's Batch object, plus its tenant, name, priority and counters."""

batch_lines = sa.Table(
    "batch_lines", metadata,
    sa.Column("batch_id", sa.String(MAX_FILE_ID_CHARS), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True),  # 1-based line number in the input file
    sa.Column("custom_id", sa.String(512)),
    sa.Column("job_id", sa.Uuid(as_uuid=False)),  # the line's job (its latest attempt's)
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),  # retries of the line
    sa.Column("error", JSONType),  # a refused line: {"code", "message"}
)
"""One row per non-blank input line of a batch: its job, or why it was refused (output in input order)."""


# The rollup of finished jobs (llmos/rollup.py): what /metrics reports for jobs that
# finished before the watermark, so a scrape never reads the task table's finished rows.
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                      120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds (seconds, `le`) of the queue wait, compute and end-to-end latency histograms.
Changing them needs a migration (one column each) and a re-fold of the rollup."""
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Upper bounds (`le`) of the batch size histogram (at most 256 ids a message)."""
ROLLUP_HISTOGRAMS = {"queue_wait": DURATION_BUCKETS_S, "compute": DURATION_BUCKETS_S,
                     "latency": DURATION_BUCKETS_S, "batch_size": BATCH_SIZE_BUCKETS}
"""Each histogram of the rollup and its bucket bounds: columns `<name>_n` (observations),
`<name>_sum` and `<name>_le_<i>` (cumulative: observations <= the i-th bound)."""


def rollup_bucket_column(name: str, i: int) -> str:
    return f"{name}_le_{i:02d}"


job_rollups = sa.Table(
    "job_rollups", metadata,
    sa.Column("day", sa.Date, primary_key=True),  # UTC day of finished_at
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("task_type", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), primary_key=True),  # a final status
    sa.Column("jobs", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("retries", sa.BigInteger, nullable=False, server_default="0"),  # sum of attempts - 1
    sa.Column("tokens_in", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("tokens_out", sa.BigInteger, nullable=False, server_default="0"),
    *[col for name, bounds in ROLLUP_HISTOGRAMS.items() for col in (
        sa.Column(f"{name}_n", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column(f"{name}_sum", sa.Float, nullable=False, server_default="0"),
        *[sa.Column(rollup_bucket_column(name, i), sa.BigInteger, nullable=False, server_default="0")
          for i in range(len(bounds))])],
)
"""Finished jobs folded per (UTC day of finished_at, model, task, tenant, status): counts, sums
and cumulative histogram buckets. Written only by `llmos.rollup` (`refresh`, `keep_counted`)."""

WEBHOOK_OUTCOMES = ("delivered", "given_up")
"""The ends of a webhook delivery (`delivered_at` or `given_up_at` set)."""

webhook_rollups = sa.Table(
    "webhook_rollups", metadata,
    sa.Column("day", sa.Date, primary_key=True),  # UTC day of delivered_at / given_up_at
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("outcome", sa.String(16), primary_key=True),  # WEBHOOK_OUTCOMES
    sa.Column("deliveries", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("attempts", sa.BigInteger, nullable=False, server_default="0"),
)
"""Ended webhook deliveries folded per (UTC day of their end, tenant, outcome), behind the same
watermark as `job_rollups`. Written only by `llmos.rollup` (`refresh`, `keep_counted`)."""

job_rollup_watermark = sa.Table(
    "job_rollup_watermark", metadata,
    sa.Column("id", sa.SmallInteger, primary_key=True),  # always 1: one row
    # jobs with finished_at < this are in job_rollups, deliveries ended before it in webhook_rollups
    sa.Column("folded_to", Timestamp),  # null: nothing folded yet
    sa.Column("refreshed_at", Timestamp),
    sa.CheckConstraint("id = 1", name="one_row"),
)
"""One row: how far the rollups have folded finished jobs and ended webhook deliveries."""


UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""Characters Postgres cannot store in text or JSONB (NUL, lone UTF-16 surrogates)."""


def storable(text: str) -> str:
    """`text` with each NUL and lone surrogate replaced by U+FFFD, so any database stores it."""
    return UNSTORABLE.sub("\ufffd", text)


def _storable_value(value: Any) -> Any:
    """A JSON-ready value with every string (keys too) made `storable`."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {_storable_value(k): _storable_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable_value(v) for v in value]
    return value


def dump_json(value: Any) -> str:
    """The engine's JSON serializer: NUL and lone surrogates become U+FFFD (a model's output may hold them).

    Fast path: non-ASCII is written as is (ensure_ascii=False), so the dumped text holds a NUL only
    as the escape "\\u0000" and a lone surrogate only as a raw surrogate character; one search finds
    either (an escaped backslash before "u0000" only sends a clean value down the slow path).
    """
    text = json.dumps(value, ensure_ascii=False)
    if "\\u0000" in text or (not text.isascii() and UNSTORABLE.search(text)):
        text = json.dumps(_storable_value(value), ensure_ascii=False)
    return text


_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()


def get_engine(url: str) -> sa.Engine:
    """One engine per URL per process (engines hold the connection pool)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create_engine(url)
        return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def _create_engine(url: str) -> sa.Engine:
    kwargs: dict[str, Any] = {"json_serializer": dump_json}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20,
                      connect_args={"connect_timeout": 5})
    engine = sa.create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (SDK polling) run beside the worker's writes; busy_timeout waits for locks.
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin_immediate)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    # A deferred BEGIN: readers run beside the writer (WAL). Every write transaction of
    # llmos.manager starts with its write statement, so it takes the write lock first thing
    # (waiting busy_timeout) and never has to upgrade a read snapshot. A transaction that must
    # read before it writes asks for the lock at BEGIN (`begin_write`).
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_IMMEDIATE) else "BEGIN")


_IMMEDIATE = "llmos_begin_immediate"


def begin_write(engine: sa.Engine):
    """`engine.begin()` for a transaction that reads, then writes. On SQLite it takes the write
    lock at BEGIN (BEGIN IMMEDIATE, waiting busy_timeout for it): a deferred transaction that
    has read cannot upgrade to a write once another connection has committed since, and SQLite
    then answers "database is locked" at once, without waiting. Postgres: the same as begin()."""
    if engine.dialect.name != "sqlite":
        return engine.begin()
    return engine.execution_options(**{_IMMEDIATE: True}).begin()


def check_database(url: str) -> None:
    """Raise DatabaseUnavailableError (saying where) unless the database answers and has tables."""
    engine = get_engine(url)
    try:
        with engine.connect() as conn:
            has_jobs = sa.inspect(conn).has_table("jobs")
    except sa.exc.OperationalError as exc:
        raise DatabaseUnavailableError(
            f"cannot reach the database at {redact(url)}: {first_line(exc.orig or exc)}. "
            "Is it running? Set LLMOS_DATABASE_URL to the right server, or unset it to use "
            "the embedded SQLite file."
        ) from None
    if not has_jobs:
        raise DatabaseUnavailableError(
            f"the database at {redact(url)} has no LLMOS tables: run `llmos db upgrade` first"
        )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
