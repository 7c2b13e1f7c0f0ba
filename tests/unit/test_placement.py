"""The planner (issue 14, Done-when 1): two 80 GB GPUs and a CPU, six models of different sizes.

Every plan fits in memory, serves every model with demand, shifts workers toward the model whose
backlog grows, evicts only idle models; a model too big for any device is refused; warm workers
are not moved for a small gain.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from llmos.errors import ConfigError
from llmos.registry import ModelSpec
from llmos.scheduling.demand import ModelDemand
from llmos.scheduling.devices import Device, devices, read_devices
from llmos.scheduling.placement import Plan, fits_anywhere, plan
from llmos.settings import Settings

GB = 1024.0
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
DEVICES = [Device("cuda:0", "cuda", 80 * GB, 80 * GB, "node"), Device("cuda:1", "cuda", 80 * GB, 80 * GB, "node"),
           Device("cpu", "cpu", 64 * GB, 64 * GB, "node", max_workers=8)]


def _spec(name: str, gb: float, device: str = "cuda") -> ModelSpec:
    return ModelSpec(name=name, source="x", tasks=("embed",), memory_mb=gb * GB, device=device)


# 70 + 40 + 24 + 14 = 148 GB of GPU models on 160 GB: one worker of each fits only when packed well
SPECS = {s.name: s for s in [_spec("llama70", 70), _spec("mixtral", 40), _spec("llama13", 24),
                             _spec("mistral7", 14), _spec("bert", 1, "cpu"), _spec("minilm", 0.1, "cpu")]}


def _busy(model: str, backlog: int, lam: float = 1.0, service_s: float = 0.5, **kw) -> ModelDemand:
    return ModelDemand(model=model, backlog=backlog, arrivals_per_s=lam, service_s_per_job=service_s,
                       mu_per_s=1 / service_s, last_used=NOW - timedelta(seconds=5), **kw)


def _idle(model: str, ago_s: float = 3600.0) -> ModelDemand:
    return ModelDemand(model=model, last_used=NOW - timedelta(seconds=ago_s))


def _check_fits(p: Plan, devices=DEVICES, specs=SPECS) -> None:
    for d in devices:
        used = sum(pl.workers * specs[pl.model].memory_mb for pl in p.on_device(d.ref))
        assert used <= d.total_mb, f"{d.ref} over-committed: {used} > {d.total_mb}\n{p}"
        if d.max_workers is not None:
            assert sum(pl.workers for pl in p.on_device(d.ref)) <= d.max_workers


def _running(p: Plan) -> dict[tuple[str, str], int]:
    return {(pl.model, pl.ref): pl.workers for pl in p.placements}


def _demands(*ds: ModelDemand) -> dict[str, ModelDemand]:
    return {d.model: d for d in ds}


def test_every_model_with_demand_is_served_and_nothing_overcommits():
    demand = _demands(*(_busy(m, backlog=20) for m in SPECS))
    p = plan(DEVICES, SPECS, demand, {}, now=NOW)
    _check_fits(p)
    for m in SPECS:
        assert p.count(m) >= 1, f"{m} has queued work and no worker: {p.reasons}"
    assert p.count("bert", "cpu") >= 1 and p.count("llama70", "cpu") == 0  # CPU models on the CPU
    assert p.refused == {} and p.evict == ()


def test_a_growing_backlog_draws_workers_to_its_model():
    plans = []
    running: dict[tuple[str, str], int] = {}
    for backlog in (10, 200, 2000, 20000):  # mistral7's backlog grows; the others' stays
        demand = _demands(_busy("mistral7", backlog=backlog, lam=2.0),
                          _busy("llama13", backlog=50, lam=1.0), _busy("mixtral", backlog=20, lam=0.5))
        p = plan(DEVICES, SPECS, demand, running, now=NOW)
        _check_fits(p)
        for m in ("mistral7", "llama13", "mixtral"):
            assert p.count(m) >= 1
        plans.append(p)
        running = _running(p)
    counts = [p.count("mistral7") for p in plans]
    assert counts == sorted(counts) and counts[-1] > counts[0], counts
    # memory is full at the end: the growth came partly from the others' workers
    assert plans[-1].count("llama13") <= plans[1].count("llama13")


def test_memory_full_evicts_the_least_recently_used_idle_model_only():
    # cuda:0 and cuda:1 each hold a 70 GB model: one idle for an hour, one for two hours, both
    # past the guard; mixtral (45 GB) gets queued work: the older of the two goes
    running = {("llama70", "node/cuda:0"): 1, ("llama13", "node/cuda:1"): 2, ("mistral7", "node/cuda:1"): 1}
    demand = _demands(_idle("llama70", ago_s=7200), _busy("llama13", backlog=5), _busy("mistral7", backlog=5),
                      _busy("mixtral", backlog=10, lam=0.1))
    p = plan(DEVICES, SPECS, demand, running, now=NOW)
    _check_fits(p)
    assert p.count("mixtral") == 1
    assert [(e.model, e.ref) for e in p.evict] == [("llama70", "node/cuda:0")]
    assert p.count("llama13") >= 1 and p.count("mistral7") >= 1  # the busy ones stay


def test_a_recently_used_model_is_not_evicted_within_the_guard():
    running = {("llama70", "node/cuda:0"): 1, ("llama70", "node/cuda:1"): 1}
    demand = _demands(_idle("llama70", ago_s=30), _busy("mixtral", backlog=10, lam=0.1))
    p = plan(DEVICES, SPECS, demand, running, now=NOW, idle_guard_s=300)
    _check_fits(p)
    # idle but used 30 s ago: within the guard. One warm llama70 is kept (idle models keep one);
    # the second, surplus, stops and mixtral takes its place: no eviction
    assert p.evict == ()
    assert p.count("llama70") == 1 and p.count("mixtral") == 1
    # one GPU only: the warm llama70 within its guard is not evicted; mixtral waits
    p = plan(DEVICES[:1], SPECS, demand, {("llama70", "node/cuda:0"): 1}, now=NOW, idle_guard_s=300)
    assert p.evict == () and p.count("llama70") == 1 and p.count("mixtral") == 0
    assert any("mixtral" in r and "no memory" in r for r in p.reasons)
    # past the guard it is
    p = plan(DEVICES[:1], SPECS, demand, {("llama70", "node/cuda:0"): 1}, now=NOW + timedelta(seconds=600),
             idle_guard_s=300)
    assert [(e.model, e.device) for e in p.evict] == [("llama70", "cuda:0")] and p.count("mixtral") == 1


def test_a_busy_model_keeps_its_worker_whatever_waits():
    running = {("llama70", "node/cuda:0"): 2}
    demand = _demands(_busy("llama70", backlog=3), _busy("mixtral", backlog=10, lam=0.1))
    p = plan(DEVICES[:1] + [Device("cuda:1", "cuda", 80 * GB, 80 * GB, "node")], SPECS, demand,
             {("llama70", "node/cuda:0"): 1, ("llama70", "node/cuda:1"): 1}, now=NOW)
    # a second worker of a busy model gives way to a model with queued work and none: not an eviction
    assert p.evict == () and p.count("llama70") == 1 and p.count("mixtral") == 1
    p = plan(DEVICES[:1], SPECS, demand, {("llama70", "node/cuda:0"): 1}, now=NOW)
    assert p.evict == () and p.count("llama70") == 1 and p.count("mixtral") == 0


def test_busy_models_are_never_evicted_under_any_demand():
    running: dict[tuple[str, str], int] = {}
    for step in range(6):
        demand = _demands(*(_busy(m, backlog=10 * (step + 1) ** (i % 3 + 1), lam=0.5 + i) for i, m in enumerate(SPECS)))
        p = plan(DEVICES, SPECS, demand, running, now=NOW)
        _check_fits(p)
        assert p.evict == ()
        for m in SPECS:
            assert p.count(m) >= 1
        running = _running(p)


def test_a_model_too_big_for_every_device_is_refused_with_its_size():
    specs = {**SPECS, "llama405": _spec("llama405", 810)}
    p = plan(DEVICES, specs, _demands(_busy("llama405", backlog=1)), {}, now=NOW)
    assert p.count("llama405") == 0
    msg = p.refused["llama405"]
    assert "829,440 MiB" in msg and "cuda:0" in msg and "81,920 MiB" in msg
    assert fits_anywhere(specs["llama405"], DEVICES) == msg
    assert fits_anywhere(SPECS["llama70"], DEVICES) is None


def test_warm_workers_stay_put_for_a_small_gain():
    running = {("mistral7", "node/cuda:1"): 2, ("llama13", "node/cuda:0"): 1}
    demand = _demands(_busy("mistral7", backlog=0, lam=2.0), _busy("llama13", backlog=0, lam=1.0))
    p = plan(DEVICES, SPECS, demand, running, now=NOW)
    # mistral7 needs 2 (λ=2, μ=2), keeps them on cuda:1 although cuda:0 has more room
    assert p.count("mistral7", "node/cuda:1") == 2 and p.count("mistral7", "cuda:0") == 0
    assert p.count("llama13", "cuda:0") == 1
    # demand dips a little: needs 1 less; the warm surplus stays (keep_margin=1)
    demand = _demands(_busy("mistral7", backlog=0, lam=1.2), _busy("llama13", backlog=0, lam=1.0))
    p2 = plan(DEVICES, SPECS, demand, _running(p), now=NOW)
    assert _running(p2) == _running(p)
    # and the same inputs give the same plan (no flapping by itself)
    assert plan(DEVICES, SPECS, demand, _running(p2), now=NOW) == p2


def test_an_idle_model_keeps_one_warm_worker():
    running = {("mistral7", "node/cuda:0"): 3}
    p = plan(DEVICES, SPECS, _demands(_idle("mistral7")), running, now=NOW)
    assert p.count("mistral7", "node/cuda:0") == 1 and p.evict == ()


def test_declared_devices_and_their_errors(tmp_path):
    f = tmp_path / "llmos.toml"
    f.write_text('[[device]]\nname = "cuda:0"\nmemory_mb = 81920\nhost = "a"\n'
                 '[[device]]\nname = "cpu"\nkind = "cpu"\nmemory_mb = 65536\nmax_workers = 4\n')
    ds = read_devices(f)
    assert [(d.name, d.kind, d.total_mb, d.host) for d in ds][0] == ("cuda:0", "cuda", 81920.0, "a")
    assert ds[1].max_workers == 4 and ds[1].free_mb == 65536.0
    assert devices(Settings(config=f)) == ds
    for bad, says in [('[[device]]\nname = "x"\nkind = "tpu"\nmemory_mb = 1\n', "kind"),
                      ('[[device]]\nname = "cpu"\nmemory_mb = -5\n', "memory_mb"),
                      ('[[device]]\nmemory_mb = 5\n', "name"),
                      ('[[device]]\nname = "cpu"\nmemory_mb = 5\ncolour = 1\n', "colour"),
                      ('device = 3\n', "array"),
                      ('[[device]]\nname = "cpu"\nmemory_mb = 5\n[[device]]\nname = "cpu"\nmemory_mb = 5\n', "twice")]:
        f.write_text(bad)
        with pytest.raises(ConfigError, match=says):
            read_devices(f)


def test_discovered_devices_include_the_cpu(tmp_path):
    ds = devices(Settings(config=None))  # no llmos.toml in the test's working directory
    cpu = [d for d in ds if d.kind == "cpu"]
    assert len(cpu) == 1 and 0 < cpu[0].free_mb <= cpu[0].total_mb and cpu[0].max_workers >= 1


def test_a_gpu_model_is_refused_when_only_the_cpu_could_hold_it():
    devs = [Device("cuda:0", "cuda", 24 * GB, 24 * GB, "n"), Device("cpu", "cpu", 256 * GB, 256 * GB, "n")]
    msg = fits_anywhere(SPECS["llama70"], devs)
    assert msg is not None and "cuda:0" in msg  # 70 GB fits the CPU's RAM, but it is a GPU model
    assert fits_anywhere(_spec("cpu70", 70, "cpu"), devs) is None
    p = plan(devs, SPECS, _demands(_busy("llama70", backlog=1)), {}, now=NOW)
    assert "llama70" in p.refused and p.count("llama70") == 0


def test_a_device_with_too_many_workers_sheds_the_idle_ones_first():
    devs = [Device("cpu", "cpu", 64 * GB, 64 * GB, "n", max_workers=2)]
    running = {("bert", "n/cpu"): 2, ("minilm", "n/cpu"): 1}
    p = plan(devs, SPECS, _demands(_busy("bert", backlog=5), _idle("minilm")), running, now=NOW)
    _check_fits(p, devs)
    assert p.count("bert") == 2 and p.count("minilm") == 0
