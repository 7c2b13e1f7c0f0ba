"""The Prometheus collector of `GET /metrics`: every figure read from the task table and Redis at scrape time.

Nothing is kept per process (no counter incremented in memory): each scrape reads the shared
state, so every API process answers the same numbers. Finished jobs come from
`llmos.rollup` (the rollup below its watermark + the live tail, one snapshot; ended
webhook deliveries likewise); the jobs not final, the pending deliveries and the workers from
small partial indexes; queue depths from Redis; capacity from `llmos.scheduling.capacity` (cached a few
seconds). docs/monitoring.md lists every metric, its labels and the index that serves it.

A scrape never fails for a service that does not answer: `llmos_up{component}` says which one
is down and the metrics of the others are still reported.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import redis
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from llmos import manager
from llmos.db import ROLLUP_HISTOGRAMS, jobs, rollup_bucket_column
from llmos.dispatch import queue_lengths
from llmos.errors import LLMOSError
from llmos.jobs import JobStatus
from llmos.logs import event
from llmos import rollup
from llmos.scheduling.capacity import capacity_report

log = logging.getLogger("llmos.monitoring")

CAPACITY_CACHE_S = 10.0
"""The capacity figures (a few aggregate queries over the last window) are read at most this often."""

CAPACITY_WINDOW_S = 600.0
"""The window the capacity figures are measured over (`llmos capacity`'s default)."""

HISTOGRAMS = {  # rollup histogram → (metric name, help)
    "queue_wait": ("llmos_job_queue_wait_seconds", "Time jobs waited from queued to started (jobs that started)."),
    "compute": ("llmos_job_compute_seconds",
                "Wall time of the batch each job ran in (preprocess, forward, postprocess)."),
    "latency": ("llmos_job_latency_seconds", "End to end: created to finished, every finished job."),
    "batch_size": ("llmos_job_batch_size", "Jobs in the forward batch each job ran in."),
}

METRIC_NAMES = frozenset({
    "llmos_up", "llmos_jobs_total", "llmos_job_retries_total", "llmos_tokens_in_total", "llmos_tokens_out_total",
    *(name for name, _ in HISTOGRAMS.values()),
    "llmos_jobs_unfinished", "llmos_queue_messages", "llmos_workers_alive",
    "llmos_webhook_failures_total", "llmos_webhook_given_up_total", "llmos_webhook_delivered_total",
    "llmos_webhook_pending", "llmos_model_utilization", "llmos_model_predicted_wait_seconds",
    "llmos_rollup_folded_to_timestamp_seconds", "llmos_rollup_tail_jobs",
})
"""Every metric family the collector emits (the names the exposition shows, with a counter's
_total and a histogram's _bucket/_sum/_count added); the dashboard test checks its queries use these."""


def _le(bound: float) -> str:
    return f"{bound:g}" if bound != int(bound) else f"{float(bound):.1f}"


class LlmosCollector(Collector):
    """Reads every metric at collect time; `engine`, `redis_client` and `models` are callables so
    that a scrape uses the API's current client (a stopped Redis, a replaced engine)."""

    def __init__(self, engine: Callable[[], sa.Engine], redis_client: Callable[[], redis.Redis],
                 models: Callable[[], Iterable[str]], *, live_within_s: float = 30.0, refresh: bool = True,
                 lag_s: float = rollup.LAG_S) -> None:
        self.engine, self.redis, self.models = engine, redis_client, models
        self.live_within_s, self.refresh, self.lag_s = live_within_s, refresh, lag_s
        self._capacity: tuple[float, list[dict[str, Any]]] | None = None
        self._capacity_lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []  # no query at registration; names are METRIC_NAMES

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("llmos_up", "Whether the service answered this scrape (1) or not (0).",
                               labels=["component"])
        out: list[Metric] = []
        models = set(self.models())
        db_ok, engine = True, None
        try:
            engine = self.engine()
            out.extend(self._database(engine, models))
        except (sa.exc.SQLAlchemyError, LLMOSError) as exc:
            db_ok = False
            event(log, "metrics_database_unavailable", logging.WARNING, error=type(exc).__name__)
        up.add_metric(["database"], 1.0 if db_ok else 0.0)
        try:
            out.append(self._queues(sorted(models)))
            redis_ok = True
        except (redis.exceptions.RedisError, OSError) as exc:
            redis_ok = False
            event(log, "metrics_redis_unavailable", logging.WARNING, error=type(exc).__name__)
        up.add_metric(["redis"], 1.0 if redis_ok else 0.0)
        if db_ok and engine is not None:
            try:
                out.extend(self._capacity_metrics(engine))
            except (sa.exc.SQLAlchemyError, LLMOSError) as exc:
                event(log, "metrics_capacity_failed", logging.WARNING, error=type(exc).__name__)
        return [up, *out]

    # -- the task table ---------------------------------------------------------------------

    def _database(self, engine: sa.Engine, models: set[str]) -> list[Metric]:
        if self.refresh:
            try:
                rollup.refresh(engine, lag_s=self.lag_s)
            except sa.exc.OperationalError as exc:  # a lock wait over busy_timeout (SQLite): the tail covers it
                event(log, "metrics_rollup_refresh_failed", logging.WARNING, error=type(exc).__name__)
        with rollup.snapshot(engine) as conn, conn.begin():
            totals = rollup.totals(conn)
            unfinished = _unfinished(conn)
        alive = manager.live_workers(engine, within_s=self.live_within_s)
        models.update(k[0] for k in totals.by_key)
        models.update(r[0] for r in unfinished)
        models.update(w["model"] for w in alive)
        return [*_finished_metrics(totals), _unfinished_metric(unfinished), _workers_metric(alive),
                *_webhook_metrics(totals.webhooks), *_rollup_metrics(totals)]

    # -- Redis ------------------------------------------------------------------------------

    def _queues(self, models: Sequence[str]) -> Metric:
        """Messages in each priority list of each model's queue (a bulk submit's message holds up
        to max_batch_size job ids): LLEN of ten lists per model, one round trip."""
        g = GaugeMetricFamily("llmos_queue_messages", "Messages waiting in each model's queue, per priority "
                              "(0-9, 9 most urgent), in Redis.", labels=["model", "priority"])
        if not models:
            return g
        for (model, priority), n in queue_lengths(self.redis(), models).items():
            g.add_metric([model, str(priority)], float(n))
        return g

    # -- llmos.scheduling -------------------------------------------------------------------

    def _capacity_metrics(self, engine: sa.Engine) -> list[Metric]:
        with self._capacity_lock:
            now = time.monotonic()
            if self._capacity is None or now - self._capacity[0] > CAPACITY_CACHE_S:
                self._capacity = (now, capacity_report(engine, window_s=CAPACITY_WINDOW_S))
            rows = self._capacity[1]
        util = GaugeMetricFamily("llmos_model_utilization", "Offered load per live worker, ρ = λ/(c·μ), over "
                                 "the last 10 minutes (llmos capacity); ≥ 1: the queue grows.", labels=["model"])
        wait = GaugeMetricFamily("llmos_model_predicted_wait_seconds", "Predicted mean queue wait (Erlang C "
                                 "with Allen–Cunneen's correction, llmos capacity); +Inf: the queue grows.",
                                 labels=["model"])
        for r in rows:
            if r["utilization"] is not None:
                util.add_metric([r["model"]], float(r["utilization"]))
            if r["mu_per_s"] is not None:
                w = r["mean_wait_corrected_s"]
                wait.add_metric([r["model"]], math.inf if w is None else float(w))
        return [util, wait]


def _finished_metrics(totals: rollup.Totals) -> list[Metric]:
    labels = ["model", "task", "tenant"]
    jobs_total = CounterMetricFamily("llmos_jobs", "Finished jobs by final status (succeeded, failed, cancelled, "
                                     "expired).", labels=[*labels, "status"])
    retries = CounterMetricFamily("llmos_job_retries", "Attempts beyond the first of finished jobs "
                                  "(a worker lost, a transient failure).", labels=labels)
    tin = CounterMetricFamily("llmos_tokens_in", "Input tokens of finished jobs (after truncation).", labels=labels)
    tout = CounterMetricFamily("llmos_tokens_out", "Generated tokens of finished jobs.", labels=labels)
    per_task: dict[tuple[str, str], dict[str, float]] = {}
    per_tenant: dict[tuple[str, str, str], dict[str, float]] = {}
    for (model, task, tenant, status), v in sorted(totals.by_key.items()):
        jobs_total.add_metric([model, task, tenant, status], v["jobs"])
        for into in (per_task.setdefault((model, task), {}), per_tenant.setdefault((model, task, tenant), {})):
            for c, x in v.items():
                into[c] = into.get(c, 0.0) + x
    for key, v in sorted(per_tenant.items()):
        retries.add_metric(list(key), v["retries"])
        tin.add_metric(list(key), v["tokens_in"])
        tout.add_metric(list(key), v["tokens_out"])
    out: list[Metric] = [jobs_total, retries, tin, tout]
    for name, (metric, help_text) in HISTOGRAMS.items():
        h = HistogramMetricFamily(metric, help_text, labels=["model", "task"])
        bounds = ROLLUP_HISTOGRAMS[name]
        for (model, task), v in sorted(per_task.items()):
            buckets = [(_le(b), v[rollup_bucket_column(name, i)]) for i, b in enumerate(bounds)]
            buckets.append(("+Inf", v[f"{name}_n"]))
            h.add_metric([model, task], buckets, sum_value=v[f"{name}_sum"])
        out.append(h)
    return out


UNFINISHED_STATES = ("queued", "retry_wait", "running")


def _unfinished(conn: sa.Connection) -> list[tuple[str, str, str, int, str, int]]:
    """(model, task, tenant, priority, state, jobs) of the jobs not final: `status IN ('queued',
    'running')`, literals so the partial indexes match (ix_jobs_open_status_model; the queued rows also
    ix_jobs_queued_order). retry_wait: queued, waiting out a retry backoff (run_after ahead)."""
    now = manager.sql_now(conn)
    state = sa.case((jobs.c.status == sa.literal_column("'running'"), "running"),
                    (sa.and_(jobs.c.run_after.is_not(None), jobs.c.run_after > now), "retry_wait"),
                    else_="queued").label("state")
    status_in = jobs.c.status.in_([sa.literal_column(f"'{s.value}'") for s in (JobStatus.QUEUED, JobStatus.RUNNING)])
    q = (sa.select(jobs.c.model, jobs.c.task_type, jobs.c.tenant, jobs.c.priority, state, sa.func.count())
         .where(status_in).group_by(jobs.c.model, jobs.c.task_type, jobs.c.tenant, jobs.c.priority, state))
    return [(m, t, ten, int(p), s, int(n)) for m, t, ten, p, s, n in conn.execute(q)]


def _unfinished_metric(rows: list[tuple[str, str, str, int, str, int]]) -> Metric:
    g = GaugeMetricFamily("llmos_jobs_unfinished", "Jobs not final, by state (not a job status): queued (waiting for a worker), "
                          "retry_wait (queued, backing off before a retry), running.",
                          labels=["model", "task", "tenant", "priority", "state"])
    for m, t, ten, p, s, n in sorted(rows):
        g.add_metric([m, t, ten, str(p), s], float(n))
    return g


def _workers_metric(alive: list[dict]) -> Metric:
    g = GaugeMetricFamily("llmos_workers_alive", "Workers that heartbeated within LLMOS_DEAD_AFTER_S and have "
                          "not stopped.", labels=["model", "device"])
    counts: dict[tuple[str, str], int] = {}
    for w in alive:
        counts[(w["model"], w["device"])] = counts.get((w["model"], w["device"]), 0) + 1
    for key, n in sorted(counts.items()):
        g.add_metric(list(key), float(n))
    return g


def _webhook_metrics(hooks: dict[str, rollup.Webhooks]) -> list[Metric]:
    failures = CounterMetricFamily("llmos_webhook_failures", "Webhook POSTs that failed (no answer or not 2xx).",
                                   labels=["tenant"])
    given_up = CounterMetricFamily("llmos_webhook_given_up", "Webhooks given up after failing for "
                                   "LLMOS_API_WEBHOOK_GIVE_UP_AFTER_S.", labels=["tenant"])
    delivered = CounterMetricFamily("llmos_webhook_delivered", "Webhooks delivered (a 2xx answer).",
                                    labels=["tenant"])
    pending = GaugeMetricFamily("llmos_webhook_pending", "Webhooks not yet delivered nor given up.",
                                labels=["tenant"])
    for tenant, w in sorted(hooks.items()):
        failures.add_metric([tenant], float(w.failures))
        given_up.add_metric([tenant], float(w.given_up))
        delivered.add_metric([tenant], float(w.delivered))
        pending.add_metric([tenant], float(w.pending))
    return [failures, given_up, delivered, pending]


def _rollup_metrics(totals: rollup.Totals) -> list[Metric]:
    folded = GaugeMetricFamily("llmos_rollup_folded_to_timestamp_seconds", "The rollup's watermark: finished jobs "
                               "before it are read from job_rollups (Unix time; 0: nothing folded yet).")
    folded.add_metric([], totals.folded_to.timestamp() if totals.folded_to is not None else 0.0)
    tail = GaugeMetricFamily("llmos_rollup_tail_jobs", "Finished jobs this scrape read live from the task table "
                             "(finished at or after the watermark).")
    tail.add_metric([], float(totals.tail_jobs))
    return [folded, tail]


def make_registry(collector: LlmosCollector) -> CollectorRegistry:
    """A registry of its own with only `collector` (no process or platform metrics of this
    process: they would differ between API processes)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
