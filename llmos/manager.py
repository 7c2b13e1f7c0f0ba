"""The one module that changes job state: create, claim, finish, fail, cancel, and worker rows.

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
from typing import Any, Iterable, Sequence

import sqlalchemy as sa

from llmos.constants import DEFAULT_TENANT, MAX_TENANT_CHARS
from llmos.db import UNSTORABLE, api_keys, jobs, storable, workers
from llmos.errors import IdempotencyConflictError, ValidationError
from llmos.jobs import Job, JobStatus


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


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; they were written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


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


def create_jobs(engine: sa.Engine, new: Sequence[NewJob], _retry: bool = True) -> list[tuple[Job, bool]]:
    """Write jobs as `queued`; returns (job, created) in input order.

    A job whose (tenant, idempotency_key) already exists is not created again: the existing job
    comes back with created=False, so the caller does not send it twice. If that job's model, task
    or input differ, IdempotencyConflictError is raised and nothing is written.
    """
    now = db_now(engine)
    existing: dict[tuple[str, str], Job] = {}
    keyed = [(n.tenant, n.idempotency_key) for n in new if n.idempotency_key is not None]
    if keyed:
        existing = _find_by_keys(engine, keyed)
    rows, out = [], []
    for n in new:
        key = (n.tenant, n.idempotency_key) if n.idempotency_key is not None else None
        if key is not None and key in existing:
            out.append((_same_job(existing[key], n), False))
            continue
        row = dict(id=str(uuid.uuid4()), model=n.model, task_type=n.task_type,
                   priority=n.priority, status=JobStatus.QUEUED.value, input=n.input,
                   attempts=0, max_attempts=n.max_attempts, tenant=n.tenant,
                   idempotency_key=n.idempotency_key, batch_id=n.batch_id,
                   conversation_id=n.conversation_id, created_at=now, queued_at=now,
                   timeout_s=n.timeout_s, dispatched_at=now, finishes=0,
                   deadline=(now + timedelta(seconds=n.deadline_in_s)) if n.deadline_in_s is not None
                   else n.deadline)
        rows.append(row)
        job = Job.from_row(row)
        out.append((job, True))
        if key is not None:
            existing[key] = job  # a repeated key inside one call yields one job
    if rows:
        try:
            with engine.begin() as conn:  # one executemany: psycopg 3 pipelines every row
                conn.execute(jobs.insert(), rows)
        except sa.exc.IntegrityError:
            if not keyed or not _retry:
                raise
            # A concurrent submit with the same key won the race: retry once, it is now "existing".
            return create_jobs(engine, new, _retry=False)
    return out


def _same_job(job: Job, new: NewJob) -> Job:
    """`job` (found by `new`'s idempotency key) if it is the job `new` asks for, else a refusal."""
    differ = [name for name, a, b in (("model", job.model, new.model), ("task", job.task_type, new.task_type),
                                      ("input", job.input, new.input)) if a != b]
    if differ:
        raise IdempotencyConflictError(
            f"idempotency key {new.idempotency_key!r} already names job {job.id} with another "
            f"{' and '.join(differ)} ({job.task_type} on {job.model!r}); use a new key for a new job")
    return job


def _find_by_keys(engine: sa.Engine, keys: list[tuple[str, str]]) -> dict:
    """Existing jobs by (tenant, idempotency key): filtered on both, so the unique index serves it."""
    found: dict[tuple[str, str], Job] = {}
    by_tenant: dict[str, set[str]] = {}
    for tenant, key in keys:
        by_tenant.setdefault(tenant, set()).add(key)
    with engine.connect() as conn:
        for tenant, names in by_tenant.items():
            for chunk in _chunks(sorted(names), 500):
                q = sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key.in_(chunk))
                for job in _jobs_from(conn.execute(q)):
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
        cond.append(sa.or_(jobs.c.created_at < at, sa.and_(jobs.c.created_at == at, jobs.c.id < job_id)))
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
    queued = [jobs.c.id.in_(ids), jobs.c.status == JobStatus.QUEUED.value]
    with engine.begin() as conn:
        now = db_now(conn)
        expire = (jobs.update()
                  .where(*queued, jobs.c.deadline.is_not(None), jobs.c.deadline <= now)
                  .values(status=JobStatus.EXPIRED.value, finished_at=now,
                          error="expired: its deadline passed before it started")
                  .returning(jobs.c.id))
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
        expired = [str(r[0]) for r in conn.execute(expire)]
        return mine + _jobs_from(conn.execute(stmt)), expired


def finish(engine: sa.Engine, outcomes: Sequence[Outcome]) -> int:
    """Write results and errors of claimed jobs in one transaction; returns how many applied.

    Text the database cannot store (NUL, lone surrogates: a model's output may hold them) is
    written as U+FFFD, in the error here and in the result by the engine's JSON serializer.

    An outcome applies only while the job is still `running` under the same worker and attempt,
    so a late finish from a worker presumed dead cannot overwrite a newer attempt.
    """
    if not outcomes:
        return 0
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
        running = _jobs_from(conn.execute(sa.select(jobs).where(jobs.c.status == JobStatus.RUNNING.value)))
        beats = {}
        if running:
            ids = sorted({j.worker_id for j in running if j.worker_id})
            for chunk in _chunks(ids, 500):
                q = sa.select(workers.c.id, workers.c.last_heartbeat, workers.c.stopped_at).where(workers.c.id.in_(chunk))
                beats.update({r.id: (as_utc(r.last_heartbeat), r.stopped_at) for r in conn.execute(q)})

    def dead(worker_id: str | None) -> bool:
        if worker_id not in beats:
            return True
        last, stopped = beats[worker_id]
        return stopped is not None or (now - last).total_seconds() > dead_after_s

    requeued, failed = [], []
    with engine.begin() as conn:
        now = db_now(conn)
        for job in running:
            if not dead(job.worker_id):
                continue
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
                            .where(jobs.c.status == JobStatus.RUNNING.value, jobs.c.timeout_s.is_not(None))).all()
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
        stmt = (jobs.update()
                .where(jobs.c.status == JobStatus.QUEUED.value, jobs.c.deadline.is_not(None),
                       jobs.c.deadline <= now)
                .values(status=JobStatus.EXPIRED.value, finished_at=now,
                        error="expired: its deadline passed before it started")
                .returning(jobs.c.id))
        return [str(r[0]) for r in conn.execute(stmt)]


def queued_counts(engine: sa.Engine) -> dict[str, int]:
    """Queued jobs per model that are due now (not waiting out a retry backoff)."""
    with engine.connect() as conn:
        now = db_now(conn)
        q = (sa.select(jobs.c.model, sa.func.count())
             .where(jobs.c.status == JobStatus.QUEUED.value,
                    sa.or_(jobs.c.run_after.is_(None), jobs.c.run_after <= now))
             .group_by(jobs.c.model))
        return {m: n for m, n in conn.execute(q)}


def due_retries(engine: sa.Engine, limit: int = 10_000) -> list[Job]:
    """Queued jobs whose retry backoff has passed and that were not sent since."""
    with engine.connect() as conn:
        now = db_now(conn)
        q = (sa.select(jobs).where(jobs.c.status == JobStatus.QUEUED.value, jobs.c.run_after.is_not(None),
                                   jobs.c.run_after <= now,
                                   sa.or_(jobs.c.dispatched_at.is_(None), jobs.c.dispatched_at < jobs.c.run_after))
             .limit(limit))
        return _jobs_from(conn.execute(q))


def stale_queued(engine: sa.Engine, model: str, older_than_s: float, limit: int = 10_000) -> list[Job]:
    """Queued, due jobs of `model` last sent more than `older_than_s` ago (database clock), oldest first."""
    with engine.connect() as conn:
        now = db_now(conn)
        cutoff = now - timedelta(seconds=older_than_s)
        q = (sa.select(jobs).where(jobs.c.status == JobStatus.QUEUED.value, jobs.c.model == model,
                                   sa.func.coalesce(jobs.c.dispatched_at, jobs.c.queued_at) < cutoff,
                                   sa.or_(jobs.c.run_after.is_(None), jobs.c.run_after <= now))
             .order_by(jobs.c.priority.desc(), jobs.c.queued_at).limit(limit))
        return _jobs_from(conn.execute(q))


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


def heartbeat(engine: sa.Engine, worker_id: str) -> None:
    """The worker is alive, by the database's clock (so a worker whose own clock is off is judged right)."""
    with engine.begin() as conn:
        conn.execute(workers.update().where(workers.c.id == worker_id).values(last_heartbeat=db_now(conn)))


def stop_worker(engine: sa.Engine, worker_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(workers.update().where(workers.c.id == worker_id).values(stopped_at=db_now(conn)))


def worker_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.select(workers.c.id))]


def live_workers(engine: sa.Engine, model: str | None = None, *, within_s: float = 30.0) -> list[dict]:
    """Workers that heartbeated within `within_s` seconds (database clock) and have not stopped."""
    with engine.connect() as conn:
        now = db_now(conn)
        q = sa.select(workers).where(workers.c.stopped_at.is_(None))
        if model:
            q = q.where(workers.c.model == model)
        rows = [dict(r._mapping) for r in conn.execute(q)]
    return [r for r in rows if (now - as_utc(r["last_heartbeat"])).total_seconds() <= within_s]


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


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
