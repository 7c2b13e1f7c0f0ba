"""The reconciler's decisions on real Redis and Postgres, with workers simulated by their rows."""

import time

import pytest
import redis

from llmos import manager
from llmos.db import get_engine
from llmos.dispatch import CeleryDispatcher, held_set, pending_set, take
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


def test_a_message_popped_by_a_worker_that_died_unrecorded_is_sent_again(world):
    settings, engine, r, d, rec = world
    lost, kept = make_jobs(engine, d, 2)
    # a worker's BRPOP took one message and the process died before kombu wrote "unacked"
    key = "llmos.minilm:4"
    msgs = r.lrange(key, 0, -1)
    r.delete(key)
    r.rpush(key, *[m for m in msgs if lost.id.encode() not in m])
    time.sleep(0.3)
    assert rec.run_once().resent == 1
    ids = {__import__("llmos.dispatch", fromlist=["_job_id_of"])._job_id_of(m) for m in r.lrange(key, 0, -1)}
    assert ids == {lost.id, kept.id}
