"""model_demand on Postgres (and SQLite) over synthetic rows with known timings: the rates,
service times, variability, waits, backlog, cold starts and live workers it reads back."""

from __future__ import annotations

import statistics
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine, jobs, workers
from llmos.scheduling.capacity import capacity_report
from llmos.scheduling.demand import DEFAULT_COLD_START_S, model_demand
from llmos.scheduling.placement import make_plan
from llmos.registry import ModelSpec, Registry
from llmos.scheduling.devices import Device

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def _job(model, status, created, **kw):
    row = dict(id=str(uuid.uuid4()), model=model, task_type="embed", priority=kw.pop("priority", 5),
               status=status, input={"text": "x"}, attempts=1, max_attempts=3, tenant="t",
               created_at=created, queued_at=created, finishes=0, aged=0, started_at=None,
               finished_at=None, compute_ms=None, batch_size=None, queue_wait_ms=None)
    row.update(kw)
    return row


def _fill(engine):
    rows = []
    # model a: 100 jobs created 1 s apart within the window, in batches of 4 taking 400 ms each
    # (a job's share 100 ms), each waited 50 ms
    for i in range(100):
        c = NOW - timedelta(seconds=300 - i)
        rows.append(_job("a", "succeeded", c, started_at=c + timedelta(milliseconds=50),
                         finished_at=c + timedelta(milliseconds=450), compute_ms=400.0, batch_size=4,
                         queue_wait_ms=50.0))
    # older than the window: must not count
    for i in range(50):
        c = NOW - timedelta(hours=2, seconds=i)
        rows.append(_job("a", "succeeded", c, started_at=c, finished_at=c + timedelta(seconds=1),
                         compute_ms=5000.0, batch_size=1, queue_wait_ms=9000.0))
    # a backlog: 5 at priority 5, 2 at priority 1, queued in the window; one running
    for i in range(7):
        c = NOW - timedelta(seconds=10 - i * 0.5)
        rows.append(_job("a", "queued", c, priority=5 if i < 5 else 1, attempts=0))
    rows.append(_job("a", "running", NOW - timedelta(seconds=2), started_at=NOW - timedelta(seconds=1)))
    # model b: only queued work, never served
    rows.append(_job("b", "queued", NOW - timedelta(seconds=30), attempts=0))
    with engine.begin() as conn:
        conn.execute(jobs.insert(), rows)
        conn.execute(workers.insert(), [
            dict(id="w1", host="h", pid=1, model="a", device="cpu", started_at=NOW - timedelta(seconds=100),
                 ready_at=NOW - timedelta(seconds=88), last_heartbeat=NOW - timedelta(seconds=3)),
            dict(id="w2", host="h", pid=2, model="a", device="cpu", started_at=NOW - timedelta(seconds=60),
                 ready_at=NOW - timedelta(seconds=52), last_heartbeat=NOW - timedelta(seconds=1)),
            dict(id="w3", host="h", pid=3, model="c", device="cpu", started_at=NOW - timedelta(hours=1),
                 ready_at=None, last_heartbeat=NOW - timedelta(minutes=10)),  # dead: not live
        ])


def _check(engine):
    d = model_demand(engine, window_s=600, now=NOW)
    a = d["a"]
    assert a.backlog == 7 and a.running == 1 and a.workers == 2 and a.finished == 100
    assert a.backlog_by_priority == ((5, 5), (1, 2))
    assert a.arrivals_per_s == pytest.approx(108 / 600)
    assert a.service_s_per_job == pytest.approx(0.1) and a.mu_per_s == pytest.approx(10.0)
    assert a.cs2 == pytest.approx(0.0, abs=1e-9)
    assert a.measured_wait_s == pytest.approx(0.05)
    assert a.cold_start_s == pytest.approx(10.0)  # median of 12 s and 8 s
    assert manager.as_utc(a.last_used) == NOW - timedelta(seconds=1)
    # arrivals at -300..-201 s (1 s apart), -10..-7 s (0.5 s apart), -2 s (the running one)
    times = sorted([-300 + i for i in range(100)] + [-10 + 0.5 * i for i in range(7)] + [-2])
    gaps = [b - a_ for a_, b in zip(times, times[1:])]
    assert a.ca2 == pytest.approx(statistics.variance(gaps) / statistics.mean(gaps) ** 2)
    b = d["b"]
    assert b.backlog == 1 and b.mu_per_s is None and b.cold_start_s == DEFAULT_COLD_START_S
    assert "c" not in d  # a dead worker and no jobs: no demand
    return d


@pytest.fixture
def pg_engine(pg_url):
    engine = get_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(jobs.delete())
        conn.execute(workers.delete())
    yield engine
    with engine.begin() as conn:
        conn.execute(jobs.delete())
        conn.execute(workers.delete())


def test_model_demand_postgres(pg_engine):
    _fill(pg_engine)
    _check(pg_engine)


def test_model_demand_sqlite(sqlite_settings):
    engine = get_engine(sqlite_settings.db_url)
    _fill(engine)
    _check(engine)


def test_capacity_report_and_plan_postgres(pg_engine):
    _fill(pg_engine)
    with pg_engine.begin() as conn:  # the report and the plan read the database's clock: move rows to now
        shift = manager.db_now(conn) - NOW
        conn.execute(jobs.update().values(
            created_at=jobs.c.created_at + shift, queued_at=jobs.c.queued_at + shift,
            started_at=jobs.c.started_at + shift, finished_at=jobs.c.finished_at + shift))
        conn.execute(workers.update().values(
            started_at=workers.c.started_at + shift, ready_at=workers.c.ready_at + shift,
            last_heartbeat=workers.c.last_heartbeat + shift))
    rows = {r["model"]: r for r in capacity_report(pg_engine, None, target_wait_s=2.0, window_s=600)}
    assert set(rows["a"]) == {"model", "lambda_per_s", "mu_per_s", "workers", "utilization", "p_wait",
                              "mean_wait_s", "mean_wait_corrected_s", "measured_wait_s", "workers_needed"}
    assert rows["a"]["workers"] == 2 and rows["a"]["mu_per_s"] == pytest.approx(10.0)
    assert rows["a"]["utilization"] == pytest.approx(108 / 600 / 20)
    assert rows["a"]["workers_needed"] == 1
    assert rows["b"]["mu_per_s"] is None and rows["b"]["workers_needed"] is None
    specs = {n: ModelSpec(name=n, source="x", tasks=("embed",), memory_mb=1000) for n in "abc"}
    p = make_plan(None, pg_engine, Registry(specs),
                  device_list=[Device("cpu", "cpu", 4000, 4000, "h", max_workers=4)])
    assert p.count("a") == 2  # its two warm workers stay (one needed, one kept: hysteresis)
    assert p.count("b") == 1  # queued work: one worker


def test_worker_ready_records_the_cold_start(sqlite_settings):
    engine = get_engine(sqlite_settings.db_url)
    manager.register_worker(engine, worker_id="w", host="h", pid=1, model="a", device="cpu")
    manager.worker_ready(engine, "w", load_s=12.5)
    with engine.connect() as conn:
        row = conn.execute(sa.select(workers).where(workers.c.id == "w")).one()
    assert (manager.as_utc(row.ready_at) - manager.as_utc(row.started_at)).total_seconds() == pytest.approx(12.5)
    assert model_demand(engine)["a"].cold_start_s == pytest.approx(12.5)


def test_plan_and_capacity_commands(tmp_path):
    import json
    import subprocess
    import sys

    from tests.helpers import REPO, service_env

    env = service_env(LLMOS_HOME=str(tmp_path / "home"), LLMOS_DATABASE_URL=f"sqlite:///{tmp_path / 'c.db'}",
                      COLUMNS="200")

    def llmos(*args):
        return subprocess.run([sys.executable, "-m", "llmos.cli", *args], env=env, capture_output=True,
                              text=True, timeout=120, cwd=REPO)

    assert llmos("db", "upgrade").returncode == 0
    engine = get_engine(f"sqlite:///{tmp_path / 'c.db'}")
    with engine.begin() as conn:  # minilm: 3 queued jobs, no worker
        conn.execute(jobs.insert(), [_job("minilm", "queued", manager.utcnow(), attempts=0) for _ in range(3)])
    devices = tmp_path / "devices.toml"
    devices.write_text('[[device]]\nname = "cpu"\nkind = "cpu"\nmemory_mb = 1000\nhost = "n1"\n')
    res = llmos("plan", "--devices", str(devices), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["placements"] == [{"model": "minilm", "device": "cpu", "workers": 1, "host": "n1"}]
    assert "needs" in out["refused"]["distilbart"] and "1,000 MiB" in out["refused"]["distilbart"]
    res = llmos("plan", "--devices", str(devices))
    assert res.returncode == 0 and "minilm" in res.stdout and "why: minilm: starts on n1/cpu" in res.stdout
    res = llmos("capacity", "--json", "--target-wait", "500ms", "--window", "1h")
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    assert row["model"] == "minilm" and row["workers"] == 0 and row["mu_per_s"] is None
    assert row["lambda_per_s"] == pytest.approx(3 / 3600)
    res = llmos("capacity", "--target-wait", "soon")
    assert res.returncode == 2 and "--target-wait must be a positive duration" in res.stderr
    devices.write_text('[[device]]\nname = "cpu"\nmemory_mb = "lots"\n')
    res = llmos("plan", "--devices", str(devices))
    assert res.returncode == 2 and "memory_mb" in res.stderr and "Traceback" not in res.stderr
