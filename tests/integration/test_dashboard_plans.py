"""Every statement the dashboard's panels run is served by an index on Postgres: EXPLAIN finds no
sequential scan of `jobs` or `batches` on a table shaped like a long-lived deployment's (most jobs
finished long ago, a backlog queued, thousands of batches).

The statements are not listed here: the test records every one that `panels.overview` (every
panel of `panels.PANELS`, the capacity report and the plan), the timeline and the action lookups
send, for an admin, an admin's tenant filter and a tenant, so a new panel is covered as it lands.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine
from llmos.monitoring.dashboard import panels
from llmos.monitoring.dashboard.panels import Scope
from llmos.registry import Registry
from llmos.settings import Settings

pytestmark = pytest.mark.integration

FINISHED, QUEUED, BATCHES = 20_000, 2_000, 2_000
CHECKED = {"jobs", "batches"}

FILL = [
    # finished jobs over the last 30 days: the one-hour and one-day windows hold a few percent of them
    f"""INSERT INTO jobs (id, model, task_type, priority, status, input, attempts, max_attempts, tenant, batch_id,
                          created_at, queued_at, started_at, finished_at, queue_wait_ms, compute_ms, batch_size,
                          worker_id, device, finishes, aged)
        SELECT gen_random_uuid(), 'm' || (i % 4), 'sentiment', i % 10,
               CASE WHEN i % 20 = 1 THEN 'failed' WHEN i % 50 = 2 THEN 'cancelled' ELSE 'succeeded' END,
               '{{}}'::jsonb, 1, 3, 't' || (i % 5), CASE WHEN i % 10 = 0 THEN 'batch_' || (i % {BATCHES}) END,
               now() - (i * interval '130 seconds') - interval '2 seconds',
               now() - (i * interval '130 seconds') - interval '2 seconds',
               now() - (i * interval '130 seconds') - interval '1 second',
               now() - (i * interval '130 seconds'), 1000.0, 20.0 + i % 7, 1 + i % 32,
               'm' || (i % 4) || '@host:1', 'cpu', 1, 0
        FROM generate_series(1, {FINISHED}) AS i""",
    # the backlog
    f"""INSERT INTO jobs (id, model, task_type, priority, status, input, attempts, max_attempts, tenant, batch_id,
                          created_at, queued_at, dispatched_at, finishes, aged)
        SELECT gen_random_uuid(), 'm' || (i % 4), 'sentiment', i % 10, 'queued', '{{}}'::jsonb, 0, 3,
               't' || (i % 5), CASE WHEN i % 10 = 0 THEN 'batch_' || (i % 20) END,
               now() - (i * interval '1 second'), now() - (i * interval '1 second'), now() - (i * interval '1 second'), 0, 0
        FROM generate_series(1, {QUEUED}) AS i""",
    f"""INSERT INTO batches (id, tenant, endpoint, input_file_id, completion_window, status, priority, total, bad,
                             superseded, completed_count, failed_count, created_at, expires_at)
        SELECT 'batch_' || i, 't' || (i % 5), '/v1/jobs', 'file-x', '24h',
               CASE WHEN i < 20 THEN 'in_progress' ELSE 'completed' END, 1, 10, 0, 0, 9, 1,
               now() - (({BATCHES} - i) * interval '10 minutes'), now() + interval '1 day'
        FROM generate_series(0, {BATCHES - 1}) AS i""",
    """INSERT INTO workers (id, host, pid, model, device, started_at, last_heartbeat)
       SELECT 'm' || (i % 4) || '@host:' || i, 'host', i, 'm' || (i % 4), 'cpu', now() - interval '1 hour',
              now() - (i * interval '1 minute') FROM generate_series(1, 200) AS i""",
]


@pytest.fixture(scope="module")
def filled(services):
    settings, _ = services
    engine = get_engine(settings.db_url)
    with engine.begin() as conn:
        for table in ("jobs", "batches", "workers"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
        for stmt in FILL:
            conn.execute(sa.text(stmt))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE jobs")
        conn.exec_driver_sql("VACUUM ANALYZE batches")
        conn.exec_driver_sql("VACUUM ANALYZE workers")
    yield settings, engine
    with engine.begin() as conn:
        for table in ("jobs", "batches", "workers"):
            conn.exec_driver_sql(f"DELETE FROM {table}")


def recorded(engine, fn):
    """(statement, parameters) of every statement `fn()` sends on `engine`."""
    seen = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        fn()
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    return seen


def seq_scans(plan, found=None):
    """Relations the plan (EXPLAIN's JSON) reads by a sequential scan."""
    found = [] if found is None else found
    if isinstance(plan, dict):
        if plan.get("Node Type") == "Seq Scan":
            found.append(plan.get("Relation Name"))
        for value in plan.values():
            seq_scans(value, found)
    elif isinstance(plan, list):
        for value in plan:
            seq_scans(value, found)
    return found


def test_every_panel_statement_uses_an_index(filled, tmp_path):
    settings, engine = filled
    settings = Settings(home=tmp_path, database_url=settings.db_url, redis_url=settings.redis_url)
    registry = Registry.load(settings)
    with engine.connect() as conn:
        failed = str(conn.exec_driver_sql("SELECT id FROM jobs WHERE status = 'failed' LIMIT 1").scalar())
        queued = str(conn.exec_driver_sql("SELECT id FROM jobs WHERE status = 'queued' LIMIT 1").scalar())

    def every_panel():
        for scope in (Scope(None, True), Scope("t1", True), Scope("t1", False)):
            view = panels.overview(engine, scope, settings=settings, registry=registry)
            assert "error" not in (view.get("capacity") or {}) and "error" not in (view.get("plan") or {}), view
            assert view["counts"]["open"]["queued"] > 0 and view["failures"] and view["batches"]
            assert panels.timeline(engine, scope, failed if scope.tenant is None else queued) is not None \
                or scope.tenant is not None
        assert panels.job_tenant(engine, queued) and panels.batch_tenant(engine, "batch_7")

    panels._slow.clear()  # the capacity report and the plan are made anew, so their statements are seen
    statements = recorded(engine, every_panel)
    assert len(statements) > 20
    reads = re.compile(r"\b(FROM|JOIN)\s+(" + "|".join(CHECKED) + r")\b", re.I)
    bad, explained = [], 0
    with engine.connect() as conn:
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith(("SELECT", "WITH")):
                continue
            if not reads.search(statement):
                continue
            plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar()
            plan = json.loads(plan) if isinstance(plan, str) else plan
            explained += 1
            scanned = set(seq_scans(plan)) & CHECKED
            if scanned:
                bad.append((sorted(scanned), statement))
    assert explained >= 15, explained
    assert not bad, "sequential scans:\n" + "\n\n".join(f"{t}: {s}" for t, s in bad)


def test_panels_see_the_filled_table(filled):
    _, engine = filled
    view = panels.overview(engine, Scope(None, True))
    with engine.connect() as conn:
        now = manager.db_now(conn)
        hour = conn.exec_driver_sql(
            "SELECT count(*) FROM jobs WHERE finished_at >= %(t)s AND status = 'succeeded'",
            {"t": now - timedelta(hours=1)}).scalar()
    assert view["counts"]["open"]["queued"] == QUEUED
    assert abs(view["counts"]["hour"]["succeeded"] - hour) <= 1
    assert view["throughput"]["total"] == sum(view["counts"]["hour"].values())
    assert len(view["failures"]) == panels.FAILURES and len(view["batches"]) == panels.BATCHES
    assert view["batches"][0]["id"] == f"batch_{BATCHES - 1}"  # newest first
    assert {w["model"] for w in view["workers"]} == {"m0", "m1", "m2", "m3"}
