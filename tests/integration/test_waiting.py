"""Waiting for results on real Redis and Postgres: one subscription per client, notices per
batch, reads counted, a lost notice, a killed subscription, tenants.

Jobs of the model `idle` (registered here, served by no worker) are run by the test itself
(claimed and recorded in the table as a worker would), so it decides what is announced; `minilm`
jobs go through the module's real worker process.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

import llmos
from llmos import manager, sdk
from llmos.constants import DONE_CHANNEL
from llmos.db import get_engine
from llmos.errors import JobNotFoundError
from llmos.notify import notice_ids, publish_done
from llmos.registry import ModelSpec, Registry
from llmos.sdk import Client
from tests.helpers import count_reads

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::llmos.NoWorkerWarning")]


@pytest.fixture(scope="module")
def registry(services):
    settings, _ = services
    idle = ModelSpec(name="idle", source="x", tasks=("sentiment",), max_input_chars=100)
    return Registry({"idle": idle, "minilm": Registry.load(settings).get("minilm")})


@pytest.fixture
def client(services, registry):
    settings, _ = services
    with Client(settings, registry=registry) as c:
        yield c


@pytest.fixture
def engine(services):
    return get_engine(services[0].db_url)


@pytest.fixture
def r(redis_url):
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def run_jobs(engine, ids, r=None, label="POSITIVE"):
    """What a worker does with `ids`: claim, record, then (with `r`) one notice for them."""
    claimed, _ = manager.claim(engine, list(ids), worker_id="test", device="cpu")
    manager.finish(engine, [manager.Outcome(job_id=j.id, worker_id="test", attempt=j.attempts,
                                            result={"label": label, "score": 0.9}) for j in claimed])
    if r is not None:
        publish_done(r, [j.id for j in claimed])


def count_connections(monkeypatch):
    """New Redis connections and pub/subs made in this process."""
    made = {"connections": 0, "pubsubs": 0}
    real_connect = redis.connection.AbstractConnection.connect
    real_pubsub = redis.Redis.pubsub

    def connect(self, *a, **k):
        if self._sock is None:
            made["connections"] += 1
        return real_connect(self, *a, **k)

    def pubsub(self, *a, **k):
        made["pubsubs"] += 1
        return real_pubsub(self, *a, **k)
    monkeypatch.setattr(redis.connection.AbstractConnection, "connect", connect)
    monkeypatch.setattr(redis.Redis, "pubsub", pubsub)
    return made


class Notices(threading.Thread):
    """Counts the notices (messages) announcing any of `self.ids`, on a subscription of its own."""

    def __init__(self, redis_url):
        super().__init__(daemon=True)
        self.ids, self.messages, self.stop = set(), 0, threading.Event()
        self.pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(DONE_CHANNEL)

    def run(self):
        while not self.stop.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if msg and msg["type"] == "message" and self.ids & set(notice_ids(msg["data"])):
                self.messages += 1
        self.pubsub.close()


def kill_listener(r, client):
    """CLIENT KILL the listener's own connection (found by its local port)."""
    conn = client._listener._pubsub.connection
    host, port = conn._sock.getsockname()[:2]
    assert r.client_kill_filter(_type="pubsub", laddr=None, addr=f"{host}:{port}") == 1


# -- with the real worker -------------------------------------------------------------------------
def test_handles_waited_in_turn_read_each_outcome_once_about_one_query_per_batch(client, pg_worker, monkeypatch,
                                                                              redis_url):
    monkeypatch.setattr(sdk, "WAIT_POLL_S", 60.0)  # no fallback poll on a slow machine: reads by notices only
    model = client.load_model("minilm")
    model.execute(llmos.SentimentTask(text="warm"), timeout=120)  # the listener is up, the worker warm
    texts = [f"review {i}: {'great, loved it' if i % 2 else 'awful, broke at once'}" for i in range(200)]
    watcher = Notices(redis_url)
    watcher.start()
    made = count_connections(monkeypatch)
    handles = model.submit_many([llmos.SentimentTask(text=t) for t in texts])
    watcher.ids.update(h.id for h in handles)
    reads = count_reads(monkeypatch)
    labels = [h.result(timeout=120).label for h in handles]
    watcher.stop.set()
    watcher.join(5)
    assert labels == ["POSITIVE" if i % 2 else "NEGATIVE" for i in range(200)]
    assert (reads["status"], reads["full"], reads["outcome"]) == (0, 0, 200)  # each once, no status read
    # at most one query per notice (a recorded batch), siblings read along
    assert reads["outcome_queries"] <= watcher.messages + 1, (reads, watcher.messages)
    assert made["pubsubs"] == 0 and made["connections"] <= 2  # no subscription per job
    batches = {(j.started_at, j.batch_size) for j in manager.get_jobs(client.engine, [h.id for h in handles],
                                                                      tenant=client.tenant).values()}
    assert reads["outcome_queries"] <= len(batches) + 1


def test_results_in_input_order_from_the_worker(client, pg_worker, monkeypatch):
    monkeypatch.setattr(sdk, "WAIT_POLL_S", 60.0)
    model = client.load_model("minilm")
    texts = [f"text {i}: {'wonderful' if i % 3 else 'terrible'}" for i in range(150)]
    handles = model.submit_many([llmos.SentimentTask(text=t) for t in texts])
    reads = count_reads(monkeypatch)
    results = model.results(handles, timeout=120)
    assert [r.label for r in results] == ["POSITIVE" if i % 3 else "NEGATIVE" for i in range(150)]
    assert (reads["status"], reads["full"], reads["outcome"]) == (0, 0, 150)


def test_a_killed_subscription_mid_wait_loses_nothing(client, pg_worker, r):
    model = client.load_model("minilm")
    handles = model.submit_many([llmos.SentimentTask(text=f"fine {i}") for i in range(300)])
    box = {}
    waiter = threading.Thread(target=lambda: box.update(results=model.results(handles, timeout=120)))
    waiter.start()
    time.sleep(0.2)
    kill_listener(r, client)
    waiter.join(130)
    assert len(box["results"]) == 300
    assert client._listener.epoch >= 2 and client._listener.live


# -- jobs run by the test -------------------------------------------------------------------------
def test_a_lost_notice_is_found_by_the_poll(client, engine, monkeypatch):
    monkeypatch.setattr(sdk, "WAIT_POLL_S", 0.3)
    model = client.load_model("idle")
    handles = model.submit_many([llmos.SentimentTask(text=f"t{i}") for i in range(3)])
    run_jobs(engine, [h.id for h in handles])  # recorded; nothing published
    started = time.monotonic()
    assert [h.result(timeout=10).label for h in handles] == ["POSITIVE"] * 3
    assert 0.25 < time.monotonic() - started < 3


def test_the_listener_subscribes_again_after_client_kill(client, engine, r, monkeypatch):
    model = client.load_model("idle")
    handles = model.submit_many([llmos.SentimentTask(text=f"k{i}") for i in range(20)])
    listener = client._listener
    assert listener.state() == 1
    kill_listener(r, client)
    with listener.cond:
        assert listener.cond.wait_for(lambda: listener.state() == 2, 10)
    assert r.pubsub_numsub(DONE_CHANNEL)[0][1] >= 1
    reads = count_reads(monkeypatch)
    # ended unannounced around the break: the jobs submitted before it get a status read at once
    run_jobs(engine, [h.id for h in handles[:10]])
    started = time.monotonic()
    assert len(model.results(handles[:10], timeout=10)) == 10
    assert time.monotonic() - started < 0.9  # no wait for the 1 s poll: one read of all 10 at once
    assert reads["outcome"] == 10 and reads["outcome_queries"] == 1
    # the new subscription carries notices: a job announced later wakes the waiter at once
    later = model.submit(llmos.SentimentTask(text="later"))
    threading.Timer(0.1, run_jobs, (engine, [later.id], r)).start()
    started = time.monotonic()
    assert later.result(timeout=10).label == "POSITIVE"
    assert time.monotonic() - started < 0.9
    run_jobs(engine, [h.id for h in handles[10:]], r)
    assert len(model.results(handles[10:], timeout=10)) == 10


def test_one_subscription_per_client_whatever_the_waits(client, engine, r, monkeypatch):
    model = client.load_model("idle")
    model.submit(llmos.SentimentTask(text="first"))  # the listener starts here, before the insert
    listener = client._notices()
    epoch = listener.epoch
    real_pubsub = client.redis.pubsub
    made = []
    monkeypatch.setattr(client.redis, "pubsub", lambda *a, **k: made.append(1) or real_pubsub(*a, **k))
    for i in range(30):
        h = model.submit(llmos.SentimentTask(text=f"one {i}"))
        threading.Timer(0.01, run_jobs, (engine, [h.id], r)).start()
        assert h.result(timeout=10).label == "POSITIVE"
    # the same subscription all along: no new listener, no resubscription, no pub/sub of the client's
    assert client._notices() is listener and listener.epoch == epoch and not made


def test_waits_are_scoped_by_tenant(services, registry, engine, r):
    settings, _ = services
    with Client(settings, registry=registry, tenant="wait-a") as a, \
            Client(settings, registry=registry, tenant="wait-b") as b:
        mine = a.load_model("idle").submit(llmos.SentimentTask(text="a's"))
        theirs = b.load_model("idle").submit(llmos.SentimentTask(text="b's"))
        run_jobs(engine, [mine.id, theirs.id], r, label="A")
        with pytest.raises(JobNotFoundError):
            b.wait([mine.id], timeout=2)
        with pytest.raises(JobNotFoundError):
            a.wait([mine.id], timeout=2, tenant="wait-b")
        with pytest.raises(JobNotFoundError):
            llmos.JobHandle(b, mine.id, "idle", "sentiment").result(timeout=2)
        assert mine.result(timeout=5).label == "A" and theirs.result(timeout=5).label == "A"
        assert set(a.wait([mine.id], timeout=5)) == {mine.id}


def test_many_threads_and_two_clients_wait_at_once(services, registry, engine, r):
    settings, _ = services
    with Client(settings, registry=registry) as one, Client(settings, registry=registry) as two:
        hs1 = one.load_model("idle").submit_many([llmos.SentimentTask(text=f"x{i}") for i in range(40)])
        hs2 = two.load_model("idle").submit_many([llmos.SentimentTask(text=f"y{i}") for i in range(40)])
        out, errors = [], []

        def wait(hs):
            try:
                out.extend(h.result(timeout=20).label for h in hs)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        threads = [threading.Thread(target=wait, args=(hs[i::4],)) for hs in (hs1, hs2) for i in range(4)]
        for t in threads:
            t.start()
        ids = [h.id for h in hs1 + hs2]
        for i in range(0, len(ids), 7):
            run_jobs(engine, ids[i:i + 7], r)
            time.sleep(0.01)
        for t in threads:
            t.join(30)
        assert errors == [] and out == ["POSITIVE"] * 80
