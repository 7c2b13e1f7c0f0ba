"""A real worker records when its model is loaded (workers.ready_at): the measured cold start."""

from __future__ import annotations

import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine, workers
from llmos.scheduling.demand import model_demand


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
