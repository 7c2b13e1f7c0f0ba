"""The reconciler: makes the task table's promises hold when Redis or a worker lets them down.

Each pass, in this order:
1. expires queued jobs whose deadline passed;
2. returns `running` jobs whose worker stopped heartbeating to `queued` (attempts + 1 on the next
   claim) and sends them again; past `max_attempts` they are `failed`, so a poison input cannot
   crash-loop workers forever;
3. fails running jobs past their timeout (plus a grace) that their worker did not stop;
4. sends jobs whose retry backoff has passed, and (LLMOS_AGING_S > 0) promotes jobs waiting
   past their aging step one priority step and sends them again (`llmos.scheduling.aging`);
5. re-sends queued jobs last sent over `resend_after_s` ago that no live worker holds and whose
   message is gone: not in the model's pending set (a FLUSHALL, a Redis restart, a send that
   failed), held by a worker that died, or delivered (kombu's unacked hash) after their last
   send to a worker that died before taking it, or popped from its list by a worker that died
   before recording it (found from each priority list's length and oldest message, O(1)); and
   any queued job last sent over `lost_after_s` ago, whatever Redis says. Checked: the first
   FRONT jobs of each model's line in serve order, and its whole window (`manager.STALE_WINDOW`)
   when the front has losses;
6. every ROLLUP_EVERY_S, folds finished jobs and ended webhook deliveries into the /metrics rollup
   (`llmos.rollup`, a few statements), always before retention, so whatever retention
   deletes was counted first;
7. with LLMOS_RETENTION_DAYS set, once a day: deletes finished jobs and stopped worker rows older
   than that (`manager.prune`), one bounded batch per pass until none is left.
Each step reads only the rows it may act on, through partial indexes over the queued rows and
the workers seen within `manager.FORGET_WORKER_AFTER_S`: a pass reads as many rows beside ten
million finished jobs as beside none (docs/benchmarks.md, "The task table at scale"); what grows
with the table is the cost of its writes, aging's promotions above all ("The reconciler pass at
scale, session 10").
After a pass that failed, or a gap between passes longer than `dead_after_s` (the database or
Redis was away, so were the workers' heartbeats), no worker is judged dead by the age of its
heartbeat until `dead_after_s` of successful passes have given every live worker time to beat
again; the other steps run meanwhile, and a worker that recorded its own stop is dead at once
(a worker silent for over `manager.FORGET_WORKER_AFTER_S` is not read at all: after an outage
that long its held jobs are sent again, a duplicate at worst).
A duplicate message is harmless: claims are conditional. `llmos up` runs it in a thread;
production runs `llmos reconcile` (one process is enough; two are safe, only wasteful).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Sequence

import redis
import sqlalchemy as sa

from llmos import manager
from llmos.db import get_engine
from llmos.dispatch import (CeleryDispatcher, Dispatcher, delivered_before, held_set, pending_set,
                            queue_key, queue_tails)
from llmos.jobs import Job, JobStatus
from llmos.logs import event
from llmos import rollup
from llmos.notify import publish_done, redis_client
from llmos.scheduling import aging
from llmos.settings import Settings

log = logging.getLogger("llmos.reconciler")

ORPHAN_MARGIN_S = 0.5
"""A queue list's oldest message must have been sent this much later than a job's last send
before the job counts as popped from that list (absorbs the gap between a send and its record)."""

RETENTION_EVERY_S = 86_400.0
"""Retention (LLMOS_RETENTION_DAYS) starts once a day, and at the reconciler's start."""

ROLLUP_EVERY_S = 15.0
"""How often a pass folds finished jobs into the /metrics rollup (scrapes fold too)."""

FRONT = 1000
"""Stale, due queued jobs of a model, in serve order, whose messages every pass checks (jobs a
live worker holds count among them). When any of them is lost, the same pass checks the model's
whole window (`manager.STALE_WINDOW`). A lost job further back is found once it comes within the
front: a job without a message is not served, so the jobs ahead of it drain until it is there.
The price: such a job is re-sent later than `resend_after_s` after its loss (when it reaches the
front, then it queues behind its list again), and `lost_after_s` applies only within what a pass
reads (docs/reliability.md, "message lost")."""

RETENTION_BATCH = 2000
"""Finished jobs (and worker rows) one pass deletes at most while retention runs."""


@dataclasses.dataclass
class PassReport:
    """What one pass changed."""

    expired: int = 0
    requeued: int = 0
    poisoned: int = 0
    timed_out: int = 0
    retried: int = 0
    resent: int = 0
    aged: int = 0
    pruned_jobs: int = 0
    pruned_workers: int = 0

    def any(self) -> bool:
        return any(dataclasses.astuple(self))


class Reconciler:
    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None,
                 redis_conn: redis.Redis | None = None) -> None:
        self.settings = settings
        self.engine = get_engine(settings.db_url)
        self.redis = redis_conn or redis_client(settings)
        self.dispatcher = dispatcher or CeleryDispatcher(settings)
        self._last_ok: float | None = None  # monotonic end of the last successful pass
        self._blind = False  # the last pass failed
        self._judge_from = -math.inf  # monotonic time from which heartbeat ages are judged
        self._prune_from = -math.inf  # monotonic time of the next retention run
        self._prune_cursor: tuple[datetime, str] | None = None  # where the running one is
        self._rollup_from = -math.inf  # monotonic time of the next rollup fold

    def run_once(self) -> PassReport:
        """One pass; while it must not judge heartbeats (see the module doc), only stopped
        workers count as dead."""
        s = self.settings
        started = time.monotonic()
        if self._blind or (self._last_ok is not None and started - self._last_ok > s.dead_after_s):
            self._judge_from = started + s.dead_after_s
            self._blind = False
            event(log, "reconcile_grace", seconds=s.dead_after_s)
        dead_after = s.dead_after_s if started >= self._judge_from else math.inf
        try:
            report = self._pass(dead_after)
        except BaseException:
            self._blind = True
            raise
        self._last_ok = time.monotonic()
        return report

    def _pass(self, dead_after: float) -> PassReport:
        s = self.settings
        report = PassReport()
        expired = manager.expire_overdue(self.engine)
        report.expired = len(expired)
        requeued, poisoned = manager.requeue_dead(self.engine, dead_after)
        report.requeued, report.poisoned = len(requeued), len(poisoned)
        timed_out = manager.fail_timed_out(self.engine, s.timeout_grace_s)
        report.timed_out = len(timed_out)
        self._notify(expired + [j.id for j in poisoned] + timed_out)
        self._send(requeued)
        retries = manager.due_retries(self.engine)
        report.retried = len(retries)
        self._send(retries)
        report.aged = aging.run_once(self.engine, self.dispatcher, s)  # no-op with LLMOS_AGING_S=0
        report.resent = self._resend_lost(dead_after)
        folded = self._fold()
        report.pruned_jobs, report.pruned_workers = self._retain() if folded else (0, 0)
        if report.any():
            event(log, "reconcile", **dataclasses.asdict(report))
        return report

    def _fold(self) -> bool:
        """Fold finished jobs into the /metrics rollup when due, and always before retention runs;
        False when the fold failed (then retention waits: it must not delete a job not yet counted).
        A failed fold is logged, not raised: the job-state steps of the pass do not depend on it."""
        now = time.monotonic()
        retention_due = bool(self.settings.retention_days) and now >= self._prune_from
        if now < self._rollup_from and not retention_due:
            return True
        try:
            rollup.refresh(self.engine, wait=retention_due)
        except sa.exc.SQLAlchemyError as exc:
            event(log, "rollup_refresh_failed", logging.WARNING, error=type(exc).__name__)
            return False
        self._rollup_from = now + ROLLUP_EVERY_S
        return True

    def _retain(self) -> tuple[int, int]:
        """One bounded batch of retention when it is due: (jobs, worker rows) deleted."""
        days = self.settings.retention_days
        if not days or time.monotonic() < self._prune_from:
            return 0, 0
        done = manager.prune(self.engine, timedelta(days=days), batch_size=RETENTION_BATCH,
                             max_batches=1, cursor=self._prune_cursor)
        self._prune_cursor = None if done.done else done.cursor
        if done.done:
            self._prune_from = time.monotonic() + RETENTION_EVERY_S
        return done.jobs, done.workers

    def _resend_lost(self, dead_after: float) -> int:
        s = self.settings
        total = 0
        # workers seen within a day (a worker silent longer is long gone; its held set was
        # cleared by the passes after it died): no pass reads every worker row ever started
        seen = manager.recent_workers(self.engine, within_s=manager.FORGET_WORKER_AFTER_S)
        live = {w["id"] for w in seen if w["stopped_at"] is None and w["silent_s"] <= dead_after}
        dead = {w["id"] for w in seen} - live
        held_live = _union(self.redis, [held_set(w) for w in live])
        held_dead = _union(self.redis, [held_set(w) for w in dead])
        delivered: list[dict[str, float]] = []  # read once, on the first model that needs it
        for model in manager.queued_models(self.engine):
            # the front of the model's line first; the whole window only when the front has losses
            # (a FLUSHALL, a dead worker): a healthy backlog costs FRONT rows a model, not 10,000
            sent: set[str] = set()  # resent by this pass (held_dead still names them)
            for window in (FRONT, manager.STALE_WINDOW):
                read = manager.stale_queued(self.engine, model, s.resend_after_s, limit=window)
                # a live worker has it in hand, or this pass sent it again already
                stale = [j for j in read if j.id not in held_live and j.id not in sent]
                lost = self._lost(model, stale, held_dead, delivered) if stale else []
                total += self._resend(lost)
                sent.update(j.id for j in lost)
                if not lost or len(read) < window:  # nothing lost, or nothing behind the front
                    break
        if dead:
            self.redis.delete(*[held_set(w) for w in dead])
        return total

    def _lost(self, model: str, stale: list[manager.QueuedRef], held_dead: set[str],
              delivered: list[dict[str, float]]) -> list[manager.QueuedRef]:
        """Those of `stale` (one model's, none held by a live worker) whose message is gone."""
        s = self.settings
        if not delivered:
            delivered.append(delivered_before(self.redis, s.dead_after_s))
        unacked = delivered[0]
        present = self.redis.smismember(pending_set(model), [j.id for j in stale])
        orphans = self._orphans(model, [j for j, here in zip(stale, present) if here])
        lost_before = manager.db_now(self.engine) - timedelta(seconds=s.lost_after_s)
        return [j for j, here in zip(stale, present)
                if not here or j.id in held_dead or j.id in orphans or j.sent_at < lost_before
                # delivered after its last send, to a worker that died before taking it
                or (unacked and unacked.get(j.id, 0.0) > j.sent_at.timestamp())]

    def _orphans(self, model: str, pending: list[manager.QueuedRef]) -> set[str]:
        """Ids of `pending` jobs whose message cannot still be in its queue list: a worker popped
        it and died before recording the delivery.

        Lists are FIFO, so a job's message is gone when its list is empty, or when the list's
        oldest message was sent (its job's last send) clearly after the job's own last send.
        Bounded per pass: two O(1) reads per list and one query for the oldest messages' jobs.
        A false positive only costs a duplicate message. A restored message (put back at the
        oldest end) can hide an orphan behind it until a worker takes it; an oldest message
        that is not a job's leaves its list undecided, for `lost_after_s`.
        """
        if not pending:
            return set()
        tails = queue_tails(self.redis, model)
        oldest = manager.get_jobs(self.engine, sorted({t for _, t in tails.values() if t}),
                                  tenant=manager.ANY_TENANT)
        margin = timedelta(seconds=ORPHAN_MARGIN_S)
        empty = {k for k, (length, _) in tails.items() if length == 0}
        # per list: a job sent before this was popped from it (absent: the list's oldest is no job's)
        popped_before = {k: _sent_at(oldest[t], k) - margin for k, (_, t) in tails.items() if t in oldest}
        keys = {p: queue_key(model, p) for p in {j.priority for j in pending}}
        found = set()
        for j in pending:
            key = keys[j.priority]
            if key in empty or (key in popped_before and popped_before[key] > j.sent_at):
                found.add(j.id)
        return found

    def _resend(self, refs: Sequence[manager.QueuedRef]) -> int:
        """Send again those of `refs` still queued (their full rows read now); how many were sent."""
        if not refs:
            return 0
        found = manager.get_jobs(self.engine, [r.id for r in refs], tenant=manager.ANY_TENANT)
        jobs = [found[r.id] for r in refs if r.id in found and found[r.id].status == JobStatus.QUEUED]
        self._send(jobs)
        return len(jobs)

    def _send(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self.dispatcher.send(jobs)
        manager.mark_dispatched(self.engine, [j.id for j in jobs])

    def _notify(self, job_ids: list[str]) -> None:
        if job_ids:
            try:
                publish_done(self.redis, job_ids)
            except redis.exceptions.RedisError:
                pass

    def run_forever(self, stop: threading.Event, interval: float | None = None) -> None:
        """Pass after pass until `stop` is set; a failed pass (Redis or the database away) is retried."""
        interval = interval or self.settings.reconcile_interval_s
        while not stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # Redis or the database away: log, wait, try the next pass
                event(log, "reconcile_failed", logging.WARNING, error=str(exc).splitlines()[0] if str(exc) else repr(exc))
            stop.wait(interval)

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run_forever, args=(stop,), name="llmos-reconciler", daemon=True)
        t.start()
        return t

    def close(self) -> Any:
        self.dispatcher.close()
        self.redis.close()


def _sent_at(job: Job, key: str | None = None) -> datetime:
    """When the job's message was last sent (database clock); for its message in list `key` that
    is not its priority's list (aging promoted it since: its last send went to another list),
    the earliest that message can have been sent, `queued_at`."""
    if key is not None and key != queue_key(job.model, job.priority):
        return manager.as_utc(job.queued_at)
    return manager.as_utc(job.dispatched_at or job.queued_at)


def _union(client: redis.Redis, keys: list[str]) -> set[str]:
    if not keys:
        return set()
    return {m.decode() if isinstance(m, bytes) else m for m in client.sunion(keys)}
