"""Retention (`manager.prune`, `llmos prune`, the reconciler's daily run) on Postgres and SQLite:
old finished jobs and gone workers' rows go; nothing queued, running or in an open batch does."""

import json
import random
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
import redis
import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine, jobs, webhook_deliveries, workers
from llmos.dispatch import CeleryDispatcher
from llmos.jobs import FINAL_STATUSES, JobStatus
from llmos.reconciler import Reconciler
from llmos.retention import parse_age
from llmos.errors import ValidationError
from tests.conftest import reset_services
from tests.helpers import REPO, service_env

pytestmark = pytest.mark.integration

AGE = timedelta(days=30)
OLD = timedelta(days=40)  # finished this long ago: older than AGE
RECENT = timedelta(days=2)


@pytest.fixture
def pg(services):
    settings, _ = services
    reset_services(settings.db_url, settings.redis_url)
    engine = get_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(webhook_deliveries.delete())
    return settings, engine


@pytest.fixture(params=["postgres", "sqlite"])
def engine(request):
    if request.param == "postgres":
        return request.getfixturevalue("pg")[1]
    return get_engine(request.getfixturevalue("sqlite_settings").db_url)


def make(engine, n=1, *, tenant="t", batch=None, deadline=None):
    new = [manager.NewJob(model="minilm", task_type="sentiment", input={"text": uuid.uuid4().hex},
                          priority=5, tenant=tenant, batch_id=batch, deadline=deadline) for _ in range(n)]
    return [j.id for j, _ in manager.create_jobs(engine, new)]


def to_status(engine, ids, status):
    """Take queued jobs to `status` through the manager, as workers, users and the reconciler do."""
    if status == JobStatus.QUEUED or not ids:
        return
    if status == JobStatus.CANCELLED:
        assert all(manager.cancel(engine, i, tenant=manager.ANY_TENANT) for i in ids)
        return
    if status == JobStatus.EXPIRED:  # made with a past deadline
        assert set(ids) <= set(manager.expire_overdue(engine))
        return
    claimed, _ = manager.claim(engine, ids, worker_id="w-test", device="cpu")
    assert len(claimed) == len(ids)
    if status == JobStatus.RUNNING:
        return
    failed = status == JobStatus.FAILED
    manager.finish(engine, [manager.Outcome(job_id=j.id, worker_id="w-test", attempt=j.attempts,
                                            result=None if failed else {"label": "POSITIVE", "score": 0.9},
                                            error="boom" if failed else None) for j in claimed])


def jobs_of(engine, status, n=1, *, ago=None, tenant="t", batch=None):
    deadline = manager.db_now(engine) - timedelta(seconds=1) if status == JobStatus.EXPIRED else None
    ids = make(engine, n, tenant=tenant, batch=batch, deadline=deadline)
    to_status(engine, ids, status)
    if ago is not None:
        backdate(engine, ids, ago)
    return ids


def backdate(engine, ids, ago):
    """Every timestamp of these rows `ago` earlier (finished_at only where set): months of history."""
    now = manager.db_now(engine)
    at = now - ago
    with engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id.in_(ids)).values(created_at=at, queued_at=at, dispatched_at=at))
        conn.execute(jobs.update().where(jobs.c.id.in_(ids), jobs.c.started_at.is_not(None)).values(started_at=at))
        conn.execute(jobs.update().where(jobs.c.id.in_(ids), jobs.c.finished_at.is_not(None)).values(finished_at=at))


def webhook(engine, *, tenant="t", job_id=None, batch_id=None, delivered=False):
    now = manager.db_now(engine)
    with engine.begin() as conn:
        conn.execute(webhook_deliveries.insert().values(
            id=str(uuid.uuid4()), tenant=tenant, kind="job" if job_id else "batch", job_id=job_id,
            batch_id=batch_id, url="https://example.invalid/hook", created_at=now - OLD,
            next_attempt_at=now, attempts=1, delivered_at=now if delivered else None))


def remaining(engine):
    with engine.connect() as conn:
        return {str(i) for i in conn.execute(sa.select(jobs.c.id)).scalars()}


def prune_all(engine, batch_size=5000):
    report, cursor, calls = manager.PruneReport(), None, 0
    while True:
        step = manager.prune(engine, AGE, batch_size=batch_size, max_batches=1, cursor=cursor)
        assert step.jobs + step.kept <= batch_size
        calls += 1
        report = manager.PruneReport(jobs=report.jobs + step.jobs, kept=report.kept + step.kept,
                                     workers=report.workers + step.workers, done=step.done)
        cursor = step.cursor
        if step.done:
            return report, calls


def test_only_old_final_jobs_outside_open_batches_go(engine):
    gone = set()
    for status in sorted(FINAL_STATUSES):
        gone |= set(jobs_of(engine, status, 2, ago=OLD))
    kept = set(jobs_of(engine, JobStatus.SUCCEEDED, 2, ago=RECENT))  # finished too recently
    kept |= set(jobs_of(engine, JobStatus.QUEUED, 2, ago=OLD))  # months in the queue: never deleted
    kept |= set(jobs_of(engine, JobStatus.RUNNING, 2, ago=OLD))
    # open batches: one job still queued (or running) keeps every finished job of the batch
    kept |= set(jobs_of(engine, JobStatus.SUCCEEDED, 3, ago=OLD, batch="open-q"))
    kept |= set(jobs_of(engine, JobStatus.QUEUED, 1, batch="open-q"))
    kept |= set(jobs_of(engine, JobStatus.FAILED, 3, ago=OLD, batch="open-r"))
    kept |= set(jobs_of(engine, JobStatus.RUNNING, 1, batch="open-r"))
    # a closed batch goes whole; a batch id is the tenant's own: another tenant's open batch of
    # the same name keeps nothing of this one
    gone |= set(jobs_of(engine, JobStatus.SUCCEEDED, 3, ago=OLD, batch="closed"))
    kept |= set(jobs_of(engine, JobStatus.QUEUED, 1, tenant="other", batch="closed"))
    # an undelivered webhook keeps its job, or its whole batch; a delivered one does not
    (waiting,) = jobs_of(engine, JobStatus.SUCCEEDED, 1, ago=OLD)
    webhook(engine, job_id=waiting)
    kept.add(waiting)
    kept |= set(jobs_of(engine, JobStatus.SUCCEEDED, 2, ago=OLD, batch="hooked"))
    webhook(engine, batch_id="hooked")
    (told,) = jobs_of(engine, JobStatus.SUCCEEDED, 1, ago=OLD)
    webhook(engine, job_id=told, delivered=True)
    gone.add(told)

    report = manager.prune(engine, AGE)
    assert report.done and report.jobs == len(gone)
    assert report.kept == 3 + 3 + 1 + 2  # old, final, kept for their batch or their webhook
    assert remaining(engine) == kept
    assert manager.prune(engine, AGE).jobs == 0  # nothing more to do


def test_a_queued_row_with_a_finished_at_is_still_not_deleted(engine):
    """Only final rows go, whatever their timestamps say (the DELETE checks the status itself)."""
    ids = jobs_of(engine, JobStatus.QUEUED, 2)
    with engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id.in_(ids)).values(finished_at=manager.db_now(engine) - OLD))
    assert manager.prune(engine, AGE).jobs == 0 and remaining(engine) == set(ids)


def test_batches_are_bounded_and_resume_past_kept_rows(engine):
    # the oldest rows are kept (an open batch): later batches continue past them, not over them
    kept = set(jobs_of(engine, JobStatus.SUCCEEDED, 7, ago=OLD + timedelta(days=5), batch="open"))
    kept |= set(jobs_of(engine, JobStatus.QUEUED, 1, batch="open"))
    gone = set(jobs_of(engine, JobStatus.SUCCEEDED, 10, ago=OLD))
    report, calls = prune_all(engine, batch_size=3)
    assert report.jobs == 10 and report.kept == 7 and remaining(engine) == kept
    assert calls == 6  # 17 candidates, 3 a call: each call reads only its own key range
    assert manager.prune(engine, AGE, batch_size=3, max_batches=2).jobs == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_tables_keep_exactly_what_they_must(engine, seed):
    rng = random.Random(seed)
    statuses = list(JobStatus)
    rows = []  # (ids, tenant, batch, status, old)
    for _ in range(40):
        tenant, batch = rng.choice(["a", "b"]), rng.choice([None, None, "b1", "b2", "b3", "b4"])
        status, old = rng.choice(statuses), rng.random() < 0.7
        ids = jobs_of(engine, status, rng.randint(1, 3), ago=OLD if old else RECENT, tenant=tenant, batch=batch)
        rows.append((ids, tenant, batch, status, old))
    hooked = {(t, b) for _, t, b, _, _ in rng.sample(rows, 3) if b}
    for tenant, batch in hooked:
        webhook(engine, tenant=tenant, batch_id=batch)
    open_batches = {(t, b) for _, t, b, s, _ in rows if b and not s.is_final}
    expected = set()
    for ids, tenant, batch, status, old in rows:
        if not (status.is_final and old and (tenant, batch) not in open_batches | hooked):
            expected |= set(ids)
    prune_all(engine, batch_size=rng.randint(1, 7))
    assert remaining(engine) == expected


def add_worker(engine, worker_id, *, silent, stopped=None):
    now = manager.db_now(engine)
    with engine.begin() as conn:
        conn.execute(workers.insert().values(
            id=worker_id, host="h", pid=1, model="minilm", device="cpu", started_at=now - silent - timedelta(hours=1),
            last_heartbeat=now - silent, stopped_at=None if stopped is None else now - stopped))


def worker_rows(engine):
    with engine.connect() as conn:
        return set(conn.execute(sa.select(workers.c.id)).scalars())


def test_worker_rows_go_when_stopped_or_long_silent(engine):
    add_worker(engine, "stopped-old", silent=OLD, stopped=OLD)
    add_worker(engine, "crashed-old", silent=OLD)  # died without recording its stop
    add_worker(engine, "stopped-recent", silent=RECENT, stopped=RECENT)
    add_worker(engine, "crashed-recent", silent=RECENT)
    add_worker(engine, "live", silent=timedelta(seconds=1))
    assert manager.prune(engine, AGE).workers == 2
    assert worker_rows(engine) == {"stopped-recent", "crashed-recent", "live"}
    # however small the age, a worker that never recorded its stop goes only after a day of silence
    add_worker(engine, "quiet-hour", silent=timedelta(hours=1))
    assert manager.prune(engine, timedelta(seconds=1)).workers == 2  # stopped-recent, crashed-recent
    assert worker_rows(engine) == {"live", "quiet-hour"}


def test_ages():
    assert parse_age("30d") == timedelta(days=30) and parse_age("12h") == timedelta(hours=12)
    assert parse_age(" 1.5W ") == timedelta(weeks=1.5) and parse_age("90s") == timedelta(seconds=90)
    for bad in ("30", "d", "-1d", "30 days", "", "1e9d", "99999999d"):
        with pytest.raises(ValidationError):
            parse_age(bad)


def llmos(url, *args):
    return subprocess.run([sys.executable, "-m", "llmos.cli", *args], cwd=REPO, capture_output=True,
                          text=True, env=service_env(LLMOS_DATABASE_URL=url), timeout=120)


def test_the_prune_command(pg):
    settings, engine = pg
    gone = jobs_of(engine, JobStatus.SUCCEEDED, 4, ago=OLD)
    queued = jobs_of(engine, JobStatus.QUEUED, 2, ago=OLD)
    add_worker(engine, "stopped-old", silent=OLD, stopped=OLD)
    run = llmos(settings.db_url, "prune", "--older-than", "30d", "--batch-size", "3", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert (out["jobs"], out["workers"], out["kept"]) == (len(gone), 1, 0) and out["cutoff"]
    assert remaining(engine) == set(queued)
    run = llmos(settings.db_url, "prune", "--older-than", "30d")
    assert run.returncode == 0 and "deleted 0 finished jobs, 0 worker rows and 0 ended webhook deliveries" in run.stdout
    run = llmos(settings.db_url, "prune", "--older-than", "a month")
    assert run.returncode == 2 and "error: an age is a number and a unit" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_reconciler_prunes_a_batch_a_pass_then_waits_a_day(pg, monkeypatch):
    import llmos.reconciler

    settings, engine = pg
    monkeypatch.setattr(llmos.reconciler, "RETENTION_BATCH", 2)
    gone = jobs_of(engine, JobStatus.SUCCEEDED, 5, ago=OLD)
    kept = jobs_of(engine, JobStatus.QUEUED, 1, ago=OLD)
    r = redis.Redis.from_url(settings.redis_url)
    off = Reconciler(settings, dispatcher=CeleryDispatcher(settings), redis_conn=r)
    assert off.run_once().pruned_jobs == 0 and remaining(engine) == set(gone + kept)  # the default: keep all
    on = Reconciler(settings.model_copy(update={"retention_days": 30.0}), dispatcher=CeleryDispatcher(settings),
                    redis_conn=r)
    assert [on.run_once().pruned_jobs for _ in range(4)] == [2, 2, 1, 0]
    assert remaining(engine) == set(kept)
    more = jobs_of(engine, JobStatus.SUCCEEDED, 2, ago=OLD)
    assert on.run_once().pruned_jobs == 0  # the next run is a day away
    assert set(more) <= remaining(engine)
    on.close()
    off.close()


def test_ended_webhook_deliveries_go_and_pending_ones_stay(engine):
    now = manager.db_now(engine)
    rows = {"delivered-old": dict(delivered_at=now - OLD), "given-up-old": dict(given_up_at=now - OLD),
            "delivered-recent": dict(delivered_at=now - RECENT), "pending": {}}
    ids = {}
    with engine.begin() as conn:
        for name, ended in rows.items():
            ids[name] = str(uuid.uuid4())
            conn.execute(webhook_deliveries.insert().values(
                id=ids[name], tenant="t", kind="job", job_id=str(uuid.uuid4()), batch_id=None,
                url="https://example.invalid/hook", created_at=now - OLD, next_attempt_at=now, attempts=1,
                **ended))
    assert manager.prune(engine, AGE, batch_size=1).deliveries == 2  # bounded batches, to the end
    with engine.connect() as conn:
        left = {str(r.id) for r in conn.execute(sa.select(webhook_deliveries.c.id))}
    assert left == {ids["delivered-recent"], ids["pending"]}
