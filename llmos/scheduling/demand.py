"""Each model's measured load, read from the task table in a few aggregate queries.

What a worker records (workers/worker.py, workers/batcher.py): every job of a batch gets the
batch's `compute_ms` (the time of the whole batch) and its `batch_size`, so one job's share of
a worker's time is compute_ms / batch_size, and the sum of the shares over the jobs of a window
is the time workers were busy. The service time per job is the mean share (at the batch sizes
seen), μ = 1 / that; c_s² is the squared coefficient of variation of the shares.

Every query is bounded by the window on an indexed column, so it reads the jobs of the window,
never the whole table (ten million finished rows cost the same as none):
- finished jobs: `finished_at >= cutoff` (ix_jobs_finished_at_id, partial over finished rows);
- queued jobs: `status = 'queued'` (ix_jobs_queued_order, partial; model, priority and
  queued_at are in it, so Postgres answers from the index alone);
- running jobs: `status = 'running'` (ix_jobs_open_status_model): as many as workers hold.
Arrivals are the jobs created in the window: those finished since the cutoff and created after
it, plus the open ones queued (or created) after it; their inter-arrival gaps give c_a².
"""

from __future__ import annotations

import dataclasses
import statistics
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from llmos import manager
from llmos.db import jobs, workers
from llmos.jobs import JobStatus

DEFAULT_COLD_START_S = 20.0
"""A model's cold start (process start to model loaded) before any worker of it was measured."""
COLD_START_LOOKBACK_S = 7 * 86_400.0
"""Worker rows started within this long count toward the measured cold start."""
LIVE_WITHIN_S = 30.0
"""A worker that heartbeated within this long (database clock) is live (the reconciler's default)."""


@dataclasses.dataclass(frozen=True)
class ModelDemand:
    """One model's load over a window. Rates per second, times in seconds.

    `service_s_per_job` and `mu_per_s` are None when no job of the model finished with a compute
    time in the window; `ca2`, `cs2` are 1.0 (exponential) when fewer than two samples exist.
    `last_used`: the latest start of one of its jobs within the window (None: none started in it).
    `backlog_by_priority`: (priority, queued jobs) pairs, highest priority first.
    """

    model: str
    backlog: int = 0
    running: int = 0
    arrivals_per_s: float = 0.0
    service_s_per_job: float | None = None
    mu_per_s: float | None = None
    ca2: float = 1.0
    cs2: float = 1.0
    measured_wait_s: float | None = None
    cold_start_s: float = DEFAULT_COLD_START_S
    workers: int = 0
    last_used: datetime | None = None
    finished: int = 0
    backlog_by_priority: tuple[tuple[int, int], ...] = ()

    @property
    def busy(self) -> bool:
        """Work waits or runs."""
        return self.backlog > 0 or self.running > 0

    def backlog_weight(self) -> float:
        """The backlog weighted by priority (a priority-p job counts 1 + p/9): the planner's
        tie-break between models of equal measured need."""
        if not self.backlog_by_priority:
            return float(self.backlog)
        return sum(n * (1.0 + p / 9.0) for p, n in self.backlog_by_priority)


def _epoch(column: Any, dialect: str) -> Any:
    """Seconds since the epoch of a timestamp column, in SQL."""
    if dialect == "postgresql":
        return sa.extract("epoch", column)
    return (sa.func.julianday(column) - 2440587.5) * 86400.0


def model_demand(engine: sa.Engine, *, window_s: float = 600.0, now: datetime | None = None,
                 live_within_s: float = LIVE_WITHIN_S) -> dict[str, ModelDemand]:
    """Each model's demand over the last `window_s` seconds (database clock unless `now` is given).

    Models appear when they have jobs in the window, queued or running jobs, or live workers.
    """
    dialect = engine.dialect.name
    with engine.connect() as conn:
        now = manager.as_utc(now) if now is not None else manager.db_now(conn)
        cutoff = now - timedelta(seconds=window_s)
        finished = _finished(conn, cutoff, now)
        queued = _queued(conn, cutoff)
        running = _running(conn, cutoff)
        gaps = _gaps(conn, cutoff, now, dialect)
        cold = _cold_starts(conn, now)
        live = _live_workers(conn, now, live_within_s)

    models = set(finished) | set(queued) | set(running) | set(live)
    out: dict[str, ModelDemand] = {}
    for model in sorted(models):
        f = finished.get(model, {})
        q = queued.get(model, {})
        r = running.get(model, {})
        arrivals = f.get("arrived", 0) + q.get("arrived", 0) + r.get("arrived", 0)
        service = mu = None
        cs2 = 1.0
        n_timed = f.get("n_timed", 0)
        if n_timed and f.get("sum_x"):
            mean_x = f["sum_x"] / n_timed
            service = mean_x / 1000.0
            mu = 1.0 / service if service > 0 else None
            if n_timed >= 2 and mean_x > 0:
                cs2 = _scv(n_timed, f["sum_x"], f["sum_x2"])
        ca2 = 1.0
        g = gaps.get(model)
        if g and g[0] >= 2 and g[1] > 0:
            ca2 = _scv(*g)
        last = max((t for t in (f.get("last_start"), r.get("last_start")) if t is not None), default=None)
        by_priority = tuple(sorted(q.get("by_priority", {}).items(), reverse=True))
        out[model] = ModelDemand(
            model=model, backlog=q.get("n", 0), running=r.get("n", 0),
            arrivals_per_s=arrivals / window_s if window_s > 0 else 0.0,
            service_s_per_job=service, mu_per_s=mu, ca2=ca2, cs2=cs2,
            measured_wait_s=f["sum_wait"] / f["n_wait"] / 1000.0 if f.get("n_wait") else None,
            cold_start_s=cold.get(model, DEFAULT_COLD_START_S), workers=live.get(model, 0),
            last_used=manager.as_utc(last), finished=f.get("n", 0), backlog_by_priority=by_priority)
    return out


def _scv(n: float, total: float, total_sq: float) -> float:
    """Squared coefficient of variation from n, Σx and Σx² (sample variance)."""
    mean = total / n
    var = max(0.0, (total_sq - n * mean * mean) / (n - 1))
    return var / (mean * mean) if mean > 0 else 1.0


def _finished(conn: sa.Connection, cutoff: datetime, now: datetime) -> dict[str, dict]:
    share = jobs.c.compute_ms / sa.func.coalesce(jobs.c.batch_size, 1)  # one job's share of the batch
    q = (sa.select(jobs.c.model, sa.func.count(),
                   sa.func.count(jobs.c.compute_ms), sa.func.sum(share), sa.func.sum(share * share),
                   sa.func.count(jobs.c.queue_wait_ms), sa.func.sum(jobs.c.queue_wait_ms),
                   sa.func.max(jobs.c.started_at),
                   sa.func.count().filter(jobs.c.created_at >= cutoff))
         .where(jobs.c.finished_at >= cutoff, jobs.c.finished_at <= now)
         .group_by(jobs.c.model))
    return {m: dict(n=n, n_timed=nt, sum_x=float(sx or 0.0), sum_x2=float(sx2 or 0.0), n_wait=nw,
                    sum_wait=float(sw or 0.0), last_start=ls, arrived=arr)
            for m, n, nt, sx, sx2, nw, sw, ls, arr in conn.execute(q)}


def _status_is(status: JobStatus) -> Any:
    # a literal, not a parameter: the partial indexes' predicate then matches in every plan
    return jobs.c.status == sa.literal_column(f"'{status.value}'")


def _queued(conn: sa.Connection, cutoff: datetime) -> dict[str, dict]:
    q = (sa.select(jobs.c.model, jobs.c.priority, sa.func.count(),
                   sa.func.count().filter(jobs.c.queued_at >= cutoff))
         .where(_status_is(JobStatus.QUEUED)).group_by(jobs.c.model, jobs.c.priority))
    out: dict[str, dict] = {}
    for model, priority, n, arrived in conn.execute(q):
        d = out.setdefault(model, {"n": 0, "arrived": 0, "by_priority": {}})
        d["n"] += n
        d["arrived"] += arrived
        d["by_priority"][int(priority)] = n
    return out


def _running(conn: sa.Connection, cutoff: datetime) -> dict[str, dict]:
    q = (sa.select(jobs.c.model, sa.func.count(), sa.func.count().filter(jobs.c.created_at >= cutoff),
                   sa.func.max(jobs.c.started_at))
         .where(_status_is(JobStatus.RUNNING)).group_by(jobs.c.model))
    return {m: dict(n=n, arrived=arr, last_start=ls) for m, n, arr, ls in conn.execute(q)}


def _gaps(conn: sa.Connection, cutoff: datetime, now: datetime, dialect: str) -> dict[str, tuple[int, float, float]]:
    """model → (gaps, Σgap, Σgap²) of the inter-arrival times (seconds) of the window's arrivals."""
    parts = [
        sa.select(jobs.c.model.label("model"), _epoch(jobs.c.created_at, dialect).label("t"))
        .where(jobs.c.finished_at >= cutoff, jobs.c.finished_at <= now, jobs.c.created_at >= cutoff),
        sa.select(jobs.c.model, _epoch(jobs.c.queued_at, dialect))
        .where(_status_is(JobStatus.QUEUED), jobs.c.queued_at >= cutoff),
        sa.select(jobs.c.model, _epoch(jobs.c.created_at, dialect))
        .where(_status_is(JobStatus.RUNNING), jobs.c.created_at >= cutoff),
    ]
    arrivals = sa.union_all(*parts).subquery("arrivals")
    gap = (arrivals.c.t - sa.func.lag(arrivals.c.t).over(partition_by=arrivals.c.model,
                                                         order_by=arrivals.c.t)).label("gap")
    gaps = sa.select(arrivals.c.model, gap).subquery("gaps")
    q = (sa.select(gaps.c.model, sa.func.count(gaps.c.gap), sa.func.sum(gaps.c.gap),
                   sa.func.sum(gaps.c.gap * gaps.c.gap))
         .group_by(gaps.c.model))
    return {m: (int(n), float(s or 0.0), float(s2 or 0.0)) for m, n, s, s2 in conn.execute(q)}


def _cold_starts(conn: sa.Connection, now: datetime) -> dict[str, float]:
    """model → median cold start (ready_at - started_at, seconds) of its recent workers."""
    q = (sa.select(workers.c.model, workers.c.started_at, workers.c.ready_at)
         .where(workers.c.ready_at.is_not(None),
                workers.c.last_heartbeat >= now - timedelta(seconds=COLD_START_LOOKBACK_S)))
    samples: dict[str, list[float]] = {}
    for model, started, ready in conn.execute(q):
        s = (manager.as_utc(ready) - manager.as_utc(started)).total_seconds()
        if s >= 0:
            samples.setdefault(model, []).append(s)
    return {m: statistics.median(v) for m, v in samples.items()}


def _live_workers(conn: sa.Connection, now: datetime, within_s: float) -> dict[str, int]:
    q = (sa.select(workers.c.model, sa.func.count())
         .where(workers.c.stopped_at.is_(None),
                workers.c.last_heartbeat >= now - timedelta(seconds=within_s))
         .group_by(workers.c.model))
    return {m: int(n) for m, n in conn.execute(q)}


def live_worker_counts(engine: sa.Engine, *, within_s: float = LIVE_WITHIN_S) -> dict[tuple[str, str, str], int]:
    """(host, device, model) → live workers (the planner's `running`, per host)."""
    out: dict[tuple[str, str, str], int] = {}
    for w in manager.live_workers(engine, within_s=within_s):
        key = (w["host"], w["device"], w["model"])
        out[key] = out.get(key, 0) + 1
    return out
