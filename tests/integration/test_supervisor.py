"""The supervisor with the real planner and real `llmos worker` processes on Postgres + Redis
(issue 14, Done-when 4).

The supervisor is `llmos.stack.make_supervisor`'s, as `llmos up --supervise` and `llmos supervise`
build it: `make_plan` over the task table and an llmos.toml whose one `[[device]]` has memory
for exactly two minilm workers, real `llmos worker` children, and a reconciler thread beside it
as `llmos up` runs one. Short windows come from settings (LLMOS_SUPERVISOR_*, LLMOS_PLAN_*).

A backlog of minilm jobs: the first worker starts for it, then a second once the measured service
time says one worker cannot drain it within LLMOS_PLAN_DRAIN_S; the backlog done, the extra
worker stops after the down window (SIGTERM), and every job succeeded (counted in the task
table). A load that oscillates faster than the windows causes no more starts than they allow.
Only starts and stops are counted; no duration is asserted.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
import sqlalchemy as sa

from llmos.db import get_engine, jobs
from llmos.jobs import JobStatus
from llmos.reconciler import Reconciler
from llmos.registry import Registry
from llmos.scheduling.placement import memory_need
from llmos.sdk import Client
from llmos.settings import Settings
from llmos.stack import make_supervisor
from llmos.tasks import SentimentTask
from tests.helpers import wait_all_final

pytestmark = pytest.mark.integration

HOST = socket.gethostname()
UP_DELAY_S, DOWN_WINDOW_S, INTERVAL_S = 1.0, 8.0, 0.25
PLAN_WINDOW_S = 6.0
"""The planner's demand window: a burst's arrivals leave it this long after its submit."""
DRAIN_S = 0.5
"""The planner wants a second worker while the backlog holds more than this much work."""
BACKLOG = 3000
BURST = 1000


def _count(engine, ids) -> dict[str, int]:
    """Status → jobs among `ids`, read from the task table."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(jobs.c.status, sa.func.count()).where(jobs.c.id.in_(ids))
                            .group_by(jobs.c.status)).all()
    return {status: n for status, n in rows}


class Watched:
    """The supervisor in a thread (as `llmos up` ticks it), the targets it saw, what it decided."""

    def __init__(self, settings, env, tmp_path):
        (tmp_path / "logs").mkdir(exist_ok=True)
        self.sup = make_supervisor(settings, env, tmp_path / "logs", host=HOST)
        assert (self.sup.up_delay_s, self.sup.down_window_s) == (UP_DELAY_S, DOWN_WINDOW_S)
        self.targets: list[int] = []
        self.decisions = []
        real = self.sup.plan_source

        def seen():
            p = real()
            self.targets.append(sum(x.workers for x in p.for_host(HOST)
                                    if x.model == "minilm" and x.device == "cpu"))
            return p
        self.sup.plan_source = seen
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sup.run, args=(self.stop, self.decisions.append), daemon=True)
        self.thread.start()

    def starts(self) -> list[int]:
        """The worker count after each start."""
        return [d.count for d in self.decisions if d.action == "start"]

    def wait_for(self, what, check, timeout=90.0):
        deadline = time.monotonic() + timeout
        while not check():
            assert self.thread.is_alive(), "the supervisor thread died"
            assert time.monotonic() < deadline, f"{what}: not after {timeout} s; targets {self.targets[-20:]}; " \
                "decisions: " + "; ".join(d.line() for d in self.decisions)
            time.sleep(0.2)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        for h in self.sup.shutdown():
            h.wait(60)
            # drained by SIGTERM, not killed after the wait: 0 (warm shutdown), or -SIGTERM for a
            # worker still loading its model (Celery's handlers not installed yet)
            assert h.proc.returncode in (0, -signal.SIGTERM), h.proc.returncode


@pytest.fixture
def planned(services, tmp_path, monkeypatch):
    """Settings and worker env with an llmos.toml declaring one CPU with room for two minilm workers."""
    settings, env = services
    need, known = memory_need(Registry.load(settings).get("minilm"))
    assert known
    config = tmp_path / "llmos.toml"
    config.write_text(f'[[device]]\nname = "cpu"\nkind = "cpu"\nmemory_mb = {need * 2.5:.0f}\nhost = "{HOST}"\n')
    for key, value in {"LLMOS_SUPERVISOR_UP_DELAY_S": UP_DELAY_S, "LLMOS_SUPERVISOR_DOWN_WINDOW_S": DOWN_WINDOW_S,
                       "LLMOS_SUPERVISOR_INTERVAL_S": INTERVAL_S, "LLMOS_PLAN_WINDOW_S": PLAN_WINDOW_S,
                       "LLMOS_PLAN_DRAIN_S": DRAIN_S}.items():
        monkeypatch.setenv(key, str(value))
    planned = Settings(home=settings.home, database_url=settings.database_url, redis_url=settings.redis_url,
                       config=config)
    return planned, {**env, "LLMOS_CONFIG": str(config)}


def test_scale_up_drain_and_oscillation(planned, tmp_path):
    settings, env = planned
    engine = get_engine(settings.db_url)
    stop_reconciler = threading.Event()
    reconciler = Reconciler(settings)
    reconciler.start_thread(stop_reconciler)
    watched = Watched(settings, env, tmp_path)
    try:
        client = Client(settings)  # closed with the test's engines
        time.sleep(4 * INTERVAL_S)
        assert watched.sup.started == 0 and set(watched.targets) == {0}  # no demand, no worker
        # 1. a backlog: one worker starts for it, then a second once its service time is measured
        ids = [h.id for h in client.load_model("minilm").submit_many(
            [SentimentTask(text=f"review {i}: I loved it") for i in range(BACKLOG)])]
        watched.wait_for("a second worker", lambda: watched.sup.count("minilm", "cpu") == 2)
        assert watched.starts() == [1, 2], watched.starts()
        assert max(watched.targets) == 2  # the device's memory holds two, never more planned
        # 2. drained: every job succeeded; the extra worker stops after the window, by SIGTERM
        final = wait_all_final(engine, ids, timeout=120)
        assert {j.status for j in final.values()} == {JobStatus.SUCCEEDED}
        watched.wait_for("the extra worker to stop", lambda: any(d.action == "drained" for d in watched.decisions),
                         timeout=DOWN_WINDOW_S + PLAN_WINDOW_S + 60)
        assert watched.sup.count("minilm", "cpu") == 1 and watched.sup.stopped == 1
        stop = next(d for d in watched.decisions if d.action == "stop")
        assert f"for {DOWN_WINDOW_S:g} s" in stop.reason
        assert _count(engine, ids) == {JobStatus.SUCCEEDED.value: BACKLOG}  # none lost, none doubled
        # 3. an oscillating load (bursts; each low phase shorter than the down window): the windows
        # allow at most one start (1 → 2) and no stop
        started, stopped, seen_from = watched.sup.started, watched.sup.stopped, len(watched.targets)
        bursts: list[str] = []
        for _ in range(3):
            since = len(watched.targets)
            burst = [h.id for h in client.load_model("minilm").submit_many(
                [SentimentTask(text="so so") for _ in range(BURST)])]
            bursts += burst
            watched.wait_for("a burst seen", lambda: 2 in watched.targets[since:], timeout=30)
            wait_all_final(engine, burst, timeout=120)
            watched.wait_for("a burst done", lambda: watched.targets[-1] == 1, timeout=PLAN_WINDOW_S + 30)
        swings = sum(1 for a, b in zip(watched.targets[seen_from:], watched.targets[seen_from + 1:]) if a != b)
        assert swings >= 4, watched.targets[seen_from:]  # the target did oscillate
        assert watched.sup.started - started <= 1 and watched.sup.stopped == stopped, \
            "; ".join(d.line() for d in watched.decisions)
        assert _count(engine, bursts) == {JobStatus.SUCCEEDED.value: len(bursts)}
        assert watched.sup.restarted == 0 and not any(d.action in ("exited", "error") for d in watched.decisions)
    finally:
        watched.close()
        stop_reconciler.set()
