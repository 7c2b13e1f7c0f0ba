"""The reconciler: makes the task table's promises hold when Redis or a worker lets them down.

Each pass, in this order:
1. expires queued jobs whose deadline passed;
2. returns `running` jobs whose worker stopped heartbeating to `queued` (attempts + 1 on the next
   claim) and sends them again; past `max_attempts` they are `failed`, so a poison input cannot
   crash-loop workers forever;
3. fails running jobs past their timeout (plus a grace) that their worker did not stop;
4. sends jobs whose retry backoff has passed;
5. re-sends queued jobs last sent over `resend_after_s` ago that no live worker holds and whose
   message is gone: not in the model's pending set (a FLUSHALL, a Redis restart, a send that
   failed), held by a worker that died, or delivered (kombu's unacked hash) after their last
   send to a worker that died before taking it; and any queued job last sent over
   `lost_after_s` ago, whatever Redis says.
A duplicate message is harmless: claims are conditional. `llmos up` runs it in a thread;
production runs `llmos reconcile` (one process is enough; two are safe, only wasteful).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import redis

from llmos import manager
from llmos.db import get_engine
from llmos.dispatch import (CeleryDispatcher, Dispatcher, delivered_before, held_set,
                            orphaned_pending, pending_set)
from llmos.jobs import Job
from llmos.logs import event
from llmos.notify import publish_done, redis_client
from llmos.settings import Settings

log = logging.getLogger("llmos.reconciler")


@dataclasses.dataclass
class PassReport:
    """What one pass changed."""

    expired: int = 0
    requeued: int = 0
    poisoned: int = 0
    timed_out: int = 0
    retried: int = 0
    resent: int = 0

    def any(self) -> bool:
        return any(dataclasses.astuple(self))


class Reconciler:
    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None,
                 redis_conn: redis.Redis | None = None) -> None:
        self.settings = settings
        self.engine = get_engine(settings.db_url)
        self.redis = redis_conn or redis_client(settings)
        self.dispatcher = dispatcher or CeleryDispatcher(settings)

    def run_once(self) -> PassReport:
        s = self.settings
        report = PassReport()
        expired = manager.expire_overdue(self.engine)
        report.expired = len(expired)
        requeued, poisoned = manager.requeue_dead(self.engine, s.dead_after_s)
        report.requeued, report.poisoned = len(requeued), len(poisoned)
        timed_out = manager.fail_timed_out(self.engine, s.timeout_grace_s)
        report.timed_out = len(timed_out)
        self._notify(expired + [j.id for j in poisoned] + timed_out)
        self._send(requeued)
        retries = manager.due_retries(self.engine)
        report.retried = len(retries)
        self._send(retries)
        report.resent = self._resend_lost()
        if report.any():
            event(log, "reconcile", **dataclasses.asdict(report))
        return report

    def _resend_lost(self) -> int:
        s = self.settings
        total = 0
        live = {w["id"] for w in manager.live_workers(self.engine, within_s=s.dead_after_s)}
        dead = set(manager.worker_ids(self.engine)) - live
        held_live = _union(self.redis, [held_set(w) for w in live])
        held_dead = _union(self.redis, [held_set(w) for w in dead])
        delivered: dict[str, float] | None = None
        for model in manager.queued_counts(self.engine):
            stale = manager.stale_queued(self.engine, model, s.resend_after_s)
            stale = [j for j in stale if j.id not in held_live]  # a live worker has it in hand
            if not stale:
                continue
            if delivered is None:
                delivered = delivered_before(self.redis, s.dead_after_s)
            present = self.redis.smismember(pending_set(model), [j.id for j in stale])
            orphans = orphaned_pending(self.redis, model)
            now = manager.utcnow()
            lost = []
            for j, here in zip(stale, present):
                sent = manager.as_utc(j.dispatched_at or j.queued_at)
                if (not here or j.id in held_dead or j.id in orphans
                        or delivered.get(j.id, 0.0) > sent.timestamp()  # taken by a worker that died
                        or (now - sent).total_seconds() > s.lost_after_s):
                    lost.append(j)
            self._send(lost)
            total += len(lost)
        if dead:
            self.redis.delete(*[held_set(w) for w in dead])
        return total

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


def _union(client: redis.Redis, keys: list[str]) -> set[str]:
    if not keys:
        return set()
    return {m.decode() if isinstance(m, bytes) else m for m in client.sunion(keys)}
