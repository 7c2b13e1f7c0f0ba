"""The cost of a /metrics scrape beside a large task table (docs/monitoring.md, "Cost of a scrape").

    .venv/bin/python benchmarks/metrics_scale.py [--finished 1000000] [--queued 20000] [--days 90]

Makes a fresh Postgres database (dropped afterwards), writes `--finished` finished jobs spread
over `--days` (3 models, 4 tasks, 20 tenants, 4 statuses) and `--queued` queued ones with
INSERT ... SELECT generate_series, VACUUM ANALYZE, then times the first fold of the rollup and,
three times, what a scrape does in the database: the fold, the totals (rollup + tail) and the
gauge of unfinished jobs.
"""

from __future__ import annotations

import argparse
import time

import sqlalchemy as sa

from llmos import migrate
from llmos.db import get_engine, job_rollups
from llmos import rollup
from llmos.monitoring.metrics import _unfinished
from tests.helpers import create_pg_database, drop_pg_database


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--finished", type=int, default=1_000_000)
    p.add_argument("--queued", type=int, default=20_000)
    p.add_argument("--days", type=float, default=90.0)
    args = p.parse_args()
    url = create_pg_database("llmos_bench_metrics")
    try:
        migrate.upgrade(url)
        engine = get_engine(url)
        step_s = args.days * 86400.0 / args.finished
        with engine.begin() as conn:
            started = time.perf_counter()
            conn.execute(sa.text(f"""
              INSERT INTO jobs (id, model, task_type, priority, status, input, tenant, created_at, started_at,
                                finished_at, attempts, queue_wait_ms, compute_ms, batch_size, tokens_in, tokens_out)
              SELECT gen_random_uuid(), (ARRAY['minilm','gpt2','bart'])[1 + i % 3],
                     (ARRAY['embed','sentiment','summarize','writing'])[1 + i % 4], 5,
                     (ARRAY['succeeded','succeeded','succeeded','failed','cancelled','expired'])[1 + i % 6], '{{}}'::jsonb,
                     'tenant' || (i % 20), t - interval '2 seconds', t - interval '1 second', t, 1 + i % 2,
                     (i % 5000)::float, (i % 300)::float, 1 + i % 32, i % 100, i % 10
              FROM generate_series(1, {args.finished}) AS i,
                   LATERAL (SELECT now() - interval '{args.days} days' + i * interval '{step_s} seconds' AS t) AS ts"""))
            conn.execute(sa.text(f"""
              INSERT INTO jobs (id, model, task_type, priority, status, input, tenant, created_at, queued_at)
              SELECT gen_random_uuid(), 'minilm', 'embed', i % 10, 'queued', '{{}}'::jsonb, 'tenant' || (i % 20), now(), now()
              FROM generate_series(1, {args.queued}) AS i"""))
        print(f"insert: {time.perf_counter() - started:.1f} s")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE jobs"))
        started = time.perf_counter()
        first = rollup.refresh(engine)
        print(f"first fold: {first.jobs} jobs in {time.perf_counter() - started:.1f} s")
        with engine.connect() as conn:
            print("rollup rows:", conn.execute(sa.select(sa.func.count()).select_from(job_rollups)).scalar())
        for _ in range(3):
            t0 = time.perf_counter()
            rollup.refresh(engine)
            t1 = time.perf_counter()
            with rollup.snapshot(engine) as conn, conn.begin():
                totals = rollup.totals(conn)
                t2 = time.perf_counter()
                groups = _unfinished(conn)
                t3 = time.perf_counter()
            print(f"scrape: fold {1000 * (t1 - t0):.1f} ms, totals {1000 * (t2 - t1):.1f} ms "
                  f"(tail {totals.tail_jobs} jobs), unfinished {1000 * (t3 - t2):.1f} ms ({len(groups)} groups)")
    finally:
        drop_pg_database(url)


if __name__ == "__main__":
    main()
