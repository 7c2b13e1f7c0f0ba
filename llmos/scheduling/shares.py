"""Tenant shares: per-tenant weights of a model's compute under contention.

Owns the weights (`[shares]` in llmos.toml: `acme = 3`, `globex = 1`; unlisted tenants weigh 1;
no table, or an empty one: shares are off) and the step-down rule applied at submit
(`adjusted_priority`, called by `Client._submit`, so the SDK, the API and llmos.batches all go
through it). Under contention for a model (more than one tenant with queued work on it), a
tenant whose share of the model's compute seconds over the last LLMOS_SHARES_WINDOW_S is above
its weight's share has its new work queued one priority step lower, until it is back under.

A job's compute seconds are its batch's `compute_ms` divided by the batch's size (a batch of
eight jobs of one tenant costs what a batch of eight of another does, whoever filled it).
The contending tenants are those with queued work on the model, and the submitting one; the
shares compare those tenants only (a tenant that left the model no longer counts).

Reads: per model, one statement every `CACHE_S` seconds per process, cached here (a submit in
between reads nothing): the compute per tenant over the window (the partial index on finished_at:
the rows finished in the window, all models) and the model's queued tenants (its queued rows,
through ix_jobs_open_status_model or ix_jobs_queued_order). Both grow with load (throughput ×
window, backlog); an index over queued rows on (model, tenant) would make the second a skip scan
if a backlog of millions makes it matter.
"""

from __future__ import annotations

import threading
import time
import tomllib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import sqlalchemy as sa

from llmos.constants import MIN_PRIORITY
from llmos.db import jobs
from llmos.errors import ConfigError
from llmos.jobs import JobStatus
from llmos.manager import db_now
from llmos.settings import Settings, config_path

CACHE_S = 2.0
"""How long one model's compute and queued tenants are reused by a process's submits (at most a
twentieth of the window: a stale read is a lag, and lag pulls the shares toward equal ones)."""

DEFAULT_WEIGHT = 1.0
"""The weight of a tenant [shares] does not list."""


@dataclass(frozen=True)
class Usage:
    """One model's recent compute seconds per tenant and the tenants with queued work on it."""

    compute_s: Mapping[str, float]
    queued: frozenset[str]


def read_weights(path: Path | None) -> dict[str, float]:
    """The [shares] table of `path` (tenant → weight > 0), checked; {} when there is none."""
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    table = data.get("shares", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: shares must be a table ([shares] tenant = weight), got {table!r}")
    weights = {}
    for tenant, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ConfigError(f"{path}: [shares] {tenant} = {value!r} is invalid: a weight must be a "
                              "positive number (unlisted tenants weigh 1)")
        weights[str(tenant)] = float(value)
    return weights


_weights_cache: dict[tuple[str, float], dict[str, float]] = {}
_usage_cache: dict[tuple[str, str, float], tuple[float, Usage]] = {}
_lock = threading.Lock()


def weights(settings: Settings) -> dict[str, float]:
    """[shares] of the configured llmos.toml, reread when the file changes."""
    path = config_path(settings)
    if path is None:
        return {}
    try:
        key = (str(path), path.stat().st_mtime)
    except OSError:
        return {}
    found = _weights_cache.get(key)
    if found is None:
        found = read_weights(path)
        with _lock:
            _weights_cache.clear()
            _weights_cache[key] = found
    return found


def read_usage(engine: sa.Engine, model: str, window_s: float) -> Usage:
    """`model`'s compute seconds per tenant over the last `window_s` (jobs finished then) and the
    tenants with queued work on it: one statement (a UNION ALL), database clock."""
    since = db_now(engine) - timedelta(seconds=window_s)
    per_job = jobs.c.compute_ms / sa.func.coalesce(sa.func.nullif(jobs.c.batch_size, 0), 1) / 1000.0
    done = (sa.select(jobs.c.tenant, sa.literal(0).label("queued"), sa.func.sum(per_job).label("seconds"))
            .where(jobs.c.finished_at.is_not(None), jobs.c.finished_at >= since, jobs.c.model == model,
                   jobs.c.compute_ms.is_not(None))
            .group_by(jobs.c.tenant))
    waiting = (sa.select(jobs.c.tenant, sa.literal(1).label("queued"), sa.literal(0.0).label("seconds"))
               .where(jobs.c.status == sa.literal_column(f"'{JobStatus.QUEUED.value}'"), jobs.c.model == model)
               .group_by(jobs.c.tenant))
    compute: dict[str, float] = {}
    queued: set[str] = set()
    with engine.connect() as conn:
        for tenant, is_queued, seconds in conn.execute(sa.union_all(done, waiting)):
            if is_queued:
                queued.add(tenant)
            else:
                compute[tenant] = float(seconds or 0.0)
    return Usage(compute, frozenset(queued))


def usage(engine: sa.Engine, model: str, window_s: float) -> Usage:
    """`read_usage`, cached per process for `CACHE_S` seconds."""
    key = (str(engine.url), model, window_s)
    now = time.monotonic()
    hit = _usage_cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    found = read_usage(engine, model, window_s)
    with _lock:
        _usage_cache[key] = (now + min(CACHE_S, window_s / 20), found)
    return found


def over_share(tenant: str, use: Usage, weight_of: Mapping[str, float]) -> bool:
    """The rule: `tenant` contends with another tenant (queued work on the model) and its share of
    the contending tenants' compute seconds is above its weight over theirs."""
    contending = set(use.queued) | {tenant}
    if len(contending) < 2:
        return False
    total = sum(use.compute_s.get(t, 0.0) for t in contending)
    if total <= 0:
        return False
    entitled = weight_of.get(tenant, DEFAULT_WEIGHT) / sum(weight_of.get(t, DEFAULT_WEIGHT) for t in contending)
    return use.compute_s.get(tenant, 0.0) / total > entitled


def shares_of(use: Usage, weight_of: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """Per contending tenant: (its share of their compute, its weight's share); for reports."""
    contending = sorted(use.queued)
    total = sum(use.compute_s.get(t, 0.0) for t in contending)
    weight = sum(weight_of.get(t, DEFAULT_WEIGHT) for t in contending)
    return {t: (use.compute_s.get(t, 0.0) / total if total else 0.0, weight_of.get(t, DEFAULT_WEIGHT) / weight)
            for t in contending}


def adjusted_priority(engine: sa.Engine, settings: Settings, model: str, tenant: str, priority: int) -> int:
    """The priority `tenant`'s new work on `model` is queued at: one step lower (not below 0)
    while the tenant is above its share under contention, else `priority`. No [shares]: as given."""
    weight_of = weights(settings)
    if not weight_of or priority <= MIN_PRIORITY:
        return priority
    if over_share(tenant, usage(engine, model, settings.shares_window_s), weight_of):
        return priority - 1
    return priority


def clear_cache() -> None:
    """Forget cached weights and usage (tests)."""
    with _lock:
        _weights_cache.clear()
        _usage_cache.clear()
