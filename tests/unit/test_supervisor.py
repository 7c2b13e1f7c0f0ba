"""The supervisor's decisions on a fake clock, with plans built by hand and fake worker processes.

(One layer: plans are built by hand (`placement.Plan`), the clock and the start/stop callables
are the test's; the real processes and planner are tests/integration/test_supervisor.py's.)
"""

from __future__ import annotations

import math
import pytest

from llmos.scheduling.placement import Placement, Plan
from llmos.scheduling.supervisor import CRASH_LIFETIME_S, Supervisor, SupervisorSettings, most_stops
from llmos.settings import Settings

HOST = "node-a"


def P(model: str, device: str, workers: int, host: str = HOST) -> Placement:
    return Placement(model=model, device=device, workers=workers, host=host)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Proc:
    """A fake worker process: alive until it dies or, after SIGTERM, until `exit()`."""

    def __init__(self, model: str, device: str) -> None:
        self.model, self.device = model, device
        self.signals: list[str] = []
        self.exited = False

    def alive(self) -> bool:
        return not self.exited

    def terminate(self) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")
        self.exited = True


class Harness:
    def __init__(self, up: float = 5.0, down: float = 300.0, target: dict | None = None,
                 plan_host: str = HOST, start=None) -> None:
        self.clock = Clock()
        self.target: dict = dict(target or {})
        self.evict: tuple = ()
        self.procs: list[Proc] = []
        self.reaped: list[Proc] = []
        self.plan_host = plan_host
        self.sup = Supervisor(Settings(), host=HOST, plan_source=self.plan, start_worker=start or self.start,
                              stop_worker=lambda p: p.terminate(), reap_worker=self.reaped.append,
                              clock=self.clock, up_delay_s=up, down_window_s=down, interval_s=1)
        self.first = self.sup.tick()  # its first pass sees the plan at t = 1000

    # A target changed between passes is seen at the next pass, and acted on `span` seconds after.

    def plan(self) -> Plan:
        return Plan(placements=tuple(P(m, d, n, self.plan_host) for (m, d), n in self.target.items() if n > 0),
                    evict=self.evict)

    def start(self, model: str, device: str) -> Proc:
        p = Proc(model, device)
        self.procs.append(p)
        return p

    def run(self, seconds: float, step: float = 1.0) -> list:
        out = []
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now += step
            out += self.sup.tick()
        return out

    def drain_all(self) -> None:
        """Every SIGTERMed process finishes its jobs and exits."""
        for p in self.procs:
            if "TERM" in p.signals:
                p.exited = True


def test_settings_defaults_and_env(monkeypatch):
    s = SupervisorSettings()
    assert (s.up_delay_s, s.down_window_s) == (5.0, 300.0) and s.interval_s > 0
    monkeypatch.setenv("LLMOS_SUPERVISOR_UP_DELAY_S", "12")
    monkeypatch.setenv("LLMOS_SUPERVISOR_DOWN_WINDOW_S", "60")
    monkeypatch.setenv("LLMOS_SUPERVISOR_INTERVAL_S", "0.5")
    sup = Supervisor(Settings(), host=HOST, plan_source=lambda: Plan(placements=()), start_worker=Proc,
                     stop_worker=lambda p: None)
    assert (sup.up_delay_s, sup.down_window_s, sup.interval_s) == (12.0, 60.0, 0.5)


def test_scale_up_waits_for_the_delay():
    h = Harness(up=5.0, target={("m", "cpu"): 1})
    h.run(4)
    assert h.procs == []  # watched 4 s only
    h.run(1)
    assert len(h.procs) == 1 and h.sup.count("m", "cpu") == 1
    h.target[("m", "cpu")] = 3
    h.run(5)
    assert h.sup.count("m", "cpu") == 1
    out = h.run(1)
    assert h.sup.count("m", "cpu") == 3
    assert [d.action for d in out] == ["start", "start"] and "target 3 above 1" in out[0].line()


def test_a_short_spike_starts_nothing():
    h = Harness(up=5.0, target={("m", "cpu"): 1})
    h.run(10)
    h.target[("m", "cpu")] = 4
    h.run(3)
    h.target[("m", "cpu")] = 1
    h.run(20)
    assert h.sup.started == 1 and h.sup.count("m", "cpu") == 1


def test_scale_down_only_after_the_whole_window():
    h = Harness(up=0.0, down=300.0, target={("m", "cpu"): 2})
    assert [d.action for d in h.first] == ["start", "start"]  # no delay: at once
    h.run(1)
    h.target[("m", "cpu")] = 1
    h.run(300)
    assert h.sup.count("m", "cpu") == 2 and h.sup.stopped == 0
    out = h.run(1)
    assert [d.action for d in out] == ["stop"] and h.sup.count("m", "cpu") == 1
    victim = [p for p in h.procs if p.signals]
    assert victim == [h.procs[1]] and victim[0].signals == ["TERM"]  # the youngest, SIGTERM


def test_the_window_keeps_its_highest_target():
    h = Harness(up=0.0, down=100.0, target={("m", "cpu"): 3})
    h.run(1)
    h.target[("m", "cpu")] = 1
    h.run(60)
    h.target[("m", "cpu")] = 2  # a second dip in the window, not as deep
    h.run(60)
    assert h.sup.count("m", "cpu") == 2  # 100 s after the last 3: down to the window's highest, 2
    h.run(100)
    assert h.sup.count("m", "cpu") == 2  # still 2 wanted
    h.target[("m", "cpu")] = 0
    h.run(100)
    assert h.sup.count("m", "cpu") == 2
    h.run(1)
    assert h.sup.count("m", "cpu") == 0 and h.sup.stopped == 3


def test_an_oscillating_target_is_counted():
    """A target that swings between 1 and 3 every 20 s for an hour: the windows allow one scale-up
    (the first high phase lasts longer than the delay) and no stop at all (3 recurs within every
    window)."""
    h = Harness(up=5.0, down=300.0, target={("m", "cpu"): 1})
    for i in range(180):
        h.target[("m", "cpu")] = 3 if i % 2 else 1
        h.run(20)
    assert h.sup.started == 3 and h.sup.stopped == 0


def test_oscillating_faster_than_the_delay_starts_nothing_more():
    h = Harness(up=5.0, down=300.0, target={("m", "cpu"): 1})
    h.run(10)
    for i in range(600):
        h.target[("m", "cpu")] = 2 if i % 2 else 1
        h.run(2)
    assert h.sup.started == 1 and h.sup.stopped == 0


def test_slow_oscillation_stays_within_the_bound():
    """High for 10 s, low for 400 s, repeated for 2 hours: every cycle may start and stop once,
    and never more than the bound of the module docstring."""
    h = Harness(up=5.0, down=300.0, target={("m", "cpu"): 1})
    elapsed = 0
    for _ in range(18):
        h.target[("m", "cpu")] = 2
        h.run(10)
        h.target[("m", "cpu")] = 1
        h.run(400)
        h.drain_all()
        elapsed += 410
    assert h.sup.stopped <= most_stops(elapsed, 300.0)
    assert h.sup.started <= 2 + most_stops(elapsed, 300.0)
    assert h.sup.stopped == 18 and h.sup.started == 19  # each cycle: one start, one stop, after the window


def test_a_dead_worker_is_restarted():
    h = Harness(up=5.0, target={("m", "cpu"): 2})
    h.run(5)
    h.clock.now += CRASH_LIFETIME_S  # it has been running a while
    h.procs[0].exited = True  # died (OOM, a crash)
    out = h.run(1)
    assert [d.action for d in out] == ["exited", "restart"], [d.line() for d in out]
    assert h.sup.count("m", "cpu") == 2 and h.sup.restarted == 1 and h.reaped == [h.procs[0]]


def test_a_crash_loop_backs_off():
    h = Harness(up=0.0, target={("m", "cpu"): 1})
    h.run(1)
    for p in h.procs:
        p.exited = True
    out = h.run(1)  # died 1 s after its start: crashed, restart in 2 s
    assert [d.action for d in out] == ["exited"] and "restart in 2 s" in out[0].reason
    h.run(1)
    assert len(h.procs) == 1
    h.run(1)
    assert len(h.procs) == 2
    h.procs[-1].exited = True
    h.run(4)
    assert len(h.procs) == 2  # second crash: 4 s
    h.run(1)
    assert len(h.procs) == 3


def test_a_dead_worker_the_window_still_wants_is_restarted_then_stopped_after_it():
    h = Harness(up=5.0, down=300.0, target={("m", "cpu"): 1})
    h.run(10)
    h.target[("m", "cpu")] = 0
    h.run(50)
    h.clock.now += CRASH_LIFETIME_S
    h.procs[0].exited = True
    out = h.run(1)
    assert [d.action for d in out] == ["exited", "restart"]  # the window's highest target is still 1
    h.run(200)
    assert h.sup.count("m", "cpu") == 0 and h.sup.stopped == 1


def test_a_dead_worker_the_plan_no_longer_wants_is_not_restarted():
    h = Harness(up=0.0, down=0.0, target={("m", "cpu"): 1})
    h.run(1)
    h.target[("m", "cpu")] = 0
    h.procs[0].exited = True
    out = h.run(1)
    assert [d.action for d in out] == ["exited"] and "not restarted" in out[0].reason
    h.run(10)
    assert h.sup.started == 1 and h.sup.restarted == 0 and h.sup.stopped == 0


def test_drain_is_sigterm_and_waits_for_the_exit():
    h = Harness(up=0.0, down=5.0, target={("a", "cuda:0"): 1})
    h.target = {("a", "cuda:0"): 0}
    h.run(6)
    a = h.procs[0]
    assert a.signals == ["TERM"] and a.alive()  # draining: its jobs finish, it is not killed
    h.target = {("b", "cuda:0"): 1}
    out = h.run(1)
    assert [d.action for d in out] == ["hold"]  # b waits: a's memory is not free yet
    assert h.sup.handles() == [a]
    h.run(10)
    assert a.signals == ["TERM"] and [p.model for p in h.procs] == ["a"]
    a.exited = True
    out = h.run(1)
    assert [d.action for d in out] == ["drained", "start"] and out[1].model == "b"
    assert all("KILL" not in p.signals for p in h.procs)


def test_evict_drains_at_once():
    h = Harness(up=0.0, down=300.0, target={("a", "cuda:0"): 1})
    h.run(1)
    h.target = {("b", "cuda:0"): 1}
    h.evict = (P("a", "cuda:0", 1),)
    out = h.run(1)
    assert [d.action for d in out] == ["evict", "hold"] and h.procs[0].signals == ["TERM"]
    h.evict = ()
    h.procs[0].exited = True
    h.run(1)
    assert [p.model for p in h.procs] == ["a", "b"] and h.sup.count("a", "cuda:0") == 0


def test_only_its_own_host():
    h = Harness(up=0.0, target={("m", "cpu"): 1}, plan_host="node-b")
    h.run(10)
    assert h.procs == []


def test_a_failing_plan_keeps_the_workers():
    h = Harness(up=0.0, down=1.0, target={("m", "cpu"): 1})
    h.run(2)

    def broken():
        raise RuntimeError("database away")
    h.sup.plan_source = broken
    out = h.run(10)
    assert {d.action for d in out} == {"error"} and "database away" in out[0].reason
    assert h.sup.count("m", "cpu") == 1 and h.sup.stopped == 0


def test_a_failing_start_backs_off():
    calls = []

    def cannot(model, device):
        calls.append(model)
        raise OSError("no such file")
    h = Harness(up=0.0, target={("m", "cpu"): 1}, start=cannot)
    out = h.first
    assert [d.action for d in out] == ["error"] and "retry in 2 s" in out[0].reason
    h.run(1)
    assert len(calls) == 1
    h.run(1)
    assert len(calls) == 2


def test_shutdown_drains_everything():
    h = Harness(up=0.0, target={("m", "cpu"): 2})
    h.run(1)
    handles = h.sup.shutdown()
    assert len(handles) == 2 and all(p.signals == ["TERM"] for p in h.procs)


@pytest.mark.parametrize("elapsed,window,expected", [(0, 300, 1), (300, 300, 2), (301, 300, 3)])
def test_most_stops(elapsed, window, expected):
    assert most_stops(elapsed, window) == expected
    assert most_stops(10, 0) == math.inf
