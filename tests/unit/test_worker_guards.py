"""The worker's guards on a real SQLite task table, with a fake Redis: failed claims release their
jobs, the held-set audit, outcomes the database refuses, the table-checked cancel, the watchdog;
and the signals that come before Celery's handlers are installed."""

import time

import pytest
import sqlalchemy as sa

from llmos import manager
from llmos.dispatch import held_set
from llmos.jobs import JobStatus
from workers import worker as worker_module
from workers.batcher import Finished
from workers.runners.base import ItemOutcome
from workers.worker import Worker, skew_clock


class FakeRedis:
    """The set commands the worker uses, and publish (notices are only counted)."""

    def __init__(self):
        self.sets: dict[str, set[str]] = {}
        self.published = 0
        self.announced: list[str] = []  # job ids in the notices published

    def sadd(self, key, *members):
        self.sets.setdefault(key, set()).update(members)

    def srem(self, key, *members):
        self.sets.setdefault(key, set()).difference_update(members)

    def smembers(self, key):
        return {m.encode() for m in self.sets.get(key, set())}

    def pipeline(self, transaction=True):
        return self

    def publish(self, channel, message):
        from llmos.notify import notice_ids

        self.published += 1
        self.announced.extend(notice_ids(message))

    def execute(self):
        return []


@pytest.fixture
def worker(sqlite_settings):
    w = Worker("minilm", settings=sqlite_settings)
    w.redis = FakeRedis()
    manager.register_worker(w.engine, worker_id=w.worker_id, host="h", pid=1, model="minilm", device="cpu")
    return w


def make_jobs(engine, n, **kw):
    base = dict(model="minilm", task_type="sentiment", input={"text": "x"}, priority=5)
    base.update(kw)
    return [j for j, _ in manager.create_jobs(engine, [manager.NewJob(**base) for _ in range(n)])]


def held(w):
    return w.redis.sets.get(held_set(w.worker_id), set())


def test_a_failed_claim_releases_its_jobs_at_once(worker):
    jobs = make_jobs(worker.engine, 3)
    ids = [j.id for j in jobs]
    worker.redis.sadd(held_set(worker.worker_id), *ids)  # the delivery took them
    worker._claim_faults = 1  # LLMOS_FAULT_CLAIM_FAILS=1
    with pytest.raises(sa.exc.ProgrammingError):
        worker.claim(ids, True)
    assert held(worker) == set()  # the reconciler re-sends them: queued, not pending, not held
    claimed = worker.claim(ids, True)  # the fault is spent: the next claim works
    assert sorted(j.id for j in claimed) == sorted(ids)


def test_the_held_set_audit_releases_ids_in_no_hand_at_two_audits(worker):
    key = held_set(worker.worker_id)
    worker.redis.sadd(key, "kept", "stranded", "late")
    worker._in_hand["kept"] += 1
    worker._audit_held()
    assert held(worker) == {"kept", "stranded", "late"}  # one strike: maybe just delivered
    worker._in_hand["late"] += 1  # its run_job started meanwhile
    worker._audit_held()
    assert held(worker) == {"kept", "late"}


def test_run_job_keeps_the_in_hand_count_exact(worker):
    class Batcher:
        def __init__(self):
            self.seen = []

        def submit(self, job_id):
            self.seen.append(worker.in_hand(job_id))
            raise RuntimeError("claim failed")

    worker.batcher = Batcher()
    with pytest.raises(RuntimeError):
        worker.run_job("j1")
    assert worker.batcher.seen == [True] and not worker.in_hand("j1")


def finished(job, **outcome):
    return Finished(job, ItemOutcome(**outcome), 1.0, 1)


def test_an_outcome_the_database_refuses_fails_only_its_own_job(worker, monkeypatch):
    jobs = make_jobs(worker.engine, 3)
    claimed, _ = manager.claim(worker.engine, [j.id for j in jobs], worker_id=worker.worker_id, device="cpu")
    real = manager.finish

    def picky(engine, outcomes):  # as Postgres refuses a NUL in a jsonb value
        if any(o.result and "\x00" in o.result["label"] for o in outcomes):
            raise sa.exc.DataError("UPDATE jobs ...", {}, Exception("unsupported Unicode escape sequence"))
        return real(engine, outcomes)

    monkeypatch.setattr(manager, "finish", picky)
    by_id = {j.id: j for j in claimed}
    a, b, c = (by_id[j.id] for j in jobs)
    worker.complete([finished(a, result={"label": "ok", "score": 1.0}),
                     finished(b, result={"label": "bad\x00", "score": 1.0}),
                     finished(c, error="its own error")])
    got = manager.get_jobs(worker.engine, [a.id, b.id, c.id], tenant=manager.ANY_TENANT)
    assert got[a.id].status == JobStatus.SUCCEEDED and got[a.id].result["label"] == "ok"
    assert got[b.id].status == JobStatus.FAILED
    assert got[b.id].error.startswith("result could not be stored: ") and got[b.id].result is None
    assert got[c.id].status == JobStatus.FAILED and got[c.id].error == "its own error"
    assert len(worker.redis.announced) == 3  # every final job is announced (in one notice per call)


def test_a_cancel_publish_counts_only_when_the_table_says_cancelled(worker):
    (job,) = make_jobs(worker.engine, 1)
    manager.claim(worker.engine, [job.id], worker_id=worker.worker_id, device="cpu")
    assert worker._cancelled(job.id) is False  # a stray publish: the job runs on
    assert manager.cancel(worker.engine, job.id, tenant=manager.ANY_TENANT)
    assert worker._cancelled(job.id) is True


def test_the_watchdog_stops_a_worker_whose_model_thread_hangs(worker, monkeypatch):
    class Hung:
        busy_since = time.monotonic() - (worker.settings.max_job_seconds + worker.settings.timeout_grace_s + 1)

    class Idle:
        busy_since = None

    (job,) = make_jobs(worker.engine, 1)
    manager.claim(worker.engine, [job.id], worker_id=worker.worker_id, device="cpu")
    exits = []
    monkeypatch.setattr(worker_module.os, "_exit", lambda code: exits.append(code))
    worker.batcher = Idle()
    worker._check_progress()
    assert exits == [] and manager.live_workers(worker.engine)
    worker.batcher = Hung()
    worker._check_progress()
    assert exits == [worker_module.HUNG_EXIT]
    assert manager.live_workers(worker.engine) == []
    # recorded stopped: the reconciler requeues its running job at once, whatever the heartbeat age
    requeued, _ = manager.requeue_dead(worker.engine, 1e9)
    assert [j.id for j in requeued] == [job.id]


def test_the_clock_skew_hook_shifts_the_wall_clock(monkeypatch):
    monkeypatch.setattr(worker_module.time, "time", time.time)  # restored after the test
    monkeypatch.setattr(manager, "utcnow", manager.utcnow)
    before_time, before_now = time.time(), manager.utcnow()
    skew_clock(-60.0)
    assert 55 < before_time - time.time() < 65
    assert 55 < (before_now - manager.utcnow()).total_seconds() < 65


def test_a_claim_whose_reply_was_lost_is_retried_as_a_reclaim(worker, monkeypatch):
    """The claim committed, then the connection dropped before its reply: the retry gets the jobs
    back (running under this worker), instead of leaving them `running` with nobody running them."""
    jobs = make_jobs(worker.engine, 3)
    ids = [j.id for j in jobs]
    real_claim = manager.claim
    calls = []

    def commit_then_lose_the_reply(engine, *args, **kwargs):
        calls.append(kwargs["reclaim"])
        result = real_claim(engine, *args, **kwargs)
        if len(calls) == 1:
            raise sa.exc.OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection"))
        return result

    monkeypatch.setattr(worker_module.manager, "claim", commit_then_lose_the_reply)
    worker.settings = worker.settings.model_copy(update={"db_retry_s": 5.0})
    claimed = worker.claim(ids, True)
    assert calls == [False, True]
    assert sorted(j.id for j in claimed) == sorted(ids)
    assert all(j.attempts == 1 and j.worker_id == worker.worker_id for j in claimed)


@pytest.fixture
def early_signals():
    """workers.worker._EarlySignals in this process; pytest's handlers and Celery's flag restored."""
    import signal

    from celery.worker import state

    from workers.worker import _EarlySignals

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield _EarlySignals(), state
    finally:
        state.should_stop = None
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_signal_while_the_model_loads_exits_at_once(early_signals):
    import os
    import signal

    early, state = early_signals
    with pytest.raises(SystemExit) as term:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode; the sleep is never finished
    assert term.value.code == 0 and early.came is None and state.should_stop is None
    with pytest.raises(SystemExit) as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert interrupt.value.code == 1  # Ctrl-C, as Celery's own handler exits


def test_a_signal_once_held_asks_celery_for_a_warm_shutdown(early_signals):
    import os
    import signal

    early, state = early_signals
    early.hold()
    os.kill(os.getpid(), signal.SIGTERM)  # no exception: a flag only
    early.pause(5)  # returns as soon as the signal has come
    assert early.came == 0 and state.should_stop == 0
    early.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
