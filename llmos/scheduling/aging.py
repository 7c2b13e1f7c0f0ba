"""Priority aging: a job waiting past LLMOS_AGING_S per step goes up one priority step, up to a
ceiling (LLMOS_AGING_CEILING), so a low-priority job's wait is bounded under any stream of
urgent work (vLLM has none: vllm-project/vllm #20608).

Owns the rule and the re-send; the reconciler's pass calls `run_once` (production runs the
reconciler, `llmos up` runs it in a thread). The rows change through `manager.age_queued` (a
conditional UPDATE of queued rows, one step per job per pass); then the promoted jobs are sent
again at their new priority, as a bulk submit sends them: one message per up to the model's
`max_batch_size` ids of one priority. Its old message stays in the lower list: whichever a worker
pops first is claimed, the other finds the job claimed (a conditional update), and the worker
releases it, so the job runs once. Pending and held sets stay right: the new send adds the id to
the model's pending set, the first pop moves it to the popping worker's held set, the second
pop finds it gone from pending and the worker releases it after the failed claim.

The bound (docs/scheduling.md, "Aging and tenant shares"): with step S = LLMOS_AGING_S, a pass
every I = LLMOS_RECONCILE_INTERVAL_S and ceiling C, a job submitted at priority p < C reaches C
within (C − p) × max(S, I) + I after it was queued (one step per pass at most, each as soon as
it is due), provided no more than its model's share of `BATCH` (BATCH divided by the models
with queued jobs) become due per pass; it then waits at most for the messages already in the
ceiling's list to drain (FIFO within a priority), which is finite while the ceiling's arrival
rate is below the service rate.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

from llmos import manager
from llmos.dispatch import Dispatcher
from llmos.errors import LLMOSError
from llmos.logs import event
from llmos.registry import Registry
from llmos.settings import Settings

log = logging.getLogger("llmos.scheduling.aging")

BATCH = 1000
"""Most jobs one pass promotes, all models together: each model with queued jobs gets an equal
share of what is left (at least one job a model, so with more models than BATCH a pass promotes
one a model), so what a model does not use goes to the models after it in name order, not back
to those before it (within a model: the highest levels first, oldest first). A second round for
the leftover would have to keep a job from going up twice in one pass: not built. It bounds the pass: a promotion is an UPDATE of an indexed column
and a message, ~0.1 ms; at a million due jobs every pass would otherwise promote its whole limit
for every model (docs/benchmarks.md, "The reconciler pass at scale, session 10")."""


def enabled(settings: Settings) -> bool:
    return settings.aging_s > 0


def due_steps(waited_s: float, aged: int, priority: int, step_s: float, ceiling: int) -> bool:
    """The rule, for one job: whether it is due for one more step (it waited over (aged + 1)
    steps, and is below the ceiling). `manager.age_queued` applies the same rule in SQL."""
    return step_s > 0 and priority < ceiling and waited_s > (aged + 1) * step_s


def bound_s(priority: int, settings: Settings, interval_s: float | None = None) -> float:
    """Seconds a job queued at `priority` may wait before aging lifts it to the ceiling: the
    first term of the stated bound (add the time to drain the ceiling's list when it gets there)."""
    interval = settings.reconcile_interval_s if interval_s is None else interval_s
    steps = max(0, settings.aging_ceiling - priority)
    if steps == 0:
        return 0.0
    return steps * max(settings.aging_s, interval) + interval


def run_once(engine: sa.Engine, dispatcher: Dispatcher, settings: Settings,
             models: list[str] | None = None) -> int:
    """One aging pass over every model with queued jobs (or `models`); returns how many jobs went
    up a step. A failed send leaves the promoted job's old message in place (it is served at
    the old level) and the reconciler re-sends it at the new one once its list shows it lost."""
    if not enabled(settings):
        return 0
    total = 0
    sizes: dict[str, int] | None = None
    todo = manager.queued_models(engine) if models is None else list(models)
    for k, model in enumerate(todo):
        share = max(1, (BATCH - total) // (len(todo) - k))  # an equal share of what is left
        promoted = manager.age_queued(engine, model, step_s=settings.aging_s,
                                      ceiling=settings.aging_ceiling, limit=share)
        if promoted:
            if sizes is None:
                sizes = _batch_sizes(settings)
            # as a bulk submit sends: one message per up to the model's batch of one priority
            dispatcher.send(promoted, chunk=sizes.get(model, 1))  # type: ignore[arg-type]
            total += len(promoted)
    if total:
        event(log, "aged", jobs=total)
    return total


def _batch_sizes(settings: Settings) -> dict[str, int]:
    """model → its max_batch_size from the registry (a model it does not name: one id a message)."""
    try:
        return {spec.name: spec.max_batch_size for spec in Registry.load(settings).all()}
    except LLMOSError:  # a registry that no longer loads: one id a message, as before
        return {}
