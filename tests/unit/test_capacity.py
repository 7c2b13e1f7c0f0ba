"""Capacity formulas against known values and a discrete-event simulation (issue 14, Done-when 2).

1. M/M/c (Poisson arrivals, exponential service, FCFS), simulated with simpy over a grid of λ,
   μ, c: Erlang C's mean wait is within 10% of the simulated one (fixed seeds, long runs).
2. Batched service (a free server takes up to B waiting jobs; a batch of k takes a + b·k): the
   rates and variabilities are measured from the simulated jobs the way llmos.scheduling.demand
   measures them from the task table, and the Allen–Cunneen figure is closer to the simulated
   wait than the plain Erlang C one. The table printed here is in docs/scheduling.md.
"""

from __future__ import annotations

import collections
import math
import random
import statistics

import pytest
import simpy

from llmos.scheduling.capacity import (erlang_c, mean_wait, mean_wait_corrected, workers_needed)


def _erlang_c_logspace(lam: float, mu: float, c: int) -> float:
    """Erlang C from its closed form, in log space (an independent check of the recursion)."""
    a = lam / mu
    rho = a / c
    log_last = c * math.log(a) - math.lgamma(c + 1) - math.log(1 - rho)
    terms = [k * math.log(a) - math.lgamma(k + 1) for k in range(c)] + [log_last]
    top = max(terms)
    denom = sum(math.exp(t - top) for t in terms)
    return math.exp(log_last - top) / denom


def test_erlang_c_known_values_and_stability():
    assert erlang_c(8, 1, 10) == pytest.approx(0.40918, abs=1e-4)  # the classic table: 8 Erlangs, 10 agents
    assert erlang_c(0.5, 1, 1) == pytest.approx(0.5)  # M/M/1: P(wait) = ρ
    assert mean_wait(0.5, 1, 1) == pytest.approx(1.0)  # M/M/1: ρ / (μ − λ)
    for lam, c in [(50, 60), (450, 500), (990, 1000), (999.5, 1000)]:
        assert erlang_c(lam, 1.0, c) == pytest.approx(_erlang_c_logspace(lam, 1.0, c), rel=1e-9)
    assert 0 < erlang_c(990, 1.0, 1000) < 1


def test_saturation_is_an_infinite_wait():
    assert erlang_c(10, 1, 10) == 1.0 and mean_wait(10, 1, 10) == math.inf
    assert mean_wait(12, 1, 10) == math.inf and mean_wait_corrected(12, 1, 10, 0.5, 0.5) == math.inf
    assert mean_wait(1, 1, 0) == math.inf  # no worker
    assert mean_wait(0, 1, 0) == 0.0 and erlang_c(0, 1, 3) == 0.0


def test_allen_cunneen_scales_by_the_variability():
    w = mean_wait(3, 1, 4)
    assert mean_wait_corrected(3, 1, 4, 1, 1) == pytest.approx(w)
    assert mean_wait_corrected(3, 1, 4, 1, 0) == pytest.approx(w / 2)  # M/D/c, roughly
    assert mean_wait_corrected(3, 1, 4, 2, 2) == pytest.approx(2 * w)


def test_workers_needed_is_the_least_that_meets_the_target():
    assert workers_needed(0, 1, 2.0) == 0
    for lam, mu, target in [(8, 1, 0.1), (900, 1, 0.01), (0.2, 0.1, 5.0), (30, 2, 0.5)]:
        c = workers_needed(lam, mu, target)
        assert c > lam / mu and mean_wait(lam, mu, c) <= target
        assert c - 1 <= lam / mu or mean_wait(lam, mu, c - 1) > target
    assert workers_needed(8, 1, 0.1, ca2=1, cs2=0) <= workers_needed(8, 1, 0.1)
    with pytest.raises(ValueError):
        workers_needed(1, 1, 0.0)


# -- simulation ---------------------------------------------------------------------------------

WARMUP = 0.1
"""The first 10% of jobs are left out (the empty system at the start)."""


def simulate_mmc(lam: float, mu: float, c: int, jobs: int, seed: int) -> float:
    """Mean wait of M/M/c FCFS: c server processes take jobs from one queue (simpy.Store)."""
    rng = random.Random(seed)
    env = simpy.Environment()
    queue = simpy.Store(env)
    waits: list[float] = []

    def source():
        for _ in range(jobs):
            yield env.timeout(rng.expovariate(lam))
            queue.put(env.now)

    def server():
        while True:
            arrived = yield queue.get()
            waits.append(env.now - arrived)
            yield env.timeout(rng.expovariate(mu))

    env.process(source())
    for _ in range(c):
        env.process(server())
    env.run()
    return statistics.fmean(waits[int(jobs * WARMUP):])


def simulate_batched(lam: float, a: float, b: float, max_batch: int, c: int, jobs: int, seed: int):
    """Batched service: a free server takes up to `max_batch` waiting jobs; a batch of k takes a + b·k.

    Returns (mean wait, and what demand.py would measure: λ, μ, c_a², c_s²), where a job's
    service sample is its share of its batch, (a + b·k)/k, as a worker records compute_ms and
    batch_size.
    """
    rng = random.Random(seed)
    env = simpy.Environment()
    queue: collections.deque[float] = collections.deque()
    arrivals: list[float] = []
    waits: list[float] = []
    shares: list[float] = []
    work = [env.event()]

    def source():
        for _ in range(jobs):
            yield env.timeout(rng.expovariate(lam))
            queue.append(env.now)
            arrivals.append(env.now)
            if not work[0].triggered:
                work[0].succeed()

    def server():
        while True:
            while not queue:
                if work[0].triggered:
                    work[0] = env.event()
                yield work[0]
            k = min(max_batch, len(queue))
            batch = [queue.popleft() for _ in range(k)]
            took = a + b * k
            for arrived in batch:
                waits.append(env.now - arrived)
                shares.append(took / k)
            yield env.timeout(took)

    env.process(source())
    for _ in range(c):
        env.process(server())
    env.run()
    skip = int(jobs * WARMUP)
    x = shares[skip:]
    mean_x = statistics.fmean(x)
    gaps = [t1 - t0 for t0, t1 in zip(arrivals, arrivals[1:])]
    ca2 = statistics.variance(gaps) / statistics.fmean(gaps) ** 2
    cs2 = statistics.variance(x) / mean_x ** 2
    lam_measured = len(gaps) / (arrivals[-1] - arrivals[0])
    return statistics.fmean(waits[skip:]), lam_measured, 1.0 / mean_x, ca2, cs2


MMC_GRID = [  # λ, μ, c, jobs: more jobs where waits are rarer (more servers), for the same precision
    (0.5, 1.0, 1, 60_000),
    (1.4, 1.0, 2, 80_000),
    (6.0, 2.0, 4, 100_000),
    (3.0, 0.5, 8, 200_000),
    (9.0, 0.75, 16, 200_000),
]


def test_erlang_c_matches_an_mmc_simulation():
    rows = []
    for i, (lam, mu, c, jobs) in enumerate(MMC_GRID):
        simulated = simulate_mmc(lam, mu, c, jobs, seed=100 + i)
        predicted = mean_wait(lam, mu, c)
        rows.append((lam, mu, c, lam / (c * mu), predicted, simulated, predicted / simulated - 1))
    print("\n  λ      μ     c   ρ     Erlang C Wq   simulated Wq   error")
    for lam, mu, c, rho, pred, sim, err in rows:
        print(f"  {lam:<6g} {mu:<5g} {c:<3d} {rho:.2f}  {pred:11.4f}   {sim:12.4f}   {err:+.1%}")
    for lam, mu, c, rho, pred, sim, err in rows:
        assert abs(err) < 0.10, f"λ={lam} μ={mu} c={c}: Erlang C {pred:.4f} vs simulated {sim:.4f}"


BATCH_GRID = [  # λ, a, b, max batch, c: batch overhead a, per-item cost b (seconds)
    (20.0, 0.05, 0.01, 8, 1),
    (40.0, 0.05, 0.01, 8, 1),
    (50.0, 0.05, 0.01, 16, 2),
    (150.0, 0.05, 0.01, 16, 4),
    (8.0, 0.2, 0.05, 4, 2),
]


def test_allen_cunneen_is_closer_than_erlang_c_for_batched_service():
    rows = []
    for i, (lam, a, b, batch, c) in enumerate(BATCH_GRID):
        simulated, lam_m, mu_m, ca2, cs2 = simulate_batched(lam, a, b, batch, c, 30_000, seed=200 + i)
        plain = mean_wait(lam_m, mu_m, c)
        corrected = mean_wait_corrected(lam_m, mu_m, c, ca2, cs2)
        rows.append((lam, a, b, batch, c, lam_m / (c * mu_m), ca2, cs2, simulated, plain, corrected))
    print("\n  λ     a+b·k        B   c  ρ      c_a²  c_s²   simulated  Erlang C   corrected  "
          "plain err  corrected err")
    for lam, a, b, batch, c, rho, ca2, cs2, sim, plain, corr in rows:
        print(f"  {lam:<5g} {a:g}+{b:g}·k  {batch:<3d} {c:<2d} {rho:.3f}  {ca2:.2f}  {cs2:.3f}  "
              f"{sim:9.4f}  {plain:8.4f}  {corr:9.4f}  {plain / sim - 1:+9.0%}  {corr / sim - 1:+12.0%}")
    for lam, a, b, batch, c, rho, ca2, cs2, sim, plain, corr in rows:
        assert cs2 < 1  # batched service is far less variable than exponential
        assert abs(corr - sim) < abs(plain - sim), (lam, c, sim, plain, corr)
