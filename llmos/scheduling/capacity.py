"""Capacity: Erlang C (M/M/c), its Allen–Cunneen correction, the workers a target wait needs.

    a = λ/μ (offered load, in workers), ρ = a/c (utilisation)
    Erlang B by the recursion B(0) = 1, B(k) = a·B(k−1) / (k + a·B(k−1))   (stable for any c)
    C(c, a) = B(c) / (1 − ρ·(1 − B(c)))                                    (probability of waiting)
    Wq = C / (c·μ − λ)                                                      (mean wait, M/M/c)
    Wq(G/G/c) ≈ Wq(M/M/c) · (c_a² + c_s²) / 2                               (Allen–Cunneen)

ρ ≥ 1 means the queue grows without bound: the waits are infinite (`math.inf`), and
`capacity_report` says so. References: A. K. Erlang (1917); A. O. Allen, Probability,
Statistics, and Queueing Theory, 2nd ed. (1990), §6; W. Whitt, "Approximations for the GI/G/m
queue", Production and Operations Management 2(2), 1993. docs/scheduling.md compares these with
a simulation.
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa

from llmos.registry import Registry
from llmos.scheduling.demand import ModelDemand, model_demand

MAX_WORKERS = 100_000
"""`workers_needed` searches no further (a target wait no number of workers meets, e.g. 0 s)."""


def _check(lam: float, mu: float, c: int) -> None:
    if lam < 0 or mu <= 0 or c < 0:
        raise ValueError(f"need λ ≥ 0, μ > 0, c ≥ 0 (got λ={lam}, μ={mu}, c={c})")


def erlang_b(a: float, c: int) -> float:
    """Erlang B blocking probability for offered load `a` on `c` servers (iterative, stable)."""
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b


def erlang_c(lam: float, mu: float, c: int) -> float:
    """P(an arrival waits) in M/M/c; 1.0 when ρ ≥ 1 (every arrival waits, the queue grows)."""
    _check(lam, mu, c)
    if lam == 0:
        return 0.0
    a = lam / mu
    if c == 0 or a >= c:
        return 1.0
    b = erlang_b(a, c)
    rho = a / c
    return b / (1.0 - rho * (1.0 - b))


def mean_wait(lam: float, mu: float, c: int) -> float:
    """Mean time in queue (seconds) in M/M/c; math.inf when ρ ≥ 1."""
    _check(lam, mu, c)
    if lam == 0:
        return 0.0
    if c == 0 or lam >= c * mu:
        return math.inf
    return erlang_c(lam, mu, c) / (c * mu - lam)


def mean_wait_corrected(lam: float, mu: float, c: int, ca2: float = 1.0, cs2: float = 1.0) -> float:
    """Allen–Cunneen's G/G/c mean wait: the M/M/c one × (c_a² + c_s²) / 2."""
    w = mean_wait(lam, mu, c)
    return w if math.isinf(w) or w == 0 else w * (ca2 + cs2) / 2.0


def workers_needed(lam: float, mu: float, target_wait_s: float, ca2: float = 1.0, cs2: float = 1.0) -> int:
    """The fewest workers whose corrected mean wait is at most `target_wait_s` (0 for no load).

    Starts at the least c with ρ < 1 and walks up (the wait falls with c). Raises ValueError for
    a target of 0 s or less with any load, or when no number up to MAX_WORKERS meets it.
    """
    _check(lam, mu, 0)
    if lam == 0:
        return 0
    if target_wait_s <= 0:
        raise ValueError(f"the target wait must be above 0 s (got {target_wait_s})")
    c = max(1, math.floor(lam / mu) + 1)
    while c <= MAX_WORKERS:
        if mean_wait_corrected(lam, mu, c, ca2, cs2) <= target_wait_s:
            return c
        c += 1
    raise ValueError(f"no number of workers up to {MAX_WORKERS} brings the mean wait to {target_wait_s} s")


def needed_for(d: ModelDemand, target_wait_s: float) -> int | None:
    """`workers_needed` for a model's measured demand; None when its service rate is unknown."""
    if d.mu_per_s is None:
        return None
    try:
        return workers_needed(d.arrivals_per_s, d.mu_per_s, target_wait_s, d.ca2, d.cs2)
    except ValueError:
        return None


def _finite(x: float) -> float | None:
    """JSON has no infinity: an infinite wait is null in the report, with `utilization` ≥ 1."""
    return None if math.isinf(x) else x


def row(d: ModelDemand, *, target_wait_s: float) -> dict[str, Any]:
    """One model's line of the report (the JSON fields of `llmos capacity --json`)."""
    lam, mu, c = d.arrivals_per_s, d.mu_per_s, d.workers
    out: dict[str, Any] = {"model": d.model, "lambda_per_s": lam, "mu_per_s": mu, "workers": c,
                           "utilization": None, "p_wait": None, "mean_wait_s": None,
                           "mean_wait_corrected_s": None, "measured_wait_s": d.measured_wait_s,
                           "workers_needed": needed_for(d, target_wait_s)}
    if mu is not None:
        out["utilization"] = lam / (c * mu) if c > 0 else None  # no worker: no utilisation
        out["p_wait"] = erlang_c(lam, mu, c)
        out["mean_wait_s"] = _finite(mean_wait(lam, mu, c))
        out["mean_wait_corrected_s"] = _finite(mean_wait_corrected(lam, mu, c, d.ca2, d.cs2))
    return out


def capacity_report(engine: sa.Engine, registry: Registry | None = None, *, target_wait_s: float = 2.0,
                    window_s: float = 600.0) -> list[dict[str, Any]]:
    """Per model with load or workers in the window: λ, μ, c, ρ, P(wait), the M/M/c and
    Allen–Cunneen mean waits, the measured mean wait and the workers the target needs.

    Fields the data cannot give are None: μ (and what needs it) when no job finished in the
    window; the waits when ρ ≥ 1 (infinite: the queue grows). Models of `registry` without any
    load are left out; a model not in the registry (an old job's) is kept.
    """
    demand = model_demand(engine, window_s=window_s)
    return [row(d, target_wait_s=target_wait_s) for d in demand.values()]
