"""The supervisor with real `llmos worker` processes on Postgres + Redis (issue 14, Done-when 4).

One model's backlog rises: a second worker starts for it; the backlog drains: the extra worker
stops after the window, every job succeeded; a load that oscillates faster than the windows
causes no more starts than they allow. The supervisor runs in the test's process (a thread)
with short windows; its workers are real children (`llmos.stack.SupervisedWorkers`).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine, jobs
from llmos.tasks import SentimentTask
from llmos.jobs import JobStatus
from llmos.scheduling.placement import Placement, Plan
from llmos.scheduling.supervisor import Supervisor
from llmos.sdk import Client
from llmos.stack import SupervisedWorkers
from tests.helpers import wait_all_final

pytestmark = pytest.mark.integration

HOST = socket.gethostname()
UP_DELAY_S, DOWN_WINDOW_S = 1.0, 8.0
BACKLOG = 60
"""Queued minilm jobs above which the placeholder plan wants a second worker."""


def placeholder_plan(engine):
    """A plan source of the test's: one minilm worker, two while more than BACKLOG jobs wait.

    (The real planner, `make_plan`, starts the first worker for this backlog but asks for a
    second one only when backlog × service time exceeds its drain time: see the report.)"""
    def source():
        with engine.connect() as conn:
            queued = conn.execute(sa.select(sa.func.count()).select_from(jobs)
                                  .where(jobs.c.status == JobStatus.QUEUED.value, jobs.c.model == "minilm")).scalar()
        return Plan(placements=(Placement("minilm", "cpu", 2 if queued > BACKLOG else 1, HOST),))
    return source


class Watched:
    """The supervisor in a thread, the targets it saw and what it decided."""

    def __init__(self, settings, env, tmp_path, plan):
        self.targets: list[int] = []
        self.decisions = []
        self.workers = SupervisedWorkers(env, tmp_path / "logs")
        (tmp_path / "logs").mkdir(exist_ok=True)

        def seen():
            p = plan()
            self.targets.append(sum(x.workers for x in p.for_host(HOST)
                                    if x.model == "minilm" and x.device == "cpu"))
            return p
        self.sup = Supervisor(settings, host=HOST, plan_source=seen, start_worker=self.workers.start,
                              stop_worker=self.workers.stop, reap_worker=self.workers.reap,
                              up_delay_s=UP_DELAY_S, down_window_s=DOWN_WINDOW_S, interval_s=0.25)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sup.run, args=(self.stop, self.decisions.append), daemon=True)
        self.thread.start()

    def wait_for(self, what, check, timeout=90.0):
        deadline = time.monotonic() + timeout
        while not check():
            assert self.thread.is_alive(), "the supervisor thread died"
            assert time.monotonic() < deadline, f"{what}: not after {timeout} s; decisions: " + \
                "; ".join(d.line() for d in self.decisions)
            time.sleep(0.2)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        for h in self.sup.shutdown():
            h.wait(60)


def live_minilm(engine) -> int:
    return len([w for w in manager.live_workers(engine, "minilm") if w["host"] == HOST])


def test_scale_up_drain_and_oscillation(services, tmp_path):
    settings, env = services
    engine = get_engine(settings.db_url)
    watched = Watched(settings, env, tmp_path, placeholder_plan(engine))
    try:
        client = Client(settings)  # closed with the test's engines
        # 1. one worker for the model
        watched.wait_for("the first worker", lambda: live_minilm(engine) == 1)
        assert watched.sup.started == 1
        # 2. its backlog rises: a second worker starts for it
        ids = [h.id for h in client.load_model("minilm").submit_many(
            [SentimentTask(text=f"review {i}: I loved it") for i in range(600)])]
        watched.wait_for("a second worker", lambda: watched.sup.count("minilm", "cpu") == 2)
        assert watched.sup.started == 2 and [d.action for d in watched.decisions].count("start") == 2
        # 3. drained: every job succeeded; the extra worker stops after the window, by SIGTERM
        final = wait_all_final(engine, ids, timeout=120)
        assert {j.status for j in final.values()} == {JobStatus.SUCCEEDED}
        watched.wait_for("the extra worker to stop", lambda: any(d.action == "drained" for d in watched.decisions),
                         timeout=DOWN_WINDOW_S + 60)
        assert watched.sup.count("minilm", "cpu") == 1 and watched.sup.stopped == 1
        stop = next(d for d in watched.decisions if d.action == "stop")
        assert f"for {DOWN_WINDOW_S:g} s" in stop.reason
        # 4. an oscillating load (bursts, each low phase shorter than the window): the windows
        # allow at most one start (1 → 2) and no stop
        started, stopped, seen_from = watched.sup.started, watched.sup.stopped, len(watched.targets)
        for _ in range(4):
            burst = [h.id for h in client.load_model("minilm").submit_many(
                [SentimentTask(text="so so") for _ in range(250)])]
            watched.wait_for("a burst seen", lambda: watched.targets[-1] == 2, timeout=30)
            final = wait_all_final(engine, burst, timeout=120)
            assert {j.status for j in final.values()} == {JobStatus.SUCCEEDED}
            watched.wait_for("a burst done", lambda: watched.targets[-1] == 1, timeout=30)
        swings = sum(1 for a, b in zip(watched.targets[seen_from:], watched.targets[seen_from + 1:]) if a != b)
        assert swings >= 2, watched.targets[seen_from:]  # the target did oscillate
        assert watched.sup.started - started <= 1 and watched.sup.stopped == stopped
    finally:
        watched.close()
