"""Our kombu transport on a real Redis: delivery takes the job, acks are written in bulk."""

import time

import pytest
import redis

from llmos.dispatch import CeleryDispatcher, held_set, make_celery, pending_set, queue_keys, queue_name
from llmos.jobs import Job, JobStatus
from llmos.settings import Settings
from llmos.transport import SCHEME

pytestmark = pytest.mark.integration


def job(i: int) -> Job:
    return Job(id=f"7a1f0e4e-1111-4222-8333-94445555{i:04d}", model="tr", task_type="sentiment",
               priority=5, status=JobStatus.QUEUED, input={"text": "x"})


@pytest.fixture
def setup(redis_url, tmp_path):
    settings = Settings(home=tmp_path, redis_url=redis_url, database_url=f"sqlite:///{tmp_path / 'x.db'}")
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    app = make_celery(settings)
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "llmos_take": {"pending": pending_set("tr"), "held": held_set("w1")}}
    yield settings, r, app
    app.close()
    r.close()


def send(settings: Settings, jobs: list[Job], chunk: int = 1) -> None:
    d = CeleryDispatcher(settings)
    d.send(jobs, chunk=chunk)
    d.close()


def test_worker_urls_use_our_transport(setup):
    settings, _, app = setup
    assert settings.kombu_url.startswith(SCHEME + "://")
    with app.connection_for_read() as conn:
        from llmos.transport import Transport

        assert isinstance(conn.transport, Transport)
        channel = conn.default_channel
        assert channel._create_client() is channel._create_client()  # one client, not one per call


def test_delivery_records_unacked_and_moves_the_job_to_held(setup):
    settings, r, app = setup
    jobs = [job(i) for i in range(3)]
    send(settings, jobs)
    assert r.scard(pending_set("tr")) == 3
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue_name("tr"))
        got = [q.get(timeout=5) for _ in jobs]
        # kombu's unacked record and our held set were written in one MULTI on delivery
        assert r.hlen("unacked") == 3 and r.zcard("unacked_index") == 3
        assert r.scard(pending_set("tr")) == 0
        assert {m.decode() for m in r.smembers(held_set("w1"))} == {j.id for j in jobs}
        for m in got:
            m.ack()
        deadline = time.monotonic() + 5  # the flusher writes acks a few ms later, in bulk
        while r.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0
        q.close()


def test_messages_of_other_tasks_are_not_taken(setup):
    settings, r, app = setup
    with app.producer_or_acquire() as producer:
        app.send_task("some.other.task", args=["x"], queue=queue_name("tr"), producer=producer)
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue_name("tr"))
        q.get(timeout=5).ack()
        q.close()
    assert not r.exists(held_set("w1"))


def all_queued(r, model: str) -> int:
    return sum(r.llen(k) for k in queue_keys(model))


def test_closing_the_channel_writes_pending_acks(setup, monkeypatch):
    from llmos import transport

    settings, r, app = setup
    monkeypatch.setattr(transport.QoS, "_flush_loop", lambda self: None)  # only close() can write it
    send(settings, [job(7)])
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue_name("tr"))
        q.get(timeout=5).ack()
        assert r.hlen("unacked") == 1  # not written yet
        q.close()
    assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0 and all_queued(r, "tr") == 0


def test_a_restored_message_puts_its_job_back_in_pending(setup):
    settings, r, app = setup
    send(settings, [job(8)])
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue_name("tr"))
        q.get(timeout=5)  # delivered, never acked: kombu restores it when the channel closes
        assert r.sismember(held_set("w1"), job(8).id)
        q.close()
    assert r.hlen("unacked") == 0 and all_queued(r, "tr") == 1
    assert r.sismember(pending_set("tr"), job(8).id) and not r.sismember(held_set("w1"), job(8).id)


def test_a_requeued_message_puts_its_job_back_in_pending(setup):
    settings, r, app = setup
    send(settings, [job(9)])
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue_name("tr"))
        q.get(timeout=5).requeue()
        assert r.sismember(pending_set("tr"), job(9).id) and not r.sismember(held_set("w1"), job(9).id)
        assert all_queued(r, "tr") == 1
        q.close()


def test_a_failed_ack_write_is_kept_and_written_later(setup):
    settings, r, app = setup
    send(settings, [job(10)])
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue_name("tr"))
        msg = q.get(timeout=5)
        qos = conn.default_channel.qos
        real = qos.channel.client_for_commands
        qos.channel.client_for_commands = lambda: (_ for _ in ()).throw(redis.ConnectionError("down"))
        with qos._ack_lock:
            qos._acked.append(msg.delivery_tag)
        with pytest.raises(redis.ConnectionError):
            qos.flush_acks()
        assert qos._acked == [msg.delivery_tag]  # kept for the next try
        qos.channel.client_for_commands = real
        qos.flush_acks()
        assert r.hlen("unacked") == 0
        q.close()


@pytest.mark.parametrize("body, want", [
    (b'[["abc-1"], {}, {}]', ["abc-1"]),
    (b'[[["abc-1", "abc-2"]], {}, {}]', ["abc-1", "abc-2"]),
    (b'[[], {"job_id": "abc-2"}, {}]', ["abc-2"]),
    (b'[[], {"job_id": ["abc-2", "abc-3"]}, {}]', ["abc-2", "abc-3"]),
    (b'[[null], {}, {}]', []),
    (b'[[["abc-1", 7]], {}, {}]', []),
    (b'[[[]], {}, {}]', []),
    (b'"a string"', []),
    (b'not json', []),
    (b'[[42], {}, {}]', []),
])
def test_job_id_parsing(body, want):
    from llmos.constants import RUN_JOB_TASK
    from llmos.transport import job_ids_from

    assert job_ids_from({"task": RUN_JOB_TASK}, body) == want
    assert job_ids_from({"task": "other"}, body) == []


def test_one_brpop_delivers_a_burst_recorded_and_taken(setup):
    """A worker's channel pops what its prefetch room allows in one go (BRPOP + one script)."""
    from kombu import Consumer, Queue

    settings, r, app = setup
    jobs = [job(20 + i) for i in range(10)]
    send(settings, jobs)
    got = []
    with app.connection_for_read() as conn:
        channel = conn.channel()
        consumer = Consumer(channel, [Queue(queue_name("tr"))], callbacks=[lambda body, m: got.append(m)],
                            accept=["json"])
        consumer.qos(prefetch_count=6)
        with consumer:
            conn.drain_events(timeout=5)  # one BRPOP
            assert len(got) == 6  # the first message, then five more up to the prefetch room
            assert r.hlen("unacked") == 6 and r.zcard("unacked_index") == 6
            held = {m.decode() for m in r.smembers(held_set("w1"))}
            assert held == {j.id for j in jobs[:6]}  # priority order is list order here
            assert r.scard(pending_set("tr")) == 4 and all_queued(r, "tr") == 4
            for m in got:
                m.ack()
            while len(got) < 10:
                conn.drain_events(timeout=5)
            for m in got[6:]:
                m.ack()
        channel.close()
    assert r.hlen("unacked") == 0 and not r.exists(pending_set("tr"))
    assert sorted(m.headers["argsrepr"] for m in got) == sorted(repr([j.id]) for j in jobs)


def consume_once(app, prefetch: int):
    """One BRPOP (plus the bulk pop) on a worker channel; returns (connection, channel, messages)."""
    from kombu import Consumer, Queue

    got = []
    conn = app.connection_for_read()
    channel = conn.channel()
    consumer = Consumer(channel, [Queue(queue_name("tr"))], callbacks=[lambda body, m: got.append(m)],
                        accept=["json"])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    conn.drain_events(timeout=5)
    return conn, channel, got


def test_a_burst_comes_back_whole_when_the_worker_stops_before_acking(setup):
    settings, r, app = setup
    jobs = [job(40 + i) for i in range(5)]
    send(settings, jobs)
    conn, channel, got = consume_once(app, prefetch=10)
    assert len(got) == 5 and r.hlen("unacked") == 5 and r.scard(held_set("w1")) == 5
    assert not channel.qos.prerecorded
    channel.close()  # kombu restores what was delivered and not acked
    conn.close()
    assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0 and all_queued(r, "tr") == 5
    assert {m.decode() for m in r.smembers(pending_set("tr"))} == {j.id for j in jobs}
    assert not r.exists(held_set("w1"))


def test_a_burst_is_popped_in_priority_order(setup):
    from dataclasses import replace

    settings, r, app = setup
    jobs = [replace(job(60 + i), priority=p) for i, p in enumerate([1, 9, 5, 9, 3])]
    send(settings, jobs)
    conn, channel, got = consume_once(app, prefetch=10)
    order = [m.headers["argsrepr"] for m in got]
    for m in got:
        m.ack()
    channel.close()
    conn.close()
    by_priority = sorted(jobs, key=lambda j: -j.priority)  # stable: equal priorities in send order
    assert order == [repr([j.id]) for j in by_priority]


def ids_of(messages) -> set[str]:
    return {m.headers["argsrepr"][2:-2] for m in messages}


def assert_nothing_stranded(r, jobs, got):
    """Every job is delivered (recorded, held) or back in its list (pending), nothing in between."""
    delivered = ids_of(got)
    assert r.hlen("unacked") == len(got) and r.zcard("unacked_index") == len(got)
    assert {m.decode() for m in r.smembers(held_set("w1"))} == delivered
    assert {m.decode() for m in r.smembers(pending_set("tr"))} == {j.id for j in jobs} - delivered
    assert all_queued(r, "tr") == len(jobs) - len(got)


def test_a_lost_bulk_pop_reply_puts_its_messages_back_at_once(setup, monkeypatch):
    from llmos import transport

    settings, r, app = setup
    jobs = [job(80 + i) for i in range(10)]
    send(settings, jobs)
    monkeypatch.setattr(transport, "_drop_pop_replies", 1)  # LLMOS_FAULT_DROP_POP_REPLY=1
    conn, channel, got = consume_once(app, prefetch=6)
    # the script popped, recorded and took five more; its reply was lost; they came back
    assert len(got) == 1 and transport._drop_pop_replies == 0
    assert_nothing_stranded(r, jobs, got)
    assert not r.keys(transport.BURST_PREFIX + "*") and not channel._lost_bursts
    channel.close()
    conn.close()


def test_a_lost_bulk_pop_reply_is_recovered_on_a_later_read(setup, monkeypatch):
    from llmos import transport

    settings, r, app = setup
    jobs = [job(100 + i) for i in range(10)]
    send(settings, jobs)
    monkeypatch.setattr(transport, "_drop_pop_replies", 1)
    real_recover, calls = transport.Channel._recover_bursts, []

    def redis_still_away(self):  # the first try right after the lost reply fails too
        calls.append(1)
        if len(calls) > 1:
            real_recover(self)

    monkeypatch.setattr(transport.Channel, "_recover_bursts", redis_still_away)
    conn, channel, got = consume_once(app, prefetch=6)
    assert len(got) == 1 and len(channel._lost_bursts) == 1
    (lost,) = channel._lost_bursts
    assert r.llen(lost) == 5  # the script listed the five it recorded
    assert r.hlen("unacked") == 6 and r.scard(held_set("w1")) == 6  # five delivered to nobody
    while len(got) < 6:  # the next reads recover the burst first, then pop as usual
        conn.drain_events(timeout=5)
    assert not channel._lost_bursts and not r.exists(lost)
    assert_nothing_stranded(r, jobs, got)
    for m in got:
        m.ack()
    channel.close()
    conn.close()


def test_the_bulk_pop_deletes_the_previous_pops_burst_key(setup):
    from llmos import transport

    settings, r, app = setup
    send(settings, [job(120 + i) for i in range(6)])
    conn, channel, got = consume_once(app, prefetch=3)
    assert len(r.keys(transport.BURST_PREFIX + "*")) == 1  # kept until the next pop's reply is in
    for m in got:
        m.ack()
    while len(got) < 6:
        conn.drain_events(timeout=5)
    assert r.keys(transport.BURST_PREFIX + "*") == [channel._burst_key.encode()]
    for m in got[3:]:
        m.ack()
    channel.close()
    conn.close()


def test_a_visibility_timeout_sweep_leaves_held_sets_alone(setup):
    """Worker w2 sweeps w1's old delivery of job X back to its list while w2 itself holds a
    duplicate message of X: X is pending again, and w2 still holds it (w1's entry is w1's audit's)."""
    settings, r, app = setup
    x = job(140)
    send(settings, [x])
    conn, channel, got = consume_once(app, prefetch=1)  # w1 has X's message, unacked
    assert len(got) == 1
    r.sadd(held_set("w2"), x.id)
    app2 = make_celery(settings)
    app2.conf.broker_transport_options = {
        **app2.conf.broker_transport_options,
        "llmos_take": {"pending": pending_set("tr"), "held": held_set("w2")}}
    with app2.connection_for_read() as conn2:
        qos = conn2.default_channel.qos
        qos.visibility_timeout = 0  # every delivery is over it
        qos.restore_visible(num=10, interval=1)
    app2.close()
    assert all_queued(r, "tr") == 1 and r.sismember(pending_set("tr"), x.id) and r.hlen("unacked") == 0
    assert r.sismember(held_set("w2"), x.id) and r.sismember(held_set("w1"), x.id)
    channel.close()
    conn.close()


# -- messages that carry several job ids (a bulk submit's chunks) ------------------------------
def chunk_setup(app, max_ids: int) -> None:
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "llmos_take": {"pending": pending_set("tr"), "held": held_set("w1"), "max_ids": max_ids}}


def chunk_ids(messages) -> list[list[str]]:
    from llmos.transport import job_ids_from

    return [job_ids_from(m.headers, m.body) for m in messages]


def test_a_burst_of_chunks_is_bounded_by_job_ids_not_messages(setup):
    """Ten messages of four ids each, a worker allowed 10 ids and 20 messages: the pop stops once
    10 ids are in hand (the message that crosses the bound is the last), every id is taken, and
    the channel consumes again only after an ack frees room."""
    settings, r, app = setup
    chunk_setup(app, max_ids=10)
    jobs = [job(100 + i) for i in range(40)]
    send(settings, jobs, chunk=4)
    assert all_queued(r, "tr") == 10
    conn, channel, got = consume_once(app, prefetch=20)
    try:
        ids = chunk_ids(got)
        assert ids == [[j.id for j in jobs[4 * i:4 * i + 4]] for i in range(3)]  # 4 + 4 + 4 ≥ 10
        held = {m.decode() for m in r.smembers(held_set("w1"))}
        assert held == {i for chunk in ids for i in chunk}
        assert r.scard(pending_set("tr")) == 28 and r.hlen("unacked") == 3
        assert channel.qos.ids_in_hand() == 12 and not channel.qos.can_consume()
        got[0].ack()
        assert channel.qos.ids_in_hand() == 8 and channel.qos.can_consume()
        assert channel.qos.id_room() == 2
    finally:
        channel.close()  # the two unacked chunks go back whole
        conn.close()
    # the acked chunk's ids stay held (a worker releases them once recorded), the rest pending
    assert all_queued(r, "tr") == 9
    assert {m.decode() for m in r.smembers(held_set("w1"))} == {j.id for j in jobs[:4]}
    assert r.scard(pending_set("tr")) == 36


def test_a_restored_chunk_puts_every_job_back_in_pending(setup):
    settings, r, app = setup
    chunk_setup(app, max_ids=64)
    jobs = [job(200 + i) for i in range(5)]
    send(settings, jobs, chunk=5)
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue_name("tr"))
        q.get(timeout=5)
        assert {m.decode() for m in r.smembers(held_set("w1"))} == {j.id for j in jobs}
        assert r.scard(pending_set("tr")) == 0
        q.close()
    assert {m.decode() for m in r.smembers(pending_set("tr"))} == {j.id for j in jobs}
    assert not r.exists(held_set("w1")) and all_queued(r, "tr") == 1


def test_a_chunk_whose_argsrepr_is_not_ours_is_taken_from_its_body(setup):
    """Celery truncates a long argsrepr; the script then leaves the ids to the Python side, which
    reads them from the body: still every id held, none pending."""
    settings, r, app = setup
    chunk_setup(app, max_ids=64)
    first = [job(300 + i) for i in range(3)]
    send(settings, [first[0]])  # a one-id message first, so the chunk comes through the bulk pop
    ids = [j.id for j in first[1:]]
    with app.producer_or_acquire() as producer:
        app.send_task(RUN_JOB_TASK_NAME(), args=[ids], queue=queue_name("tr"), producer=producer,
                      argsrepr="[['" + ids[0] + "', ...]]", priority=5)
    r.sadd(pending_set("tr"), *ids)
    conn, channel, got = consume_once(app, prefetch=10)
    try:
        assert len(got) == 2
        assert {m.decode() for m in r.smembers(held_set("w1"))} == {j.id for j in first}
        assert r.scard(pending_set("tr")) == 0 and channel.qos.ids_in_hand() == 3
    finally:
        for m in got:
            m.ack()
        channel.close()
        conn.close()


def RUN_JOB_TASK_NAME() -> str:
    from llmos.constants import RUN_JOB_TASK

    return RUN_JOB_TASK
