"""The reconciler's decisions on real Redis and Postgres, with workers simulated by their rows."""

import time

import pytest
import redis
import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine, jobs as jobs_table
from llmos.dispatch import CeleryDispatcher, held_set, pending_set, take
from llmos.jobs import JobStatus
from llmos.reconciler import Reconciler
from tests.conftest import reset_services

pytestmark = pytest.mark.integration


@pytest.fixture
def world(services):
    settings, _ = services
    reset_services(settings.db_url, settings.redis_url)
    settings = settings.model_copy(update={"resend_after_s": 0.2, "dead_after_s": 30.0})
    engine = get_engine(settings.db_url)
    r = redis.Redis.from_url(settings.redis_url)
    d = CeleryDispatcher(settings)
    rec = Reconciler(settings, dispatcher=d, redis_conn=r)
    yield settings, engine, r, d, rec
    rec.close()


def make_jobs(engine, d, n):
    created = manager.create_jobs(engine, [manager.NewJob(model="minilm", task_type="sentiment",
                                                          input={"text": f"t{i}"}, priority=5) for i in range(n)])
    jobs = [j for j, _ in created]
    d.send(jobs)
    return jobs


def queue_len(r):
    return sum(r.llen(k) for k in [b"llmos.minilm"] + [f"llmos.minilm:{p}".encode() for p in range(1, 10)])


def test_messages_in_the_queue_are_left_alone(world):
    settings, engine, r, d, rec = world
    make_jobs(engine, d, 5)
    time.sleep(0.3)
    assert rec.run_once().resent == 0 and queue_len(r) == 5


def test_flushed_messages_are_sent_again(world):
    settings, engine, r, d, rec = world
    jobs = make_jobs(engine, d, 5)
    r.flushdb()
    time.sleep(0.3)
    assert rec.run_once().resent == 5
    assert queue_len(r) == 5 and all(r.sismember(pending_set("minilm"), j.id) for j in jobs)
    assert rec.run_once().resent == 0  # now pending again: not re-sent every pass


def test_held_by_a_live_worker_is_not_resent_held_by_a_dead_one_is(world):
    settings, engine, r, d, rec = world
    alive, gone = make_jobs(engine, d, 2)
    r.delete(*[k for k in r.keys("llmos.minilm*")])  # both messages taken off the queue
    for wid in ("live-w", "dead-w"):
        manager.register_worker(engine, worker_id=wid, host="h", pid=1, model="minilm", device="cpu")
    take(r, "minilm", "live-w", alive.id)
    take(r, "minilm", "dead-w", gone.id)
    manager.stop_worker(engine, "dead-w")
    time.sleep(0.3)
    assert rec.run_once().resent == 1
    assert r.sismember(pending_set("minilm"), gone.id) and not r.sismember(pending_set("minilm"), alive.id)
    assert not r.exists(held_set("dead-w")) and r.sismember(held_set("live-w"), alive.id)


def list_ids(r, key):
    from llmos.dispatch import _job_id_of

    return [_job_id_of(m) for m in r.lrange(key, 0, -1)]


def drop_message(r, key, job_id):
    """A worker's BRPOP took this job's message and the process died before kombu recorded it."""
    assert r.lrem(key, 0, next(m for m in r.lrange(key, 0, -1) if job_id.encode() in m)) == 1


@pytest.fixture
def small_margin(monkeypatch):
    """Sends a test makes 0.1 s apart count as clearly apart."""
    import llmos.reconciler

    monkeypatch.setattr(llmos.reconciler, "ORPHAN_MARGIN_S", 0.05)


KEY = "llmos.minilm:4"  # priority 5's list


def test_a_message_popped_by_a_worker_that_died_unrecorded_is_sent_again(world, small_margin):
    settings, engine, r, d, rec = world
    (lost,) = make_jobs(engine, d, 1)
    time.sleep(0.1)
    (kept,) = make_jobs(engine, d, 1)
    drop_message(r, KEY, lost.id)  # the oldest message was popped: the next one was sent later
    time.sleep(0.3)
    assert rec.run_once().resent == 1
    assert sorted(list_ids(r, KEY)) == sorted([lost.id, kept.id])


def test_an_empty_list_means_its_pending_job_was_popped(world):
    settings, engine, r, d, rec = world
    (lost,) = make_jobs(engine, d, 1)
    drop_message(r, KEY, lost.id)
    time.sleep(0.3)
    assert rec.run_once().resent == 1 and list_ids(r, KEY) == [lost.id]


def test_orphans_are_found_in_bounded_reads_behind_a_long_list(world, small_margin, monkeypatch):
    settings, engine, r, d, rec = world
    (lost,) = make_jobs(engine, d, 1)
    time.sleep(0.1)
    waiting = make_jobs(engine, d, 300)  # still in the list: stale, but not lost
    drop_message(r, KEY, lost.id)
    time.sleep(0.3)
    for name in ("lrange", "smembers", "sscan"):  # bounded: no whole list or set is read
        monkeypatch.setattr(redis.Redis, name, lambda *a, **k: pytest.fail("a whole list or set was read"))
    assert rec.run_once().resent == 1
    assert r.llen(KEY) == len(waiting) + 1 and lost.id.encode() in r.lindex(KEY, 0)  # sent again
    assert rec.run_once().resent == 0  # the long list's own jobs are never re-sent


def test_a_duplicate_message_does_not_mask_an_orphan(world, small_margin):
    settings, engine, r, d, rec = world
    (lost,) = make_jobs(engine, d, 1)
    time.sleep(0.1)
    (twice,) = make_jobs(engine, d, 1)
    d.send([twice])  # a duplicate: as many messages as pending ids once `lost` is popped
    drop_message(r, KEY, lost.id)
    assert r.llen(KEY) == r.scard(pending_set("minilm")) == 2
    time.sleep(0.3)
    assert rec.run_once().resent == 1 and lost.id in list_ids(r, KEY)


def test_no_worker_is_judged_dead_until_the_reconciler_has_seen_dead_after_s_of_passes(world, monkeypatch):
    """After a failed pass (the database was away, and so were the heartbeats), a worker whose
    last beat is old is not judged dead until it has had dead_after_s of good passes to beat."""
    settings, engine, r, d, rec = world
    rec.settings = settings.model_copy(update={"dead_after_s": 1.0})
    (job,) = make_jobs(engine, d, 1)
    manager.register_worker(engine, worker_id="w-quiet", host="h", pid=1, model="minilm", device="cpu")
    manager.claim(engine, [job.id], worker_id="w-quiet", device="cpu")
    manager.register_worker(engine, worker_id="w-gone", host="h", pid=2, model="minilm", device="cpu")
    (gone_job,) = make_jobs(engine, d, 1)
    manager.claim(engine, [gone_job.id], worker_id="w-gone", device="cpu")
    manager.stop_worker(engine, "w-gone")  # stopped itself: dead at once, grace or not
    time.sleep(1.2)  # both heartbeats are now older than dead_after_s

    real = manager.expire_overdue
    monkeypatch.setattr(manager, "expire_overdue", lambda e: (_ for _ in ()).throw(
        sa.exc.OperationalError("SELECT", {}, Exception("database away"))))
    with pytest.raises(sa.exc.OperationalError):
        rec.run_once()
    monkeypatch.setattr(manager, "expire_overdue", real)

    first = time.monotonic()
    report = rec.run_once()
    assert report.requeued == 1  # only the stopped worker's job
    assert manager.get_job(engine, job.id, tenant=manager.ANY_TENANT).status == JobStatus.RUNNING
    while time.monotonic() - first < 1.0:  # the grace: w-quiet is not judged by its old beat
        assert rec.run_once().requeued == 0
        time.sleep(0.1)
    assert rec.run_once().requeued == 1  # it never beat again: now it is dead
    assert manager.get_job(engine, job.id, tenant=manager.ANY_TENANT).status == JobStatus.QUEUED


def test_a_worker_that_beats_again_during_the_grace_keeps_its_jobs(world):
    settings, engine, r, d, rec = world
    rec.settings = settings.model_copy(update={"dead_after_s": 1.0})
    (job,) = make_jobs(engine, d, 1)
    manager.register_worker(engine, worker_id="w-back", host="h", pid=1, model="minilm", device="cpu")
    manager.claim(engine, [job.id], worker_id="w-back", device="cpu")
    rec.run_once()
    time.sleep(1.2)  # a gap between passes longer than dead_after_s: the reconciler was away too
    assert rec.run_once().requeued == 0  # judged on a stale view, w-back would be dead here
    manager.heartbeat(engine, "w-back")  # the first beat after the outage
    first = time.monotonic()
    while time.monotonic() - first < 1.3:
        assert rec.run_once().requeued == 0
        manager.heartbeat(engine, "w-back")
        time.sleep(0.1)
    assert manager.get_job(engine, job.id, tenant=manager.ANY_TENANT).status == JobStatus.RUNNING


def test_losses_at_the_front_send_the_whole_window_each_job_once(world, monkeypatch):
    """A pass checks the front of a model's line (FRONT jobs in serve order) and, when the front
    has losses, the whole window in the same pass; the jobs it re-sent from the front are not
    judged again by the wider read (their dead worker's held set still names them)."""
    import llmos.reconciler

    settings, engine, r, d, _ = world
    monkeypatch.setattr(llmos.reconciler, "FRONT", 2)
    jobs = make_jobs(engine, d, 5)
    r.delete(*[k for k in r.keys("llmos.minilm*")])  # every message taken off the queue
    manager.register_worker(engine, worker_id="dead-w", host="h", pid=1, model="minilm", device="cpu")
    for j in jobs:
        take(r, "minilm", "dead-w", j.id)
    manager.stop_worker(engine, "dead-w")
    # resent jobs count as stale again at once: only the pass's own memory keeps them from a second send
    rec = Reconciler(settings.model_copy(update={"resend_after_s": 0.001}), dispatcher=d, redis_conn=r)
    time.sleep(0.05)
    assert rec.run_once().resent == 5  # the front's 2, then the other 3 from the whole window
    assert queue_len(r) == 5 and sorted(list_ids(r, KEY)) == sorted(j.id for j in jobs)
    assert not r.exists(held_set("dead-w"))


def test_a_healthy_front_ends_the_check(world, monkeypatch):
    """With nothing lost at the front, a pass reads no further: a job lost behind the front waits
    until it comes within it (the jobs ahead of it are served; it is not), or until a loss at the
    front widens the read."""
    import llmos.reconciler

    settings, engine, r, d, rec = world
    monkeypatch.setattr(llmos.reconciler, "FRONT", 2)
    jobs = make_jobs(engine, d, 4)  # serve order: oldest first (one priority)
    r.srem(pending_set("minilm"), jobs[3].id)  # the last one's message looks gone
    time.sleep(0.3)
    assert rec.run_once().resent == 0
    for j in jobs[:3]:  # the three ahead of it leave the line (taken off it, no longer queued)
        drop_message(r, KEY, j.id)
        r.srem(pending_set("minilm"), j.id)
        assert manager.cancel(engine, j.id, tenant=j.tenant)
    assert rec.run_once().resent == 1
    assert r.sismember(pending_set("minilm"), jobs[3].id)


def test_requeue_dead_leaves_a_job_that_a_live_worker_claimed_between_its_reads(world, monkeypatch):
    """requeue_dead judges workers on (id, worker_id) and then reads the dead ones' jobs in full;
    a job requeued and claimed again by a live worker in between is running under that worker at
    its new attempt, so an UPDATE conditional on that attempt would match: only the check that the
    job is still on the worker judged dead leaves it alone."""
    _, engine, *_ = world
    (a, _), = manager.create_jobs(engine, [manager.NewJob(model="minilm", task_type="sentiment",
                                                          input={"text": "t"}, priority=5)])
    manager.claim(engine, [a.id], worker_id="gone", device="cpu")  # no worker row: dead
    manager.register_worker(engine, worker_id="live", host="h", pid=1, model="minilm", device="cpu")
    real = manager._jobs_from

    def reclaimed_meanwhile(rows):
        monkeypatch.setattr(manager, "_jobs_from", real)  # once (claim reads its rows with it too)
        with engine.begin() as conn:  # another reconciler requeued it; the live worker claimed it
            conn.execute(jobs_table.update().where(jobs_table.c.id == a.id).values(
                status=JobStatus.QUEUED.value, worker_id=None))
        manager.claim(engine, [a.id], worker_id="live", device="cpu")
        with engine.connect() as conn:  # the full row as the read finds it now
            return real(conn.execute(sa.select(jobs_table).where(jobs_table.c.id == a.id)))

    monkeypatch.setattr(manager, "_jobs_from", reclaimed_meanwhile)
    assert manager.requeue_dead(engine, dead_after_s=30) == ([], [])
    j = manager.get_job(engine, a.id, tenant=manager.ANY_TENANT)
    assert j.status == JobStatus.RUNNING and j.worker_id == "live" and j.attempts == 2
