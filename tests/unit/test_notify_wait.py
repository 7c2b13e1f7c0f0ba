"""Waiting for results: one notice per group on one channel, one listener per client, reads
counted. Redis is an in-process fake (pub/sub only); the task table is a real SQLite one."""

from __future__ import annotations

import gc
import queue
import threading
import time

import pytest
import redis

import llmos
from llmos import manager, notify, sdk
from llmos.constants import DONE_CHANNEL
from llmos.db import get_engine
from llmos.dispatch import InMemoryDispatcher
from llmos.errors import JobNotFoundError, JobTimeoutError
from llmos.jobs import JobStatus
from llmos.notify import publish_done
from llmos.sdk import Client
from tests.helpers import count_reads

pytestmark = pytest.mark.filterwarnings("ignore::llmos.NoWorkerWarning")

KILL = object()


class FakePubSub:
    def __init__(self, server: "FakeRedis") -> None:
        self.server, self.channels, self.q = server, set(), queue.Queue()

    def subscribe(self, *channels):
        if self.server.down:
            raise redis.exceptions.ConnectionError("refused")
        with self.server.lock:
            self.channels.update(channels)
            self.server.subs.append(self)
        for c in channels:
            self.q.put({"type": "subscribe", "channel": c.encode(), "data": 1})

    def get_message(self, timeout=0.0):
        try:
            msg = self.q.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg is KILL:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return msg

    def close(self):
        with self.server.lock:
            if self in self.server.subs:
                self.server.subs.remove(self)


class FakeRedis:
    """Pub/sub in memory: what is published reaches the pub/subs subscribed at that moment."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.subs: list[FakePubSub] = []
        self.published: list[tuple[str, bytes]] = []
        self.down = False

    def pubsub(self, **_):
        return FakePubSub(self)

    def publish(self, channel, data):
        data = data.encode() if isinstance(data, str) else data
        with self.lock:
            self.published.append((channel, data))
            subs = [s for s in self.subs if channel in s.channels]
        for s in subs:
            s.q.put({"type": "message", "channel": channel.encode(), "data": data})
        return len(subs)

    def pipeline(self, transaction=False):
        server, calls = self, []

        class Pipe:
            def publish(self, channel, data):
                calls.append((channel, data))

            def execute(self):
                return [server.publish(c, d) for c, d in calls]
        return Pipe()

    def kill(self):
        """As CLIENT KILL: every subscriber's connection breaks (and is gone from the server)."""
        with self.lock:
            subs, self.subs = self.subs, []
        for s in subs:
            s.q.put(KILL)

    def ping(self):
        return True

    def close(self):
        pass


def finish(engine, ids, fake=None, label="POSITIVE"):
    """Run `ids` as a worker would: claim, record, then one notice for the batch (if `fake`)."""
    claimed, _ = manager.claim(engine, list(ids), worker_id="w", device="cpu")
    manager.finish(engine, [manager.Outcome(job_id=j.id, worker_id="w", attempt=j.attempts,
                                            result={"label": label, "score": 0.9}) for j in claimed])
    if fake is not None:
        publish_done(fake, [j.id for j in claimed])
    return [j.id for j in claimed]


class Worker(threading.Thread):
    """Runs every job the dispatcher was sent, `burst` at a time, announcing each burst."""

    def __init__(self, engine, dispatcher, fake, burst=16, drop=()):
        super().__init__(daemon=True)
        self.engine, self.dispatcher, self.fake, self.burst = engine, dispatcher, fake, burst
        self.drop, self.done, self.stop = set(drop), 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            todo = [job_id for _, job_id, _ in self.dispatcher.sent[self.done:self.done + self.burst]]
            if not todo:
                time.sleep(0.005)
                continue
            self.done += len(todo)
            finish(self.engine, todo)
            announced = [i for i in todo if i not in self.drop]
            if announced:
                publish_done(self.fake, announced)


@pytest.fixture(autouse=True)
def _quick_listener(monkeypatch):
    """A fake's pub/sub cannot be woken by a socket shutdown: the listener looks at its stop flag often."""
    monkeypatch.setattr(notify, "LISTEN_TICK_S", 0.05)


@pytest.fixture
def fake():
    return FakeRedis()


@pytest.fixture
def setup(sqlite_settings, fake):
    dispatcher = InMemoryDispatcher()
    client = Client(sqlite_settings, dispatcher=dispatcher, redis_conn=fake)
    engine = get_engine(sqlite_settings.db_url)
    yield client, dispatcher, engine
    client.close()


def tasks(n, prefix="t"):
    return [llmos.SentimentTask(text=f"{prefix}{i}") for i in range(n)]


# -- notices -------------------------------------------------------------------------------------
def test_publish_done_sends_one_message_per_thousand_ids(fake):
    ids = [f"id{i}" for i in range(2500)]
    publish_done(fake, ids[:7])
    assert fake.published == [(DONE_CHANNEL, ",".join(ids[:7]).encode())]
    fake.published.clear()
    publish_done(fake, ids)
    assert [c for c, _ in fake.published] == [DONE_CHANNEL] * 3
    assert [i for _, d in fake.published for i in notify.notice_ids(d)] == ids
    fake.published.clear()
    publish_done(fake, [])
    assert fake.published == []


def test_the_listener_keeps_only_ids_it_was_asked_about(fake):
    listener = notify.DoneListener(fake).start()
    try:
        assert listener.state() == 1
        with listener.cond:
            listener.watch(["a"])
        listener.track(["b"], 1, "default")
        publish_done(fake, ["x", "a", "y", "b", "z"])
        with listener.cond:
            assert listener.cond.wait_for(lambda: len(listener.announced) == 2, 5)
            assert listener.announced == {"a", "b"}
            listener.unwatch(["a"])
            listener.collected(["b"])
            assert (listener.announced, listener.watched, listener.submitted) == (set(), {}, {})
    finally:
        listener.close()
    assert not listener._thread.is_alive()


# -- waiting, both ways ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 200, 800])
def test_results_reads_each_outcome_once_and_no_status(setup, fake, monkeypatch, n):
    client, dispatcher, engine = setup
    model = client.load_model("minilm")
    handles = model.submit_many(tasks(n))
    reads = count_reads(monkeypatch)
    worker = Worker(engine, dispatcher, fake, burst=16)
    worker.start()
    try:
        results = model.results(handles, timeout=30)
    finally:
        worker.stop.set()
    assert [r.label for r in results] == ["POSITIVE"] * n
    # submitted while subscribed: no status read; each outcome (not the full row) once, in about n/16 queries
    assert (reads["status"], reads["full"], reads["outcome"]) == (0, 0, n)
    assert reads["outcome_queries"] <= -(-n // 16) + 2
    listener = client._listener
    assert (listener.submitted, listener.watched, listener.announced) == ({}, {}, set())


def test_handles_waited_in_turn_read_each_outcome_once_in_about_n_over_batch_queries(setup, fake, monkeypatch):
    client, dispatcher, engine = setup
    model = client.load_model("minilm")
    n, burst = 320, 32
    handles = model.submit_many(tasks(n))
    reads = count_reads(monkeypatch)
    worker = Worker(engine, dispatcher, fake, burst=burst)
    worker.start()
    try:
        labels = [h.result(timeout=30).label for h in handles]
    finally:
        worker.stop.set()
    assert labels == ["POSITIVE"] * n
    assert (reads["status"], reads["full"], reads["outcome"]) == (0, 0, n)  # one outcome each, none twice
    assert reads["outcome_queries"] <= 2 * n // burst  # siblings read along: about one query per batch
    group = handles[0]._group
    assert group.rows == {} and group.unread == set()
    assert client._listener.submitted == {} and client._listener.announced == set()


def test_results_come_in_input_order_with_mixed_outcomes(setup, fake):
    client, dispatcher, engine = setup
    model = client.load_model("minilm")
    handles = model.submit_many(tasks(30))
    order = [h.id for h in handles]
    # finish them in reverse, in three notices, with labels telling which is which
    for chunk in (order[20:], order[10:20], order[:10]):
        finish(engine, chunk[::-1], fake, label=f"L{order.index(chunk[0]) // 10}")
    results = model.results(handles[::-1], timeout=10)
    assert [r.label for r in results] == [f"L{i // 10}" for i in range(30)][::-1]
    assert [h.result(timeout=10).label for h in handles] == [f"L{i // 10}" for i in range(30)]  # again


def test_a_lost_notice_is_found_by_the_poll(setup, fake, monkeypatch):
    monkeypatch.setattr(sdk, "WAIT_POLL_S", 0.2)
    client, dispatcher, engine = setup
    model = client.load_model("minilm")
    handles = model.submit_many(tasks(40))
    lost = {handles[3].id, handles[30].id}
    reads = count_reads(monkeypatch)
    worker = Worker(engine, dispatcher, fake, burst=8, drop=lost)
    worker.start()
    started = time.monotonic()
    try:
        jobs = client.wait([h.id for h in handles], timeout=30)
    finally:
        worker.stop.set()
    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED} and len(jobs) == 40
    assert time.monotonic() - started < 5
    assert reads["full"] == 40 and 2 <= reads["status"] <= 2 * 3  # a poll or two found the unannounced


def test_a_lost_notice_in_turn_is_found_by_the_poll(setup, fake, monkeypatch):
    monkeypatch.setattr(sdk, "WAIT_POLL_S", 0.2)
    client, _, engine = setup
    h = client.load_model("minilm").submit(tasks(1)[0])
    finish(engine, [h.id])  # recorded, never announced
    started = time.monotonic()
    assert h.result(timeout=10).label == "POSITIVE"
    assert 0.15 < time.monotonic() - started < 3


def test_a_lost_batch_notice_costs_handles_in_turn_one_poll_not_one_each(setup, fake, monkeypatch):
    monkeypatch.setattr(sdk, "WAIT_POLL_S", 0.3)
    client, _, engine = setup
    handles = client.load_model("minilm").submit_many(tasks(10))
    finish(engine, [h.id for h in handles])  # a whole batch recorded, its notice lost
    reads = count_reads(monkeypatch)
    started = time.monotonic()
    assert [h.result(timeout=10).label for h in handles] == ["POSITIVE"] * 10
    assert time.monotonic() - started < 0.9  # one poll interval, then the siblings' rows were read along
    assert reads["outcome"] == 10 and reads["outcome_queries"] == 2  # its own, then all its siblings


def test_the_listener_subscribes_again_after_its_connection_is_killed(setup, fake, monkeypatch):
    client, dispatcher, engine = setup
    model = client.load_model("minilm")
    handles = model.submit_many(tasks(20))
    listener = client._listener
    assert listener.state() == 1
    reads = count_reads(monkeypatch)
    fake.kill()
    with listener.cond:
        assert listener.cond.wait_for(lambda: listener.state() == 2, 5)  # down, then subscribed again
    assert len(fake.subs) == 1
    # jobs that ended while it was down, announced into the void: the new epoch makes waits poll
    ids = [h.id for h in handles]
    finish(engine, ids[:10])
    started = time.monotonic()
    got = model.results(handles[:10], timeout=10)
    assert len(got) == 10 and time.monotonic() - started < 0.9  # no wait for the 1 s poll
    assert reads["outcome"] == 10 and reads["outcome_queries"] == 1  # one read: outcomes of all 10
    # and notices flow again: the rest wakes the waiter at once
    threading.Timer(0.05, finish, (engine, ids[10:], fake)).start()
    started = time.monotonic()
    assert len(model.results(handles[10:], timeout=10)) == 10
    assert time.monotonic() - started < 0.9


def test_a_wait_when_the_subscription_breaks_mid_wait_polls_at_once(setup, fake, monkeypatch):
    client, dispatcher, engine = setup
    model = client.load_model("minilm")
    handles = model.submit_many(tasks(5))
    box = {}
    waiter = threading.Thread(target=lambda: box.update(r=model.results(handles, timeout=20)))
    waiter.start()
    time.sleep(0.1)
    fake.down = True
    fake.kill()  # and Redis refuses for a while: the listener is down
    time.sleep(0.3)
    finish(engine, [h.id for h in handles])  # announced to nobody
    fake.down = False  # it comes back: subscribed again, the waiter polls and finds them
    waiter.join(10)
    assert len(box["r"]) == 5


def test_jobs_from_elsewhere_get_one_status_read(setup, fake, monkeypatch):
    client, dispatcher, engine = setup
    (job, _), = manager.create_jobs(engine, [manager.NewJob(model="minilm", task_type="sentiment",
                                                            input={"text": "x"}, priority=5)])
    handle = llmos.JobHandle(client, job.id, "minilm", "sentiment")  # built from an id: no group
    reads = count_reads(monkeypatch)
    threading.Timer(0.1, finish, (engine, [job.id], fake)).start()
    assert handle.result(timeout=10).label == "POSITIVE"
    assert reads["status"] == 1 and reads["full"] == 1
    again = llmos.JobHandle(client, job.id.upper(), "minilm", "sentiment")
    assert [r.label for r in client.load_model("minilm").results([again, handle], timeout=5)] == ["POSITIVE"] * 2
    assert client.wait([job.id])[job.id].input == {"text": "x"}  # wait: the full row


def test_jobs_submitted_while_redis_refuses_are_polled(sqlite_settings, monkeypatch):
    monkeypatch.setattr(sdk, "WAIT_POLL_S", 0.2)
    fake = FakeRedis()
    fake.down = True
    c = Client(sqlite_settings, dispatcher=InMemoryDispatcher(), redis_conn=fake)
    try:
        h = c.load_model("minilm").submit(tasks(1)[0])
        assert c._listener.state() is None and c._listener.submitted == {}
        threading.Timer(0.1, finish, (get_engine(sqlite_settings.db_url), [h.id])).start()
        assert h.result(timeout=10).label == "POSITIVE"
    finally:
        c.close()


def test_many_threads_wait_at_once(setup, fake):
    client, dispatcher, engine = setup
    model = client.load_model("minilm")
    handles = model.submit_many(tasks(64))
    out, errors = {}, []

    def wait(part):
        try:
            for h in part:
                out[h.id] = h.result(timeout=20).label
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=wait, args=(handles[i::8],)) for i in range(8)]
    threads.append(threading.Thread(target=lambda: out.update(
        {f"all{i}": r.label for i, r in enumerate(model.results(handles, timeout=20))})))
    for t in threads:
        t.start()
    worker = Worker(engine, dispatcher, fake, burst=5)
    worker.start()
    for t in threads:
        t.join(30)
    worker.stop.set()
    assert errors == [] and len(out) == 128 and set(out.values()) == {"POSITIVE"}
    assert client._listener.watched == {}


def test_timeouts_still_raise(setup, fake):
    client, _, _ = setup
    model = client.load_model("minilm")
    h = model.submit(tasks(1)[0])
    started = time.monotonic()
    with pytest.raises(JobTimeoutError, match="still queued after 0.3 s"):
        h.result(timeout=0.3)
    with pytest.raises(JobTimeoutError):
        model.results([h], timeout=0.2)
    assert 0.45 < time.monotonic() - started < 3
    assert client.wait([h.id], timeout=0)[h.id].status == JobStatus.QUEUED
    assert client._listener.watched == {}


def test_waits_are_scoped_by_tenant(setup, fake):
    client, _, engine = setup
    mine = client.load_model("minilm").submit(tasks(1)[0], tenant="a")
    finish(engine, [mine.id], fake)
    with pytest.raises(JobNotFoundError):
        client.wait([mine.id], timeout=1, tenant="b")  # announced, yet not b's: not found
    other = llmos.JobHandle(client, mine.id, "minilm", "sentiment", tenant="b")
    with pytest.raises(JobNotFoundError):
        other.result(timeout=1)
    assert mine.result(timeout=5).label == "POSITIVE"


def test_memory_is_bounded_by_what_is_not_collected(setup, fake, monkeypatch):
    client, dispatcher, engine = setup
    model = client.load_model("minilm")
    handles = model.submit_many(tasks(10))
    listener = client._listener
    assert len(listener.submitted) == 10
    finish(engine, [h.id for h in handles], fake)
    with listener.cond:
        assert listener.cond.wait_for(lambda: len(listener.announced) == 10, 5)
    del handles  # never waited for: forgotten once their handles are gone
    gc.collect()
    publish_done(fake, ["unrelated"])  # the listener drains what was forgotten at its next message
    with listener.cond:
        assert listener.cond.wait_for(lambda: not listener.submitted and not listener.announced, 5)
    monkeypatch.setattr(notify, "MAX_TRACKED_SUBMITS", 5)
    more = model.submit_many(tasks(8, "m"))
    assert len(listener.submitted) == 5  # past the cap: waited for as jobs from elsewhere
    finish(engine, [h.id for h in more], fake)
    assert [r.label for r in model.results(more, timeout=10)] == ["POSITIVE"] * 8


def test_close_stops_the_listener(sqlite_settings, fake):
    c = Client(sqlite_settings, dispatcher=InMemoryDispatcher(), redis_conn=fake)
    c.load_model("minilm").submit(tasks(1)[0])
    thread = c._listener._thread
    assert thread.is_alive() and len(fake.subs) == 1
    c.close()
    assert not thread.is_alive() and fake.subs == []
