"""The worker process: one model, one device slot, one Celery queue.

Start-up: pin the device (before torch initialises CUDA), load the model once, register in the
workers table, start the heartbeat and the batcher, then consume `llmos.<model>` with Celery's
thread pool. Each Celery thread claims its job with a conditional update (a duplicate or
cancelled job is a no-op), hands it to the batcher and waits; the batcher writes the batch's
outcomes in one transaction and publishes completion notices in one pipeline. Messages are
acked only after that (acks_late). SIGTERM: Celery's warm shutdown finishes what is held.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Sequence

from llmos import manager
from llmos.constants import HEARTBEAT_INTERVAL_S, RUN_JOB_TASK
from llmos.db import check_database, get_engine
from llmos.jobs import Job
from llmos.dispatch import make_celery, queue_name
from llmos.logs import event, setup
from llmos.manager import as_utc
from llmos.notify import publish_done, redis_client
from llmos.registry import Registry
from llmos.settings import Settings, get_settings

log = logging.getLogger("llmos.worker")


def pin_device(device: str) -> str:
    """Make `device` the only visible GPU before torch starts; returns the torch device to use."""
    if device.startswith("cuda"):
        index = device.split(":", 1)[1] if ":" in device else "0"
        os.environ["CUDA_VISIBLE_DEVICES"] = index
        return "cuda:0"
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda:N', got {device!r}")
    return "cpu"


class Worker:
    """Everything one worker process holds: model, runners, batcher, Celery app."""

    def __init__(self, model: str, device: str | None = None, settings: Settings | None = None,
                 concurrency: int | None = None) -> None:
        self.settings = settings or get_settings()
        self.spec = Registry.load(self.settings).get(model)
        self.device = device or self.spec.device
        self.torch_device = pin_device(self.device)
        self.host = socket.gethostname()
        self.worker_id = f"{self.spec.name}@{self.host}:{os.getpid()}"
        self.concurrency = concurrency or self.spec.max_batch_size
        self.engine = get_engine(self.settings.db_url)
        self.redis = redis_client(self.settings)
        self._stop = threading.Event()

    def run(self) -> int:
        check_database(self.settings.db_url)
        from workers import model_cache
        from workers.batcher import Batcher
        from workers.runners import runners_for

        loaded = model_cache.get(self.spec, self.torch_device)
        runners = runners_for(loaded, history=self.history)
        self.batcher = Batcher(runners, max_batch_size=self.spec.max_batch_size,
                               max_wait_ms=self.spec.max_wait_ms, complete=self.complete).start()
        manager.register_worker(self.engine, worker_id=self.worker_id, host=self.host,
                                pid=os.getpid(), model=self.spec.name, device=self.device)
        beat = threading.Thread(target=self._heartbeat, name="llmos-heartbeat", daemon=True)
        beat.start()
        app = make_celery(self.settings)
        app.task(name=RUN_JOB_TASK, ignore_result=True, acks_late=True)(self.run_job)
        event(log, "worker_start", worker=self.worker_id, model=self.spec.name, device=self.device,
              queue=queue_name(self.spec.name))
        celery_worker = app.Worker(
            hostname=self.worker_id.replace(":", "-"), queues=[queue_name(self.spec.name)],
            pool_cls="threads", concurrency=self.concurrency, loglevel=self.settings.log_level,
            without_gossip=True, without_mingle=True, optimization="fair", quiet=True,
        )
        try:
            celery_worker.start()
        finally:
            self._stop.set()
            self.batcher.stop()
            try:
                manager.stop_worker(self.engine, self.worker_id)
            except Exception as exc:  # the database may be what failed
                event(log, "worker_stop_unrecorded", logging.WARNING, error=repr(exc))
            event(log, "worker_stop", worker=self.worker_id)
        return int(getattr(celery_worker, "exitcode", 0) or 0)

    def run_job(self, job_id: str) -> None:
        """Celery task body: claim, hand to the batcher, wait until the outcome is written."""
        claimed = manager.claim(self.engine, [job_id], worker_id=self.worker_id,
                                device=self.device, model=self.spec.name)
        if not claimed:
            event(log, "skip", job_id=job_id, reason="not queued (duplicate, cancelled or done)")
            return
        self.batcher.submit(claimed[0]).result()

    def history(self, job: Job) -> list[tuple[str, str]]:
        """Earlier turns of a dialogue job's conversation, from the task table."""
        if not job.conversation_id:
            return []
        return manager.conversation_history(self.engine, job.conversation_id, job)

    def complete(self, finished: Sequence["Finished"]) -> None:  # noqa: F821
        outcomes = []
        for f in finished:
            job = f.job
            wait_ms = None
            if job.started_at and job.queued_at:
                wait_ms = (as_utc(job.started_at) - as_utc(job.queued_at)).total_seconds() * 1000.0
            outcomes.append(manager.Outcome(
                job_id=job.id, worker_id=self.worker_id, attempt=job.attempts,
                result=f.outcome.result, error=f.outcome.error, compute_ms=f.compute_ms,
                batch_size=f.batch_size, tokens_in=f.outcome.tokens_in,
                tokens_out=f.outcome.tokens_out, queue_wait_ms=wait_ms))
        manager.finish(self.engine, outcomes)
        try:
            publish_done(self.redis, [o.job_id for o in outcomes])
        except Exception as exc:  # waiters fall back to polling the table
            event(log, "notify_failed", logging.WARNING, error=repr(exc))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                manager.heartbeat(self.engine, self.worker_id)
            except Exception as exc:
                event(log, "heartbeat_failed", logging.WARNING, error=repr(exc))


def main(model: str, device: str | None = None, concurrency: int | None = None) -> int:
    setup()
    return Worker(model, device, concurrency=concurrency).run()
