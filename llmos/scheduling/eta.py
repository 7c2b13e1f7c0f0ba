"""A submit's predicted start and finish, and admission: deadlines its ETA cannot meet, models
that fit on no device (issue 14).

Owns `admit` (the one call in `Client._submit`), the estimator `predict` (pure arithmetic on a
`Load`), and the two reads they need:

- `read_load` (every submit call, one statement): the database's clock, the queued jobs of the
  model at the submit's priority or higher (counted through ix_jobs_queued_order, up to
  `AHEAD_CAP`, beyond which the model's Redis pending set gives a cheap upper bound), its running
  jobs, and its live workers;
- `read_rate` (at most once per `RATE_TTL_S` per process and model, cached): the measured
  service time per job per worker at the batch sizes seen (the batch's compute time divided by
  its size, averaged over the last `RATE_SAMPLE` jobs finished within `RATE_WINDOW_S`), the mean
  time a job runs (its batch's compute), and the measured cold start of the model's workers
  (`workers.ready_at - started_at`).

The model (a fluid approximation of c parallel batch servers, see docs/scheduling.md). A job's
start is its claim (`started_at`): each worker holds about `slots` = one max_batch_size of jobs
claimed ahead of its model thread (WORKER_SLOTS_PER_BATCH), so a job is claimed once the jobs
ahead of it fit in the workers' free slots, and computes once those ahead of it are done:

    wait_0    = dispatch latency (the batcher's max_wait_ms) [+ cold start when no worker is warm]
    ahead_i   = queued ahead at priority >= p  +  running  +  i     (i: position in the submit)
    start_i   = now + wait_0 + max(0, ahead_i + 1 - c * slots) * s / c
    finish_i  = now + wait_0 + ahead_i * s / c + run_s
    (s: seconds per job per worker at the batch sizes seen, c: warm workers (>= 1),
     run_s: a job's own batch compute time)

Predictions are offsets from the database's clock at insert, so the stored `eta_start_at` is
never before `created_at`. Deadline admission refuses (LLMOS_DEADLINE_ADMISSION=refuse, the
default) or warns (=warn) only when the prediction rests on measurements (a measured service
time, and a measured cold start when one is needed): a guess never refuses a job. `off` skips
the check (the ETA is still stored).

Imports llmos.manager, llmos.db, llmos.dispatch, llmos.errors, llmos.registry, llmos.settings
only; writes nothing (the rows are written by llmos.manager.create_jobs).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
import time
import warnings
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from llmos import manager
from llmos.db import jobs, workers
from llmos.errors import DeadlineUnmeetableError, DeadlineUnmeetableWarning, ModelTooLargeError
from llmos.jobs import JobStatus
from llmos.logs import event
from llmos.registry import ModelSpec


log = logging.getLogger("llmos.scheduling.eta")

AHEAD_CAP = 2_000
"""Queued jobs counted ahead of a submit through the index, at most (beyond: the pending set)."""

RATE_TTL_S = 5.0
"""How long one process reuses a model's measured rate before reading it again."""

RATE_WINDOW_S = 600.0
"""Finished jobs older than this do not count toward the measured rate."""

RATE_SAMPLE = 2000
"""The measured rate is over at most this many of the model's most recently finished jobs."""

PRIOR_SERVICE_S = 0.05
"""Seconds per job per worker assumed before any job of the model has finished (not measured)."""

PRIOR_COLD_START_S = 30.0
"""Seconds a worker is assumed to take to load its model before any has recorded `ready_at`."""

WORKER_SLOTS_PER_BATCH = 1
"""Batches of jobs a worker holds claimed (`running`) before they compute: its batcher claims the
next batch while the model thread computes one. Measured: 1 fits test_eta's live run best (mean
signed start error +0.3 s, against -3.9 s counting running jobs half done and +2.4 s with 2, the
worker's message concurrency); see docs/scheduling.md."""

ADMISSION_MODES = ("refuse", "warn", "off")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rate:
    """A model's measured service figures (cached per process for RATE_TTL_S)."""

    service_s: float  # seconds per job per worker at the batch sizes seen (batch compute / size)
    run_s: float  # seconds a job runs (its batch's compute)
    jobs: int  # finished jobs it was measured on (0: the priors)
    mean_batch: float = 1.0
    cold_start_s: float = PRIOR_COLD_START_S
    cold_start_measured: bool = False

    @property
    def measured(self) -> bool:
        return self.jobs > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Load:
    """What one submit sees of its model's queue (read once per submit call)."""

    now: datetime  # the database's clock
    ahead: int  # queued at the submit's priority or higher (a bound when `ahead_capped`)
    running: int
    workers: int  # live (heartbeating) workers of the model
    ahead_capped: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Admission:
    """The prediction for one submit of `n` jobs: job i starts `start_in_s(i)` after insert."""

    model: str
    n: int
    now: datetime  # the database's clock when the load was read
    wait0_s: float  # before the first job of the submit can start
    per_job_s: float  # added per position (s / c)
    run_s: float
    ahead: int
    running: int
    workers: int
    measured: bool  # service time (and the cold start when none is warm) measured, not priors

    slots: int = 1  # jobs the warm workers hold claimed at most, together

    def start_in_s(self, i: int) -> float:
        """When job i of the submit is claimed (its `started_at`), after insert."""
        return self.wait0_s + max(0, self.ahead + self.running + i + 1 - self.slots) * self.per_job_s

    def finish_in_s(self, i: int) -> float:
        return self.wait0_s + (self.ahead + self.running + i) * self.per_job_s + self.run_s

    @property
    def eta_start_at(self) -> datetime:
        """The first job's predicted start (database clock)."""
        return self.now + timedelta(seconds=self.start_in_s(0))

    @property
    def last_start_at(self) -> datetime:
        return self.now + timedelta(seconds=self.start_in_s(self.n - 1))

    @property
    def eta_finish_at(self) -> datetime:
        """The last job's predicted finish."""
        return self.now + timedelta(seconds=self.finish_in_s(self.n - 1))


def predict(spec: ModelSpec, load: Load, rate: Rate, n: int) -> Admission:
    """The ETA arithmetic (no I/O): see the module docstring."""
    workers_n = load.workers
    wait0 = spec.max_wait_ms / 1000.0  # the batcher holds a lone job this long before it claims
    measured = rate.measured
    if workers_n <= 0:
        wait0 += rate.cold_start_s  # one worker has to start (the supervisor, or by hand)
        measured = measured and rate.cold_start_measured
    c = max(1, workers_n)
    return Admission(model=spec.name, n=n, now=load.now, wait0_s=wait0, per_job_s=rate.service_s / c,
                     run_s=rate.run_s, ahead=load.ahead, running=load.running, workers=workers_n,
                     measured=measured, slots=c * WORKER_SLOTS_PER_BATCH * spec.max_batch_size)


# -- reads -------------------------------------------------------------------------------------

def _queued() -> Any:
    return jobs.c.status == sa.literal_column(f"'{JobStatus.QUEUED.value}'")  # the partial index's predicate


def read_load(engine: sa.Engine, model: str, priority: int, *, dead_after_s: float,
              redis_conn: Any = None) -> Load:
    """One statement: the clock, queued ahead (bounded), running, live workers of `model`."""
    # in the index's order (model, priority desc, queued_at): the planner walks ix_jobs_queued_order
    # and stops after AHEAD_CAP entries, however many jobs are queued
    ahead_q = (sa.select(jobs.c.priority).where(_queued(), jobs.c.model == model, jobs.c.priority >= priority)
               .order_by(jobs.c.priority.desc(), jobs.c.queued_at).limit(AHEAD_CAP).subquery())
    running_q = (sa.select(sa.literal(1))
                 .where(jobs.c.status == sa.literal_column(f"'{JobStatus.RUNNING.value}'"), jobs.c.model == model)
                 .limit(AHEAD_CAP).subquery())
    with engine.connect() as conn:
        since = timedelta(seconds=dead_after_s)
        if conn.dialect.name == "postgresql":  # the clock in the statement: no round trip to read it
            clock: Any = sa.func.now()
            alive = clock - since
        else:
            local = manager.db_now(conn)
            clock, alive = sa.literal(local, jobs.c.created_at.type), local - since
        live = (sa.select(sa.func.count()).select_from(workers)
                .where(workers.c.model == model, workers.c.stopped_at.is_(None), workers.c.last_heartbeat >= alive))
        row = conn.execute(sa.select(
            clock, sa.select(sa.func.count()).select_from(ahead_q).scalar_subquery(),
            sa.select(sa.func.count()).select_from(running_q).scalar_subquery(),
            live.scalar_subquery())).one()
    ahead, capped = int(row[1]), int(row[1]) >= AHEAD_CAP
    if capped and redis_conn is not None:
        ahead = max(ahead, _pending(redis_conn, model))
    return Load(now=manager.as_utc(row[0]).astimezone(timezone.utc), ahead=ahead, running=int(row[2]),
                workers=int(row[3]), ahead_capped=capped)


def _pending(redis_conn: Any, model: str) -> int:
    """The model's pending set size (ids sent, not taken: every priority, so an upper bound)."""
    from llmos.dispatch import pending_set

    try:
        return int(redis_conn.scard(pending_set(model)))
    except Exception:  # Redis is checked by the submit itself; the bound is only a refinement
        return 0


_rates: dict[tuple[str, str], tuple[float, Rate]] = {}
_rates_lock = threading.Lock()


def read_rate(engine: sa.Engine, model: str, *, ttl_s: float = RATE_TTL_S) -> Rate:
    """`model`'s measured service figures, cached per process and database for `ttl_s`."""
    key = (str(engine.url), model)
    hit = _rates.get(key)
    if hit is not None and time.monotonic() - hit[0] < ttl_s and hit[1] is not None:
        return hit[1]
    rate = _measure(engine, model)
    with _rates_lock:
        _rates[key] = (time.monotonic(), rate)
    return rate


def forget_rates() -> None:
    """Drop the cached rates (tests; a process that wants fresh figures at once)."""
    with _rates_lock:
        _rates.clear()


def _measure(engine: sa.Engine, model: str) -> Rate:
    """Two small reads: the last RATE_SAMPLE finished jobs of the window (ix_jobs_finished_at_id,
    walked backwards), and the last few workers' load times (ix_workers_model)."""
    with engine.connect() as conn:
        now = manager.db_now(conn)
        recent = (sa.select(jobs.c.compute_ms, jobs.c.batch_size)
                  .where(jobs.c.finished_at.is_not(None), jobs.c.finished_at >= now - timedelta(seconds=RATE_WINDOW_S),
                         jobs.c.model == model, jobs.c.compute_ms.is_not(None))
                  .order_by(jobs.c.finished_at.desc()).limit(RATE_SAMPLE).subquery())
        size = sa.func.coalesce(recent.c.batch_size, 1)
        n, share, run, batch = conn.execute(sa.select(
            sa.func.count(), sa.func.sum(recent.c.compute_ms / sa.case((size < 1, 1), else_=size)),
            sa.func.avg(recent.c.compute_ms), sa.func.avg(size))).one()
        loads = conn.execute(sa.select(workers.c.started_at, workers.c.ready_at)
                             .where(workers.c.model == model, workers.c.ready_at.is_not(None))
                             .order_by(workers.c.started_at.desc()).limit(5)).all()
    cold = [(manager.as_utc(r) - manager.as_utc(s)).total_seconds() for s, r in loads]
    cold = [c for c in cold if math.isfinite(c) and c >= 0]
    cold_s = sum(cold) / len(cold) if cold else PRIOR_COLD_START_S
    if not n:
        return Rate(service_s=PRIOR_SERVICE_S, run_s=PRIOR_SERVICE_S, jobs=0, cold_start_s=cold_s,
                    cold_start_measured=bool(cold))
    return Rate(service_s=float(share) / 1000.0 / n, run_s=float(run) / 1000.0, jobs=int(n),
                mean_batch=float(batch), cold_start_s=cold_s, cold_start_measured=bool(cold))


# -- fits anywhere -----------------------------------------------------------------------------

_device_mb: dict[str, float | None] = {}


def largest_device_mb(kind: str) -> float | None:
    """Total memory of the largest device of `kind` ('cpu' or 'cuda') this process knows (cached).

    CPU: this host's RAM. CUDA: only if torch is already imported here (a submit never imports
    torch); None when unknown, and then nothing is refused.
    """
    if kind not in _device_mb:
        mb: float | None = None
        try:
            if kind == "cpu":
                mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
            elif kind == "cuda" and "torch" in sys.modules:
                torch = sys.modules["torch"]
                if torch.cuda.is_available():
                    mb = max(torch.cuda.get_device_properties(i).total_memory
                             for i in range(torch.cuda.device_count())) / 2**20
        except (ValueError, OSError, AttributeError, RuntimeError):
            mb = None
        _device_mb[kind] = mb
    return _device_mb[kind]


_declared: dict[tuple[str, float], tuple] = {}


def declared_devices(settings: Any) -> tuple:
    """The `[[device]]` entries of llmos.toml (cached per file and modification time), () if none
    or no settings: a submit reads the file at most once per change."""
    if settings is None:
        return ()
    from llmos.scheduling.devices import config_path, read_devices

    path = config_path(settings)
    if path is None:
        return ()
    try:
        key = (str(path), path.stat().st_mtime)
    except OSError:
        return ()
    if key not in _declared:
        _declared.clear()
        _declared[key] = tuple(read_devices(path))
    return _declared[key]


def check_fits(spec: ModelSpec, settings: Any = None) -> None:
    """ModelTooLargeError if `spec` fits on no device: the `[[device]]` entries of llmos.toml when
    it declares any (llmos.scheduling.placement.fits_anywhere, as the planner decides), else the
    largest device of its kind this process knows."""
    declared = declared_devices(settings)
    if declared:
        from llmos.scheduling.placement import fits_anywhere

        refusal = fits_anywhere(spec, declared)
        if refusal is not None:
            raise ModelTooLargeError(f"{refusal}: it fits on no device; nothing was written")
        return
    try:
        need = spec.memory_need_mb()
    except Exception:  # a need that cannot be worked out is not a refusal
        need = None
    if need is None:
        return
    kind = "cuda" if str(spec.device).startswith("cuda") else "cpu"
    largest = largest_device_mb(kind)
    if largest is not None and need > largest:
        raise ModelTooLargeError(
            f"model {spec.name!r} needs about {need / 1024:.1f} GiB of memory ({need:.0f} MiB) and the "
            f"largest {kind} device has {largest / 1024:.1f} GiB ({largest:.0f} MiB): it fits on no "
            f"device; nothing was written")


# -- admission ---------------------------------------------------------------------------------

def admit(engine: sa.Engine, spec: ModelSpec, *, priority: int, n: int, deadline: datetime | None,
          deadline_in_s: float | None, mode: str = "refuse", dead_after_s: float = 30.0,
          redis_conn: Any = None, settings: Any = None) -> Admission:
    """The ETA of a submit of `n` jobs of `spec` at `priority`, after the admission checks.

    ModelTooLargeError if the model fits on no device; DeadlineUnmeetableError (mode 'refuse') or
    a DeadlineUnmeetableWarning (mode 'warn') if the last job's predicted start is past the
    deadline and the prediction is measured. Nothing is written here.
    """
    check_fits(spec, settings)
    load = read_load(engine, spec.name, priority, dead_after_s=dead_after_s, redis_conn=redis_conn)
    adm = predict(spec, load, read_rate(engine, spec.name), n)
    if mode != "off" and (deadline is not None or deadline_in_s is not None):
        _check_deadline(adm, deadline, deadline_in_s, mode)
    return adm


def _check_deadline(adm: Admission, deadline: datetime | None, deadline_in_s: float | None, mode: str) -> None:
    left_s = deadline_in_s if deadline_in_s is not None else (deadline - adm.now).total_seconds()
    last = adm.start_in_s(adm.n - 1)
    if last <= left_s or not adm.measured:
        return
    meet = sum(1 for i in range(adm.n) if adm.start_in_s(i) <= left_s)  # (the refusal path only)
    what = "the job" if adm.n == 1 else f"{adm.n - meet} of the {adm.n} jobs"
    message = (f"deadline in {left_s:.1f} s cannot be met for {what} of model {adm.model!r}: predicted start "
               f"in {last:.1f} s (ETA {(adm.now + timedelta(seconds=last)).isoformat(timespec='seconds')}; "
               f"{adm.ahead} queued ahead, {adm.running} running, {adm.workers} live worker(s))")
    event(log, "deadline_unmeetable", logging.WARNING, model=adm.model, jobs=adm.n, mode=mode,
          eta_start_in_s=round(last, 3), deadline_in_s=round(left_s, 3))
    if mode == "warn":
        warnings.warn(message + "; accepted (LLMOS_DEADLINE_ADMISSION=warn)", DeadlineUnmeetableWarning, stacklevel=4)
        return
    raise DeadlineUnmeetableError(message + "; nothing was written (LLMOS_DEADLINE_ADMISSION=warn accepts it)",
                                  eta_start_s=last, deadline_in_s=left_s)


def eta_vs_actual(job: Any) -> dict[str, Any]:
    """A job's predicted start and finish beside its actual ones, and the errors in seconds
    (actual - predicted: positive when it came later than predicted; None until it happened)."""
    def error(predicted: datetime | None, actual: datetime | None) -> float | None:
        if predicted is None or actual is None:
            return None
        return round((manager.as_utc(actual) - manager.as_utc(predicted)).total_seconds(), 3)

    return {"predicted_start": job.eta_start_at, "started_at": job.started_at,
            "start_error_s": error(job.eta_start_at, job.started_at),
            "predicted_finish": job.eta_finish_at, "finished_at": job.finished_at,
            "finish_error_s": error(job.eta_finish_at, job.finished_at)}
