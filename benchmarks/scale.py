"""The task table at scale: millions of finished jobs and a backlog of queued ones in Postgres,
and what the calls users and the reconciler make cost there.

    .venv/bin/python benchmarks/scale.py [--finished 10000000] [--queued 1000000] [--calls 300]
        [--submit-calls 100] [--passes 100] [--prune-batches 20] [--database llmos_scale]
        [--redis-url redis://127.0.0.1:6379/9] [--plans plans.txt] [--out results.json]
        [--keep] [--reuse]

1. Fill (the only hand-written SQL besides the sampling of ids): a fresh database `--database`
   at the revision before the scale indexes (0006), secondary indexes dropped, `--finished`
   finished jobs over 120 days
   (20 tenants, 3 models, submits of 1,000, a quarter of them batches, one in ten keyed; 2%
   failed, 1% cancelled, 1% expired), `--queued` queued jobs sent over the last hour (half in
   open batches, 5% with a deadline, 1% waiting out a retry), 1,000 running under 8 live workers,
   one queued job in each of 1% of the old finished batches (kept open), 20,000 worker rows of
   past workers (one in ten never recorded its stop); all by `generate_series` inside Postgres,
   then the indexes rebuilt, VACUUM ANALYZE and a CHECKPOINT (the fill's dirty pages written
   before anything is measured, as a table of months has them on disk); then the upgrade to head, timed: revision 0006
   builds its indexes CONCURRENTLY on the full table, as on a live one. Redis (`--redis-url`, only this run's keys are
   touched): every queued id in its model's pending set, and in each priority list its oldest
   message: what the reconciler reads of Redis (LLEN, LINDEX -1, SMISMEMBER) is then exactly
   what a full backlog shows it, without a million messages in memory.
2. Measured through the functions users and the reconciler call, each over `--calls` calls
   (p50/p95/p99, ms): `Client.job` (lookup by id), `manager.list_jobs` (a page of 100 as the API
   asks for it: the first page and pages behind a cursor at random depths; also one filtered on a
   rare status), `manager.batch_status_counts` (batches of 1,000); `Client.submit` of 1,000 jobs
   with idempotency keys (`--submit-calls`; fresh keys, then the same keys again);
   `Reconciler.run_once` (`--passes`; the live workers beat between passes, untimed; with each
   step of the pass timed on its own, `reconcile_steps_ms`: p50 / p95 / max a pass); retention:
   `manager.prune` batch by batch (`--prune-batches` batches of 5,000) and one reconciler pass
   with retention on; then a check that nothing queued, running or in an open batch went.
3. `EXPLAIN (ANALYZE, BUFFERS)` of every statement those calls issued (writes in a rolled-back
   transaction), to `--plans` (and the summary on stdout).

Prints one JSON object (`--out` too) and a table against the targets: lookup p95 < 5 ms, list page
p95 < 20 ms, keyed submit of 1,000 < 200 ms, reconciler pass < 500 ms. The database is dropped at
the end unless `--keep`; `--reuse` skips the fill of a kept one. Method and figures:
docs/benchmarks.md ("The task table at scale").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import uuid
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for key in [k for k in os.environ if k.startswith("LLMOS_")]:
    del os.environ[key]

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from llmos import manager, migrate  # noqa: E402
from llmos.constants import HELD_SET_PREFIX, PENDING_SET_PREFIX, QUEUE_PREFIX  # noqa: E402
from llmos.db import dispose_engines, get_engine  # noqa: E402
from llmos.dispatch import CeleryDispatcher, pending_set, queue_key  # noqa: E402
from llmos.jobs import JobStatus  # noqa: E402
from llmos import reconciler as reconciler_module  # noqa: E402
from llmos.reconciler import Reconciler  # noqa: E402
from llmos.sdk import Client  # noqa: E402
from llmos.settings import Settings  # noqa: E402
from llmos.tasks import SentimentTask  # noqa: E402

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/"
MODELS = ("minilm", "scale-b", "scale-c")
"""Models of the synthetic jobs; `minilm` is also the registered model the submits use."""
TENANTS = 20
BLOCK = 1000
"""Jobs per synthetic submit (and per batch)."""
SPAN_DAYS = 120
PAST_WORKERS = 20_000
LIVE_WORKERS = 8
RUNNING = 1000
PAGE = 101
"""Rows a list page reads: the API asks for limit + 1 to know whether there is a next page."""
SCALE_REVISION = "0006"
"""The revision that adds the indexes these queries need."""
TARGETS = {"lookup_ms": 5.0, "list_page_ms": 20.0, "keyed_submit_ms": 200.0, "reconcile_pass_ms": 500.0}
"""p95 targets (ms) of the issue."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pcts(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    at = lambda q: round(s[min(len(s) - 1, int(q * len(s)))], 2)  # noqa: E731
    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "n": len(s)}


def timed(fn: Callable[[Any], Any], args: list[Any], between: Callable[[], None] | None = None) -> list[float]:
    """Milliseconds of `fn(a)` for each of `args` (`between` runs untimed after each call)."""
    out = []
    for a in args:
        t = time.perf_counter()
        fn(a)
        out.append((time.perf_counter() - t) * 1000)
        if between:
            between()
    return out


# -- the fill --------------------------------------------------------------------------------

FINISHED_SQL = f"""
INSERT INTO jobs (id, model, task_type, priority, status, input, result, error, attempts, max_attempts,
                  tenant, idempotency_key, batch_id, created_at, queued_at, started_at, finished_at,
                  queue_wait_ms, compute_ms, batch_size, tokens_in, worker_id, device, dispatched_at, finishes)
SELECT gen_random_uuid(), (ARRAY{list(MODELS)})[1 + mod((i / {BLOCK}), 3)], 'sentiment', 4 + mod(i, 3), s.status,
       jsonb_build_object('text', 'review number ' || i),
       CASE WHEN s.status = 'succeeded' THEN '{{"label": "POSITIVE", "score": 0.98}}'::jsonb END,
       CASE s.status WHEN 'failed' THEN 'runner error: input too long'
                     WHEN 'cancelled' THEN 'cancelled by user'
                     WHEN 'expired' THEN 'expired: its deadline passed before it started' END,
       1, 3, 'tenant-' || mod((i / {BLOCK}), {TENANTS}), CASE WHEN mod(i, 10) = 0 THEN 'key-' || i END,
       CASE WHEN mod((i / {BLOCK}), 4) = 0 THEN 'batch-' || i / {BLOCK} END,
       t.at, t.at, t.at + interval '200 ms', t.at + interval '400 ms', 200, 180, 32, 33,
       'scale-w-' || (i * {PAST_WORKERS}::bigint / %(total)s), 'cpu', t.at, 1
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i,
     LATERAL (SELECT %(t0)s::timestamptz + (i::float8 / %(total)s) * %(span)s * interval '1 second' AS at) t,
     LATERAL (SELECT CASE WHEN mod(i, 50) = 0 THEN 'failed' WHEN mod(i, 97) = 0 THEN 'cancelled'
                          WHEN mod(i, 89) = 0 THEN 'expired' ELSE 'succeeded' END AS status) s
"""

QUEUED_SQL = f"""
INSERT INTO jobs (id, model, task_type, priority, status, input, attempts, max_attempts, tenant,
                  idempotency_key, batch_id, created_at, queued_at, dispatched_at, deadline, run_after,
                  error, finishes)
SELECT gen_random_uuid(), (ARRAY{list(MODELS)})[1 + mod((j / {BLOCK}), 3)], 'sentiment',
       CASE WHEN mod(j, 7) = 0 THEN 8 WHEN mod(j, 5) = 0 THEN 2 ELSE 5 END, 'queued',
       jsonb_build_object('text', 'queued review ' || j), CASE WHEN mod(j, 100) = 0 THEN 1 ELSE 0 END, 3,
       'tenant-' || mod((j / {BLOCK}), {TENANTS}), CASE WHEN mod(j, 10) = 0 THEN 'qkey-' || j END,
       CASE WHEN mod((j / {BLOCK}), 2) = 0 THEN 'qbatch-' || j / {BLOCK} END, t.at, t.at, t.at,
       CASE WHEN mod(j, 20) = 0 THEN now() + interval '1 day' END,
       CASE WHEN mod(j, 100) = 0 THEN now() + interval '1 hour' END,
       CASE WHEN mod(j, 100) = 0 THEN 'attempt 1 failed, retrying: connection reset' END, 0
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS j,
     LATERAL (SELECT now() - interval '60 minutes' + (j::float8 / %(total)s) * interval '55 minutes' AS at) t
"""

# One queued job (requeued a minute ago) in each of 1% of the old finished batches: open batches.
STRAGGLERS_SQL = f"""
INSERT INTO jobs (id, model, task_type, priority, status, input, attempts, max_attempts, tenant, batch_id,
                  created_at, queued_at, dispatched_at, error, finishes)
SELECT gen_random_uuid(), (ARRAY{list(MODELS)})[1 + mod(b, 3)], 'sentiment', 5, 'queued',
       jsonb_build_object('text', 'straggler ' || b), 1, 3, 'tenant-' || mod(b, {TENANTS}), 'batch-' || b,
       %(t0)s::timestamptz + (b::float8 * {BLOCK} / %(total)s) * %(span)s * interval '1 second',
       now() - interval '1 minute', now() - interval '1 minute', 'worker scale-w-0 lost during attempt 1', 0
FROM generate_series(4, %(blocks)s - 1, 100) AS b
"""

RUNNING_SQL = f"""
INSERT INTO jobs (id, model, task_type, priority, status, input, attempts, max_attempts, tenant,
                  created_at, queued_at, started_at, dispatched_at, worker_id, device, finishes)
SELECT gen_random_uuid(), (ARRAY{list(MODELS)})[1 + mod((mod(k, {LIVE_WORKERS})), 3)], 'sentiment', 5, 'running',
       jsonb_build_object('text', 'running ' || k), 1, 3, 'tenant-' || mod(k, {TENANTS}),
       now() - interval '1 minute', now() - interval '1 minute', now() - interval '1 second',
       now() - interval '1 minute', 'scale-live-' || mod(k, {LIVE_WORKERS}), 'cpu', 0
FROM generate_series(0, {RUNNING - 1}) AS k
"""

WORKERS_SQL = f"""
INSERT INTO workers (id, host, pid, model, device, started_at, last_heartbeat, stopped_at)
SELECT 'scale-w-' || n, 'host-' || mod(n, 16), 1000 + n, (ARRAY{list(MODELS)})[1 + mod(n, 3)], 'cpu', w.started,
       w.started + %(slot)s * interval '1 second',
       CASE WHEN mod(n, 10) <> 0 THEN w.started + %(slot)s * interval '1 second' END
FROM generate_series(0, {PAST_WORKERS - 1}) AS n,
     LATERAL (SELECT %(t0)s::timestamptz + n * %(slot)s * interval '1 second' AS started) w
UNION ALL
SELECT 'scale-live-' || k, 'host-live', 100 + k, (ARRAY{list(MODELS)})[1 + mod(k, 3)], 'cpu',
       now() - interval '1 hour', now(), NULL
FROM generate_series(0, {LIVE_WORKERS - 1}) AS k
"""


def secondary_indexes(conn: sa.Connection, table: str) -> list[tuple[str, str, str | None]]:
    """(name, CREATE INDEX statement or constraint definition, constraint name) of `table`'s
    indexes other than its primary key."""
    rows = conn.execute(sa.text("""
        SELECT i.relname, pg_get_indexdef(i.oid), c.conname, pg_get_constraintdef(c.oid)
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
        LEFT JOIN pg_constraint c ON c.conindid = i.oid AND c.contype = 'u'
        WHERE t.relname = :t AND NOT x.indisprimary ORDER BY i.relname"""), {"t": table}).all()
    return [(name, cdef if con else idef, con) for name, idef, con, cdef in rows]


def fill(url: str, finished: int, queued: int) -> dict:
    """The synthetic task table (see the module doc); returns what it took."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    out: dict[str, float] = {}
    span = SPAN_DAYS * 86400.0
    with engine.connect() as conn:
        conn.execute(sa.text("SET maintenance_work_mem = '512MB'"))
        t0 = conn.execute(sa.text(f"SELECT now() - interval '{SPAN_DAYS} days' - interval '1 hour'")).scalar_one()
        indexes = {t: secondary_indexes(conn, t) for t in ("jobs", "workers")}
        for table, idx in indexes.items():
            for name, _, con in idx:
                conn.execute(sa.text(f'ALTER TABLE {table} DROP CONSTRAINT "{con}"' if con else f'DROP INDEX "{name}"'))
        started = time.perf_counter()
        step = 1_000_000
        for lo in range(1, finished + 1, step):
            hi = min(finished, lo + step - 1)
            conn.exec_driver_sql(FINISHED_SQL, dict(lo=lo, hi=hi, total=finished, t0=t0, span=span))
            log(f"  finished jobs {hi:,} / {finished:,}")
        for lo in range(1, queued + 1, step):
            hi = min(queued, lo + step - 1)
            conn.exec_driver_sql(QUEUED_SQL, dict(lo=lo, hi=hi, total=queued))
        conn.exec_driver_sql(STRAGGLERS_SQL, dict(t0=t0, total=finished, span=span, blocks=finished // BLOCK))
        conn.exec_driver_sql(RUNNING_SQL)
        conn.exec_driver_sql(WORKERS_SQL, dict(t0=t0, slot=span / PAST_WORKERS))
        out["insert_s"] = round(time.perf_counter() - started, 1)
        log(f"  rows written in {out['insert_s']} s; building {sum(map(len, indexes.values()))} indexes")
        started = time.perf_counter()
        for table, idx in indexes.items():
            for name, definition, con in idx:
                t = time.perf_counter()
                conn.execute(sa.text(f'ALTER TABLE {table} ADD CONSTRAINT "{con}" {definition}' if con else definition))
                log(f"    {name}: {time.perf_counter() - t:.1f} s")
        out["index_build_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        conn.execute(sa.text("VACUUM (ANALYZE) jobs"))
        conn.execute(sa.text("VACUUM (ANALYZE) workers"))
        out["vacuum_s"] = round(time.perf_counter() - started, 1)
        # the fill's gigabytes of dirty pages written out now, not by the checkpointer during the
        # measurements (a database with months of rows has them on disk already)
        started = time.perf_counter()
        conn.execute(sa.text("CHECKPOINT"))
        out["checkpoint_s"] = round(time.perf_counter() - started, 1)
    engine.dispose()
    return out


def fill_revision() -> str:
    """The revision before the scale indexes (0006), so that the upgrade is measured at scale; the
    head where there is none (an older checkout)."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(migrate.alembic_config(""))
    head = scripts.get_current_head()
    return scripts.get_revision(head).down_revision if head == SCALE_REVISION else head


def sizes(engine: sa.Engine) -> dict:
    with engine.connect() as conn:
        heap, idx = conn.execute(sa.text(
            "SELECT pg_table_size('jobs'), pg_indexes_size('jobs')")).one()
        rows = dict(conn.execute(sa.text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
        nworkers = conn.execute(sa.text("SELECT count(*) FROM workers")).scalar_one()
    return {"jobs_table_gb": round(heap / 2**30, 2), "jobs_indexes_gb": round(idx / 2**30, 2),
            "rows": rows, "worker_rows": nworkers}


# -- Redis: what a backlog of this size shows the reconciler -----------------------------------

def our_keys(r: redis.Redis) -> list[bytes]:
    keys: list[bytes] = []
    for pattern in (f"{QUEUE_PREFIX}*", f"{PENDING_SET_PREFIX}*", f"{HELD_SET_PREFIX}*", "unacked*"):
        keys.extend(r.scan_iter(match=pattern, count=1000))
    return keys


def clear_redis(r: redis.Redis) -> None:
    keys = our_keys(r)
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i:i + 1000])


def seed_redis(engine: sa.Engine, r: redis.Redis, dispatcher: CeleryDispatcher) -> dict:
    """Every queued id in its model's pending set; the oldest message of each priority list."""
    clear_redis(r)
    started = time.perf_counter()
    n = 0
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=20_000).execute(
            sa.text("SELECT id::text, model FROM jobs WHERE status = 'queued'"))
        while chunk := result.fetchmany(20_000):
            pipe = r.pipeline(transaction=False)
            by_model: dict[str, list[str]] = {}
            for job_id, model in chunk:
                by_model.setdefault(model, []).append(job_id)
            for model, ids in by_model.items():
                pipe.sadd(pending_set(model), *ids)
            pipe.execute()
            n += len(chunk)
        oldest = conn.execute(sa.text("""
            SELECT DISTINCT ON (model, priority) id::text FROM jobs WHERE status = 'queued'
            ORDER BY model, priority, coalesce(dispatched_at, queued_at)""")).scalars().all()
    jobs = manager.get_jobs(engine, oldest, tenant=manager.ANY_TENANT).values()
    first: dict[str, Any] = {}  # per priority list, its oldest job
    for job in sorted(jobs, key=lambda j: j.dispatched_at or j.queued_at):
        first.setdefault(queue_key(job.model, job.priority), job)
    for key, job in first.items():
        k, payload = dispatcher.message([job])
        r.lpush(k, payload)
    return {"pending_ids": n, "lists": len(first), "seed_s": round(time.perf_counter() - started, 1)}


# -- EXPLAIN -----------------------------------------------------------------------------------

class Capture:
    """The statements an engine sends while active (executemany inserts and `SELECT now()` left out)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine, self.statements = engine, []

    def _on(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if not executemany and "now()" not in statement.replace(" ", "").lower()[:20]:
            self.statements.append((statement, parameters))

    def __enter__(self) -> "Capture":
        sa.event.listen(self.engine, "before_cursor_execute", self._on)
        return self

    def __exit__(self, *exc: Any) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._on)


class StepClock:
    """Milliseconds each step of the reconciler's pass took, pass by pass (the functions `_pass`
    calls, wrapped for the measured passes and put back after)."""

    STEPS = [("expire", manager, "expire_overdue"), ("requeue_dead", manager, "requeue_dead"),
             ("timed_out", manager, "fail_timed_out"), ("retries", manager, "due_retries"),
             ("aging", reconciler_module.aging, "run_once")]
    METHODS = [("lost_check", "_resend_lost"), ("rollup_fold", "_fold"), ("retention", "_retain")]

    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec
        self.ms: dict[str, list[float]] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_step(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.ms.setdefault(name, []).append((time.perf_counter() - t) * 1000)
        return timed_step

    def __enter__(self) -> "StepClock":
        for name, owner, attr in self.STEPS:
            self._saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, self._wrap(name, getattr(owner, attr)))
        for name, attr in self.METHODS:
            self._saved.append((self.rec, attr, None))
            setattr(self.rec, attr, self._wrap(name, getattr(self.rec, attr)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, fn in reversed(self._saved):
            if fn is None:
                delattr(owner, attr)  # the instance attribute: the class's method again
            else:
                setattr(owner, attr, fn)

    def summary(self) -> dict[str, list[float]]:
        out = {}
        for name, ms in self.ms.items():
            p = pcts(ms)
            out[name] = [p["p50"], p["p95"], round(max(ms), 1)]
        return out


def explain(engine: sa.Engine, what: str, call: Callable[[], Any], plans: list[str]) -> None:
    """Run `call` once capturing its statements, then EXPLAIN (ANALYZE, BUFFERS) each distinct one
    in a transaction that is rolled back."""
    with Capture(engine) as cap:
        call()
    seen = set()
    for statement, params in cap.statements:
        if statement in seen:
            continue
        seen.add(statement)
        with engine.connect() as conn:
            trans = conn.begin()
            try:
                lines = [r[0] for r in conn.exec_driver_sql(
                    "EXPLAIN (ANALYZE, BUFFERS) " + statement, params)]
            except sa.exc.DBAPIError as exc:
                lines = [f"(not explained: {str(exc.orig).splitlines()[0]})"]
            finally:
                trans.rollback()
        plans.append(f"--- {what}\n{short(statement)}\n" + "\n".join(short(line, 200) for line in lines))


def short(text: str, width: int | None = None) -> str:
    """A statement on one line with its long lists of parameters folded; a plan line cut at `width`."""
    text = re.sub(r"\(%\((\w+?)_1\)s(::\w+)?(, %\(\w+\)s(::\w+)?)+\)",
                  lambda m: f"(%({m.group(1)}_1)s, … {m.group(0).count('%(')} parameters)", text)
    text = re.sub(r"'\{[^}]{120,}\}'", lambda m: m.group(0)[:60] + "…}'", text)
    text = re.sub(r"SELECT (\w+)\.\w+(, \1\.\w+){9,} FROM", lambda m: f"SELECT {m.group(1)}.* FROM", text)
    if width is None:
        return " ".join(text.split())
    return text if len(text) <= width else text[:width] + " …"


# -- the measurements --------------------------------------------------------------------------

def sample(engine: sa.Engine, n: int, where: str = "TRUE") -> list[Any]:
    """About n random rows (id, tenant, created_at, batch_id, status): whole random pages."""
    with engine.connect() as conn:
        total = conn.execute(sa.text("SELECT reltuples FROM pg_class WHERE relname = 'jobs'")).scalar_one()
        pct = min(100.0, 100.0 * n * 40 / max(total, 1))
        return conn.execute(sa.text(
            f"SELECT id::text, tenant, created_at, batch_id, status FROM jobs TABLESAMPLE SYSTEM ({pct}) "
            f"WHERE {where} ORDER BY random() LIMIT {n}")).all()


def beat(engine: sa.Engine) -> None:
    for k in range(LIVE_WORKERS):
        manager.heartbeat(engine, f"scale-live-{k}")


def measure(url: str, redis_url: str, args: argparse.Namespace, plans: list[str]) -> dict:
    engine = get_engine(url)
    r = redis.Redis.from_url(redis_url)
    home = Path(tempfile.mkdtemp(prefix="llmos-scale-"))
    settings = Settings(home=home, database_url=url, redis_url=redis_url)
    out: dict[str, Any] = {}
    calls = args.calls
    beat(engine)
    dispatcher = CeleryDispatcher(settings)
    out["redis"] = seed_redis(engine, r, dispatcher)
    log(f"redis seeded: {out['redis']}")
    client = Client(settings)

    # lookups by id
    rows = sample(engine, calls)
    client.job(rows[0].id, tenant=rows[0].tenant)  # connection and registry warm
    out["lookup_ms"] = pcts(timed(lambda row: client.job(row.id, tenant=row.tenant), rows))
    explain(engine, "lookup by id: Client.job", lambda: client.job(rows[1].id, tenant=rows[1].tenant), plans)
    log(f"lookup: {out['lookup_ms']}")

    # list pages
    tenants = [f"tenant-{i % TENANTS}" for i in range(calls)]
    out["list_first_page_ms"] = pcts(timed(
        lambda t: manager.list_jobs(engine, tenant=t, limit=PAGE), tenants))
    rows = sample(engine, calls)
    page = lambda row: manager.list_jobs(engine, tenant=row.tenant, before=(row.created_at, row.id), limit=PAGE)  # noqa: E731
    out["list_page_ms"] = pcts(timed(page, rows))
    out["list_failed_page_ms"] = pcts(timed(lambda row: manager.list_jobs(
        engine, tenant=row.tenant, status=JobStatus.FAILED, before=(row.created_at, row.id), limit=PAGE), rows[:max(10, calls // 3)]))
    explain(engine, "list page behind a cursor: manager.list_jobs", lambda: page(rows[0]), plans)
    explain(engine, "list page filtered on status=failed", lambda: manager.list_jobs(
        engine, tenant=rows[1].tenant, status=JobStatus.FAILED, before=(rows[1].created_at, rows[1].id), limit=PAGE), plans)
    log(f"list: first {out['list_first_page_ms']}, cursor {out['list_page_ms']}, failed {out['list_failed_page_ms']}")

    # a batch's counts
    batches = sample(engine, calls, "batch_id IS NOT NULL")
    counts = lambda row: manager.batch_status_counts(engine, row.batch_id, tenant=row.tenant)  # noqa: E731
    out["batch_counts_ms"] = pcts(timed(counts, batches))
    explain(engine, "batch counts: manager.batch_status_counts", lambda: counts(batches[0]), plans)
    log(f"batch counts: {out['batch_counts_ms']}")

    # the reconciler's pass
    rec = Reconciler(settings, dispatcher=dispatcher, redis_conn=r)
    beat(engine)
    rec.run_once()  # warm (and the first pass's own work, if any)
    beat(engine)
    reports = []
    with StepClock(rec) as steps:
        out["reconcile_pass_ms"] = pcts(timed(lambda _: reports.append(rec.run_once()), range(args.passes),
                                              between=lambda: beat(engine)))
    out["reconcile_steps_ms"] = steps.summary()
    log(f"reconciler pass steps (ms a pass, p50 / p95 / max): {out['reconcile_steps_ms']}")
    out["reconcile_did"] = {k: sum(getattr(rp, k) for rp in reports) for k in vars(reports[0])}
    explain(engine, "reconciler pass: Reconciler.run_once", rec.run_once, plans)
    log(f"reconciler pass: {out['reconcile_pass_ms']}, did {out['reconcile_did']}")

    # keyed submits of 1,000 through the SDK
    clear_redis(r)
    tasks = [SentimentTask(text=f"scale review {k}") for k in range(BLOCK)]
    run = uuid.uuid4().hex[:8]  # keys new to this run, also on a kept database
    keys = lambda c: [f"scale-{run}-{c}-{k}" for k in range(BLOCK)]  # noqa: E731
    submit = lambda c: client.submit("minilm", tasks, idempotency_key=keys(c), tenant=f"tenant-{c % TENANTS}")  # noqa: E731
    warnings.simplefilter("ignore")
    submit(-1)
    clean = lambda: clear_redis(r)  # noqa: E731
    out["keyed_submit_ms"] = pcts(timed(submit, range(args.submit_calls), between=clean))
    out["keyed_resubmit_ms"] = pcts(timed(submit, range(args.submit_calls), between=clean))
    explain(engine, "keyed submit of 1,000 (new keys): Client.submit", lambda: submit(10**6), plans)
    clean()
    log(f"keyed submit: new {out['keyed_submit_ms']}, again {out['keyed_resubmit_ms']}")

    if hasattr(manager, "prune"):
        out.update(retention(engine, settings, dispatcher, r, args, plans))
    rec.close()
    client.close()
    clear_redis(r)
    return out


def retention(engine: sa.Engine, settings: Settings, dispatcher: CeleryDispatcher, r: redis.Redis,
              args: argparse.Namespace, plans: list[str]) -> dict:
    """`manager.prune` batch by batch, a reconciler pass with retention on, and what was kept."""
    out: dict[str, Any] = {}
    q_open = sa.text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
    q_kept = sa.text("""SELECT count(*) FROM jobs j WHERE j.batch_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM jobs o WHERE o.tenant = j.tenant AND o.batch_id = j.batch_id AND o.status IN ('queued', 'running'))""")
    with engine.connect() as conn:
        open_before, kept_before = conn.execute(q_open).scalar_one(), conn.execute(q_kept).scalar_one()
    older = timedelta(days=30)
    cursor, ms, deleted, kept = None, [], 0, 0
    started = time.perf_counter()
    for _ in range(args.prune_batches):
        t = time.perf_counter()
        report = manager.prune(engine, older, batch_size=5000, max_batches=1, cursor=cursor)
        ms.append((time.perf_counter() - t) * 1000)
        deleted, kept, cursor = deleted + report.jobs, kept + report.kept, report.cursor
        if report.done:
            break
    elapsed = time.perf_counter() - started
    out["prune_batch_ms"] = pcts(ms)
    out["prune_jobs_deleted"] = deleted
    out["prune_jobs_kept"] = kept  # old enough, but of an open batch
    out["prune_jobs_per_s"] = round(deleted / elapsed)
    explain(engine, "prune, one batch of 5,000: manager.prune",
            lambda: manager.prune(engine, older, batch_size=5000, max_batches=1, cursor=cursor), plans)
    seed_redis(engine, r, dispatcher)  # the submits' clean-up emptied it
    rec = Reconciler(settings.model_copy(update={"retention_days": 30.0}), dispatcher=dispatcher, redis_conn=r)
    beat(engine)
    rec.run_once()
    beat(engine)
    out["reconcile_pass_with_retention_ms"] = pcts(timed(lambda _: rec.run_once(), range(10), between=lambda: beat(engine)))
    with engine.connect() as conn:
        open_after, kept_after = conn.execute(q_open).scalar_one(), conn.execute(q_kept).scalar_one()
    out["prune_kept"] = {"queued_or_running": [open_before, open_after], "jobs_of_open_batches": [kept_before, kept_after],
                         "ok": open_after == open_before and kept_after == kept_before}
    log(f"prune: {out['prune_batch_ms']}, {deleted:,} jobs, kept {out['prune_kept']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finished", type=int, default=10_000_000)
    ap.add_argument("--queued", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=300, help="calls per read measurement")
    ap.add_argument("--submit-calls", type=int, default=100, help="keyed submits of 1,000 (then as many resubmits)")
    ap.add_argument("--passes", type=int, default=100, help="reconciler passes")
    ap.add_argument("--prune-batches", type=int, default=20, help="prune batches of 5,000 measured")
    ap.add_argument("--database", default="llmos_scale")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    ap.add_argument("--plans", type=Path, help="write every EXPLAIN here")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the database")
    ap.add_argument("--reuse", action="store_true", help="measure a kept database again (no fill)")
    args = ap.parse_args()
    started = time.perf_counter()
    admin = sa.create_engine(PG_SERVER + "postgres", isolation_level="AUTOCOMMIT")
    url = PG_SERVER + args.database
    with admin.connect() as c:
        exists = c.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": args.database}).first()
    result: dict[str, Any] = {"finished": args.finished, "queued": args.queued}
    if not (args.reuse and exists):
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)'))
            c.execute(sa.text(f'CREATE DATABASE "{args.database}"'))
        base = fill_revision()
        migrate.upgrade(url, base)
        log(f"filling {args.finished:,} finished + {args.queued:,} queued jobs at revision {base}")
        result["fill"] = fill(url, args.finished, args.queued)
    t = time.perf_counter()
    migrate.upgrade(url)  # the scale indexes built on the full table, as an upgrade builds them
    result["upgrade_s"] = round(time.perf_counter() - t, 1)
    log(f"upgraded to head in {result['upgrade_s']} s")
    result["size"] = sizes(get_engine(url))
    log(f"size: {result['size']}")
    plans: list[str] = []
    try:
        result.update(measure(url, args.redis_url, args, plans))
    finally:
        dispose_engines()
        if not args.keep:
            with admin.connect() as c:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)'))
        admin.dispose()
    result["total_s"] = round(time.perf_counter() - started, 1)
    if args.plans:
        args.plans.write_text("\n\n".join(plans) + "\n")
    text = json.dumps(result, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print_table(result)


def print_table(r: dict) -> None:
    print(f"\n{r['finished']:,} finished + {r['queued']:,} queued jobs, {r['total_s']} s in all")
    for key, target in TARGETS.items():
        if key in r:
            p95 = r[key]["p95"]
            print(f"  {key:<26} p50 {r[key]['p50']:>8} p95 {p95:>8}   target < {target:g}: "
                  f"{'met' if p95 < target else 'NOT met'}")
    for key in ("list_first_page_ms", "list_failed_page_ms", "batch_counts_ms", "keyed_resubmit_ms",
                "prune_batch_ms", "reconcile_pass_with_retention_ms"):
        if key in r:
            print(f"  {key:<26} p50 {r[key]['p50']:>8} p95 {r[key]['p95']:>8}")


if __name__ == "__main__":
    main()
