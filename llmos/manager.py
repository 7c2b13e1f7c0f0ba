"""The one module that changes job state: create, claim, finish, fail, cancel, prune, and worker rows.

Workers, the SDK, the CLI and (later) the API and reconciler call these functions; nobody else
writes the `status` column. Every transition is a conditional UPDATE on the current state, so a
duplicate message, a late worker or a racing cancel is a no-op, never a second result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, NamedTuple, Sequence

import sqlalchemy as sa

from llmos import rollup
from llmos.constants import DEFAULT_TENANT, MAX_TENANT_CHARS
from llmos.db import (UNSTORABLE, api_keys, as_utc, begin_write, dump_json, jobs, storable, webhook_deliveries,
                      webhook_secrets, workers)
from llmos.errors import IdempotencyConflictError, ValidationError
from llmos.jobs import FINAL_STATUSES, Job, JobStatus, new_ids


def utcnow() -> datetime:
    """This process's clock; only for local use (anything compared across processes uses `db_now`)."""
    return datetime.now(timezone.utc)


def db_now(bind: sa.Engine | sa.Connection) -> datetime:
    """The database's clock (aware, UTC): every timestamp written and compared across processes.

    Postgres answers `now()` (the transaction's start when called inside one). SQLite is a local file
    that only processes of one machine share, so the local clock is the database's clock there.
    """
    if bind.dialect.name == "sqlite":
        return utcnow()
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return db_now(conn)
    return bind.execute(sa.select(sa.func.now())).scalar_one().astimezone(timezone.utc)


def sql_now(conn: sa.Connection) -> Any:
    """The database's clock as a statement uses it: Postgres's `now()` in the SQL itself (no round
    trip to read it first), else `db_now`'s value."""
    return sa.func.now() if conn.dialect.name == "postgresql" else db_now(conn)


class _AnyTenant:
    """The tenant argument of system callers (workers, the reconciler) that act for every tenant."""

    def __repr__(self) -> str:
        return "ANY_TENANT"


ANY_TENANT = _AnyTenant()
"""Pass as `tenant=` to act for every tenant; user-facing callers pass the caller's tenant."""

Tenant = str | _AnyTenant


def _scoped(conditions: list[Any], tenant: Tenant) -> list[Any]:
    """`conditions` limited to one tenant's rows (another tenant's id then reads as not found)."""
    if tenant is ANY_TENANT:
        return conditions
    if not isinstance(tenant, str):
        raise TypeError(f"tenant must be a tenant name or ANY_TENANT, got {tenant!r}")
    return [*conditions, jobs.c.tenant == tenant]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NewJob:
    """What a producer knows about a job before it exists."""

    model: str
    task_type: str
    input: dict[str, Any]
    priority: int
    tenant: str = DEFAULT_TENANT
    idempotency_key: str | None = None
    batch_id: str | None = None
    conversation_id: str | None = None
    max_attempts: int = 3
    timeout_s: float | None = None
    deadline: datetime | None = None
    deadline_in_s: float | None = None  # a deadline relative to the database's clock at insert
    eta_start_in_s: float | None = None  # predicted start and finish, seconds after insert (llmos.scheduling.eta)
    eta_finish_in_s: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
    """What a worker learned running one claimed job (a result or an error)."""

    job_id: str
    worker_id: str
    attempt: int
    result: dict[str, Any] | None = None
    error: str | None = None
    compute_ms: float | None = None
    batch_size: int | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    queue_wait_ms: float | None = None

    @property
    def status(self) -> JobStatus:
        return JobStatus.FAILED if self.error is not None else JobStatus.SUCCEEDED


def _jobs_from(rows: Iterable[Any]) -> list[Job]:
    return [Job.from_row(r._mapping) for r in rows]


def _typed_row(columns: Sequence[Any], values: Sequence[Any]) -> Any:
    """`values` as a row of parameters typed like `columns`: the right side of `(a, b) < (x, y)`."""
    return sa.tuple_(*(sa.literal(v, c.type) for c, v in zip(columns, values)))


def _status_in(column: Any, *statuses: JobStatus) -> Any:
    """`column` (a status) among `statuses`, written as SQL literals, not parameters: a partial
    index's predicate (`status = 'queued'`) then matches in every plan, a generic one or SQLite's."""
    values = [sa.literal_column(f"'{JobStatus(s).value}'") for s in statuses]
    return column == values[0] if len(values) == 1 else column.in_(values)


FORGET_WORKER_AFTER_S = 86_400.0
"""A worker row silent this long is of a process long gone: the reconciler no longer reads it,
and retention may delete it even if the worker never recorded its stop (it crashed)."""

MAX_AGE_S = 1e9
"""Ages at or above this (~31 years; `math.inf` too) mean "any age" (no timestamp that old)."""


def create_jobs(engine: sa.Engine, new: Sequence[NewJob], _retry: bool = True, *,
                webhook_url: str | None = None) -> list[tuple[Job, bool]]:
    """Write jobs as `queued`; returns (job, created) in input order.

    A job whose (tenant, idempotency_key) already exists is not created again: the existing job
    comes back with created=False, so the caller does not send it twice. If that job's model, task
    or input differ, IdempotencyConflictError is raised and nothing is written.

    `webhook_url` (checked by the caller): deliveries written in the same transaction as the jobs,
    one per batch id among the created jobs, one per created job without a batch id.

    On Postgres one transaction reads the clock and the keys, then writes the rows with one binary
    COPY (~3x faster than executemany for 10,000 rows: what is left is mostly the server's index
    entries); elsewhere (SQLite) the rows go in with one executemany.
    """
    keyed = [(n.tenant, n.idempotency_key) for n in new if n.idempotency_key is not None]
    try:
        if engine.dialect.driver == "psycopg":  # Postgres through psycopg 3 (the URLs llmos.settings makes)
            with engine.begin() as conn:  # one connection: the clock, the keys, the rows, the webhooks
                now = db_now(conn)
                out, created = _new_jobs(new, _find_by_keys(conn, keyed) if keyed else {}, now)
                if created:
                    _copy_jobs(conn, created)
                    _write_deliveries(conn, created, webhook_url, now)
        else:
            now = db_now(engine)
            out, created = _new_jobs(new, _find_by_keys(engine, keyed) if keyed else {}, now)
            if created:
                with engine.begin() as conn:  # SQLite: the write transaction starts with its write
                    conn.execute(jobs.insert(), [_job_row(job) for job in created])
                    _write_deliveries(conn, created, webhook_url, now)
    except sa.exc.IntegrityError:
        if not keyed or not _retry:
            raise
        # A concurrent submit with the same key won the race: retry once, it is now "existing".
        return create_jobs(engine, new, _retry=False, webhook_url=webhook_url)
    return out


_NEW_JOB_COLUMNS = ("id", "model", "task_type", "priority", "status", "input", "attempts", "max_attempts",
                    "tenant", "idempotency_key", "batch_id", "conversation_id", "created_at", "queued_at",
                    "timeout_s", "dispatched_at", "finishes", "deadline", "eta_start_at", "eta_finish_at")
"""The columns a new job's row sets (the others are null)."""

_COPY_JOBS = f"COPY jobs ({', '.join(_NEW_JOB_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
# Binary COPY sends each field as the column type's binary form: a uuid's is its 16 bytes, so the
# id goes as bytea (bytes.fromhex, 7x cheaper than a uuid.UUID); the jsonb is dumped by dump_json,
# the engine's serializer, as SQLAlchemy's executemany dumps it.
_COPY_TYPES = ("bytea", "text", "text", "int2", "text", "jsonb", "int4", "int4", "text", "text", "text",
               "text", "timestamptz", "timestamptz", "float8", "timestamptz", "int4", "timestamptz",
               "timestamptz", "timestamptz")


def _new_jobs(new: Sequence[NewJob], existing: dict[tuple[str, str], Job],
              now: datetime) -> tuple[list[tuple[Job, bool]], list[Job]]:
    """((job, created) per `new` in order, the jobs to write): `existing` by (tenant, key) reused."""
    out: list[tuple[Job, bool]] = []
    created: list[Job] = []
    queued = dict(status=JobStatus.QUEUED, attempts=0, finishes=0, created_at=now, queued_at=now,
                  dispatched_at=now)
    for n, job_id in zip(new, new_ids(len(new))):
        key = (n.tenant, n.idempotency_key) if n.idempotency_key is not None else None
        if key is not None and key in existing:
            out.append((_same_job(existing[key], n), False))
            continue
        job = Job.from_fields({
            **queued, "id": job_id, "model": n.model, "task_type": n.task_type, "priority": n.priority,
            "input": n.input, "max_attempts": n.max_attempts, "tenant": n.tenant,
            "idempotency_key": n.idempotency_key, "batch_id": n.batch_id,
            "conversation_id": n.conversation_id, "timeout_s": n.timeout_s,
            "deadline": (now + timedelta(seconds=n.deadline_in_s)) if n.deadline_in_s is not None
            else n.deadline,
            "eta_start_at": None if n.eta_start_in_s is None else now + timedelta(seconds=n.eta_start_in_s),
            "eta_finish_at": None if n.eta_finish_in_s is None else now + timedelta(seconds=n.eta_finish_in_s)})
        created.append(job)
        out.append((job, True))
        if key is not None:
            existing[key] = job  # a repeated key inside one call yields one job
    return out, created


def _job_row(job: Job) -> dict[str, Any]:
    """A new job's row for an INSERT (executemany)."""
    row = {c: getattr(job, c) for c in _NEW_JOB_COLUMNS}
    row["status"] = job.status.value
    return row


def _copy_jobs(conn: sa.Connection, created: list[Job]) -> None:
    """Write new jobs' rows with one binary COPY on `conn` (Postgres, psycopg 3), in its transaction.

    A refusal raises as SQLAlchemy's executemany would (IntegrityError for a taken key, DataError...).
    """
    from psycopg.types.json import Jsonb  # (psycopg is loaded only where Postgres is used)

    dbapi = conn.dialect.loaded_dbapi
    fromhex = bytes.fromhex
    try:
        with conn.connection.driver_connection.cursor() as cur, cur.copy(_COPY_JOBS) as copy:
            copy.set_types(_COPY_TYPES)
            write = copy.write_row
            for j in created:
                write((fromhex(j.id.replace("-", "")), j.model, j.task_type, j.priority, j.status.value,
                       Jsonb(j.input, dump_json), 0, j.max_attempts, j.tenant, j.idempotency_key,
                       j.batch_id, j.conversation_id, j.created_at, j.queued_at,
                       None if j.timeout_s is None else float(j.timeout_s), j.dispatched_at, 0,
                       as_utc(j.deadline), j.eta_start_at, j.eta_finish_at))
    except dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(_COPY_JOBS, None, exc, dbapi.Error) from exc


def _write_deliveries(conn: sa.Connection, created: list[Job], url: str | None, now: datetime) -> None:
    """The webhook deliveries of newly written jobs, in their transaction: no accepted job without its webhook."""
    deliveries = _without_pending_batches(conn, _deliveries_for(created, url, now))
    if deliveries:
        conn.execute(webhook_deliveries.insert(), deliveries)


def _deliveries_for(created: list[Job], url: str | None, now: datetime) -> list[dict[str, Any]]:
    """Delivery rows for newly written jobs: one per (tenant, batch id), one per unbatched job."""
    if url is None:
        return []
    targets, batches = [], set()
    for job in created:
        if job.batch_id is None:
            targets.append((job.tenant, dict(kind=WEBHOOK_JOB, job_id=job.id, batch_id=None)))
        elif (job.tenant, job.batch_id) not in batches:
            batches.add((job.tenant, job.batch_id))
            targets.append((job.tenant, dict(kind=WEBHOOK_BATCH, job_id=None, batch_id=job.batch_id)))
    return [dict(id=delivery_id, tenant=tenant, url=url, created_at=now, next_attempt_at=now, attempts=0, **target)
            for delivery_id, (tenant, target) in zip(new_ids(len(targets)), targets)]


def _without_pending_batches(conn: sa.Connection, deliveries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`deliveries` less the batch ones whose batch already waits for a webhook to the same URL.

    A batch submitted in several parts gets one webhook (the summary once all of it is final),
    not one per part; a part submitted after its batch's webhook went out gets a new one.
    """
    batch = [d for d in deliveries if d["kind"] == WEBHOOK_BATCH]
    if not batch:
        return deliveries
    t = webhook_deliveries.c
    pending = {(r.tenant, r.batch_id, r.url) for r in conn.execute(
        sa.select(t.tenant, t.batch_id, t.url).where(
            t.kind == WEBHOOK_BATCH, t.tenant.in_({d["tenant"] for d in batch}),
            t.batch_id.in_({d["batch_id"] for d in batch}),
            t.delivered_at.is_(None), t.given_up_at.is_(None)))}
    return [d for d in deliveries
            if d["kind"] != WEBHOOK_BATCH or (d["tenant"], d["batch_id"], d["url"]) not in pending]


def _same_job(job: Job, new: NewJob) -> Job:
    """`job` (found by `new`'s idempotency key) if it is the job `new` asks for, else a refusal."""
    differ = [name for name, a, b in (("model", job.model, new.model), ("task", job.task_type, new.task_type),
                                      ("input", job.input, new.input)) if a != b]
    if differ:
        raise IdempotencyConflictError(
            f"idempotency key {new.idempotency_key!r} already names job {job.id} with another "
            f"{' and '.join(differ)} ({job.task_type} on {job.model!r}); use a new key for a new job")
    return job


def _find_by_keys(bind: sa.Engine | sa.Connection, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Job]:
    """Existing jobs by (tenant, idempotency key): filtered on both, so the unique index serves it."""
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return _find_by_keys(conn, keys)
    found: dict[tuple[str, str], Job] = {}
    by_tenant: dict[str, set[str]] = {}
    for tenant, key in keys:
        by_tenant.setdefault(tenant, set()).add(key)
    for tenant, names in by_tenant.items():
        for chunk in _chunks(sorted(names), 500):
            q = sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key.in_(chunk))
            for job in _jobs_from(bind.execute(q)):
                found[(job.tenant, job.idempotency_key)] = job
    return found


def get_job(engine: sa.Engine, job_id: str, *, tenant: Tenant) -> Job | None:
    """One job of `tenant` (None if there is none, or it is another tenant's)."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(jobs).where(*_scoped([jobs.c.id == str(job_id)], tenant))).first()
    return Job.from_row(row._mapping) if row else None


def get_jobs(engine: sa.Engine, job_ids: Sequence[str], *, tenant: Tenant) -> dict[str, Job]:
    """Jobs of `tenant` by id (ids that name none of its jobs are absent)."""
    out: dict[str, Job] = {}
    with engine.connect() as conn:
        for chunk in _chunks([str(i) for i in job_ids], 500):
            q = sa.select(jobs).where(*_scoped([jobs.c.id.in_(chunk)], tenant))
            for job in _jobs_from(conn.execute(q)):
                out[job.id] = job
    return out


class JobOutcome(NamedTuple):
    """The columns of a job's row that its result needs (`JobHandle.result`, `Model.results`)."""

    id: str
    status: JobStatus
    result: dict[str, Any] | None
    error: str | None


_OUTCOMES = sa.select(jobs.c.id, jobs.c.status, jobs.c.result, jobs.c.error).where(
    jobs.c.id.in_(sa.bindparam("ids", expanding=True)), jobs.c.tenant == sa.bindparam("tenant"))


def job_outcomes(engine: sa.Engine, job_ids: Sequence[str], *, tenant: str) -> dict[str, JobOutcome]:
    """Status, result and error of `tenant`'s jobs by id: one transaction, four columns a row
    (what a result needs, at about a third of the full row's cost: no input, no timestamps)."""
    ids = [str(i) for i in job_ids]
    out: dict[str, JobOutcome] = {}
    with engine.connect() as conn:
        for i in range(0, len(ids), 500):
            for job_id, status, result, error in conn.execute(
                    _OUTCOMES, {"ids": ids[i:i + 500], "tenant": tenant}):
                job_id = str(job_id)
                out[job_id] = JobOutcome(job_id, JobStatus(status), result, error)
    return out


def job_statuses(engine: sa.Engine, job_ids: Sequence[str], *, tenant: Tenant) -> dict[str, JobStatus]:
    """Status of each of `tenant`'s jobs by id (two columns read, not the whole row)."""
    out: dict[str, JobStatus] = {}
    with engine.connect() as conn:
        for chunk in _chunks([str(i) for i in job_ids], 500):
            q = sa.select(jobs.c.id, jobs.c.status).where(*_scoped([jobs.c.id.in_(chunk)], tenant))
            for job_id, status in conn.execute(q):
                out[str(job_id)] = JobStatus(status)
    return out


def status_counts(engine: sa.Engine, job_ids: Sequence[str], *, tenant: Tenant) -> dict[JobStatus, int]:
    counts: dict[JobStatus, int] = {}
    with engine.connect() as conn:
        for chunk in _chunks([str(i) for i in job_ids], 500):
            q = (sa.select(jobs.c.status, sa.func.count())
                 .where(*_scoped([jobs.c.id.in_(chunk)], tenant)).group_by(jobs.c.status))
            for status, n in conn.execute(q):
                counts[JobStatus(status)] = counts.get(JobStatus(status), 0) + n
    return counts


def batch_status_counts(engine: sa.Engine, batch_id: str, *, tenant: Tenant) -> dict[JobStatus, int]:
    """Jobs of one of `tenant`'s submitted batches per status (one indexed query)."""
    q = (sa.select(jobs.c.status, sa.func.count())
         .where(*_scoped([jobs.c.batch_id == batch_id], tenant)).group_by(jobs.c.status))
    with engine.connect() as conn:
        return {JobStatus(s): n for s, n in conn.execute(q)}


def batch_open_jobs(engine: sa.Engine, batch_id: str, *, tenant: Tenant) -> int:
    """How many jobs of one of `tenant`'s batches are queued or running: a count over the partial
    index ix_jobs_open_batches (its statuses literals), so it costs the same for a batch of a
    million finished jobs as for one of ten."""
    q = (sa.select(sa.func.count()).select_from(jobs)
         .where(*_scoped([jobs.c.batch_id == batch_id, jobs.c.batch_id.is_not(None),
                          _status_in(jobs.c.status, JobStatus.QUEUED, JobStatus.RUNNING)], tenant)))
    with engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


def list_jobs(engine: sa.Engine, *, tenant: Tenant, status: JobStatus | None = None,
              model: str | None = None, task_type: str | None = None, batch_id: str | None = None,
              created_since: datetime | None = None, before: tuple[datetime, str] | None = None,
              limit: int = 100) -> list[Job]:
    """`tenant`'s jobs newest first (created_at, then id), after the cursor `before` if given.

    Keyset pagination over the (tenant, created_at, id) index: a page costs the same at any depth.
    """
    cond = _scoped([], tenant)
    for column, value in ((jobs.c.status, status), (jobs.c.model, model),
                          (jobs.c.task_type, task_type), (jobs.c.batch_id, batch_id)):
        if value is not None:
            cond.append(column == str(value))
    if created_since is not None:
        cond.append(jobs.c.created_at >= created_since)
    if before is not None:
        at, job_id = before
        # a row comparison, not `a < x OR (a = x AND b < y)`: it is the index's range condition,
        # so a page deep in ten million rows reads its 100 entries, not every newer one
        key = (jobs.c.created_at, jobs.c.id)
        cond.append(sa.tuple_(*key) < _typed_row(key, (at, str(job_id))))
    q = sa.select(jobs).where(*cond).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        return _jobs_from(conn.execute(q))


def queued_count(engine: sa.Engine, *, tenant: Tenant) -> int:
    """How many of `tenant`'s jobs are queued (the (tenant, status) index answers it)."""
    q = sa.select(sa.func.count()).select_from(jobs).where(
        *_scoped([jobs.c.status == JobStatus.QUEUED.value], tenant))
    with engine.connect() as conn:
        return conn.execute(q).scalar_one()


def claim(engine: sa.Engine, job_ids: Sequence[str], *, worker_id: str, device: str,
          model: str | None = None, fresh_only: bool = False,
          reclaim: bool = False) -> tuple[list[Job], list[str]]:
    """queued → running for those of `job_ids` still queued and due; returns (claimed, expired ids).

    One transaction: jobs whose deadline has passed become `expired`; the rest that are still
    queued (and not waiting out a retry backoff) are claimed by one conditional UPDATE, so a
    duplicate message, a cancelled or a finished job is never run twice at once.
    `reclaim`: this call retries a claim whose reply was lost (the connection dropped after the
    commit): those of `job_ids` already running under `worker_id` come back as claimed too, or
    they would stay `running` under a live worker that never runs them.
    """
    if not job_ids:
        return [], []
    ids = [str(i) for i in job_ids]
    # By primary key only: `status || ''` keeps the planner off the indexes over queued rows
    # (ix_jobs_queued_order, ix_jobs_open_status_model), which it picks when its statistics are
    # stale (a fresh or never-ANALYZEd table) and then walks the whole queue per claim.
    queued = [jobs.c.id.in_(ids), (jobs.c.status + "") == JobStatus.QUEUED.value]
    with engine.begin() as conn:
        now = sql_now(conn)
        cond = [*queued, sa.or_(jobs.c.deadline.is_(None), jobs.c.deadline > now),
                sa.or_(jobs.c.run_after.is_(None), jobs.c.run_after <= now)]
        if model is not None:  # a worker only ever claims its own model's jobs
            cond.append(jobs.c.model == model)
        if fresh_only:  # jobs that never ran; a job that ran before is claimed on its own
            cond.append(jobs.c.attempts == 0)
        stmt = (jobs.update()
                .where(*cond)
                .values(status=JobStatus.RUNNING.value, started_at=now, worker_id=worker_id,
                        device=device, attempts=jobs.c.attempts + 1)
                .returning(*jobs.c))
        mine = []
        if reclaim:
            mine = _jobs_from(conn.execute(sa.select(jobs).where(
                jobs.c.id.in_(ids), jobs.c.status == JobStatus.RUNNING.value, jobs.c.worker_id == worker_id)))
        claimed = _jobs_from(conn.execute(stmt))
        expired: list[str] = []
        rest = set(ids) - {j.id for j in claimed} - {j.id for j in mine}
        if rest:  # only then can one be past its deadline (a claimable job is not): one more statement
            expire = (jobs.update()
                      .where(jobs.c.id.in_(sorted(rest)), (jobs.c.status + "") == JobStatus.QUEUED.value,
                             jobs.c.deadline.is_not(None), jobs.c.deadline <= now)
                      .values(status=JobStatus.EXPIRED.value, finished_at=now,
                              error="expired: its deadline passed before it started")
                      .returning(jobs.c.id))
            expired = [str(r[0]) for r in conn.execute(expire)]
        return mine + claimed, expired


def restart_clock(engine: sa.Engine, job_ids: Sequence[str], *, worker_id: str) -> dict[str, datetime]:
    """`started_at` = now for claimed jobs that waited (a claim made ahead, while the batch before
    computed) before their group starts: a job's timeout, and its queue wait, count from when it
    starts to run. Returns id → the new started_at of the jobs still running under `worker_id`."""
    if not job_ids:
        return {}
    ids = [str(i) for i in job_ids]
    with engine.begin() as conn:
        now = sql_now(conn)
        stmt = (jobs.update()
                .where(jobs.c.id.in_(ids), (jobs.c.status + "") == JobStatus.RUNNING.value,
                       jobs.c.worker_id == worker_id)
                .values(started_at=now).returning(jobs.c.id, jobs.c.started_at))
        return {str(i): at for i, at in conn.execute(stmt)}


def finish(engine: sa.Engine, outcomes: Sequence[Outcome]) -> int:
    """Write results and errors of claimed jobs in one transaction; returns how many applied.

    Text the database cannot store (NUL, lone surrogates: a model's output may hold them) is
    written as U+FFFD, in the error here and in the result by the engine's JSON serializer.

    An outcome applies only while the job is still `running` under the same worker and attempt,
    so a late finish from a worker presumed dead cannot overwrite a newer attempt.
    """
    if not outcomes:
        return 0
    if engine.dialect.name == "postgresql":
        return _finish_pg(engine, outcomes)
    stmt = (
        jobs.update()
        .where(jobs.c.id == sa.bindparam("b_id"), jobs.c.status == JobStatus.RUNNING.value,
               jobs.c.worker_id == sa.bindparam("b_worker"), jobs.c.attempts == sa.bindparam("b_attempt"))
        .values(status=sa.bindparam("b_status"), result=sa.bindparam("b_result", type_=jobs.c.result.type),
                error=sa.bindparam("b_error"), finished_at=sa.bindparam("b_now"),
                compute_ms=sa.bindparam("b_compute"), batch_size=sa.bindparam("b_batch"),
                tokens_in=sa.bindparam("b_tin"), tokens_out=sa.bindparam("b_tout"),
                queue_wait_ms=sa.bindparam("b_wait"), finishes=jobs.c.finishes + 1)
    )
    with engine.begin() as conn:  # one executemany: psycopg 3 pipelines it into one round trip
        now = db_now(conn)
        params = [dict(b_id=o.job_id, b_worker=o.worker_id, b_attempt=o.attempt, b_status=o.status.value,
                       b_result=o.result, b_error=None if o.error is None else storable(o.error),
                       b_compute=o.compute_ms, b_batch=o.batch_size,
                       b_tin=o.tokens_in, b_tout=o.tokens_out, b_wait=o.queue_wait_ms, b_now=now)
                  for o in outcomes]
        return conn.execute(stmt, params).rowcount


_FINISH_PG = sa.text("""
UPDATE jobs AS j SET status = v.status, result = v.result, error = v.error, finished_at = now(),
       compute_ms = v.compute_ms, batch_size = v.batch_size, tokens_in = v.tokens_in,
       tokens_out = v.tokens_out, queue_wait_ms = v.queue_wait_ms, finishes = j.finishes + 1
FROM unnest(CAST(:ids AS uuid[]), CAST(:workers AS varchar[]), CAST(:attempts AS integer[]),
            CAST(:statuses AS varchar[]), CAST(:results AS jsonb[]), CAST(:errors AS text[]),
            CAST(:compute AS float8[]), CAST(:batch AS integer[]), CAST(:tin AS integer[]),
            CAST(:tout AS integer[]), CAST(:wait AS float8[]))
     AS v(id, worker_id, attempt, status, result, error, compute_ms, batch_size, tokens_in,
          tokens_out, queue_wait_ms)
WHERE j.id = v.id AND j.status = 'running' AND j.worker_id = v.worker_id AND j.attempts = v.attempt
""")
"""`finish` on Postgres: one statement for the whole group (arrays of the outcomes' fields,
joined on the primary key), instead of one UPDATE per job; `now()` is the transaction's time."""


def _finish_pg(engine: sa.Engine, outcomes: Sequence[Outcome]) -> int:
    params = dict(
        ids=[o.job_id for o in outcomes], workers=[o.worker_id for o in outcomes],
        attempts=[o.attempt for o in outcomes], statuses=[o.status.value for o in outcomes],
        results=[None if o.result is None else dump_json(o.result) for o in outcomes],
        errors=[None if o.error is None else storable(o.error) for o in outcomes],
        compute=[o.compute_ms for o in outcomes], batch=[o.batch_size for o in outcomes],
        tin=[o.tokens_in for o in outcomes], tout=[o.tokens_out for o in outcomes],
        wait=[o.queue_wait_ms for o in outcomes])
    with engine.begin() as conn:
        return conn.execute(_FINISH_PG, params).rowcount


def conversation_history(engine: sa.Engine, conversation_id: str, before: Job, *, tenant: Tenant,
                         limit: int = 50) -> list[tuple[str, str]]:
    """Earlier succeeded turns of `tenant`'s conversation as (user utterance, response), oldest first.

    Scoped by tenant: another tenant's conversation of the same id never enters the prompt.
    """
    cond = [jobs.c.conversation_id == conversation_id, jobs.c.task_type == "dialogue",
            jobs.c.status == JobStatus.SUCCEEDED.value, jobs.c.created_at <= before.created_at,
            jobs.c.id != before.id]
    q = (sa.select(jobs.c.input, jobs.c.result).where(*_scoped(cond, tenant))
         .order_by(jobs.c.created_at.desc()).limit(limit))
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return [(r.input["user_utterance"], r.result["response"]) for r in reversed(rows)]


def cancel(engine: sa.Engine, job_id: str, *, tenant: Tenant) -> bool:
    """queued or running → cancelled for one of `tenant`'s jobs; True if this call cancelled it.

    A queued job's message becomes a no-op; a running job's worker stops it between decoding
    steps (it hears of it on the cancel channel) and its late finish does not apply.
    """
    cond = [jobs.c.id == str(job_id), jobs.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])]
    with engine.begin() as conn:
        stmt = (jobs.update().where(*_scoped(cond, tenant))
                .values(status=JobStatus.CANCELLED.value, finished_at=db_now(conn), error="cancelled by user"))
        return conn.execute(stmt).rowcount == 1


def retry_failed(engine: sa.Engine, job_id: str, *, tenant: Tenant) -> Job | None:
    """failed → queued for one of `tenant`'s jobs (an operator's retry); the re-queued row, or None
    if this call did not re-queue it (no such job, not failed, or its deadline has passed).

    The attempt count is kept (a late finish of an old attempt still cannot apply) and
    `max_attempts` becomes attempts + the job's own budget (the submit's max_attempts, kept in
    `attempt_budget`), so every retry gets as many tries as the submit did; `attempts_at_retry`
    records the attempts now (the rollup counts the retries of each finish). The error, result and
    the last run's timings and prediction are cleared, and `queued_at` and `dispatched_at` are now
    (its queue wait counts from the retry). The job's webhook is re-armed (a new delivery: it
    sends the retry's outcome once the job is final again, whether the failure's was delivered or
    given up). The caller sends its message (a lost send is the reconciler's to redo, as for any
    queued job).

    /metrics counts finishes: the failure stays counted (`llmos.rollup.keep_counted`, in this
    transaction, before finished_at is cleared) and the retry's outcome is counted again when it
    finishes, so no counter goes down and nothing is counted twice.
    """
    d = webhook_deliveries
    with begin_write(engine) as conn:
        now = db_now(conn)
        cond = _scoped([jobs.c.id == str(job_id), jobs.c.status == JobStatus.FAILED.value,
                        sa.or_(jobs.c.deadline.is_(None), jobs.c.deadline > now)], tenant)
        retried = sa.select(jobs.c.id).where(*cond).scalar_subquery()
        job_delivery = [d.c.kind == WEBHOOK_JOB, d.c.job_id == retried]
        rollup.keep_counted(conn, cond, job_delivery)
        budget = sa.func.coalesce(jobs.c.attempt_budget, jobs.c.max_attempts)
        stmt = (jobs.update().where(*cond)
                .values(status=JobStatus.QUEUED.value, max_attempts=jobs.c.attempts + budget,
                        attempt_budget=budget, attempts_at_retry=jobs.c.attempts,
                        error=None, result=sa.null(), started_at=None, finished_at=None, worker_id=None,
                        device=None, queue_wait_ms=None, compute_ms=None, batch_size=None, tokens_in=None,
                        tokens_out=None, run_after=None, queued_at=now, dispatched_at=now,
                        eta_start_at=None, eta_finish_at=None)
                .returning(*jobs.c))
        found = _jobs_from(conn.execute(stmt))
        if found:  # as a new delivery (`_deliveries_for`): due now, claimed once the job is final
            conn.execute(d.update().where(d.c.kind == WEBHOOK_JOB, d.c.job_id == found[0].id)
                         .values(next_attempt_at=now, attempts=0, first_attempt_at=None, last_attempt_at=None,
                                 last_status=None, last_error=None, delivered_at=None, given_up_at=None))
    return found[0] if found else None


def retry_later(engine: sa.Engine, outcomes: Sequence[Outcome], delays_s: Sequence[float]) -> int:
    """running → queued after a transient failure, to be sent again once `run_after` passes."""
    if not outcomes:
        return 0
    applied = 0
    with engine.begin() as conn:
        now = db_now(conn)
        for o, delay in zip(outcomes, delays_s):
            stmt = (jobs.update()
                    .where(jobs.c.id == o.job_id, jobs.c.status == JobStatus.RUNNING.value,
                           jobs.c.worker_id == o.worker_id, jobs.c.attempts == o.attempt)
                    .values(status=JobStatus.QUEUED.value, worker_id=None, started_at=None,
                            error=storable(f"attempt {o.attempt} failed, retrying: {o.error}"),
                            run_after=now + timedelta(seconds=delay)))
            applied += conn.execute(stmt).rowcount
    return applied


def requeue_dead(engine: sa.Engine, dead_after_s: float) -> tuple[list[Job], list[Job]]:
    """Running jobs whose worker stopped heartbeating: back to queued, or failed past max_attempts.

    Returns (requeued, failed). Heartbeats are judged by the database's clock, which wrote them.
    Each update is conditional on the attempt it saw, so a worker that was only slow and finishes
    later cannot overwrite the newer attempt.
    """
    with engine.connect() as conn:
        now = db_now(conn)
        # what judging needs of each running row; the full rows only of those whose worker is dead
        # (usually none: a pass must not read the inputs of every job in flight)
        light = conn.execute(sa.select(jobs.c.id, jobs.c.worker_id)
                             .where(_status_in(jobs.c.status, JobStatus.RUNNING))).all()
        beats = {}
        ids = sorted({r.worker_id for r in light if r.worker_id})
        for chunk in _chunks(ids, 500):
            q = sa.select(workers.c.id, workers.c.last_heartbeat, workers.c.stopped_at).where(workers.c.id.in_(chunk))
            beats.update({r.id: (as_utc(r.last_heartbeat), r.stopped_at) for r in conn.execute(q)})

        def dead(worker_id: str | None) -> bool:
            if worker_id not in beats:
                return True
            last, stopped = beats[worker_id]
            return stopped is not None or (now - last).total_seconds() > dead_after_s

        lost = {str(r.id): r.worker_id for r in light if dead(r.worker_id)}
        running = []
        for chunk in _chunks(sorted(lost), 500):
            running += _jobs_from(conn.execute(sa.select(jobs).where(jobs.c.id.in_(chunk))))
        # still running on the worker judged dead (not claimed again meanwhile by a live one)
        running = [j for j in running if j.status == JobStatus.RUNNING and j.worker_id == lost[j.id]]

    requeued, failed = [], []
    if not running:
        return requeued, failed
    with engine.begin() as conn:
        now = db_now(conn)
        for job in running:
            cond = [jobs.c.id == job.id, jobs.c.status == JobStatus.RUNNING.value,
                    jobs.c.attempts == job.attempts]
            if job.attempts >= job.max_attempts:
                values = dict(status=JobStatus.FAILED.value, finished_at=now,
                              error=f"worker lost during attempt {job.attempts} of {job.max_attempts} "
                                    f"({job.worker_id}); not retried again (a poison input?)")
                target = failed
            else:
                values = dict(status=JobStatus.QUEUED.value, worker_id=None, started_at=None,
                              dispatched_at=now, error=f"worker {job.worker_id} lost during attempt {job.attempts}")
                target = requeued
            if conn.execute(jobs.update().where(*cond).values(**values)).rowcount:
                target.append(job)
    return requeued, failed


def fail_timed_out(engine: sa.Engine, grace_s: float) -> list[str]:
    """Running jobs past started_at + timeout_s + grace (database clock): failed with reason timeout.

    The worker stops such a job itself between steps; this records it when the worker cannot
    (a single long forward pass), and the worker's late finish then does not apply.
    """
    with engine.connect() as conn:
        now = db_now(conn)
        rows = conn.execute(sa.select(jobs.c.id, jobs.c.started_at, jobs.c.timeout_s, jobs.c.attempts)
                            .where(_status_in(jobs.c.status, JobStatus.RUNNING), jobs.c.timeout_s.is_not(None))).all()
    overdue = [r for r in rows if (now - as_utc(r.started_at)).total_seconds() > r.timeout_s + grace_s]
    done = []
    if not overdue:
        return done
    with engine.begin() as conn:
        now = db_now(conn)
        for r in overdue:
            stmt = (jobs.update()
                    .where(jobs.c.id == r.id, jobs.c.status == JobStatus.RUNNING.value, jobs.c.attempts == r.attempts)
                    .values(status=JobStatus.FAILED.value, finished_at=now,
                            error=f"timeout: still running {r.timeout_s:g} s after it started"))
            if conn.execute(stmt).rowcount:
                done.append(str(r.id))
    return done


def expire_overdue(engine: sa.Engine) -> list[str]:
    """Queued jobs whose deadline passed (database clock): expired (they never ran)."""
    with engine.begin() as conn:
        now = db_now(conn)
        stmt = (jobs.update()  # the partial index ix_jobs_queued_deadline: queued rows with a deadline
                .where(_status_in(jobs.c.status, JobStatus.QUEUED), jobs.c.deadline.is_not(None),
                       jobs.c.deadline <= now)
                .values(status=JobStatus.EXPIRED.value, finished_at=now,
                        error="expired: its deadline passed before it started")
                .returning(jobs.c.id))
        return [str(r[0]) for r in conn.execute(stmt)]


def queued_models(engine: sa.Engine) -> list[str]:
    """Models that have queued jobs: one probe of ix_jobs_queued_order per model (a skip scan),
    however many jobs are queued."""
    found: list[str] = []
    with engine.connect() as conn:
        while True:
            q = sa.select(jobs.c.model).where(_status_in(jobs.c.status, JobStatus.QUEUED))
            if found:
                q = q.where(jobs.c.model > found[-1])
            model = conn.execute(q.order_by(jobs.c.model).limit(1)).scalar()
            if model is None:
                return found
            found.append(model)


def due_retries(engine: sa.Engine, limit: int = 10_000) -> list[Job]:
    """Queued jobs whose retry backoff has passed and that were not sent since."""
    with engine.connect() as conn:
        now = db_now(conn)
        q = (sa.select(jobs).where(_status_in(jobs.c.status, JobStatus.QUEUED), jobs.c.run_after.is_not(None),
                                   jobs.c.run_after <= now,
                                   sa.or_(jobs.c.dispatched_at.is_(None), jobs.c.dispatched_at < jobs.c.run_after))
             .limit(limit))
        return _jobs_from(conn.execute(q))


class QueuedRef(NamedTuple):
    """What the reconciler reads of a queued job to judge whether its message is lost (no input).

    A named tuple, not a dataclass: a pass builds tens of thousands of them.
    """

    id: str
    model: str
    priority: int
    sent_at: datetime  # when its message was last sent: dispatched_at, else queued_at (database clock)


STALE_WINDOW = 10_000
"""Queued jobs of one model whose messages a reconciler pass checks when the front of the line
(`reconciler.FRONT`) has losses (`stale_queued`'s default limit): with the front's own read, at
most FRONT + STALE_WINDOW rows a model a pass."""


def stale_queued(engine: sa.Engine, model: str, older_than_s: float,
                 limit: int = STALE_WINDOW) -> list[QueuedRef]:
    """Queued, due jobs of `model` last sent more than `older_than_s` ago (database clock), in
    serve order (highest priority, then oldest first).

    ix_jobs_queued_order holds the queued rows in this order, so the query reads `limit` rows (and
    the recently sent ones it skips), not the whole backlog; only the columns a resend needs.
    """
    sent_at = sa.func.coalesce(jobs.c.dispatched_at, jobs.c.queued_at)
    with engine.connect() as conn:
        now = db_now(conn)
        cutoff = now - timedelta(seconds=older_than_s)
        q = (sa.select(jobs.c.id, jobs.c.model, jobs.c.priority, sent_at)
             .where(_status_in(jobs.c.status, JobStatus.QUEUED), jobs.c.model == model, sent_at < cutoff,
                    sa.or_(jobs.c.run_after.is_(None), jobs.c.run_after <= now))
             .order_by(jobs.c.priority.desc(), jobs.c.queued_at).limit(limit))
        rows = conn.execute(q).all()
    return [QueuedRef(str(i), m, p, as_utc(at)) for i, m, p, at in rows]


def age_queued(engine: sa.Engine, model: str, *, step_s: float, ceiling: int,
               limit: int = 1000) -> list[QueuedRef]:
    """Aging (llmos.scheduling.aging): queued, due jobs of `model` below `ceiling` that have waited
    over (aged + 1) × `step_s` since `queued_at` go up one priority step (priority + 1, aged + 1,
    dispatched_at = now: the caller sends their new message at once). Returns the promoted jobs
    as what a message needs (id, model, new priority, sent_at = now), not their full rows: a pass
    under a backlog promotes thousands.

    One conditional UPDATE per priority level, from the ceiling down, in one transaction: a job
    moves at most one step per call, and one claimed (or cancelled) meanwhile is left alone.
    Each level's candidates are an ordered range of ix_jobs_queued_order (model = m,
    priority = p, queued_at < now - step_s), oldest first, at most `limit` in all per call; the
    rows it reads and skips are those promoted into that level within the last step (not due
    again yet), so a call reads about `limit` rows, not the backlog.

    On Postgres the transaction commits with `synchronous_commit = off`. If the server crashes
    before the WAL writer flushed it (within 3 × `wal_writer_delay`, 600 ms by default; any later
    synchronous commit, such as a worker's claim, flushes it too), the promotions are undone: those jobs are
    queued one step lower again while their new message waits in the higher list. That message's
    claim works as any claim does (it does not look at the priority), the old one then finds the
    job claimed, and the reconciler dates a message in a list that is not its job's priority's by
    the job's `queued_at`: nothing is lost or run twice, the job merely may be promoted again.
    """
    if step_s <= 0 or limit <= 0:
        return []
    promoted: list[QueuedRef] = []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # the commit does not wait for its WAL flush (see the docstring): the pass does not
            # wait on the disk for a thousand rows' index entries at a million queued
            conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
        now = db_now(conn)
        # the due time of the next step, by the steps already taken (aged 0–9): a CASE of
        # literals, so the same statement works on SQLite and Postgres (no interval arithmetic)
        def ago(steps: int) -> Any:
            return sa.literal(now - timedelta(seconds=steps * step_s), jobs.c.queued_at.type)

        due = sa.case(*[(jobs.c.aged == k, ago(k + 1)) for k in range(10)], else_=ago(11))
        first = now - timedelta(seconds=step_s)
        for level in range(min(ceiling, 10) - 1, -1, -1):
            room = limit - len(promoted)
            if room <= 0:
                break
            queued = [_status_in(jobs.c.status, JobStatus.QUEUED), jobs.c.model == model,
                      jobs.c.priority == level]
            pick = (sa.select(jobs.c.id)
                    .where(*queued, jobs.c.queued_at < first, jobs.c.queued_at < due,
                           sa.or_(jobs.c.run_after.is_(None), jobs.c.run_after <= now))
                    .order_by(jobs.c.queued_at).limit(room))
            stmt = (jobs.update()
                    .where(jobs.c.id.in_(pick), *queued)
                    .values(priority=jobs.c.priority + 1, aged=jobs.c.aged + 1, dispatched_at=now)
                    .returning(jobs.c.id, jobs.c.model, jobs.c.priority))
            promoted.extend(QueuedRef(str(i), m, p, now) for i, m, p in conn.execute(stmt))
    return promoted


def mark_dispatched(engine: sa.Engine, job_ids: Sequence[str]) -> None:
    with engine.begin() as conn:
        now = db_now(conn)
        for chunk in _chunks([str(i) for i in job_ids], 500):
            conn.execute(jobs.update().where(jobs.c.id.in_(chunk)).values(dispatched_at=now))


def register_worker(engine: sa.Engine, *, worker_id: str, host: str, pid: int, model: str,
                    device: str) -> None:
    with engine.begin() as conn:
        now = db_now(conn)
        conn.execute(workers.delete().where(workers.c.id == worker_id))
        conn.execute(workers.insert().values(id=worker_id, host=host, pid=pid, model=model,
                                             device=device, started_at=now, last_heartbeat=now))


def worker_ready(engine: sa.Engine, worker_id: str, *, load_s: float | None = None) -> None:
    """The worker's model is loaded and it consumes: `ready_at` = now (database clock). `load_s`:
    how long it took since the process began to load (its row is written once the model is in
    memory), so `started_at` moves back by as much and ready_at - started_at is the cold start."""
    with engine.begin() as conn:
        now = db_now(conn)
        values: dict[str, Any] = {"ready_at": now}
        if load_s is not None and load_s > 0:
            values["started_at"] = now - timedelta(seconds=load_s)
        conn.execute(workers.update().where(workers.c.id == worker_id).values(**values))


def heartbeat(engine: sa.Engine, worker_id: str) -> None:
    """The worker is alive, by the database's clock (so a worker whose own clock is off is judged right)."""
    with engine.begin() as conn:
        conn.execute(workers.update().where(workers.c.id == worker_id).values(last_heartbeat=db_now(conn)))


def stop_worker(engine: sa.Engine, worker_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(workers.update().where(workers.c.id == worker_id).values(stopped_at=db_now(conn)))


def live_workers(engine: sa.Engine, model: str | None = None, *, within_s: float = 30.0) -> list[dict]:
    """Workers that heartbeated within `within_s` seconds (database clock) and have not stopped.

    The heartbeat's age is a condition of the query (ix_workers_last_heartbeat), so the rows of
    workers that died long ago without recording their stop are not read.
    """
    with engine.connect() as conn:
        now = db_now(conn)
        q = sa.select(workers).where(workers.c.stopped_at.is_(None))
        if within_s < MAX_AGE_S:
            q = q.where(workers.c.last_heartbeat >= now - timedelta(seconds=within_s))
        if model:
            q = q.where(workers.c.model == model)
        return [dict(r._mapping) for r in conn.execute(q)]


def recent_workers(engine: sa.Engine, *, within_s: float = FORGET_WORKER_AFTER_S) -> list[dict]:
    """Worker rows, stopped ones too, that heartbeated within `within_s` seconds (database clock),
    each with `silent_s`: seconds since its last beat. Older rows are not read."""
    with engine.connect() as conn:
        now = db_now(conn)
        q = sa.select(workers).where(workers.c.last_heartbeat >= now - timedelta(seconds=min(within_s, MAX_AGE_S)))
        return [{**r._mapping, "silent_s": (now - as_utc(r.last_heartbeat)).total_seconds()}
                for r in conn.execute(q)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneReport:
    """What one `prune` call deleted, and where the next call continues."""

    jobs: int = 0  # finished jobs deleted
    kept: int = 0  # finished jobs old enough, kept: their batch is open or a webhook waits for them
    workers: int = 0  # worker rows deleted
    deliveries: int = 0  # webhook deliveries deleted (delivered or given up before the cutoff)
    cursor: tuple[datetime, str] | None = None  # (finished_at, id) of the last job looked at
    done: bool = False  # nothing old enough is left to look at
    cutoff: datetime | None = None  # older than this went (database clock)


def prune(engine: sa.Engine, older_than: timedelta, *, batch_size: int = 5000,
          max_batches: int | None = None, cursor: tuple[datetime, str] | None = None) -> PruneReport:
    """Delete finished jobs and worker rows older than `older_than` (database clock), in batches.

    A job goes when it is final, finished before the cutoff, its batch (tenant, batch_id) has no
    queued or running job (an open batch keeps every job of it), and no undelivered webhook waits
    for it or its batch. A worker row goes when the worker stopped before the cutoff, or never
    recorded its stop and has been silent since before both the cutoff and FORGET_WORKER_AFTER_S.
    A webhook delivery row goes when it was delivered or given up before the cutoff.
    Nothing goes that the /metrics rollup has not counted: each call folds first
    (`llmos.rollup.refresh`, waiting for a fold under way, with the rollup's own lag), and jobs
    and deliveries that ended at or after the watermark (`rollup.LAG_S`, a minute, behind now)
    are kept whatever `older_than`, so a prune never lowers a counter and never moves the shared
    watermark closer to now than every other fold does.

    Each batch is one read of up to `batch_size` candidates in (finished_at, id) order, from
    `cursor`, then one DELETE of that key range in its own short transaction: row locks on the
    rows it deletes only, and the same cost at any depth, however many kept rows lie before it.
    `max_batches` bounds the call; pass the report's `cursor` to the next call to go on.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rollup.refresh(engine, wait=True)
    with engine.connect() as conn:
        now, folded = db_now(conn), rollup.folded_to(conn)
    cutoff = now - older_than
    counted = cutoff if folded is None else min(cutoff, folded)  # ended before it: safe to delete
    silent = now - timedelta(seconds=max(older_than.total_seconds(), FORGET_WORKER_AFTER_S))
    key = (jobs.c.finished_at, jobs.c.id)
    o, d = jobs.alias("open_job"), webhook_deliveries
    undelivered = [d.c.delivered_at.is_(None), d.c.given_up_at.is_(None)]
    not_kept = [  # each a NOT EXISTS of its own, so that the planner may make it an anti-join
        ~sa.exists().where(o.c.tenant == jobs.c.tenant, o.c.batch_id == jobs.c.batch_id,  # ix_jobs_open_batches
                           _status_in(o.c.status, JobStatus.QUEUED, JobStatus.RUNNING)),
        ~sa.exists().where(d.c.job_id == jobs.c.id, *undelivered),
        ~sa.exists().where(d.c.tenant == jobs.c.tenant, d.c.batch_id == jobs.c.batch_id, *undelivered)]
    gone = sa.and_(workers.c.last_heartbeat < cutoff,
                   sa.or_(workers.c.stopped_at < cutoff,
                          sa.and_(workers.c.stopped_at.is_(None), workers.c.last_heartbeat < silent)))
    ended = sa.or_(d.c.delivered_at < counted, d.c.given_up_at < counted)
    deleted = kept_n = workers_n = deliveries_n = batches = 0
    jobs_done = workers_done = deliveries_done = False
    if folded is None:  # nothing counted yet: keep every job and delivery
        jobs_done = deliveries_done = True
    while (not (jobs_done and workers_done and deliveries_done)
           and (max_batches is None or batches < max_batches)):
        batches += 1
        if not jobs_done:
            q = sa.select(*key).where(jobs.c.finished_at < counted)
            if cursor is not None:
                q = q.where(sa.tuple_(*key) > _typed_row(key, cursor))
            with engine.connect() as conn:  # a read: the write transaction below starts with its write
                found = conn.execute(q.order_by(*key).limit(batch_size)).all()
            if found:
                last = (found[-1].finished_at, str(found[-1].id))
                # the plain bounds beside the row comparisons give the planner a true row estimate
                span = [jobs.c.finished_at < counted, jobs.c.finished_at <= last[0],
                        sa.tuple_(*key) <= _typed_row(key, last)]
                if cursor is not None:
                    span += [jobs.c.finished_at >= cursor[0], sa.tuple_(*key) > _typed_row(key, cursor)]
                stmt = jobs.delete().where(*span, _status_in(jobs.c.status, *sorted(FINAL_STATUSES)), *not_kept)
                with engine.begin() as conn:
                    n = conn.execute(stmt).rowcount
                deleted, kept_n, cursor = deleted + n, kept_n + len(found) - n, last
            jobs_done = len(found) < batch_size
        if not workers_done:
            ids = sa.select(workers.c.id).where(gone).limit(batch_size)
            with engine.begin() as conn:
                n = conn.execute(workers.delete().where(workers.c.id.in_(ids))).rowcount
            workers_n += n
            workers_done = n < batch_size
        if not deliveries_done:
            ids = sa.select(d.c.id).where(ended).limit(batch_size)
            with engine.begin() as conn:
                n = conn.execute(d.delete().where(d.c.id.in_(ids))).rowcount
            deliveries_n += n
            deliveries_done = n < batch_size
    return PruneReport(jobs=deleted, kept=kept_n, workers=workers_n, deliveries=deliveries_n, cursor=cursor,
                       done=jobs_done and workers_done and deliveries_done, cutoff=cutoff)


API_KEY_PREFIX = "llmos_"
"""Every API key reads `llmos_<prefix>_<secret>`; the prefix names it in lists and logs."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApiKey:
    """An API key's row without its hash: what lists and the API's authentication see."""

    id: str
    tenant: str
    name: str | None
    prefix: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    @classmethod
    def from_row(cls, m: Any) -> "ApiKey":
        return cls(id=str(m["id"]), tenant=m["tenant"], name=m["name"], prefix=m["prefix"],
                   admin=bool(m["admin"]), created_at=as_utc(m["created_at"]),
                   revoked_at=as_utc(m["revoked_at"]), last_used_at=as_utc(m["last_used_at"]))


def _key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_api_key(engine: sa.Engine, *, tenant: str, name: str | None = None,
                   admin: bool = False) -> tuple[ApiKey, str]:
    """A new key for `tenant`: (its row, the key). The key is returned only here; only its hash is kept."""
    for what, value, required in (("tenant", tenant, True), ("name", name, False)):
        if value is None and not required:
            continue
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_TENANT_CHARS or UNSTORABLE.search(value):
            raise ValidationError(f"{what} must be 1–{MAX_TENANT_CHARS} storable characters, got {value!r}")
    secret = secrets.token_urlsafe(32)  # 256 bits
    with engine.begin() as conn:
        row = dict(id=str(uuid.uuid4()), tenant=tenant, name=name, prefix=secrets.token_hex(6),
                   hash=_key_hash(secret), admin=bool(admin), created_at=db_now(conn))
        conn.execute(api_keys.insert().values(**row))
    return ApiKey.from_row({**row, "revoked_at": None, "last_used_at": None}), \
        f"{API_KEY_PREFIX}{row['prefix']}_{secret}"


def list_api_keys(engine: sa.Engine, *, tenant: Tenant = ANY_TENANT) -> list[ApiKey]:
    """Keys (revoked ones too), oldest first; of one tenant, or of every tenant with ANY_TENANT."""
    q = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.prefix)
    if tenant is not ANY_TENANT:
        q = q.where(api_keys.c.tenant == tenant)
    with engine.connect() as conn:
        return [ApiKey.from_row(r._mapping) for r in conn.execute(q)]


def revoke_api_key(engine: sa.Engine, prefix: str) -> bool:
    """Revoke the key with `prefix`; True if this call revoked it (False: none, or already revoked)."""
    if not (isinstance(prefix, str) and prefix.isascii() and prefix.isalnum()):
        return False  # no key has it (and the database need not see text it cannot store)
    with engine.begin() as conn:
        stmt = (api_keys.update().where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=db_now(conn)))
        return conn.execute(stmt).rowcount == 1


def authenticate_key(engine: sa.Engine, presented: str, *, touch_after_s: float = 60.0) -> ApiKey | None:
    """The live key `presented` is, or None (malformed, unknown, wrong secret or revoked).

    The secret's hash is compared in constant time. `last_used_at` is written at most once per
    `touch_after_s`, so authenticating is a read on almost every request.
    """
    if not isinstance(presented, str) or not presented.startswith(API_KEY_PREFIX):
        return None
    prefix, _, secret = presented[len(API_KEY_PREFIX):].partition("_")
    if not (prefix.isascii() and prefix.isalnum() and len(prefix) <= 16) or not secret:
        return None
    with engine.connect() as conn:
        row = conn.execute(sa.select(api_keys).where(api_keys.c.prefix == prefix)).first()
    if row is None or not hmac.compare_digest(row.hash, _key_hash(secret)) or row.revoked_at is not None:
        return None
    key = ApiKey.from_row(row._mapping)
    # the local clock only decides how often to touch; the time written is the database's
    if key.last_used_at is None or (utcnow() - key.last_used_at).total_seconds() > touch_after_s:
        with engine.begin() as conn:
            conn.execute(api_keys.update().where(api_keys.c.id == key.id).values(last_used_at=db_now(conn)))
    return key


def live_key_by_id(engine: sa.Engine, key_id: str) -> tuple[ApiKey, str] | None:
    """(the key with id `key_id`, its stored hash), or None when there is no such key or it is
    revoked: for credentials that name a key without holding it (the dashboard's session cookie)."""
    try:
        key_id = str(uuid.UUID(str(key_id)))
    except ValueError:
        return None
    with engine.connect() as conn:
        row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
    if row is None or row.revoked_at is not None:
        return None
    return ApiKey.from_row(row._mapping), row.hash


WEBHOOK_JOB, WEBHOOK_BATCH = "job", "batch"
"""The kinds of webhook delivery: one job's final state, or a whole batch's."""

WEBHOOK_SECRET_PREFIX = "whsec_"
"""Every webhook signing secret reads `whsec_<random>`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Delivery:
    """A webhook delivery's row: what to POST where, and how its attempts went."""

    id: str
    tenant: str
    kind: str
    job_id: str | None
    batch_id: str | None
    url: str
    created_at: datetime
    next_attempt_at: datetime
    attempts: int
    first_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None
    given_up_at: datetime | None = None

    @property
    def target_id(self) -> str:
        """The job id or batch id the delivery announces."""
        return self.job_id if self.kind == WEBHOOK_JOB else self.batch_id

    @classmethod
    def from_row(cls, m: Any) -> "Delivery":
        return cls(id=str(m["id"]), tenant=m["tenant"], kind=m["kind"],
                   job_id=None if m["job_id"] is None else str(m["job_id"]), batch_id=m["batch_id"],
                   url=m["url"], created_at=as_utc(m["created_at"]), next_attempt_at=as_utc(m["next_attempt_at"]),
                   attempts=m["attempts"], first_attempt_at=as_utc(m["first_attempt_at"]),
                   last_attempt_at=as_utc(m["last_attempt_at"]), last_status=m["last_status"],
                   last_error=m["last_error"], delivered_at=as_utc(m["delivered_at"]),
                   given_up_at=as_utc(m["given_up_at"]))


def _due_deliveries(now: datetime) -> tuple[sa.Select, Any]:
    """(SELECT of the ids of undelivered deliveries due at `now` whose job or whole batch is final, its alias)."""
    d = webhook_deliveries.alias("due")  # an alias: the subquery must not correlate to an UPDATE's table
    final = [s.value for s in FINAL_STATUSES]
    job_final = sa.exists().where(jobs.c.id == d.c.job_id, jobs.c.status.in_(final))
    of_batch = [jobs.c.batch_id == d.c.batch_id, jobs.c.tenant == d.c.tenant]
    batch_final = sa.and_(sa.exists().where(*of_batch),
                          ~sa.exists().where(*of_batch, jobs.c.status.not_in(final)))
    return (sa.select(d.c.id)
            .where(d.c.delivered_at.is_(None), d.c.given_up_at.is_(None), d.c.next_attempt_at <= now,
                   sa.or_(sa.and_(d.c.kind == WEBHOOK_JOB, job_final),
                          sa.and_(d.c.kind == WEBHOOK_BATCH, batch_final)))
            .order_by(d.c.next_attempt_at), d)


def claim_deliveries(engine: sa.Engine, *, limit: int, lease_s: float) -> list[Delivery]:
    """Due deliveries whose target is final, leased for `lease_s` to this caller (oldest due first).

    The lease is `next_attempt_at` pushed forward, so another process skips the row until then;
    on Postgres the rows are picked `FOR UPDATE SKIP LOCKED`, so concurrent callers split them and
    no row is claimed twice at once. A caller that dies mid-POST loses its lease when it passes,
    and the delivery is tried again (at least once, never lost).
    """
    with engine.connect() as conn:  # a read first: an idle poll takes no write lock
        now = db_now(conn)
        due, _ = _due_deliveries(now)
        if conn.execute(due.limit(1)).first() is None:
            return []
    with engine.begin() as conn:
        now = db_now(conn)
        due, d = _due_deliveries(now)
        due = due.limit(limit).with_for_update(skip_locked=True, of=d)  # (SQLite: a plain update)
        stmt = (webhook_deliveries.update()
                .where(webhook_deliveries.c.id.in_(due))
                .values(next_attempt_at=now + timedelta(seconds=lease_s))
                .returning(*webhook_deliveries.c))
        return [Delivery.from_row(r._mapping) for r in conn.execute(stmt)]


def record_delivery(engine: sa.Engine, delivery: Delivery, *, delivered: bool, status: int | None,
                    error: str | None, retry_in_s: float, give_up_after_s: float) -> str:
    """Write the outcome of one attempt at a claimed delivery; returns what became of it.

    'delivered'; 'retry' (next attempt in `retry_in_s`); 'given_up' (failing for `give_up_after_s`
    since its first attempt); 'lost' (the lease had passed and another caller has the row: nothing
    written). Times are the database's.
    """
    d = webhook_deliveries
    with engine.begin() as conn:
        now = db_now(conn)
        first = delivery.first_attempt_at or now
        values: dict[str, Any] = dict(attempts=d.c.attempts + 1, last_status=status, last_attempt_at=now,
                                      first_attempt_at=first,
                                      last_error=None if error is None else storable(error[:1000]))
        if delivered:
            values["delivered_at"], outcome = now, "delivered"
        elif (now - first).total_seconds() + retry_in_s > give_up_after_s:
            values["given_up_at"], outcome = now, "given_up"
        else:
            values["next_attempt_at"], outcome = now + timedelta(seconds=retry_in_s), "retry"
        stmt = d.update().where(d.c.id == delivery.id, d.c.next_attempt_at == delivery.next_attempt_at,
                                d.c.delivered_at.is_(None), d.c.given_up_at.is_(None)).values(**values)
        return outcome if conn.execute(stmt).rowcount == 1 else "lost"


def list_deliveries(engine: sa.Engine, *, tenant: str, job_id: str | None = None,
                    batch_id: str | None = None, limit: int = 100) -> list[Delivery]:
    """`tenant`'s deliveries newest first, of one job or batch if given."""
    d = webhook_deliveries
    q = sa.select(d).where(d.c.tenant == tenant)
    if job_id is not None:
        q = q.where(d.c.job_id == str(job_id))
    if batch_id is not None:
        q = q.where(d.c.batch_id == batch_id)
    q = q.order_by(d.c.created_at.desc(), d.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [Delivery.from_row(r._mapping) for r in conn.execute(q)]


def batch_job_ids(engine: sa.Engine, batch_id: str, *, tenant: Tenant) -> list[str]:
    """Ids of one of `tenant`'s batches' jobs, oldest first."""
    q = (sa.select(jobs.c.id).where(*_scoped([jobs.c.batch_id == batch_id], tenant))
         .order_by(jobs.c.created_at, jobs.c.id))
    with engine.connect() as conn:
        return [str(r[0]) for r in conn.execute(q)]


def _new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)  # 256 bits


def webhook_secret(engine: sa.Engine, tenant: str) -> tuple[str, datetime]:
    """`tenant`'s webhook signing secret and when it was made; made now if it has none."""
    s = webhook_secrets
    with engine.connect() as conn:
        row = conn.execute(sa.select(s.c.secret, s.c.created_at).where(s.c.tenant == tenant)).first()
    if row is not None:
        return row.secret, as_utc(row.created_at)
    try:
        with engine.begin() as conn:
            now = db_now(conn)
            secret = _new_webhook_secret()
            conn.execute(s.insert().values(tenant=tenant, secret=secret, created_at=now))
        return secret, now
    except sa.exc.IntegrityError:  # another process made it first: that one is the secret
        return webhook_secret(engine, tenant)


def rotate_webhook_secret(engine: sa.Engine, tenant: str) -> tuple[str, datetime]:
    """A new secret for `tenant` (every delivery from now on is signed with it), and its time."""
    s = webhook_secrets
    secret = _new_webhook_secret()
    with engine.begin() as conn:
        now = db_now(conn)
        if conn.execute(s.update().where(s.c.tenant == tenant).values(secret=secret, created_at=now)).rowcount:
            return secret, now
    try:
        with engine.begin() as conn:
            conn.execute(s.insert().values(tenant=tenant, secret=secret, created_at=now))
        return secret, now
    except sa.exc.IntegrityError:  # made meanwhile by a first delivery: replace it
        return rotate_webhook_secret(engine, tenant)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def end_queued_batch_jobs(engine: sa.Engine, batch_id: str, *, tenant: Tenant, status: JobStatus,
                          error: str) -> int:
    """queued → `status` (cancelled or expired) for every queued job of one of `tenant`'s batches
    (the Batch API's cancel and completion window); running jobs finish. How many it ended."""
    if status not in (JobStatus.CANCELLED, JobStatus.EXPIRED):
        raise ValueError(f"a batch's queued jobs end cancelled or expired, not {status}")
    with engine.begin() as conn:
        stmt = (jobs.update()
                .where(*_scoped([jobs.c.batch_id == batch_id, _status_in(jobs.c.status, JobStatus.QUEUED)], tenant))
                .values(status=status.value, finished_at=db_now(conn), error=error))
        return conn.execute(stmt).rowcount
