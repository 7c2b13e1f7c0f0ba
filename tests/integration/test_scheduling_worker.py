"""A real worker records when its model is loaded (workers.ready_at): the measured cold start; a
SIGTERM that comes before Celery starts is still a clean stop."""

from __future__ import annotations

import signal

import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine, workers
from llmos.scheduling.demand import model_demand
from tests import helpers


def test_a_worker_records_its_cold_start(services, pg_worker):
    settings, _ = services
    engine = get_engine(settings.db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(workers).where(workers.c.stopped_at.is_(None))).all()
    assert rows and all(r.ready_at is not None for r in rows)
    for r in rows:
        assert (manager.as_utc(r.ready_at) - manager.as_utc(r.started_at)).total_seconds() > 0
    d = model_demand(engine)["minilm"]
    assert d.workers == len(rows) and d.cold_start_s > 0


def test_a_sigterm_before_celery_starts_is_a_clean_stop(services):
    """SIGTERM between registering and Celery's own signal handlers (held open by a start pause):
    the worker stops before consuming, records its stop and exits 0, as a warm shutdown does."""
    settings, env = services
    engine = get_engine(settings.db_url)
    w = helpers.WorkerProcess(dict(env, LLMOS_FAULT_START_PAUSE_S="60")).wait_ready(settings.db_url)
    w.proc.send_signal(signal.SIGTERM)
    assert w.stop(timeout=30) == 0, w.log()
    with engine.connect() as conn:
        row = conn.execute(sa.select(workers).where(workers.c.pid == w.proc.pid)).one()
    assert row.stopped_at is not None
    assert "Traceback" not in w.log()
