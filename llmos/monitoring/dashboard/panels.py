"""The dashboard's panels: one read-only, bounded, indexed query (or a few) each, scoped by tenant.

Every panel is a function in `PANELS` taking (conn, scope, now) and answering JSON-ready data;
`overview` runs them all on one connection. A panel's query reads rows in a window of time
or a fixed number of rows through an index, never the whole task table, so the page costs the
same with ten million finished jobs as with a hundred (tests/integration/test_dashboard_plans.py
EXPLAINs every statement the panels run and fails on a sequential scan of `jobs`).

Scope: a tenant's key sees its own jobs and batches only; an admin key sees every tenant's, or one
tenant's with a filter, and the system panels (workers, Redis queues, capacity, plan), which add
up every tenant's load and so are not a tenant's to see.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import sqlalchemy as sa

from llmos.db import UNSTORABLE, api_keys, batches, jobs, workers
from llmos.jobs import JobStatus
from llmos.manager import as_utc, db_now

OPEN_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
FINAL = ("succeeded", "failed", "cancelled", "expired")
WINDOW_S = 3600.0
"""The window of the latency, throughput and one-hour count panels."""
DAY_S = 86_400.0
LATENCY_SAMPLE = 10_000
"""Latency percentiles are over at most this many of the window's newest finished jobs."""
FAILURES = 20
QUEUED_JOBS = 20
BATCHES = 10
WORKERS_WITHIN_S = 3600.0
"""Workers that heartbeated within this long are shown (stopped ones too, marked)."""
MAX_WORKERS = 200


@dataclasses.dataclass(frozen=True)
class Scope:
    """Whose rows a request sees: `tenant` None means every tenant's (an admin without a filter)."""

    tenant: str | None
    admin: bool

    def where(self, table: Any = jobs) -> list[Any]:
        return [] if self.tenant is None else [table.c.tenant == self.tenant]


def _lit(*statuses: Any) -> Any:
    """`jobs.status` among `statuses` as SQL literals, so a partial index's predicate matches."""
    values = [sa.literal_column(f"'{JobStatus(s).value}'") for s in statuses]
    return jobs.c.status == values[0] if len(values) == 1 else jobs.c.status.in_(values)


def _since(now: datetime, seconds: float) -> Any:
    return sa.literal(now - timedelta(seconds=seconds), jobs.c.finished_at.type)


def _finished_since(now: datetime, seconds: float) -> list[Any]:
    """Jobs finished in the last `seconds`: a range of ix_jobs_finished_at_id."""
    return [jobs.c.finished_at.is_not(None), jobs.c.finished_at >= _since(now, seconds)]


def _iso(value: datetime | None) -> str | None:
    value = as_utc(value)
    return None if value is None else value.astimezone(timezone.utc).isoformat()


# --- the panels ------------------------------------------------------------------------------------

def counts(conn: sa.Connection, scope: Scope, now: datetime) -> dict[str, Any]:
    """Open jobs by status (live), and jobs finished in the last hour and day by status."""
    open_q = (sa.select(jobs.c.status, sa.func.count()).where(_lit(*OPEN_STATUSES), *scope.where())
              .group_by(jobs.c.status))
    hour = _since(now, WINDOW_S)
    done_q = (sa.select(jobs.c.status, sa.func.count().filter(jobs.c.finished_at >= hour), sa.func.count())
              .where(*_finished_since(now, DAY_S), *scope.where()).group_by(jobs.c.status))
    out = {"open": {s.value: 0 for s in OPEN_STATUSES}, "hour": {s: 0 for s in FINAL}, "day": {s: 0 for s in FINAL}}
    for status, n in conn.execute(open_q):
        out["open"][status] = n
    for status, h, d in conn.execute(done_q):
        if status in FINAL:  # (a running job's finished_at is null; a requeued one's too)
            out["hour"][status], out["day"][status] = h, d
    return out


def queue_depth(conn: sa.Connection, scope: Scope, now: datetime) -> list[dict[str, Any]]:
    """Queued jobs per model and priority (ix_jobs_queued_order, or a tenant's status index)."""
    q = (sa.select(jobs.c.model, jobs.c.priority, sa.func.count(), sa.func.min(jobs.c.queued_at))
         .where(_lit(JobStatus.QUEUED), *scope.where()).group_by(jobs.c.model, jobs.c.priority)
         .order_by(jobs.c.model, jobs.c.priority.desc()))
    return [{"model": m, "priority": p, "queued": n,
             "oldest_s": None if at is None else max(0.0, (now - as_utc(at)).total_seconds())}
            for m, p, n, at in conn.execute(q)]


def _percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile (0–100) by linear interpolation between closest ranks."""
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _recent_finished(conn: sa.Connection, scope: Scope, now: datetime) -> list[Any]:
    q = (sa.select(jobs.c.model, jobs.c.queue_wait_ms, jobs.c.compute_ms, jobs.c.worker_id, jobs.c.batch_size)
         .where(*_finished_since(now, WINDOW_S), *scope.where())
         .order_by(jobs.c.finished_at.desc(), jobs.c.id.desc()).limit(LATENCY_SAMPLE))
    return conn.execute(q).all()


def latency(conn: sa.Connection, scope: Scope, now: datetime) -> dict[str, Any]:
    """Per model: p50/p95 of queue wait and compute time over the last hour's newest finished jobs."""
    rows = _recent_finished(conn, scope, now)
    per: dict[str, dict[str, list[float]]] = {}
    for model, wait, compute, _, _ in rows:
        m = per.setdefault(model, {"wait": [], "compute": []})
        if wait is not None:
            m["wait"].append(float(wait))
        if compute is not None:
            m["compute"].append(float(compute))
    models = [{"model": model, "jobs": len(v["wait"]) or len(v["compute"]),
               "wait_p50_ms": _percentile(v["wait"], 50), "wait_p95_ms": _percentile(v["wait"], 95),
               "compute_p50_ms": _percentile(v["compute"], 50), "compute_p95_ms": _percentile(v["compute"], 95)}
              for model, v in sorted(per.items()) if v["wait"] or v["compute"]]  # (not models whose jobs never ran)
    return {"models": models, "sampled": len(rows), "sample_limit": LATENCY_SAMPLE, "window_s": WINDOW_S}


def _minute(conn: sa.Connection) -> Any:
    """The minute (since the epoch) a job finished in, in SQL."""
    if conn.dialect.name == "postgresql":
        return sa.func.floor(sa.extract("epoch", jobs.c.finished_at) / 60)
    return sa.cast((sa.func.julianday(jobs.c.finished_at) - 2440587.5) * 1440.0, sa.Integer)


def throughput(conn: sa.Connection, scope: Scope, now: datetime) -> dict[str, Any]:
    """Jobs finished per minute over the last hour, succeeded and not (the chart)."""
    minute = _minute(conn).label("minute")
    q = (sa.select(minute, jobs.c.status, sa.func.count()).where(*_finished_since(now, WINDOW_S), *scope.where())
         .group_by(minute, jobs.c.status))
    last = int(now.timestamp() // 60)
    first = last - int(WINDOW_S // 60) + 1
    buckets = {m: {"succeeded": 0, "other": 0} for m in range(first, last + 1)}
    for m, status, n in conn.execute(q):
        b = buckets.get(int(m))
        if b is None:  # the window's first partial minute: counted in the first bucket
            b = buckets[first if int(m) < first else last]
        b["succeeded" if status == "succeeded" else "other"] += n
    return {"minutes": [{"t": datetime.fromtimestamp(m * 60, timezone.utc).isoformat(), **v}
                        for m, v in sorted(buckets.items())],
            "total": sum(v["succeeded"] + v["other"] for v in buckets.values())}


def failures(conn: sa.Connection, scope: Scope, now: datetime) -> list[dict[str, Any]]:
    """The newest failed jobs with their errors (ix_jobs_failed_finished_at_id, read backwards)."""
    q = (sa.select(jobs.c.id, jobs.c.tenant, jobs.c.model, jobs.c.task_type, jobs.c.error, jobs.c.attempts,
                   jobs.c.finished_at)
         .where(_lit(JobStatus.FAILED), jobs.c.finished_at.is_not(None), *scope.where())
         .order_by(jobs.c.finished_at.desc(), jobs.c.id.desc()).limit(FAILURES))
    return [{"id": str(r.id), "tenant": r.tenant, "model": r.model, "task": r.task_type,
             "error": (r.error or "")[:500], "attempts": r.attempts, "finished_at": _iso(r.finished_at)}
            for r in conn.execute(q)]


def queued_jobs(conn: sa.Connection, scope: Scope, now: datetime) -> list[dict[str, Any]]:
    """Queued jobs to act on: every tenant's in serve order per model (ix_jobs_queued_order), or
    one tenant's oldest first (ix_jobs_tenant_status_created_at_id)."""
    cols = (jobs.c.id, jobs.c.tenant, jobs.c.model, jobs.c.task_type, jobs.c.priority, jobs.c.queued_at,
            jobs.c.eta_start_at, jobs.c.batch_id)
    if scope.tenant is None:
        q = (sa.select(*cols).where(_lit(JobStatus.QUEUED))
             .order_by(jobs.c.model, jobs.c.priority.desc(), jobs.c.queued_at))
    else:
        q = (sa.select(*cols).where(jobs.c.tenant == scope.tenant, _lit(JobStatus.QUEUED))
             .order_by(jobs.c.created_at, jobs.c.id))
    return [{"id": str(r.id), "tenant": r.tenant, "model": r.model, "task": r.task_type, "priority": r.priority,
             "queued_at": _iso(r.queued_at), "eta_start_at": _iso(r.eta_start_at), "batch_id": r.batch_id}
            for r in conn.execute(q.limit(QUEUED_JOBS))]


def batch_panel(conn: sa.Connection, scope: Scope, now: datetime) -> list[dict[str, Any]]:
    """The newest batches with their progress: final ones' recorded counts, open ones' live job
    counts (ix_jobs_of_batch: one batch's jobs)."""
    b = batches.c
    q = (sa.select(b.id, b.tenant, b.name, b.status, b.model, b.endpoint, b.total, b.bad, b.superseded,
                   b.completed_count, b.failed_count, b.created_at)
         .where(*scope.where(batches)).order_by(b.created_at.desc(), b.id.desc()).limit(BATCHES))
    out = []
    for r in conn.execute(q).all():
        item = {"id": r.id, "tenant": r.tenant, "name": r.name, "status": r.status, "model": r.model,
                "endpoint": r.endpoint, "total": r.total, "created_at": _iso(r.created_at)}
        if r.status in ("completed", "failed", "expired", "cancelled"):
            item.update(completed=r.completed_count, failed=r.failed_count, running=0, queued=0)
        else:
            by = dict(conn.execute(sa.select(jobs.c.status, sa.func.count())
                                   .where(jobs.c.batch_id == r.id, jobs.c.tenant == r.tenant)
                                   .group_by(jobs.c.status)).all())
            failed = sum(by.get(s, 0) for s in ("failed", "cancelled", "expired")) - r.superseded + r.bad
            item.update(completed=by.get("succeeded", 0), failed=max(0, failed), running=by.get("running", 0),
                        queued=by.get("queued", 0))
        item["done"] = item["completed"] + item["failed"]
        out.append(item)
    return out


def worker_panel(conn: sa.Connection, scope: Scope, now: datetime) -> list[dict[str, Any]] | None:
    """Workers that heartbeated in the last hour (ix_workers_last_heartbeat), with the batch sizes
    of their jobs finished in the last hour (the latency panel's sample). Admin only."""
    if not scope.admin:
        return None
    w = workers.c
    rows = conn.execute(sa.select(workers).where(w.last_heartbeat >= now - timedelta(seconds=WORKERS_WITHIN_S))
                        .order_by(w.model, w.id).limit(MAX_WORKERS)).all()
    sizes: dict[str, list[int]] = {}
    if rows:
        for _, _, _, worker_id, size in _recent_finished(conn, Scope(None, True), now):
            if worker_id is not None and size is not None:
                sizes.setdefault(worker_id, []).append(size)
    out = []
    for r in rows:
        mine = sizes.get(r.id, [])
        silent = (now - as_utc(r.last_heartbeat)).total_seconds()
        out.append({"id": r.id, "model": r.model, "device": r.device, "host": r.host, "pid": r.pid,
                    "last_heartbeat": _iso(r.last_heartbeat), "silent_s": max(0.0, silent),
                    "started_at": _iso(r.started_at), "ready_at": _iso(r.ready_at),
                    "stopped_at": _iso(r.stopped_at),
                    "jobs_1h": len(mine), "batch_mean": (sum(mine) / len(mine)) if mine else None,
                    "batch_max": max(mine) if mine else None})
    return out


def tenants(conn: sa.Connection, scope: Scope, now: datetime) -> list[str] | None:
    """Tenants an admin may filter by: those of the API keys (ix_api_keys_tenant). Admin only."""
    if not scope.admin:
        return None
    return [t for (t,) in conn.execute(sa.select(api_keys.c.tenant).distinct().order_by(api_keys.c.tenant))]


PANELS: dict[str, Callable[[sa.Connection, Scope, datetime], Any]] = {
    "counts": counts, "queue_depth": queue_depth, "latency": latency, "throughput": throughput,
    "failures": failures, "queued_jobs": queued_jobs, "batches": batch_panel, "workers": worker_panel,
    "tenants": tenants,
}
"""Every panel of the task table; `overview` runs each, the plan test EXPLAINs each one's statements."""


# --- beyond the task table -----------------------------------------------------------------------

def redis_depth(redis_conn: Any, models: list[str]) -> list[dict[str, Any]]:
    """Messages waiting in each priority list of each model's queue (`llmos.dispatch.queue_lengths`)."""
    from llmos.dispatch import queue_lengths

    return [{"model": m, "priority": p, "messages": n} for (m, p), n in queue_lengths(redis_conn, models).items() if n]


def capacity(engine: sa.Engine, registry: Any) -> list[dict[str, Any]]:
    """`llmos capacity`'s report (llmos.scheduling.capacity), its defaults."""
    from llmos.scheduling.capacity import capacity_report

    return capacity_report(engine, registry)


def placement_plan(settings: Any, engine: Any, registry: Any) -> dict[str, Any]:
    """`llmos plan`'s plan for now (llmos.scheduling.placement), as JSON."""
    from llmos.scheduling.placement import make_plan

    return make_plan(settings, engine, registry).to_json()


SLOW_PANEL_S = 30.0
"""The capacity report and the plan (each a few hundred ms on a million-job table) are made at
most this often per API process; every other panel is read on every refresh."""

_slow: dict[tuple[str, str], tuple[float, Any]] = {}
_slow_lock = threading.Lock()
_making: dict[tuple[str, str], threading.Lock] = {}
"""One lock per slow panel and database: held while its value is made, so that when the cached
value expires one request makes it and the others serve the stale one (or, with none yet, wait)."""


def _every(kind: str, engine: sa.Engine, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(`fn()`, 0), or (its answer of less than SLOW_PANEL_S ago for the same database, its age in s).

    `fn` runs once at a time per (kind, database): a request that finds the value expired while
    another is making it answers the expired value with its age; one that finds none waits."""
    key = (kind, str(engine.url))
    with _slow_lock:
        hit = _slow.get(key)
        making = _making.setdefault(key, threading.Lock())
    if hit is not None and time.monotonic() - hit[0] < SLOW_PANEL_S:
        return hit[1], time.monotonic() - hit[0]
    if not making.acquire(blocking=hit is None):
        return hit[1], time.monotonic() - hit[0]  # another request is making it: the stale value meanwhile
    try:
        with _slow_lock:
            hit = _slow.get(key)
        if hit is not None and time.monotonic() - hit[0] < SLOW_PANEL_S:
            return hit[1], time.monotonic() - hit[0]  # made while this one waited
        started = time.monotonic()
        value = fn()
        with _slow_lock:
            _slow[key] = (started, value)
        return value, 0.0
    finally:
        making.release()


def overview(engine: sa.Engine, scope: Scope, *, settings: Any = None, registry: Any = None,
             redis_conn: Any = None) -> dict[str, Any]:
    """Every panel: the task table's on one connection; for an admin, the Redis queue
    lengths, the capacity report and the plan too (each `{"error": ...}` if it cannot be made)."""
    with engine.connect() as conn:
        now = db_now(conn)
        out: dict[str, Any] = {"now": _iso(now), "scope": {"tenant": scope.tenant, "admin": scope.admin}}
        for name, panel in PANELS.items():
            out[name] = panel(conn, scope, now)
    if scope.admin and registry is not None and out["workers"]:
        limits = {spec.name: spec.max_batch_size for spec in registry.all()}
        for w in out["workers"]:  # the batch size the registry allows beside the sizes it ran
            w["max_batch_size"] = limits.get(w["model"])
    if scope.admin:
        models = sorted({q["model"] for q in out["queue_depth"]}
                        | ({s.name for s in registry.all()} if registry is not None else set()))
        out["redis"] = _guard(lambda: redis_depth(redis_conn, models)) if redis_conn is not None else None
        if registry is not None:
            out["capacity"], age = _every("capacity", engine, lambda: _guard(lambda: capacity(engine, registry)))
            out["slow_age_s"] = {"capacity": age}
            if settings is not None:
                out["plan"], out["slow_age_s"]["plan"] = _every(
                    "plan", engine, lambda: _guard(lambda: placement_plan(settings, engine, registry)))
    return out


def _guard(fn: Callable[[], Any]) -> Any:
    """A system panel's data, or why it has none (Redis away, no devices declared...): the page
    shows the rest."""
    from llmos.errors import LLMOSError

    try:
        return fn()
    except (LLMOSError, OSError, ValueError) as exc:
        return {"error": " ".join(str(exc).split()) or type(exc).__name__}
    except Exception as exc:  # redis errors and the like: named, not raised
        if type(exc).__module__.startswith("redis"):
            return {"error": f"Redis: {' '.join(str(exc).split()) or type(exc).__name__}"}
        raise


def job_id_or_none(value: str) -> str | None:
    """`value` as a canonical job id, or None (then it names no job)."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return None


def timeline(engine: sa.Engine, scope: Scope, job_id: str) -> dict[str, Any] | None:
    """One job's whole timeline (primary key): created, queued, started, finished, the ETA against
    what happened; None if the scope has no such job."""
    jid = job_id_or_none(job_id)
    if jid is None:
        return None
    with engine.connect() as conn:
        now = db_now(conn)
        r = conn.execute(sa.select(jobs).where(jobs.c.id == jid, *scope.where())).first()
    if r is None:
        return None

    def gap(a: datetime | None, b: datetime | None) -> float | None:
        a, b = as_utc(a), as_utc(b)
        return None if a is None or b is None else (b - a).total_seconds()

    return {"id": str(r.id), "tenant": r.tenant, "model": r.model, "task": r.task_type, "status": r.status,
            "priority": r.priority, "attempts": r.attempts, "max_attempts": r.max_attempts, "error": r.error,
            "batch_id": r.batch_id, "worker_id": r.worker_id, "device": r.device, "batch_size": r.batch_size,
            "created_at": _iso(r.created_at), "queued_at": _iso(r.queued_at), "started_at": _iso(r.started_at),
            "finished_at": _iso(r.finished_at), "eta_start_at": _iso(r.eta_start_at),
            "eta_finish_at": _iso(r.eta_finish_at), "deadline": _iso(r.deadline), "now": _iso(now),
            "queue_wait_ms": r.queue_wait_ms, "compute_ms": r.compute_ms,
            # positive: later than predicted
            "start_vs_eta_s": gap(r.eta_start_at, r.started_at), "finish_vs_eta_s": gap(r.eta_finish_at, r.finished_at),
            "cancellable": r.status in ("queued", "running"), "retryable": r.status == "failed"}


def batch_tenant(engine: sa.Engine, batch_id: str) -> str | None:
    """The tenant of a batch (by primary key), or None: an admin's action names the batch alone."""
    if not isinstance(batch_id, str) or len(batch_id) > 64 or UNSTORABLE.search(batch_id):
        return None
    with engine.connect() as conn:
        return conn.execute(sa.select(batches.c.tenant).where(batches.c.id == batch_id)).scalar()


def job_tenant(engine: sa.Engine, job_id: str) -> str | None:
    """The tenant of a job (by primary key), or None."""
    jid = job_id_or_none(job_id)
    if jid is None:
        return None
    with engine.connect() as conn:
        return conn.execute(sa.select(jobs.c.tenant).where(jobs.c.id == jid)).scalar()
