"""The worker's guards on real Redis and Postgres (in process, no Celery): a failed claim and the
held-set audit release stranded ids; the cancel listener acts only on a cancel the table holds."""

import threading
import time

import pytest
import redis
import sqlalchemy as sa

from llmos import manager
from llmos.constants import CANCEL_CHANNEL
from llmos.dispatch import held_set
from tests.conftest import reset_services
from workers.worker import Worker

pytestmark = pytest.mark.integration


@pytest.fixture
def worker(services):
    settings, _ = services
    reset_services(settings.db_url, settings.redis_url)
    w = Worker("minilm", settings=settings)
    manager.register_worker(w.engine, worker_id=w.worker_id, host="h", pid=1, model="minilm", device="cpu")
    yield w, redis.Redis.from_url(settings.redis_url)
    w._stop.set()


def make_jobs(engine, n):
    new = [manager.NewJob(model="minilm", task_type="sentiment", input={"text": f"t{i}"}, priority=5)
           for i in range(n)]
    return [j for j, _ in manager.create_jobs(engine, new)]


def members(r, key):
    return {m.decode() for m in r.smembers(key)}


def test_a_failed_claim_and_the_audit_leave_no_id_stranded(worker):
    w, r = worker
    key = held_set(w.worker_id)
    jobs = make_jobs(w.engine, 3)
    r.sadd(key, *[j.id for j in jobs])  # as the delivery's take wrote them
    w._claim_faults = 1
    with pytest.raises(sa.exc.ProgrammingError):
        w.claim([j.id for j in jobs], True)
    assert members(r, key) == set()

    r.sadd(key, "in-hand", "stranded")  # e.g. a lost bulk-pop reply's, or a failed SREM's
    w._in_hand["in-hand"] += 1
    w._audit_held()
    assert members(r, key) == {"in-hand", "stranded"}  # first strike only
    w._audit_held()
    assert members(r, key) == {"in-hand"}


def eventually(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_the_cancel_listener_acts_only_on_a_cancel_the_table_holds(worker):
    w, r = worker
    (job,) = make_jobs(w.engine, 1)
    (running,), _ = manager.claim(w.engine, [job.id], worker_id=w.worker_id, device="cpu")
    w._in_hand[job.id] += 1
    listener = threading.Thread(target=w._listen_cancels, daemon=True)
    listener.start()
    assert eventually(lambda: r.pubsub_numsub(CANCEL_CHANNEL)[0][1] >= 1)
    r.publish(CANCEL_CHANNEL, job.id)  # a publish alone, the job still running in the table
    (other,) = make_jobs(w.engine, 1)
    assert manager.cancel(w.engine, other.id, tenant=manager.ANY_TENANT)
    w._in_hand[other.id] += 1
    r.publish(CANCEL_CHANNEL, other.id)  # heard after the first: the first was handled by then
    assert eventually(lambda: w.control.reason(other) == "cancelled")
    assert w.control.reason(running) is None
    assert manager.cancel(w.engine, job.id, tenant=manager.ANY_TENANT)
    r.publish(CANCEL_CHANNEL, job.id)
    assert eventually(lambda: w.control.reason(running) == "cancelled")
    w._stop.set()
    listener.join(5)
