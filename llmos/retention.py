"""Retention: how long finished jobs are kept (`30d`), and pruning a whole table batch by batch.

The deletes themselves are `llmos.manager.prune` (the one writer of job rows); the reconciler runs
one batch a pass once a day when LLMOS_RETENTION_DAYS is set, `llmos prune` all of it at once.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Callable

import sqlalchemy as sa

from llmos import manager
from llmos.errors import ValidationError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
"""Units an age may be given in: seconds, minutes, hours, days, weeks."""

MAX_AGE_DAYS = 36_500


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w` (a number, then one unit) as a timedelta."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "", re.IGNORECASE)
    if not m:
        raise ValidationError(f"an age is a number and a unit (s, m, h, d or w), e.g. 30d or 12h; got {text!r}")
    seconds = float(m.group(1)) * UNITS[m.group(2).lower()]
    if seconds > MAX_AGE_DAYS * 86400:
        raise ValidationError(f"an age is at most {MAX_AGE_DAYS} days, got {text!r}")
    return timedelta(seconds=seconds)


def prune_all(engine: sa.Engine, older_than: timedelta, *, batch_size: int = 5000,
              progress: Callable[[manager.PruneReport], None] | None = None,
              every_s: float = 5.0) -> manager.PruneReport:
    """`manager.prune` batch after batch until nothing old enough is left; the totals.

    Each `manager.prune` folds the /metrics rollup first (`llmos.rollup.refresh`, its usual lag
    of `LAG_S`: the shared watermark never moves closer to now) and deletes only what is folded:
    with an `older_than` under `rollup.LAG_S` (60 s) the jobs of the last minute are kept.
    `progress` is called with the running totals every `every_s` seconds of a long prune.
    """
    total = manager.PruneReport()
    cursor, shown = None, time.monotonic()
    while True:
        step = manager.prune(engine, older_than, batch_size=batch_size, max_batches=1, cursor=cursor)
        cursor = step.cursor
        total = manager.PruneReport(jobs=total.jobs + step.jobs, kept=total.kept + step.kept,
                                    workers=total.workers + step.workers,
                                    deliveries=total.deliveries + step.deliveries, cursor=cursor,
                                    done=step.done, cutoff=total.cutoff or step.cutoff)
        if step.done:
            return total
        if progress is not None and time.monotonic() - shown >= every_s:
            progress(total)
            shown = time.monotonic()
