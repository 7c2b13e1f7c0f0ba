"""The dashboard's panels on a big task table: how long each takes to answer.

    .venv/bin/python benchmarks/dashboard_panels.py --db postgresql+psycopg://postgres@127.0.0.1:5432/NAME
        [--finished 1000000] [--queued 100000] [--days 30] [--repeat 5]

EMPTIES the jobs, batches and workers tables of that database (give it a scratch database that
`llmos db upgrade` made), fills them like a deployment that ran for `--days` days (finished jobs
spread evenly, a backlog queued, 2,000 batches), VACUUM ANALYZEs, then times every panel of
`llmos.monitoring.dashboard.panels.PANELS` for an admin, an admin's tenant filter and a tenant
(the best of `--repeat` runs, milliseconds), and the capacity report and plan. One JSON line.
Figures: docs/dashboard.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmos.db import get_engine  # noqa: E402
from llmos.manager import db_now  # noqa: E402
from llmos.monitoring.dashboard import panels  # noqa: E402
from llmos.monitoring.dashboard.panels import Scope  # noqa: E402
from llmos.registry import Registry  # noqa: E402
from llmos.settings import Settings  # noqa: E402


def fill(engine: sa.Engine, finished: int, queued: int, days: float) -> None:
    step_s = days * 86_400 / finished
    with engine.begin() as conn:
        for table in ("jobs", "batches", "workers"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
        conn.execute(sa.text(f"""
            INSERT INTO jobs (id, model, task_type, priority, status, input, attempts, max_attempts, tenant, batch_id,
                              created_at, queued_at, started_at, finished_at, queue_wait_ms, compute_ms, batch_size,
                              worker_id, device, finishes, aged)
            SELECT gen_random_uuid(), 'm' || (i % 4), 'sentiment', i % 10,
                   CASE WHEN i % 200 = 1 THEN 'failed' WHEN i % 50 = 2 THEN 'cancelled' ELSE 'succeeded' END,
                   '{{}}'::jsonb, 1, 3, 't' || (i % 20), CASE WHEN i % 10 = 0 THEN 'batch_' || (i % 2000) END,
                   now() - (i * interval '{step_s} seconds') - interval '2 seconds',
                   now() - (i * interval '{step_s} seconds') - interval '2 seconds',
                   now() - (i * interval '{step_s} seconds') - interval '1 second',
                   now() - (i * interval '{step_s} seconds'), 1000.0, 20.0 + i % 7, 1 + i % 32,
                   'm' || (i % 4) || '@host:1', 'cpu', 1, 0
            FROM generate_series(1, {finished}) AS i"""))
        conn.execute(sa.text(f"""
            INSERT INTO jobs (id, model, task_type, priority, status, input, attempts, max_attempts, tenant,
                              created_at, queued_at, dispatched_at, finishes, aged)
            SELECT gen_random_uuid(), 'm' || (i % 4), 'sentiment', i % 10, 'queued', '{{}}'::jsonb, 0, 3,
                   't' || (i % 20), now() - (i * interval '10 ms'), now() - (i * interval '10 ms'),
                   now() - (i * interval '10 ms'), 0, 0
            FROM generate_series(1, {queued}) AS i"""))
        conn.execute(sa.text("""
            INSERT INTO batches (id, tenant, endpoint, input_file_id, completion_window, status, priority, total, bad,
                                 superseded, completed_count, failed_count, created_at, expires_at)
            SELECT 'batch_' || i, 't' || (i % 20), '/v1/jobs', 'file-x', '24h',
                   CASE WHEN i >= 1990 THEN 'in_progress' ELSE 'completed' END, 1, 500, 0, 0, 495, 5,
                   now() - ((2000 - i) * interval '20 minutes'), now() + interval '1 day'
            FROM generate_series(0, 1999) AS i"""))
        conn.execute(sa.text("""
            INSERT INTO workers (id, host, pid, model, device, started_at, last_heartbeat)
            SELECT 'm' || (i % 4) || '@host:' || i, 'host', i, 'm' || (i % 4), 'cpu', now() - interval '1 hour',
                   now() - (i * interval '1 minute') FROM generate_series(1, 200) AS i"""))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("jobs", "batches", "workers"):
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")


def best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(min(times), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--finished", type=int, default=1_000_000)
    ap.add_argument("--queued", type=int, default=100_000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    engine = get_engine(a.db)
    t = time.perf_counter()
    fill(engine, a.finished, a.queued, a.days)
    out: dict = {"finished": a.finished, "queued": a.queued, "days": a.days, "fill_s": round(time.perf_counter() - t, 1)}
    settings = Settings(database_url=a.db, redis_url="redis://127.0.0.1:1/0")
    registry = Registry.load(settings)
    for label, scope in (("admin", Scope(None, True)), ("admin_filtered", Scope("t1", True)),
                         ("tenant", Scope("t1", False))):
        row = {}
        for name, panel in panels.PANELS.items():
            def run(panel=panel, scope=scope):
                with engine.connect() as conn:
                    panel(conn, scope, db_now(conn))
            row[name] = best_ms(run, a.repeat)
        row["overview"] = best_ms(lambda scope=scope: panels.overview(engine, scope), a.repeat)
        out[label] = row
    out["capacity"] = best_ms(lambda: panels.capacity(engine, registry), a.repeat)
    out["plan"] = best_ms(lambda: panels.placement_plan(settings, engine, registry), a.repeat)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
