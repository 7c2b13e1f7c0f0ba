"""Issue 14, Done-when 5, with a real worker process, Postgres and Redis: (a) a priority-1 job under
a steady stream of priority-9 jobs finishes within the bound docs/scheduling.md states for aging;
(b) two tenants with [shares] weights 3:1 flooding one model get 75/25 ± 10 points of its compute.
And the reconciler does not take an aged job's old message for a sign that jobs behind it are lost.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
import sqlalchemy as sa

import llmos
from llmos import manager
from llmos.db import get_engine, jobs
from llmos.dispatch import CeleryDispatcher, pending_set, queue_keys
from llmos.jobs import JobStatus
from llmos.reconciler import Reconciler
from llmos.scheduling import aging, shares
from llmos.sdk import Client
from tests.conftest import reset_services
from tests.helpers import WorkerProcess, wait_all_final

pytestmark = pytest.mark.integration

MODEL = "minilm"
TEXT = "The service was quick and the food was lovely."


def test_an_aged_jobs_old_message_does_not_make_the_jobs_behind_it_look_lost(services):
    settings, _ = services
    reset_services(settings.db_url, settings.redis_url)  # before the module's worker starts
    settings = settings.model_copy(update={"resend_after_s": 0.2, "aging_s": 0.1})
    engine = get_engine(settings.db_url)
    r = redis.Redis.from_url(settings.redis_url)
    d = CeleryDispatcher(settings)
    rec = Reconciler(settings, dispatcher=d, redis_conn=r)
    try:
        new = manager.NewJob(model=MODEL, task_type="sentiment", input={"text": "x"}, priority=1)
        (a, _), = manager.create_jobs(engine, [new])
        d.send([a])
        time.sleep(0.05)
        (b, _), = manager.create_jobs(engine, [new])
        d.send([b])
        time.sleep(0.8)  # past the orphan margin: a's promotion is clearly later than b's send
        promoted = manager.age_queued(engine, MODEL, step_s=0.1, ceiling=9, limit=1)  # the oldest: a
        assert [j.id for j in promoted] == [a.id]
        d.send(promoted)
        time.sleep(0.3)  # both stale; a's old message is the oldest of priority 1's list, b's behind it
        report = rec.run_once()
        assert report.resent == 0, report  # b's message is in its list: not re-sent
        assert r.llen(queue_keys(MODEL)[9 - 1]) == 2  # priority 1's list: a's old message and b's
        assert set(m.decode() for m in r.smembers(pending_set(MODEL))) == {a.id, b.id}
    finally:
        rec.close()
        reset_services(settings.db_url, settings.redis_url)


@pytest.fixture(scope="module")
def worker(services):
    settings, env = services
    w = WorkerProcess(env, model=MODEL, concurrency=8).wait_ready(settings.db_url)
    yield w
    assert w.stop() == 0, w.log()


class TopUp(threading.Thread):
    """Keeps `keep` of `tenant`'s jobs queued on MODEL (a steady flood), submitting what is missing."""

    def __init__(self, settings, tenant: str, priority: int, keep: int, piece: int = 32) -> None:
        super().__init__(daemon=True, name=f"topup-{tenant}")
        self.settings, self.tenant, self.priority, self.keep, self.piece = settings, tenant, priority, keep, piece
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.settings, tenant=self.tenant) as client:
                engine = get_engine(self.settings.db_url)
                while not self.stop.is_set():
                    missing = self.keep - manager.queued_count(engine, tenant=self.tenant)
                    for n in range(0, max(0, missing), self.piece):  # small messages: a fine-grained flood
                        client.submit(MODEL, [llmos.SentimentTask(text=TEXT)] * min(self.piece, missing - n),
                                      priority=self.priority)
                    self.stop.wait(0.02)
        except BaseException as exc:  # seen by the test
            self.error = exc


def wait_lists_empty(r: redis.Redis, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(r.llen(k) for k in queue_keys(MODEL)):
        assert time.monotonic() < deadline, "the worker did not drain the queue lists"
        time.sleep(0.2)


@pytest.mark.filterwarnings("ignore::llmos.NoWorkerWarning")
def test_a_priority_1_job_under_a_stream_of_priority_9_finishes_within_the_aging_bound(services, worker):
    settings, _ = services
    interval = 0.25
    settings = settings.model_copy(update={"aging_s": 1.0, "aging_ceiling": 9, "resend_after_s": 3.0,
                                           "reconcile_interval_s": interval})
    engine = get_engine(settings.db_url)
    r = redis.Redis.from_url(settings.redis_url)
    rec = Reconciler(settings)
    stop, passes = threading.Event(), []

    def reconcile() -> None:  # `llmos reconcile`'s loop, timing its passes
        while not stop.is_set():
            t = time.monotonic()
            rec.run_once()
            passes.append(time.monotonic() - t)
            stop.wait(interval)

    keep = 60  # well above what the worker holds (8 ids, a chunk message more): it never runs dry
    flood = TopUp(settings, "stream", 9, keep)
    flood.start()
    loop = threading.Thread(target=reconcile, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while manager.queued_count(engine, tenant="stream") < keep // 2 or not _finished(engine, "stream"):
            assert flood.error is None and time.monotonic() < deadline, flood.error or "no flood"
            time.sleep(0.1)
        with Client(settings, tenant="low") as client:
            (handle,) = client.submit(MODEL, [llmos.SentimentTask(text=TEXT)], priority=1)
        low = wait_all_final(engine, [handle.id], timeout=120)[handle.id]
    finally:
        flood.stop.set()
        flood.join(10)
        stop.set()
        loop.join(10)
    assert flood.error is None, flood.error
    stream = _tenant_jobs(engine, "stream")
    wait_all_final(engine, [j.id for j in stream], timeout=120)
    wait_lists_empty(r)
    rec.close()
    stream = _tenant_jobs(engine, "stream")

    assert low.status == JobStatus.SUCCEEDED
    # it went up by aging (the only way past the stream), one step at a time, and ran once
    assert low.aged >= 1 and low.priority == 1 + low.aged, (low.priority, low.aged)
    assert low.attempts == 1 and low.finishes == 1
    assert all(j.attempts == 1 and j.finishes == 1 for j in stream)  # its extra messages ran nothing twice
    low_start = manager.as_utc(low.started_at)
    overtaken = [j for j in stream if manager.as_utc(j.queued_at) < low_start < manager.as_utc(j.started_at)]
    assert overtaken, "the priority-1 job started only when no priority-9 job was waiting"
    assert r.scard(pending_set(MODEL)) == 0  # every message was popped: no id left pending

    # The stated bound (docs/scheduling.md): reaching the ceiling takes at most
    # (C - p) * max(S, I') + I', I' the pass interval plus the longest pass measured; then the jobs
    # at the ceiling ahead of it drain: at most `keep` queued plus what the worker holds (8 ids and
    # one chunk message of 32), at the service rate measured over the run. Doubled, for a loaded
    # 2-core machine (every term is measured or set, none tuned to pass).
    period = interval + max(passes)
    reach = aging.bound_s(1, settings, interval_s=period)  # (C - p) * max(S, I') + I'
    rate = _service_rate(stream)
    drain = (keep + 8 + 32) / rate
    bound = 2 * (reach + drain)
    waited = (manager.as_utc(low.finished_at) - manager.as_utc(low.queued_at)).total_seconds()
    print(f"\naging: priority-1 job waited {waited:.2f} s (aged {low.aged} steps); bound {bound:.2f} s "
          f"= 2 × ({reach:.2f} s to the ceiling + {drain:.2f} s to drain it at {rate:.0f} jobs/s); "
          f"longest reconciler pass {max(passes) * 1000:.0f} ms; {len(overtaken)} priority-9 jobs overtaken")
    assert waited <= bound, (waited, bound)


def test_two_tenants_weighted_3_to_1_get_75_25_of_the_compute(services, worker, tmp_path):
    settings, _ = services
    config = tmp_path / "llmos.toml"
    config.write_text("[shares]\nacme = 3\nglobex = 1\n")
    window = 10.0
    settings = settings.model_copy(update={"config": config, "shares_window_s": window})
    engine = get_engine(settings.db_url)
    shares.clear_cache()
    floods = [TopUp(settings, tenant, 5, keep=16, piece=4) for tenant in ("acme", "globex")]
    for f in floods:
        f.start()
    try:
        time.sleep(window)  # the window fills, the rule starts to act
        t0 = manager.db_now(engine)
        time.sleep(30.0)
        t1 = manager.db_now(engine)
        assert all(f.error is None for f in floods), [f.error for f in floods]
    finally:
        for f in floods:
            f.stop.set()
        for f in floods:
            f.join(10)
    part = jobs.c.compute_ms / sa.func.coalesce(jobs.c.batch_size, 1)
    q = (sa.select(jobs.c.tenant, sa.func.sum(part), sa.func.sum(jobs.c.compute_ms), sa.func.count())
         .where(jobs.c.model == MODEL, jobs.c.finished_at >= t0, jobs.c.finished_at < t1,
                jobs.c.tenant.in_(["acme", "globex"]))
         .group_by(jobs.c.tenant))
    with engine.connect() as conn:
        got = {t: (float(s), float(raw), n) for t, s, raw, n in conn.execute(q)}
        stepped = dict(conn.execute(sa.select(jobs.c.tenant, sa.func.count()).where(
            jobs.c.priority == 4, jobs.c.tenant.in_(["acme", "globex"])).group_by(jobs.c.tenant)).all())
    total = got["acme"][0] + got["globex"][0]
    acme = 100 * got["acme"][0] / total
    raw = 100 * got["acme"][1] / (got["acme"][1] + got["globex"][1])
    print(f"\nshares over {(t1 - t0).total_seconds():.0f} s: acme {acme:.1f} % / globex {100 - acme:.1f} % "
          f"of compute seconds (batch compute_ms / batch size; plain compute_ms sums: {raw:.1f} %), "
          f"jobs {got['acme'][2]} / {got['globex'][2]}; queued a step lower: {stepped}")
    assert stepped.get("acme", 0) > 0 and stepped.get("globex", 0) > 0  # the rule acted on both
    assert 65.0 <= acme <= 85.0, acme


def _finished(engine, tenant: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.select(jobs.c.id).where(jobs.c.tenant == tenant,
                                                       jobs.c.finished_at.is_not(None)).limit(1)).first() is not None


def _tenant_jobs(engine, tenant: str):
    with engine.connect() as conn:
        return manager._jobs_from(conn.execute(sa.select(jobs).where(jobs.c.tenant == tenant)))


def _service_rate(done) -> float:
    """Jobs per second the worker served over the run (first start to last finish)."""
    finished = [j for j in done if j.finished_at is not None and j.started_at is not None]
    first = min(manager.as_utc(j.started_at) for j in finished)
    last = max(manager.as_utc(j.finished_at) for j in finished)
    return len(finished) / max((last - first).total_seconds(), 1e-3)
