"""The supervisor: the worker processes of one host, converged to the plan on an interval.

Every `LLMOS_SUPERVISOR_INTERVAL_S` a `Supervisor.tick` reads the plan for its own host (a *plan
source*: any callable returning a `placement.Plan`; in production `make_plan` over the task table)
and the worker processes it started, and decides per (model, device), with the stabilization
rules of Kubernetes' HorizontalPodAutoscaler:

- scale up to the *lowest* target seen over the last `LLMOS_SUPERVISOR_UP_DELAY_S` (default 5 s),
  and only once it has watched that long: a target must have exceeded the count for the whole
  delay (from zero too: the first workers of `llmos up --supervise` start after one delay);
- scale down to the *highest* target seen over the last `LLMOS_SUPERVISOR_DOWN_WINDOW_S`
  (default 300 s), and only once it has watched that long: a target must have stayed below the
  count for the whole window;
- a worker that died is restarted at once while the (window's highest) target still wants it;
  one that dies within `CRASH_LIFETIME_S` of its start is restarted after 2, 4 … 60 s;
- what the plan says to evict (idle models only: the planner guarantees it) is drained at once;
- draining is `stop_worker`, SIGTERM for real processes: the worker finishes the jobs it holds
  and exits. The supervisor never kills a worker; a start on a device waits until the workers
  draining there have exited (their memory is not free before).

Never flapping: a stop needs every target of the window before it to be below the count, a
start needs every target of the delay before it to be above, so between a start and a later stop
of the same (model, device) lie at least `down_window_s`. Over a time T, a (model, device) sees at
most ⌈T / down_window_s⌉ + 1 stops and as many starts beyond its highest target, however fast
its target oscillates (restarts of dead workers aside).

Which worker stops: the youngest (the last started). Each decision is one log line (logger
`llmos.supervisor`, `action=supervisor_<what>`) and comes back from `tick` as a `Decision`.

The processes themselves are the caller's: `start_worker(model, device)` returns a handle with
`alive()`, `stop_worker(handle)` drains it, `reap_worker(handle)` (optional) is called once it
has exited. `llmos.stack` gives it real `llmos worker` children (`llmos up --supervise`,
`llmos supervise`); the unit tests give it fakes.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmos.logs import event
from llmos.settings import Settings

log = logging.getLogger("llmos.supervisor")

CRASH_LIFETIME_S = 60.0
"""A worker that exits this soon after its start crashed (a model that cannot load, a bad
device): its next start waits 2, 4 … `MAX_RESTART_BACKOFF_S` seconds."""

MAX_RESTART_BACKOFF_S = 60.0

Key = tuple[str, str]
"""(model, device)."""


class SupervisorSettings(BaseSettings):
    """The supervisor's settings (LLMOS_SUPERVISOR_*)."""

    model_config = SettingsConfigDict(env_prefix="LLMOS_SUPERVISOR_", extra="ignore", frozen=True)

    up_delay_s: float = Field(default=5.0, ge=0, le=3600,
                              description="Scale up only after the target has exceeded the count this long.")
    down_window_s: float = Field(default=300.0, ge=0, le=86_400,
                                 description="Scale down only after the target has stayed below the count this long "
                                             "(the highest target of the window is kept).")
    interval_s: float = Field(default=2.0, gt=0, le=3600, description="Pause between two supervisor passes.")


class WorkerHandle(Protocol):
    def alive(self) -> bool: ...


class PlanLike(Protocol):
    """What the supervisor reads of `placement.Plan`: its placements and evictions per host."""

    def for_host(self, host: str) -> tuple: ...

    def evict_for_host(self, host: str) -> tuple: ...


@dataclass(frozen=True)
class Decision:
    """One thing the supervisor did: start, restart, stop, evict, exited, drained, hold, error."""

    action: str
    model: str
    device: str
    reason: str
    count: int = 0  # workers of (model, device) after it

    def line(self) -> str:
        return f"{self.action} {self.model} on {self.device}: {self.reason}"


@dataclass
class _Managed:
    model: str
    device: str
    handle: Any
    started_at: float
    evicted: bool = False

    @property
    def key(self) -> Key:
        return (self.model, self.device)


@dataclass
class _KeyState:
    samples: deque = field(default_factory=deque)  # (time, target), oldest first
    first_seen: float = 0.0
    restarts_due: int = 0
    crashes: int = 0
    hold_until: float = 0.0
    holding: bool = False  # a start waits for drains on its device (said once)


class Supervisor:
    """Converges the worker processes it starts on this host to the plan; see the module docstring."""

    def __init__(self, settings: Settings, *, host: str | None = None,
                 plan_source: Callable[[], PlanLike],
                 start_worker: Callable[[str, str], WorkerHandle],
                 stop_worker: Callable[[WorkerHandle], None],
                 reap_worker: Callable[[WorkerHandle], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 up_delay_s: float | None = None, down_window_s: float | None = None,
                 interval_s: float | None = None) -> None:
        own = SupervisorSettings()
        self.settings = settings
        self.host = host or socket.gethostname()
        self.plan_source, self.start_worker, self.stop_worker = plan_source, start_worker, stop_worker
        self.reap_worker = reap_worker or (lambda handle: None)
        self.clock = clock
        self.up_delay_s = own.up_delay_s if up_delay_s is None else float(up_delay_s)
        self.down_window_s = own.down_window_s if down_window_s is None else float(down_window_s)
        self.interval_s = own.interval_s if interval_s is None else float(interval_s)
        self.running: list[_Managed] = []
        self.draining: list[_Managed] = []
        self._keys: dict[Key, _KeyState] = {}
        self.started = self.stopped = self.restarted = 0  # counters since construction
        self.last_plan: PlanLike | None = None

    # --- what it manages ---------------------------------------------------------------------

    def count(self, model: str, device: str) -> int:
        """Workers of (model, device) running and not draining."""
        return sum(1 for m in self.running if m.key == (model, device))

    def counts(self) -> dict[Key, int]:
        out: dict[Key, int] = {}
        for m in self.running:
            out[m.key] = out.get(m.key, 0) + 1
        return out

    def handles(self) -> list[Any]:
        """Every process it holds, draining ones too."""
        return [m.handle for m in self.running + self.draining]

    # --- one pass ------------------------------------------------------------------------------

    def tick(self) -> list[Decision]:
        """Read the plan, reap, restart, evict, scale; returns (and logs) what it decided."""
        now = self.clock()
        decisions: list[Decision] = []
        self._reap(decisions)
        try:
            plan = self.plan_source()
            placements, evict = plan.for_host(self.host), plan.evict_for_host(self.host)
        except Exception as exc:  # the database away, a broken llmos.toml: keep what runs, retry next pass
            decisions.append(Decision("error", "-", "-", f"no plan ({type(exc).__name__}: {exc}); "
                                      "keeping the workers as they are"))
            self._log(decisions)
            return decisions
        self.last_plan = plan
        targets: dict[Key, int] = {}
        for p in placements:
            targets[(p.model, p.device)] = targets.get((p.model, p.device), 0) + int(p.workers)
        for key in set(targets) | set(self._keys) | set(self.counts()):
            self._record(key, now, targets.get(key, 0))
        self._evict(evict, now, decisions)
        self._dead(now, decisions)
        for key in sorted(self._keys):
            self._converge(key, now, decisions)
        self._forget(now)
        self._log(decisions)
        return decisions

    def run(self, stop: threading.Event, on_decision: Callable[[Decision], None] | None = None) -> None:
        """Tick every interval until `stop` is set (the caller drains with `shutdown`)."""
        while not stop.is_set():
            for d in self.tick():
                if on_decision:
                    on_decision(d)
            stop.wait(self.interval_s)

    def shutdown(self) -> list[Any]:
        """Drain everything (SIGTERM); returns the handles, for the caller to wait on."""
        for m in self.running:
            self.stop_worker(m.handle)
        self.draining.extend(self.running)
        self.running.clear()
        return [m.handle for m in self.draining]

    # --- the steps of a pass ----------------------------------------------------------------

    def _record(self, key: Key, now: float, target: int) -> None:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState(first_seen=now)
        state.samples.append((now, target))
        horizon = now - max(self.up_delay_s, self.down_window_s)
        while len(state.samples) > 1 and state.samples[1][0] <= horizon:  # keep the one in force at the horizon
            state.samples.popleft()

    def _window(self, key: Key, now: float, span: float) -> list[int]:
        """The targets in force over [now - span, now]: each sample holds until the next one."""
        samples = self._keys[key].samples
        inside = [t for at, t in samples if at > now - span]
        before = [t for at, t in samples if at <= now - span]
        return inside + before[-1:]

    def _reap(self, decisions: list[Decision]) -> None:
        for m in list(self.draining):
            if not m.handle.alive():
                self.draining.remove(m)
                self.reap_worker(m.handle)
                decisions.append(Decision("drained", m.model, m.device, "the worker finished its jobs and exited",
                                          self.count(m.model, m.device)))

    def _evict(self, evict: tuple, now: float, decisions: list[Decision]) -> None:
        for p in evict:
            key = (p.model, p.device)
            victims = [m for m in self.running if m.key == key][::-1][: max(0, int(p.workers))]
            for m in victims:
                self._drain(m, evicted=True)
                decisions.append(Decision("evict", m.model, m.device, "the plan needs its memory (idle model); "
                                          "SIGTERM, it finishes what it holds", self.count(*key)))
            if victims and key in self._keys:  # its windows start again from the plan after eviction
                state = self._keys[key]
                state.samples = deque([state.samples[-1]])
                state.first_seen = now
                state.restarts_due = 0

    def _dead(self, now: float, decisions: list[Decision]) -> None:
        for m in list(self.running):
            if m.handle.alive():
                continue
            self.running.remove(m)
            self.reap_worker(m.handle)
            state = self._keys[m.key]
            if now - m.started_at < CRASH_LIFETIME_S:
                state.crashes += 1
                state.hold_until = now + min(MAX_RESTART_BACKOFF_S, 2.0 ** min(state.crashes, 6))
            else:
                state.crashes = 0
            wanted = max(self._window(m.key, now, self.down_window_s), default=0)
            if self.count(*m.key) + state.restarts_due < wanted:
                state.restarts_due += 1
                when = (f"restart in {state.hold_until - now:.0f} s (it crashed {state.crashes} time(s) "
                        f"within {CRASH_LIFETIME_S:.0f} s of its start)") if state.hold_until > now else "restart now"
                decisions.append(Decision("exited", m.model, m.device, f"the worker died; {when}", self.count(*m.key)))
            else:
                decisions.append(Decision("exited", m.model, m.device, "the worker died; the plan no longer "
                                          "wants it, not restarted", self.count(*m.key)))

    def _converge(self, key: Key, now: float, decisions: list[Decision]) -> None:
        state = self._keys[key]
        model, device = key
        cur = self.count(*key)
        wanted = max(self._window(key, now, self.down_window_s), default=0)  # the down window's highest
        if state.restarts_due and cur >= wanted:
            state.restarts_due = 0
        can_start = state.hold_until <= now and not any(m.device == device for m in self.draining)
        if state.restarts_due and can_start:
            n = min(state.restarts_due, wanted - cur)
            for _ in range(n):
                if not self._start(model, device, now, decisions, "restart",
                                   f"restarted a worker that died (target {wanted})"):
                    return
                state.restarts_due -= 1
                self.restarted += 1
            cur = self.count(*key)
        covered_up = now - state.first_seen >= self.up_delay_s
        up = min(self._window(key, now, self.up_delay_s), default=0) if covered_up else 0
        if up > cur:
            if not can_start:
                if state.hold_until <= now and not state.holding:  # said once, not every pass
                    decisions.append(Decision("hold", model, device, f"target {up}: waiting for the workers "
                                              f"draining on {device} to exit", cur))
                state.holding = True
                return
            state.holding = False
            for _ in range(up - cur):
                if not self._start(model, device, now, decisions, "start",
                                   f"target {up} above {cur} for {self.up_delay_s:g} s"):
                    return
                state.restarts_due = 0
            return
        covered_down = now - state.first_seen >= self.down_window_s
        if covered_down and cur > wanted and not state.restarts_due:
            victims = [m for m in self.running if m.key == key][::-1][: cur - wanted]
            for m in victims:
                self._drain(m)
                decisions.append(Decision("stop", model, device, f"target at most {wanted} below {cur} for "
                                          f"{self.down_window_s:g} s; SIGTERM, it finishes its jobs",
                                          self.count(*key)))

    def _start(self, model: str, device: str, now: float, decisions: list[Decision], action: str,
               reason: str) -> bool:
        state = self._keys[(model, device)]
        try:
            handle = self.start_worker(model, device)
        except Exception as exc:  # the process could not even be spawned: back off like a crash
            state.crashes += 1
            state.hold_until = now + min(MAX_RESTART_BACKOFF_S, 2.0 ** min(state.crashes, 6))
            decisions.append(Decision("error", model, device, f"could not start a worker "
                                      f"({type(exc).__name__}: {exc}); retry in {state.hold_until - now:.0f} s",
                                      self.count(model, device)))
            return False
        self.running.append(_Managed(model, device, handle, now))
        self.started += 1
        decisions.append(Decision(action, model, device, reason, self.count(model, device)))
        return True

    def _drain(self, m: _Managed, evicted: bool = False) -> None:
        self.running.remove(m)
        m.evicted = evicted
        self.stop_worker(m.handle)
        self.draining.append(m)
        self.stopped += 1

    def _forget(self, now: float) -> None:
        """Drop the state of a (model, device) the plan has long stopped naming and nothing runs."""
        for key, state in list(self._keys.items()):
            if (not any(t for _, t in state.samples) and self.count(*key) == 0 and not state.restarts_due
                    and now - state.first_seen >= max(self.up_delay_s, self.down_window_s)
                    and state.hold_until <= now):
                del self._keys[key]

    def _log(self, decisions: list[Decision]) -> None:
        for d in decisions:
            event(log, f"supervisor_{d.action}", level=logging.WARNING if d.action in ("exited", "error")
                  else logging.INFO, model=d.model, device=d.device, workers=d.count, reason=d.reason)


def most_stops(elapsed_s: float, down_window_s: float) -> int:
    """The most stops one (model, device) can see in `elapsed_s` (see the module docstring)."""
    if down_window_s <= 0:
        return math.inf  # type: ignore[return-value]
    return math.ceil(elapsed_s / down_window_s) + 1


def plan_source(settings: Settings, **plan_options: Any) -> Callable[[], Any]:
    """The real plan: `placement.make_plan` over this settings' task table and registry
    (`plan_options`: its keyword arguments, e.g. `window_s`)."""
    from llmos.db import get_engine
    from llmos.registry import Registry
    from llmos.scheduling.placement import make_plan

    engine = get_engine(settings.db_url)

    def source() -> Any:
        return make_plan(settings, engine, Registry.load(settings), **plan_options)

    return source
