"""The plan: how many workers of which model on which device, and why (`llmos plan`).

`plan()` is pure (no I/O): devices, model specs, measured demand and the workers running now in,
a `Plan` out. The policy, in order (docs/scheduling.md says why):

1. A model that fits on no device (its memory need above the largest device's) is `refused`.
2. Warm workers stay where they are (a worker is never moved between devices). A busy model
   (queued or running jobs, or arrivals) keeps up to its desired count plus `keep_margin`
   workers; an idle one keeps one warm worker (a cache entry) and no more; others stop.
3. Every model with queued work and no worker gets one where it fits: on a free device, else
   by evicting idle models from one device, least recently used first, only those idle past
   `idle_guard_s` (a model with queued or running work is never evicted), else by taking a
   surplus worker (beyond its desired count) or a second worker of a busy model.
4. The rest is water-filled by demand: the desired count of a model is the most of
   `workers_needed` (Erlang C with Allen–Cunneen, for `target_wait_s`), the workers that drain
   its backlog within `drain_s`, and 1 when work is queued; each step gives one worker to the
   model furthest below its desired count (by fraction, weighted by its backlog's priority).
   When memory is full it may take a worker from a model better served than itself, but only
   for a gain of at least `min_gain` (hysteresis: no worker is moved for a small gain).
Memory is never over-committed: the workers of a device need at most its capacity (its free
memory plus what the workers running on it hold, at most its total), and at most its
`max_workers`.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmos.registry import ModelSpec
from llmos.scheduling.capacity import needed_for
from llmos.scheduling.demand import ModelDemand
from llmos.scheduling.devices import Device

UNKNOWN_MEMORY_MB = 2048.0
"""The memory need assumed for a local model whose size the registry cannot tell."""
IDLE_GUARD_S = 300.0
"""An idle model is evictable once its last job started at least this long ago."""
DRAIN_S = 60.0
"""The planner wants enough workers to serve a model's standing backlog within this long."""
DEMAND_WINDOW_S = 600.0
"""The demand `make_plan` reads: the jobs of this many seconds back."""


class PlanSettings(BaseSettings):
    """The planner's settings (LLMOS_PLAN_*), read by `make_plan` (docs/scheduling.md)."""

    model_config = SettingsConfigDict(env_prefix="LLMOS_PLAN_", extra="ignore", frozen=True)

    drain_s: float = Field(default=DRAIN_S, gt=0, le=86_400,
                           description="Enough workers to serve a model's standing backlog within this long.")
    window_s: float = Field(default=DEMAND_WINDOW_S, gt=0, le=7 * 86_400,
                            description="The demand window: arrivals, service times, recent use.")


@dataclasses.dataclass(frozen=True)
class Placement:
    """`workers` workers of `model` on device `device` (its name: a worker's --device) of `host`."""

    model: str
    device: str
    workers: int
    host: str = ""

    @property
    def ref(self) -> str:
        return f"{self.host}/{self.device}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Placements (workers > 0), the reasons, refused models (name → why) and the evictions
    (idle models' workers the plan unloads to make room)."""

    placements: tuple[Placement, ...]
    reasons: tuple[str, ...] = ()
    refused: dict[str, str] = dataclasses.field(default_factory=dict)
    evict: tuple[Placement, ...] = ()

    def count(self, model: str, device: str | None = None) -> int:
        """Workers of `model` in the plan, on `device` (a name, or "host/name") when given."""
        return sum(p.workers for p in self.placements if p.model == model and _matches(p, device))

    def for_host(self, host: str) -> tuple[Placement, ...]:
        """The placements of one host (what its supervisor runs)."""
        return tuple(p for p in self.placements if p.host == host)

    def evict_for_host(self, host: str) -> tuple[Placement, ...]:
        return tuple(p for p in self.evict if p.host == host)

    def on_device(self, device: str) -> tuple[Placement, ...]:
        return tuple(p for p in self.placements if _matches(p, device))

    def to_json(self) -> dict[str, Any]:
        return {"placements": [dataclasses.asdict(p) for p in self.placements],
                "evict": [dataclasses.asdict(p) for p in self.evict],
                "refused": dict(self.refused), "reasons": list(self.reasons)}


def _matches(p: Placement, device: str | None) -> bool:
    if device is None:
        return True
    return p.ref == device if "/" in device else p.device == device


def memory_need(spec: ModelSpec) -> tuple[float, bool]:
    """(MiB one worker of `spec` needs, whether that is known). A remote (openai) model needs none."""
    if spec.engine == "openai":
        return 0.0, True
    need = spec.memory_need_mb()
    return (UNKNOWN_MEMORY_MB, False) if need is None else (float(need), True)


def fits_anywhere(spec: ModelSpec, devices: Iterable[Device]) -> str | None:
    """None when one worker of `spec` fits on some device, else the refusal (size, largest device)."""
    need, _ = memory_need(spec)
    devs = _eligible(spec, list(devices))
    if not devs:
        return f"model {spec.name!r} needs {need:,.0f} MiB of memory and no device is known"
    largest = max(devs, key=lambda d: d.total_mb)
    if need <= largest.total_mb:
        return None
    return (f"model {spec.name!r} needs {need:,.0f} MiB of memory; the largest device, "
            f"{largest.name} on {largest.host}, has {largest.total_mb:,.0f} MiB")


def _eligible(spec: ModelSpec, devs: list[Device]) -> list[Device]:
    """The devices a worker of `spec` may use: CUDA ones for a spec set on CUDA when there are
    any (a model meant for a GPU is not planned on the CPU), else all."""
    if spec.engine != "openai" and spec.device.startswith("cuda") and any(d.kind == "cuda" for d in devs):
        return [d for d in devs if d.kind == "cuda"]
    return devs


def desired_workers(d: ModelDemand | None, *, target_wait_s: float, drain_s: float = DRAIN_S) -> int:
    """How many workers a model's demand asks for (0 when it has none)."""
    if d is None:
        return 0
    want = 1 if d.backlog > 0 else 0
    needed = needed_for(d, target_wait_s) if d.arrivals_per_s > 0 else None
    if needed is not None:
        want = max(want, needed)
    if d.service_s_per_job is not None and d.backlog > 0:
        want = max(want, math.ceil(d.backlog * d.service_s_per_job / drain_s))
    if d.running > 0:
        want = max(want, 1)
    return want


class _State:
    """The plan being built: workers per (model, device ref), memory and slots left."""

    def __init__(self, devices: list[Device], need: dict[str, float], running: dict[tuple[str, str], int]):
        self.devices = {d.ref: d for d in devices}
        self.need = need
        self.alloc: dict[tuple[str, str], int] = {k: n for k, n in running.items() if n > 0}
        held: dict[str, float] = {}
        for (model, ref), n in self.alloc.items():
            held[ref] = held.get(ref, 0.0) + n * need[model]
        self.capacity = {ref: min(d.total_mb, d.free_mb + held.get(ref, 0.0)) for ref, d in self.devices.items()}

    def used(self, ref: str) -> float:
        return sum(n * self.need[m] for (m, r), n in self.alloc.items() if r == ref)

    def slots_used(self, ref: str) -> int:
        return sum(n for (_, r), n in self.alloc.items() if r == ref)

    def free(self, ref: str) -> float:
        return self.capacity[ref] - self.used(ref)

    def fits(self, model: str, ref: str) -> bool:
        d = self.devices[ref]
        if d.max_workers is not None and self.slots_used(ref) >= d.max_workers:
            return False
        return self.free(ref) + 1e-9 >= self.need[model]

    def count(self, model: str, ref: str | None = None) -> int:
        return sum(n for (m, r), n in self.alloc.items() if m == model and (ref is None or r == ref))

    def add(self, model: str, ref: str) -> None:
        self.alloc[(model, ref)] = self.alloc.get((model, ref), 0) + 1

    def remove(self, model: str, ref: str, n: int = 1) -> None:
        left = self.alloc.get((model, ref), 0) - n
        if left > 0:
            self.alloc[(model, ref)] = left
        else:
            self.alloc.pop((model, ref), None)


def _resolve_running(running: Mapping[tuple[str, str], int], devices: list[Device]) -> tuple[dict[tuple[str, str], int], list[str]]:
    """running keyed by (model, "host/name" or name) → by (model, device ref)."""
    by_ref = {d.ref: d for d in devices}
    by_name: dict[str, list[Device]] = {}
    for d in devices:
        by_name.setdefault(d.name, []).append(d)
    out: dict[tuple[str, str], int] = {}
    notes = []
    for (model, where), n in running.items():
        name = "cuda:0" if where == "cuda" else where
        if name in by_ref:
            ref = name
        elif "/" in name and name.split("/", 1)[1] == "cuda":
            ref = name + ":0"
        elif len(by_name.get(name, [])) >= 1:
            ref = by_name[name][0].ref
        else:
            notes.append(f"{n} worker(s) of {model} run on {where}, a device the plan does not know: "
                         "left out of it")
            continue
        out[(model, ref)] = out.get((model, ref), 0) + n
    return out, notes


def plan(devices: Iterable[Device], specs: Mapping[str, ModelSpec] | Iterable[ModelSpec],
         demand: Mapping[str, ModelDemand], running: Mapping[tuple[str, str], int] | None = None, *,
         idle_guard_s: float = IDLE_GUARD_S, target_wait_s: float = 2.0, drain_s: float = DRAIN_S,
         keep_margin: int = 1, min_gain: float = 0.25, now: datetime | None = None) -> Plan:
    """The plan for `devices` given each model's demand and the workers `running` now
    ((model, device) → count; the device a name, or "host/name"). Pure: no I/O."""
    devs = list(devices)
    spec_map = dict(specs) if isinstance(specs, Mapping) else {s.name: s for s in specs}
    now = now or datetime.now(timezone.utc)
    reasons: list[str] = []
    refused: dict[str, str] = {}
    need: dict[str, float] = {}
    for name, spec in spec_map.items():
        mb, known = memory_need(spec)
        need[name] = mb
        why = fits_anywhere(spec, devs)
        if why is not None:
            refused[name] = why
        elif not known and (name in demand):
            reasons.append(f"{name}: memory need unknown (no params or memory_mb): assumed {mb:,.0f} MiB")
    cur, notes = _resolve_running(running or {}, devs)
    reasons.extend(notes)
    for (model, ref) in list(cur):
        if model not in spec_map:
            reasons.append(f"{model}: not in the registry: its {cur.pop((model, ref))} worker(s) on {ref} stop")
        elif model in refused:
            cur.pop((model, ref))
    need.update({m: need.get(m, 0.0) for m, _ in cur})
    st = _State(devs, need, cur)
    original = dict(st.alloc)

    def dem(m: str) -> ModelDemand:
        return demand.get(m) or ModelDemand(model=m)

    def busy(m: str) -> bool:
        d = dem(m)
        return d.busy or d.arrivals_per_s > 0

    def evictable(m: str) -> bool:
        d = dem(m)
        if busy(m):
            return False
        return d.last_used is None or (now - d.last_used).total_seconds() >= idle_guard_s

    def kind_rank(m: str, ref: str) -> int:
        spec = spec_map[m]
        want = "cpu" if spec.engine == "openai" else ("cuda" if spec.device.startswith("cuda") else "cpu")
        return 0 if st.devices[ref].kind == want else 1

    def candidates(m: str, best_fit: bool = False) -> list[str]:
        """Devices that could ever hold one worker of m, best first: its kind, then the most free
        memory (spreading a model's workers), or with `best_fit` the least that still fits
        (packing first workers of many models)."""
        allowed = {d.ref for d in _eligible(spec_map[m], devs)}
        refs = [r for r in st.devices if r in allowed and need[m] <= st.capacity[r]]
        if best_fit:
            return sorted(refs, key=lambda r: (kind_rank(m, r), not st.fits(m, r), st.free(r), r))
        return sorted(refs, key=lambda r: (kind_rank(m, r), -st.free(r), r))

    models = [m for m in sorted(spec_map) if m not in refused]
    want = {m: desired_workers(demand.get(m), target_wait_s=target_wait_s, drain_s=drain_s) for m in models}
    weight = {m: _priority_weight(dem(m)) for m in models}

    # 2. warm workers stay, within their model's ceiling
    for m in models:
        have = st.count(m)
        ceiling = want[m] + keep_margin if busy(m) else min(have, 1)
        if have > ceiling:
            for ref in sorted({r for (mm, r) in st.alloc if mm == m}, key=lambda r: -st.count(m, r)):
                while st.count(m) > ceiling and st.count(m, ref) > 0:
                    st.remove(m, ref)
            reasons.append(f"{m}: {have} → {ceiling} worker(s) ({'idle: one stays warm' if not busy(m) else f'it needs {want[m]}'})")
    # a device over-committed already (its memory shrank): stop the least needed workers on it
    for ref, device in st.devices.items():
        while st.free(ref) < -1e-9 or (device.max_workers is not None and st.slots_used(ref) > device.max_workers):
            victim = min((m for (m, r) in st.alloc if r == ref), key=lambda m: (busy(m), want[m] - st.count(m), m))
            st.remove(victim, ref)
            reasons.append(f"{victim}: a worker on {ref} stops: the device has less memory (or fewer "
                           "worker slots) than its workers need")

    evicted: dict[tuple[str, str], int] = {}

    def make_room(m: str, *, allow: str) -> str | None:
        """A device where one more worker of m fits after stopping others; None if there is none.

        allow="start": idle evictable models, then workers beyond a busy model's desired count,
        then a busy model's second (or later) worker. allow="fill": idle evictable models,
        surplus workers, then workers of models better served than m by at least `min_gain`.
        """
        order = candidates(m, best_fit=allow == "start")
        for ref in order:
            if st.fits(m, ref):
                return ref
        for ref in order:
            victims = _victims(m, ref, allow)
            if victims is None:
                continue
            for v in victims:
                st.remove(v, ref)
                if not busy(v):
                    evicted[(v, ref)] = evicted.get((v, ref), 0) + 1
                    reasons.append(f"{v}: evicted from {ref} (idle, least recently used) to make room for {m}")
                else:
                    reasons.append(f"{v}: one worker on {ref} gives way to {m} ({allow})")
            return ref
        return None

    def _victims(m: str, ref: str, allow: str) -> list[str] | None:
        """Workers on ref to stop, in order, so that one of m fits; None if they would not suffice."""
        pool = []
        on = [(v, st.count(v, ref)) for v in sorted({v for (v, r) in st.alloc if r == ref}) if v != m]
        idle = sorted((v for v, _ in on if evictable(v)), key=lambda v: _lru_key(dem(v)))
        for v in idle:
            pool.extend([v] * st.count(v, ref))
        surplus = [v for v, _ in on if busy(v) and st.count(v) > want[v]]
        for v in surplus:
            pool.extend([v] * min(st.count(v, ref), st.count(v) - want[v]))
        if allow == "start":
            for v, _ in on:
                if busy(v):
                    extra = min(st.count(v, ref), max(0, min(st.count(v), want[v]) - 1))
                    pool.extend([v] * extra)
        else:
            mine = (st.count(m) + 1) / max(want[m], 1) / weight[m]
            for v, _ in sorted(on, key=lambda x: -(st.count(x[0]) / max(want[x[0]], 1))):
                if busy(v) and st.count(v) > 1:
                    theirs = (st.count(v) - 1) / max(want[v], 1) / weight[v]
                    if theirs - mine >= min_gain:
                        pool.append(v)
        freed, slots, chosen = st.free(ref), 0, []
        d = st.devices[ref]
        taken: dict[str, int] = {}
        for v in pool:
            if taken.get(v, 0) >= st.count(v, ref):
                continue
            slot_ok = d.max_workers is None or st.slots_used(ref) - slots < d.max_workers
            if freed + 1e-9 >= need[m] and slot_ok:
                break
            chosen.append(v)
            taken[v] = taken.get(v, 0) + 1
            freed += need[v]
            slots += 1
        slot_ok = d.max_workers is None or st.slots_used(ref) - slots < d.max_workers
        return chosen if freed + 1e-9 >= need[m] and slot_ok and chosen else None

    # 3. one worker for every model with queued work: largest first, each on the device it fits
    # best (first-fit decreasing: it packs what a spread would strand)
    for m in sorted(models, key=lambda m: (-need[m], -weight[m] * dem(m).backlog, m)):
        if dem(m).backlog > 0 and st.count(m) == 0:
            ref = make_room(m, allow="start")
            if ref is None:
                reasons.append(f"{m}: {dem(m).backlog} job(s) queued and no memory can be freed for it "
                               "(every device's workers are busy)")
                continue
            st.add(m, ref)
            reasons.append(f"{m}: starts on {ref}: {dem(m).backlog} job(s) queued and no worker")

    # 4. water-fill by demand
    stuck: set[str] = set()
    for _ in range(100_000):  # each step adds a worker, or moves one for a gain of min_gain: it ends
        open_ = [m for m in models if m not in stuck and st.count(m) < want[m]]
        if not open_:
            break
        m = min(open_, key=lambda m: (st.count(m) / want[m] / weight[m], -want[m], m))
        ref = make_room(m, allow="fill")
        if ref is None:
            stuck.add(m)
            reasons.append(f"{m}: wants {want[m]} worker(s), gets {st.count(m)}: no room on any device")
            continue
        st.add(m, ref)
    for m in models:
        if want[m] and st.count(m) >= want[m] and m not in stuck:
            d = dem(m)
            lam = f"λ={d.arrivals_per_s:.3g}/s" + (f", μ={d.mu_per_s:.3g}/s" if d.mu_per_s else "")
            reasons.append(f"{m}: {st.count(m)} worker(s) for {want[m]} wanted ({lam}, backlog {d.backlog})")

    placements = tuple(sorted(
        (Placement(model=m, device=st.devices[ref].name, workers=n, host=st.devices[ref].host)
         for (m, ref), n in st.alloc.items() if n > 0), key=lambda p: (p.host, p.device, p.model)))
    evict = tuple(Placement(model=m, device=st.devices[ref].name, workers=n, host=st.devices[ref].host)
                  for (m, ref), n in sorted(evicted.items()))
    for (m, ref), n in sorted(original.items()):
        left = st.count(m, ref)
        if left < n and (m, ref) not in evicted and not any(f"{m}:" in r and ref in r for r in reasons):
            reasons.append(f"{m}: {n} → {left} worker(s) on {ref}")
    return Plan(placements=placements, reasons=tuple(reasons), refused=refused, evict=evict)


def _priority_weight(d: ModelDemand) -> float:
    """1 + the mean priority of the backlog / 9 (1.0 with nothing queued)."""
    return d.backlog_weight() / d.backlog if d.backlog else 1.0


def _lru_key(d: ModelDemand) -> tuple[int, float]:
    """Least recently used first: never used in the window, then oldest last use."""
    return (0, 0.0) if d.last_used is None else (1, d.last_used.timestamp())


def make_plan(settings: Any, engine: Any, registry: Any, *, window_s: float | None = None,
              target_wait_s: float = 2.0, idle_guard_s: float = IDLE_GUARD_S,
              device_list: list[Device] | None = None, drain_s: float | None = None) -> Plan:
    """The plan for now: the devices (`device_list`, else llmos.toml's or this host's), the
    demand of the last `window_s` and the live workers (recent heartbeat) of the task table.
    `window_s` and `drain_s` default to LLMOS_PLAN_WINDOW_S and LLMOS_PLAN_DRAIN_S."""
    from llmos import manager
    from llmos.scheduling.demand import live_worker_counts, model_demand
    from llmos.scheduling.devices import devices as read_devices

    own = PlanSettings()
    window_s = own.window_s if window_s is None else float(window_s)
    drain_s = own.drain_s if drain_s is None else float(drain_s)
    devs = device_list if device_list is not None else read_devices(settings)
    within = getattr(settings, "dead_after_s", 30.0)
    demand = model_demand(engine, window_s=window_s, live_within_s=within)
    running: dict[tuple[str, str], int] = {}
    for (host, device, model), n in live_worker_counts(engine, within_s=within).items():
        running[(model, f"{host}/{device}")] = n
    return plan(devs, {s.name: s for s in registry.all()}, demand, running,
                idle_guard_s=idle_guard_s, target_wait_s=target_wait_s, drain_s=drain_s,
                now=manager.db_now(engine))
