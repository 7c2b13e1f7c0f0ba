"""The /metrics rollup and collector on SQLite: fold, tail, idempotence, racing folds, prune, the route's auth,
and the Grafana dashboard's queries against the metric names the collector emits."""

from __future__ import annotations

import json
import random
import re
import threading
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from llmos import manager
from llmos.api import create_app
from llmos.api.settings import ApiSettings
from llmos.db import (DURATION_BUCKETS_S, get_engine, job_rollup_watermark, job_rollups, jobs, webhook_deliveries,
                      webhook_rollups)
from llmos.dispatch import InMemoryDispatcher
from llmos import rollup
from llmos.monitoring.metrics import METRIC_NAMES
from llmos.sdk import Client
from tests.helpers import REPO

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
FINAL = ("succeeded", "failed", "cancelled", "expired")


@pytest.fixture
def engine(sqlite_settings):
    return get_engine(sqlite_settings.db_url)


def add_jobs(engine, n, *, finished_from, finished_to, seed=0, **fixed):
    """`n` jobs finished uniformly in [finished_from, finished_to), of random labels and timings."""
    rng = random.Random(seed)
    span = (finished_to - finished_from).total_seconds()
    rows = []
    for _ in range(n):
        finished = finished_from + timedelta(seconds=rng.random() * span)
        started = rng.random() > 0.2
        row = dict(id=str(uuid.uuid4()), model=rng.choice(["minilm", "gpt2"]), task_type=rng.choice(["embed", "sentiment"]),
                   tenant=rng.choice(["acme", "globex"]), priority=rng.randint(0, 9),
                   status=rng.choice(FINAL) if started else rng.choice(["cancelled", "expired"]), input={},
                   attempts=rng.randint(1, 3) if started else 0,
                   created_at=finished - timedelta(seconds=rng.choice([0.003, 0.2, 1.7, 40.0, 900.0])),
                   finished_at=finished,
                   queue_wait_ms=rng.choice([2.0, 30.0, 700.0, 4000.0]) if started else None,
                   compute_ms=rng.choice([4.0, 60.0, 1500.0]) if started else None,
                   batch_size=rng.choice([1, 3, 32]) if started else None,
                   tokens_in=rng.randint(1, 50) if started else None, tokens_out=rng.randint(0, 9) if started else None)
        row.update(fixed)
        rows.append(row)
    with engine.begin() as conn:
        conn.execute(jobs.insert(), rows)
    return rows


def expected(rows):
    """Per (model, task, tenant, status): jobs, retries, tokens, and the queue wait and latency bucket counts."""
    out: dict = {}
    for r in rows:
        key = (r["model"], r["task_type"], r["tenant"], r["status"])
        e = out.setdefault(key, Counter())
        e["jobs"] += 1
        e["retries"] += max(r["attempts"] - 1, 0)
        e["tokens_in"] += r["tokens_in"] or 0
        e["tokens_out"] += r["tokens_out"] or 0
        latency = (r["finished_at"] - r["created_at"]).total_seconds()
        e["latency_n"] += 1
        for i, b in enumerate(DURATION_BUCKETS_S):
            e[f"latency_le_{i:02d}"] += latency <= b
            if r["queue_wait_ms"] is not None:
                e[f"queue_wait_le_{i:02d}"] += r["queue_wait_ms"] / 1000 <= b
        e["queue_wait_n"] += r["queue_wait_ms"] is not None
        e["batch_size_sum"] += r["batch_size"] or 0
    return out


def read_totals(engine) -> rollup.Totals:
    with rollup.snapshot(engine) as conn, conn.begin():
        return rollup.totals(conn)


def check(totals: rollup.Totals, rows):
    want = expected(rows)
    assert set(totals.by_key) == set(want)
    for key, e in want.items():
        got = totals.by_key[key]
        for c, v in e.items():
            assert got[c] == pytest.approx(v), (key, c)


def rollup_jobs(engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(job_rollups.c.jobs), 0))).scalar())


def watermark(engine):
    with engine.connect() as conn:
        return manager.as_utc(conn.execute(sa.select(job_rollup_watermark.c.folded_to)).scalar())


def test_totals_are_exact_before_and_after_a_fold_and_the_tail_is_only_the_unfolded(engine):
    old = add_jobs(engine, 300, finished_from=NOW - timedelta(days=3), finished_to=NOW - timedelta(minutes=2), seed=1)
    recent = add_jobs(engine, 40, finished_from=NOW - timedelta(seconds=50), finished_to=NOW, seed=2)
    before = read_totals(engine)
    assert before.folded_to is None and before.tail_jobs == 340
    check(before, old + recent)
    done = rollup.refresh(engine, now=NOW)
    assert done.jobs == 300 and done.folded_to == NOW - timedelta(seconds=rollup.LAG_S)
    after = read_totals(engine)
    assert after.tail_jobs == 40 and rollup_jobs(engine) == 300
    check(after, old + recent)
    with engine.connect() as conn:  # one row per UTC day and label set: the 3 days are 4 calendar days
        days = {r[0] for r in conn.execute(sa.select(job_rollups.c.day))}
    assert len(days) == 4


def test_refresh_is_idempotent_and_folds_each_job_once(engine):
    rows = add_jobs(engine, 200, finished_from=NOW - timedelta(hours=5), finished_to=NOW - timedelta(minutes=5))
    assert rollup.refresh(engine, now=NOW).jobs == 200
    assert rollup.refresh(engine, now=NOW).jobs == 0
    assert rollup.refresh(engine, now=NOW - timedelta(hours=1)).jobs == 0  # a clock behind the watermark: nothing
    assert rollup_jobs(engine) == 200 and read_totals(engine).tail_jobs == 0
    check(read_totals(engine), rows)
    later = add_jobs(engine, 30, finished_from=NOW, finished_to=NOW + timedelta(minutes=1), seed=3)
    assert rollup.refresh(engine, now=NOW + timedelta(minutes=5)).jobs == 30
    check(read_totals(engine), rows + later)


def test_a_first_fold_of_months_goes_a_day_per_transaction(engine):
    rows = add_jobs(engine, 500, finished_from=NOW - timedelta(days=40), finished_to=NOW - timedelta(hours=1))
    steps = []
    real = rollup._fold_step

    def counted(*args, **kwargs):
        steps.append(real(*args, **kwargs))
        return steps[-1]

    rollup._fold_step = counted
    try:
        assert rollup.refresh(engine, now=NOW).jobs == 500
    finally:
        rollup._fold_step = real
    assert 40 <= len(steps) <= 42 and all(s is not None for s in steps)
    check(read_totals(engine), rows)


def test_refreshes_racing_beside_finishing_jobs_fold_each_job_exactly_once(sqlite_settings):
    """Three folders, each on its own engine (its own connections), fold in a loop with no lag at
    all while a writer keeps finishing jobs: afterwards every job is in the rollup exactly once.

    The writer stamps finished_at while it holds the write lock, so its commit comes before any
    fold that could read a clock past the stamp: no timing enters the test. (A real finish on
    SQLite stamps before it waits for the lock, up to busy_timeout: the lag covers that; with a
    stamp 17 s before its commit, seen here with folders in a tight loop, a lag of 1 s loses jobs.)"""
    from llmos.db import _sqlite_begin, _sqlite_pragmas, begin_write

    engines = []
    for _ in range(3):
        e = sa.create_engine(sqlite_settings.db_url, connect_args={"timeout": 30, "check_same_thread": False})
        sa.event.listen(e, "connect", _sqlite_pragmas)
        sa.event.listen(e, "begin", _sqlite_begin)
        engines.append(e)
    main = get_engine(sqlite_settings.db_url)
    rows = add_jobs(main, 200, finished_from=NOW - timedelta(days=1), finished_to=NOW - timedelta(minutes=2))
    stop, errors, folds = threading.Event(), [], Counter()

    def fold(e, name):
        try:
            while not stop.is_set():
                folds[name] += rollup.refresh(e, lag_s=0.0, max_step_s=3600.0).jobs
                stop.wait(0.005)  # pacing only: lets the writer take the lock between folds
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fold, args=(e, i)) for i, e in enumerate(engines)]
    for t in threads:
        t.start()
    for i in range(10):  # jobs finishing now, while the folders run
        with begin_write(main) as conn:
            now = datetime.now(timezone.utc)
            batch = [dict(r, finished_at=now, created_at=now - timedelta(seconds=1), id=str(uuid.uuid4()))
                     for r in rows[i * 5:i * 5 + 5]]
            conn.execute(jobs.insert(), batch)
        rows += batch
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(folds.values()) == rollup_jobs(main)  # each fold's count is what it added
    rollup.refresh(main, lag_s=0.0)
    assert rollup_jobs(main) == len(rows) == 250 and read_totals(main).tail_jobs == 0
    check(read_totals(main), rows)
    for e in engines:
        e.dispose()


def test_racing_refreshes_without_late_writes_are_exact(sqlite_settings):
    main = get_engine(sqlite_settings.db_url)
    rows = add_jobs(main, 400, finished_from=NOW - timedelta(days=2), finished_to=NOW)
    barrier = threading.Barrier(3)

    def fold():
        barrier.wait()
        rollup.refresh(main, now=NOW, max_step_s=1800.0)

    threads = [threading.Thread(target=fold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with main.connect() as conn:
        behind = conn.execute(sa.select(sa.func.count()).where(jobs.c.finished_at < watermark(main))).scalar()
    assert rollup_jobs(main) == behind and behind > 0
    check(read_totals(main), rows)


def test_prune_leaves_the_counters(engine):
    rows = add_jobs(engine, 120, finished_from=NOW - timedelta(days=60), finished_to=NOW - timedelta(days=31))
    recent = add_jobs(engine, 30, finished_from=datetime.now(timezone.utc) - timedelta(minutes=30),
                      finished_to=datetime.now(timezone.utc) - timedelta(minutes=2), seed=5)
    rollup.refresh(engine)
    report = manager.prune(engine, timedelta(days=30))
    assert report.jobs == 120
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar() == 30
    check(read_totals(engine), rows + recent)


def test_the_reconciler_folds_before_retention_and_retention_waits_for_a_failed_fold(sqlite_settings, monkeypatch):
    from llmos.reconciler import Reconciler

    settings = sqlite_settings.model_copy(update={"retention_days": 30})
    engine = get_engine(settings.db_url)
    rows = add_jobs(engine, 80, finished_from=NOW - timedelta(days=90), finished_to=NOW - timedelta(days=40))
    real = rollup.refresh

    def failing(*args, **kwargs):
        raise sa.exc.OperationalError("fold", {}, Exception("database is locked"))

    monkeypatch.setattr(rollup, "refresh", failing)
    report = Reconciler(settings, dispatcher=InMemoryDispatcher(), redis_conn=object()).run_once()
    assert report.pruned_jobs == 0  # not folded: not deleted
    monkeypatch.setattr(rollup, "refresh", real)
    report = Reconciler(settings, dispatcher=InMemoryDispatcher(), redis_conn=object()).run_once()
    assert report.pruned_jobs == 80
    assert watermark(engine) is not None and rollup_jobs(engine) == 80
    check(read_totals(engine), rows)


def test_llmos_prune_folds_first_and_inside_the_lag_keeps_what_is_not_folded(engine):
    from llmos.retention import prune_all

    now = datetime.now(timezone.utc)
    rows = add_jobs(engine, 40, finished_from=now - timedelta(days=3), finished_to=now - timedelta(minutes=5))
    recent = add_jobs(engine, 7, finished_from=now - timedelta(seconds=40), finished_to=now - timedelta(seconds=20),
                      seed=9)
    assert watermark(engine) is None  # nothing folded yet: no scrape, no reconciler
    report = prune_all(engine, timedelta(seconds=10))
    # the fold kept its lag (the shared watermark is never moved closer to now by a prune) and
    # the jobs of the last minute, not yet folded, were kept, not deleted
    assert watermark(engine) <= datetime.now(timezone.utc) - timedelta(seconds=rollup.LAG_S)
    assert report.jobs == 40
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar() == 7
    check(read_totals(engine), rows + recent)
    assert manager.prune(engine, timedelta(seconds=1)).jobs == 0  # still inside the lag: kept


def test_prune_before_any_fold_deletes_nothing_uncounted(engine, monkeypatch):
    rows = add_jobs(engine, 20, finished_from=NOW - timedelta(days=60), finished_to=NOW - timedelta(days=40))
    monkeypatch.setattr(rollup, "refresh", lambda *a, **k: rollup.Refreshed(skipped=True))  # a fold that did nothing
    assert manager.prune(engine, timedelta(days=30)).jobs == 0
    monkeypatch.undo()
    assert manager.prune(engine, timedelta(days=30)).jobs == 20
    check(read_totals(engine), rows)


def add_deliveries(engine, n, *, ended=None, outcome="delivered", attempts=1, tenant="acme"):
    now = datetime.now(timezone.utc)
    rows = [dict(id=str(uuid.uuid4()), tenant=tenant, kind="job", job_id=str(uuid.uuid4()), url="https://example.com/h",
                 created_at=(ended or now) - timedelta(minutes=1), next_attempt_at=now, attempts=attempts + i % 3,
                 delivered_at=ended if outcome == "delivered" else None,
                 given_up_at=ended if outcome == "given_up" else None) for i in range(n)]
    with engine.begin() as conn:
        conn.execute(webhook_deliveries.insert(), rows)
    return rows


def webhook_expected(rows):
    out = {}
    for r in rows:
        e = out.setdefault(r["tenant"], Counter())
        e["delivered"] += r["delivered_at"] is not None
        e["given_up"] += r["given_up_at"] is not None
        e["pending"] += r["delivered_at"] is None and r["given_up_at"] is None
        e["failures"] += r["attempts"] - (r["delivered_at"] is not None)
    return out


def check_webhooks(engine, rows):
    got = read_totals(engine).webhooks
    assert {t: dict(delivered=w.delivered, given_up=w.given_up, pending=w.pending, failures=w.failures)
            for t, w in got.items()} == {t: {k: e[k] for k in ("delivered", "given_up", "pending", "failures")}
                                         for t, e in webhook_expected(rows).items()}


def test_webhook_counters_fold_and_survive_prune(engine):
    now = datetime.now(timezone.utc)
    rows = add_deliveries(engine, 30, ended=now - timedelta(days=40))
    rows += add_deliveries(engine, 10, ended=now - timedelta(days=35), outcome="given_up", attempts=5, tenant="globex")
    rows += add_deliveries(engine, 6, outcome="pending", attempts=0)  # one to two failed attempts so far, or none
    rows += add_deliveries(engine, 4, ended=now - timedelta(seconds=5), tenant="globex")  # in the tail
    check_webhooks(engine, rows)
    rollup.refresh(engine)
    check_webhooks(engine, rows)
    with engine.connect() as conn:
        folded = conn.execute(sa.select(sa.func.sum(webhook_rollups.c.deliveries))).scalar()
    assert folded == 40  # the 4 of the last minute are still the tail's
    assert manager.prune(engine, timedelta(days=30)).deliveries == 40
    check_webhooks(engine, rows)


def test_jobs_not_final_are_not_counted_as_finished(engine):
    add_jobs(engine, 20, finished_from=NOW - timedelta(hours=1), finished_to=NOW)
    manager.create_jobs(engine, [manager.NewJob(model="minilm", task_type="embed", input={"texts": ["x"]}, priority=5)])
    totals = read_totals(engine)
    assert sum(v["jobs"] for v in totals.by_key.values()) == 20


def _by_status(engine):
    totals = read_totals(engine).by_key
    out = Counter()
    for (_, _, _, status), v in totals.items():
        out[status] += v["jobs"]
        out["retries"] += v["retries"]
    return out


def _delivery(engine, job_id):
    with engine.connect() as conn:
        return conn.execute(sa.select(webhook_deliveries).where(webhook_deliveries.c.job_id == job_id)).one()


def test_an_operator_retry_keeps_the_counters_and_counts_each_finish_once(engine):
    """fail (tail), scrape, retry, scrape, fail again, fold, retry, succeed, fold: the totals never go
    down; llmos_jobs_total counts finishes (2 failed, 1 succeeded), retries are those of each finish;
    the retry's budget is the submit's each time; the webhook is re-armed and stays counted."""
    now = datetime.now(timezone.utc)
    job = str(uuid.uuid4())
    base = dict(model="minilm", task_type="embed", tenant="acme", priority=5, input={}, tokens_in=3, tokens_out=0)
    with engine.begin() as conn:
        conn.execute(jobs.insert().values(id=job, status="failed", attempts=3, max_attempts=3, error="boom",
                                          created_at=now - timedelta(hours=1), finished_at=now - timedelta(minutes=30),
                                          **base))
        conn.execute(webhook_deliveries.insert().values(
            id=str(uuid.uuid4()), tenant="acme", kind="job", job_id=job, url="https://example.com/h",
            created_at=now - timedelta(hours=1), next_attempt_at=now, attempts=2,
            delivered_at=now - timedelta(minutes=29)))
    seen = []

    def scrape_and_check(want):
        got = _by_status(engine)
        webhooks = read_totals(engine).webhooks["acme"]
        got["delivered"], got["webhook_failures"] = webhooks.delivered, webhooks.failures
        for earlier in seen:  # counters: never down
            assert all(got[k] >= v for k, v in earlier.items()), (earlier, got)
        seen.append(got)
        assert {k: got[k] for k in want} == want

    scrape_and_check({"failed": 1, "succeeded": 0, "retries": 2, "delivered": 1, "webhook_failures": 1})
    retried = manager.retry_failed(engine, job, tenant="acme")  # the failure is in the tail, never folded
    assert retried is not None and retried.max_attempts == 3 + 3  # attempts + the submit's budget
    d = _delivery(engine, job)
    assert d.delivered_at is None and d.given_up_at is None and d.attempts == 0  # re-armed: a new delivery
    scrape_and_check({"failed": 1, "succeeded": 0, "retries": 2, "delivered": 1, "webhook_failures": 1})
    with engine.begin() as conn:  # the retry runs 3 more attempts and fails again, 10 minutes ago
        conn.execute(jobs.update().where(jobs.c.id == job).values(
            status="failed", attempts=6, error="boom again", finished_at=now - timedelta(minutes=10)))
    scrape_and_check({"failed": 2, "succeeded": 0, "retries": 4})
    assert rollup.refresh(engine).jobs == 1  # the second failure is folded; the first was kept at the retry
    scrape_and_check({"failed": 2, "succeeded": 0, "retries": 4})
    retried = manager.retry_failed(engine, job, tenant="acme")  # now the failure is below the watermark
    assert retried is not None and retried.max_attempts == 6 + 3  # again exactly the budget more
    scrape_and_check({"failed": 2, "succeeded": 0, "retries": 4})
    with engine.begin() as conn:  # succeeds at its first attempt of this retry
        conn.execute(jobs.update().where(jobs.c.id == job).values(
            status="succeeded", attempts=7, error=None, result={"ok": 1}, finished_at=datetime.now(timezone.utc)))
    scrape_and_check({"failed": 2, "succeeded": 1, "retries": 4})
    rollup.refresh(engine, now=datetime.now(timezone.utc) + timedelta(hours=1))
    assert read_totals(engine).tail_jobs == 0
    scrape_and_check({"failed": 2, "succeeded": 1, "retries": 4})
    assert rollup_jobs(engine) == 3
    with engine.connect() as conn:
        row = conn.execute(sa.select(jobs.c.attempt_budget, jobs.c.attempts_at_retry).where(jobs.c.id == job)).one()
    assert tuple(row) == (3, 6)


def test_a_retried_job_whose_webhook_gave_up_sends_again(engine):
    now = datetime.now(timezone.utc)
    [(created, _)] = manager.create_jobs(engine, [manager.NewJob(model="minilm", task_type="embed", input={"texts": ["x"]},
                                                            priority=5)], webhook_url="https://example.com/h")
    with engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == created.id).values(
            status="failed", attempts=1, error="boom", finished_at=now - timedelta(minutes=5)))
        conn.execute(webhook_deliveries.update().where(webhook_deliveries.c.job_id == created.id).values(
            attempts=4, first_attempt_at=now - timedelta(minutes=4), given_up_at=now - timedelta(minutes=3)))
    rollup.refresh(engine)
    assert manager.claim_deliveries(engine, limit=10, lease_s=30) == []  # given up: nothing to send
    assert manager.retry_failed(engine, created.id, tenant="acme") is None  # another tenant's: not found
    assert manager.retry_failed(engine, created.id, tenant=created.tenant) is not None
    assert manager.claim_deliveries(engine, limit=10, lease_s=30) == []  # not final yet: not sent
    with engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == created.id).values(
            status="succeeded", attempts=2, result={"ok": 1}, finished_at=datetime.now(timezone.utc)))
    [due] = manager.claim_deliveries(engine, limit=10, lease_s=30)
    assert due.job_id == created.id and due.attempts == 0 and due.first_attempt_at is None
    webhooks = read_totals(engine).webhooks[created.tenant]
    assert (webhooks.given_up, webhooks.pending, webhooks.failures) == (1, 1, 4)  # the give-up stays counted


# -- the collector behind GET /metrics ---------------------------------------------------------

TOKEN = "scrape-token-0123456789"


@pytest.fixture
def api(sqlite_settings):
    client = Client(sqlite_settings, dispatcher=InMemoryDispatcher())
    app = create_app(api_settings=ApiSettings(rate_limit_storage="memory://", metrics_token=TOKEN), client=client)
    engine = get_engine(sqlite_settings.db_url)
    with TestClient(app) as http:
        yield http, engine


def scrape(http, headers=None):
    resp = http.get("/metrics", headers=headers or {"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def samples(family, name=None):
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if name is None or s.name == name}


def test_metrics_auth(api):
    http, engine = api
    _, admin = manager.create_api_key(engine, tenant="ops", admin=True)
    _, tenant = manager.create_api_key(engine, tenant="acme")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer " + TOKEN[:-1]}):
        resp = http.get("/metrics", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized", resp.text
    resp = http.get("/metrics", headers={"Authorization": f"Bearer {tenant}"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    assert "llmos_up" in scrape(http, {"Authorization": f"Bearer {admin}"})
    assert "llmos_up" in scrape(http)


def test_metrics_match_the_task_table_and_redis_down_is_a_gauge(api):
    http, engine = api
    now = datetime.now(timezone.utc)
    rows = add_jobs(engine, 150, finished_from=now - timedelta(days=2), finished_to=now)
    manager.create_jobs(engine, [manager.NewJob(model="minilm", task_type="embed", input={"texts": ["x"]},
                                                priority=7, tenant="acme") for _ in range(3)])
    families = scrape(http)
    assert samples(families["llmos_up"]) == {(("component", "database"),): 1.0, (("component", "redis"),): 0.0}
    with engine.connect() as conn:
        table = {(m, t, ten, s): n for m, t, ten, s, n in conn.execute(
            sa.select(jobs.c.model, jobs.c.task_type, jobs.c.tenant, jobs.c.status, sa.func.count())
            .where(jobs.c.finished_at.is_not(None))
            .group_by(jobs.c.model, jobs.c.task_type, jobs.c.tenant, jobs.c.status))}
    got = {(d["model"], d["task"], d["tenant"], d["status"]): v
           for k, v in samples(families["llmos_jobs"], "llmos_jobs_total").items() for d in [dict(k)]}
    assert got == table
    latency = families["llmos_job_latency_seconds"]
    assert sum(samples(latency, "llmos_job_latency_seconds_count").values()) == len(rows)
    want = expected(rows)
    retries = samples(families["llmos_job_retries"], "llmos_job_retries_total")
    assert sum(retries.values()) == sum(e["retries"] for e in want.values())
    unfinished = samples(families["llmos_jobs_unfinished"])
    assert unfinished == {(("model", "minilm"), ("priority", "7"), ("state", "queued"), ("task", "embed"),
                           ("tenant", "acme")): 3.0}
    # a fold between two scrapes changes nothing they report
    rollup.refresh(engine, lag_s=0.0)
    again = scrape(http)
    for name in ("llmos_jobs", "llmos_job_latency_seconds", "llmos_job_queue_wait_seconds", "llmos_tokens_in"):
        assert samples(again[name]) == samples(families[name]), name


def test_a_database_that_does_not_answer_is_a_gauge_not_an_error(sqlite_settings):
    from prometheus_client import generate_latest

    from llmos.errors import DatabaseUnavailableError
    from llmos.monitoring.metrics import LlmosCollector, make_registry

    def no_database():
        raise DatabaseUnavailableError("cannot reach the database")

    class FakeRedis:
        def pipeline(self, transaction=False):
            return self

        def llen(self, key):
            self.n = getattr(self, "n", 0) + 1

        def execute(self):
            return [2] * self.n

    registry = make_registry(LlmosCollector(no_database, FakeRedis, lambda: ["minilm"]))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert samples(families["llmos_up"]) == {(("component", "database"),): 0.0, (("component", "redis"),): 1.0}
    queue = samples(families["llmos_queue_messages"])
    assert len(queue) == 10 and queue[(("model", "minilm"), ("priority", "9"))] == 2.0
    assert "llmos_jobs" not in families


# -- the Grafana dashboard ---------------------------------------------------------------------

DASHBOARD = Path(REPO) / "deploy" / "grafana" / "llmos.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_created")
DOCS = [Path(REPO) / p for p in ("docs/operations.md", "docs/monitoring.md", "README.md")]


def exprs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                yield v
            else:
                yield from exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from exprs(v)


def _emitted(name: str) -> bool:
    base = next((name[: -len(s)] for s in SUFFIXES if name.endswith(s) and name[: -len(s)] in METRIC_NAMES), name)
    return base in METRIC_NAMES


def test_the_docs_name_only_metrics_the_collector_emits():
    """Every `llmos_…` name in the docs that is not an API key (`llmos_...`, `llmos_<prefix>_<secret>`)
    is a metric the collector emits, or one with a histogram's suffix."""
    found = 0
    for doc in DOCS:
        for name in re.findall(r"\bllmos_[a-z_]+", doc.read_text()):
            if name.rstrip("_") == "llmos":  # an API key's prefix
                continue
            found += 1
            assert _emitted(name), (doc.name, name)
    assert found >= 30
    assert not _emitted("llmos_queue_depth") and _emitted("llmos_job_latency_seconds_bucket")


def test_the_dashboard_queries_only_metrics_the_collector_emits():
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["panels"]
    queries = list(exprs(board))
    assert len(queries) >= 8
    for q in queries:
        names = set(re.findall(r"\bllmos_[a-z_]+", q))
        assert names, q
        for name in names:
            assert _emitted(name), (name, q)
