"""The worker process: one model, one device slot, one Celery queue.

Start-up: pin the device (before torch initialises CUDA), load the model once, register in the
workers table, start the heartbeat, the cancel listener and the batcher, then consume
`llmos.<model>` with Celery's thread pool. Each Celery thread hands its job id to the batcher and
waits; the batcher claims a whole batch with one conditional UPDATE (a duplicate, cancelled or
expired job is a no-op), runs it, and `complete` writes every outcome in one transaction and
publishes completion notices in one pipeline. Messages are acked only after that (acks_late).
Transient failures go back to `queued` with a backoff; database connection errors are retried for
`LLMOS_DB_RETRY_S`; an outcome the database refuses to store fails its own job only.
SIGTERM: Celery's warm shutdown finishes the jobs held, then the worker exits. Before Celery has
installed its own handlers: while the model loads, SIGTERM (or Ctrl-C) ends the process at once
(exit 0, or 1 for Ctrl-C; nothing is held yet); from the worker's registration on it is a warm
shutdown too: the worker stops before it consumes anything, records its stop and exits 0 (1 for
Ctrl-C, as Celery's own; a supervisor draining a worker that has just started sees a clean exit).

The heartbeat thread also guards the worker: it audits the Redis held set (an id held there that
no Celery thread has in hand at two audits in a row, e.g. after a failed claim or a lost bulk-pop
reply, is released, so the reconciler re-sends its job), and it is the watchdog of the model
thread: stuck in one group for longer than any job may run (`LLMOS_MAX_JOB_SECONDS` plus
`LLMOS_TIMEOUT_GRACE_S`), the worker records itself stopped, so the reconciler requeues its
running jobs at once, and exits with code 4 without acking. Exit code 3: results could not be
recorded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import socket
import uuid
import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any, Callable, Sequence

import redis
import sqlalchemy as sa

from llmos import manager, transport
from llmos.constants import CANCEL_CHANNEL, RUN_JOB_TASK
from llmos.db import check_database, first_line, get_engine
from llmos.dispatch import held_set, make_celery, pending_set, queue_name, release, take
from llmos.jobs import Job, JobStatus
from llmos.logs import event, setup
from llmos.manager import as_utc
from llmos.notify import publish_done, redis_client
from llmos.registry import Registry
from llmos.settings import Settings, get_settings
from workers import affinity
from workers.control import RunControl

log = logging.getLogger("llmos.worker")

CANNOT_RECORD_EXIT, HUNG_EXIT = 3, 4
"""Exit codes: results could not be recorded; the model thread hung."""

FAULT_CLAIM_FAILS_ENV = "LLMOS_FAULT_CLAIM_FAILS"
"""Fault injection for the fault tests: the first N claims raise a non-connection database error,
as a broken query would. Unset in production."""

FAULT_CLOCK_SKEW_ENV = "LLMOS_FAULT_CLOCK_SKEW_S"
"""Fault injection for the fault tests: this process's wall clock (`time.time`,
`manager.utcnow`) is shifted by this many seconds. Unset in production."""

FAULT_START_PAUSE_ENV = "LLMOS_FAULT_START_PAUSE_S"
"""Fault injection for the tests: pause this many seconds between registering and starting Celery
(the window where a SIGTERM must still be a warm shutdown). Unset in production."""


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
        # Unique per start: a restarted container reuses hostname and pid, and must not inherit
        # (and so hide from the reconciler) the running jobs of the process that died.
        self.worker_id = f"{self.spec.name}@{self.host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # Two batches' worth of job ids in hand (messages of one id, or bulk chunks of up to a
        # batch: the transport bounds ids, not messages): the next batch is ready while one
        # computes. A more urgent message waits behind at most these, about two batch cycles.
        self.concurrency = concurrency or 2 * self.spec.max_batch_size
        self.engine = get_engine(self.settings.db_url)
        self.redis = redis_client(self.settings)
        self.control = RunControl()
        self._in_hand: Counter[str] = Counter()  # job id → Celery threads running run_job for it
        self._hand_lock = threading.Lock()
        self._suspects: set[str] = set()  # held in Redis but in no thread's hand at the last audit
        self._claim_faults = int(os.environ.get(FAULT_CLAIM_FAILS_ENV) or 0)
        self._stop = threading.Event()
        # On our transport the delivery itself takes the job; on another (rediss://) the task does.
        self.transport_takes = self.settings.kombu_url.startswith(transport.SCHEME)

    def run(self) -> int:
        born = time.monotonic()  # the cold start counts from here (workers.ready_at - started_at)
        early = _EarlySignals()
        check_database(self.settings.db_url)
        from workers import model_cache
        from workers.batcher import Batcher
        from workers.runners import runners_for

        placement = affinity.from_setting(self.settings.model_cpus)
        if placement is not None:  # before any thread starts: they inherit the main thread's cores
            placement.pin_bookkeeping()
        loaded = model_cache.get(self.spec, self.torch_device)
        runners = runners_for(loaded, history=self.history, redis=self.redis)  # redis: token streams
        early.hold()  # from here a signal is a warm shutdown, not an exit on the spot
        self.batcher = Batcher(runners, max_batch_size=self.spec.max_batch_size,
                               max_wait_ms=self.spec.max_wait_ms, claim=self.claim,
                               complete=self.complete, control=self.control,
                               on_start=placement.pin_model if placement else None,
                               restart=self.restart_clock).start()
        if early.came is not None:  # a signal as the batcher started: never registered, nothing held
            self.batcher.stop()
            early.restore()
            event(log, "worker_stop", worker=self.worker_id, before="start")
            return early.came
        manager.register_worker(self.engine, worker_id=self.worker_id, host=self.host,
                                pid=os.getpid(), model=self.spec.name, device=self.device)
        manager.worker_ready(self.engine, self.worker_id, load_s=time.monotonic() - born)
        pause = float(os.environ.get(FAULT_START_PAUSE_ENV) or 0.0)
        if pause:
            event(log, "fault_injected", logging.WARNING, hook=FAULT_START_PAUSE_ENV, seconds=pause)
            early.pause(pause)
        for target, name in ((self._heartbeat, "llmos-heartbeat"), (self._listen_cancels, "llmos-cancels")):
            threading.Thread(target=target, name=name, daemon=True).start()
        app = make_celery(self.settings)
        if self.transport_takes:  # the delivery's MULTI moves the id pending → held (llmos.transport)
            app.conf.broker_transport_options = {
                **app.conf.broker_transport_options,
                "llmos_take": {"pending": pending_set(self.spec.name), "held": held_set(self.worker_id),
                               # in job ids: a chunk message carries a batch (llmos.transport.QoS)
                               "max_ids": self.concurrency}}
        app.task(name=RUN_JOB_TASK, ignore_result=True, acks_late=True)(self.run_job)
        event(log, "worker_start", worker=self.worker_id, model=self.spec.name, device=self.device,
              queue=queue_name(self.spec.name))
        celery_worker = app.Worker(
            hostname=self.worker_id.replace(":", "-"), queues=[queue_name(self.spec.name)],
            pool_cls="threads", concurrency=self.concurrency, loglevel=self.settings.log_level,
            without_gossip=True, without_mingle=True, without_heartbeat=not self.settings.task_events,
            optimization="fair", quiet=True,
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

    # -- Celery task body and batcher callbacks -------------------------------------------------
    def run_job(self, job_id: str | list[str]) -> None:
        """Celery task body: hand the message's job ids (one, or a bulk submit's chunk) to the
        batcher and wait until each is recorded (the delivery already marked them held by this
        worker, on our transport; on another, this does)."""
        ids = [job_id] if isinstance(job_id, str) else [str(i) for i in job_id]
        with self._hand_lock:
            for i in ids:
                self._in_hand[i] += 1
        try:
            if not self.transport_takes:
                try:
                    for i in ids:
                        take(self.redis, self.spec.name, self.worker_id, i)
                except redis.exceptions.RedisError as exc:  # the reconciler may then re-send: harmless
                    event(log, "take_unrecorded", logging.WARNING, error=repr(exc))
            futures = [self.batcher.submit(i) for i in ids]
            deadline = time.monotonic() + self.settings.max_job_seconds * 2
            error: BaseException | None = None
            for fut in futures:  # every id's outcome, even after one failed: all stay in hand till then
                try:
                    fut.result(timeout=max(0.0, deadline - time.monotonic()))
                except Exception as exc:
                    error = error or exc
            if error is not None:
                raise error
        finally:
            with self._hand_lock:
                for i in ids:
                    self._in_hand[i] -= 1
                    if self._in_hand[i] <= 0:
                        del self._in_hand[i]

    def in_hand(self, job_id: str) -> bool:
        """Whether a Celery thread of this worker is running `run_job` for this job."""
        with self._hand_lock:
            return self._in_hand[job_id] > 0

    def claim(self, job_ids: list[str], fresh_only: bool) -> list[Job]:
        """queued → running; on failure the jobs are released at once, for the reconciler to re-send
        (the Celery task fails and acks its message, which would strand them in the held set)."""
        try:
            if self._claim_faults > 0:
                self._claim_faults -= 1
                raise sa.exc.ProgrammingError("UPDATE jobs ...", {}, Exception("injected fault: broken claim"))
            tries = 0

            def claim_once(engine: sa.Engine) -> tuple[list[Job], list[str]]:
                nonlocal tries
                tries += 1  # a retry may follow a claim that committed but lost its reply
                return manager.claim(engine, job_ids, worker_id=self.worker_id, device=self.device,
                                     model=self.spec.name, fresh_only=fresh_only, reclaim=tries > 1)

            claimed, expired = self.db(claim_once)
        except Exception:
            self._release(job_ids)
            raise
        if expired:
            self.notify(expired)
        if not fresh_only:
            self._release([i for i in job_ids if i not in {j.id for j in claimed}])
        return claimed

    def restart_clock(self, jobs: list[Job]) -> list[Job]:
        """A claimed-ahead batch that waited: started_at = now in the table and on the jobs."""
        started = self.db(manager.restart_clock, [j.id for j in jobs], worker_id=self.worker_id)
        return [dataclasses.replace(j, started_at=started[j.id]) if j.id in started else j for j in jobs]

    def _release(self, job_ids: list[str]) -> None:
        try:
            release(self.redis, self.worker_id, job_ids)
        except redis.exceptions.RedisError as exc:
            event(log, "release_unrecorded", logging.WARNING, error=repr(exc))

    def history(self, job: Job) -> list[tuple[str, str]]:
        """Earlier turns of a dialogue job's conversation, from the task table."""
        if not job.conversation_id:
            return []
        return self.db(manager.conversation_history, job.conversation_id, job, tenant=job.tenant)

    def complete(self, finished: Sequence[Any]) -> None:
        """Write a batch's outcomes: results and errors in one transaction, retries with backoff."""
        done, retry, delays = [], [], []
        for f in finished:
            job = f.job
            wait_ms = None
            if job.started_at and job.queued_at:
                wait_ms = (as_utc(job.started_at) - as_utc(job.queued_at)).total_seconds() * 1000.0
            outcome = manager.Outcome(
                job_id=job.id, worker_id=self.worker_id, attempt=job.attempts,
                result=f.outcome.result, error=f.outcome.error, compute_ms=f.compute_ms,
                batch_size=f.batch_size, tokens_in=f.outcome.tokens_in,
                tokens_out=f.outcome.tokens_out, queue_wait_ms=wait_ms)
            if f.outcome.transient and job.attempts < job.max_attempts:
                retry.append(outcome)
                delays.append(self.backoff(job.attempts))
            else:
                done.append(outcome)
        final = [o.job_id for o in done]
        try:
            try:
                if done:
                    self.db(manager.finish, done)
                if retry:
                    self.db(manager.retry_later, retry, delays)
            except Exception as exc:
                if not _refused(exc):
                    raise
                final = self._record_each(done, retry, delays)
        except Exception as exc:
            # Results cannot be recorded: this worker is not healthy. Exit without acking, so
            # the heartbeat stops and the reconciler sends these jobs to another worker.
            event(log, "cannot_record_exiting", logging.CRITICAL, error=repr(exc),
                  jobs=[o.job_id for o in done + retry])
            os._exit(CANNOT_RECORD_EXIT)
        self._release([o.job_id for o in done + retry])
        if final:
            self.notify(final)
        if retry:
            event(log, "retry_later", jobs=[o.job_id for o in retry], delays=[round(d, 2) for d in delays])

    def _record_each(self, done: list[manager.Outcome], retry: list[manager.Outcome],
                     delays: list[float]) -> list[str]:
        """Record outcomes one by one after the database refused a batch of them: an outcome it
        refuses (a character it cannot store, say) fails its own job with the reason. Returns
        the ids now final (finished, or failed instead of retried)."""
        final = []
        for o, delay in [(o, None) for o in done] + list(zip(retry, delays)):
            try:
                if delay is None:
                    self.db(manager.finish, [o])
                else:
                    self.db(manager.retry_later, [o], [delay])
                    continue
            except Exception as exc:
                if not _refused(exc):
                    raise
                event(log, "result_unstorable", logging.ERROR, job=o.job_id, error=first_line(exc))
                self.db(manager.finish, [dataclasses.replace(
                    o, result=None, error=f"result could not be stored: {first_line(exc)}")])
            final.append(o.job_id)
        return final

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter for the next try after `attempt` failed."""
        base = self.settings.retry_base_s * (2 ** (attempt - 1))
        return min(300.0, base) * (0.5 + random.random())

    def notify(self, job_ids: list[str]) -> None:
        try:
            publish_done(self.redis, job_ids)
        except redis.exceptions.RedisError as exc:  # waiters fall back to polling the table
            event(log, "notify_failed", logging.WARNING, error=repr(exc))

    def db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a manager function, retrying connection errors (a database restart) for a while."""
        deadline = time.monotonic() + self.settings.db_retry_s
        delay = 0.2
        while True:
            try:
                return fn(self.engine, *args, **kwargs)
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                event(log, "db_retry", logging.WARNING, call=fn.__name__, error=str(exc).splitlines()[0])
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- background threads ------------------------------------------------------------------
    def _heartbeat(self) -> None:
        """Every `heartbeat_s`: the model thread's watchdog, the heartbeat, the held-set audit."""
        while not self._stop.wait(self.settings.heartbeat_s):
            self._check_progress()
            try:
                manager.heartbeat(self.engine, self.worker_id)
            except Exception as exc:
                event(log, "heartbeat_failed", logging.WARNING, error=repr(exc))
            try:
                self._audit_held()
            except redis.exceptions.RedisError as exc:
                event(log, "held_audit_failed", logging.WARNING, error=repr(exc))

    def _check_progress(self) -> None:
        """A model thread stuck in one group for longer than any job may run makes this worker
        dead: recorded stopped (the reconciler requeues its running jobs at once), then exit."""
        since = self.batcher.busy_since
        limit = self.settings.max_job_seconds + self.settings.timeout_grace_s
        if since is None or time.monotonic() - since <= limit:
            return
        event(log, "model_thread_hung_exiting", logging.CRITICAL, worker=self.worker_id,
              busy_s=round(time.monotonic() - since, 1), limit_s=limit)
        try:
            manager.stop_worker(self.engine, self.worker_id)
        except Exception as exc:  # then its silent heartbeat says it, after dead_after_s
            event(log, "worker_stop_unrecorded", logging.WARNING, error=repr(exc))
        os._exit(HUNG_EXIT)

    def _audit_held(self) -> None:
        """Release ids of this worker's held set that no Celery thread had in hand at this audit
        and the one before (a delivery reaches `run_job` within milliseconds; two audits apart,
        an id still in no hand was stranded: a failed claim, a lost reply, a swept message)."""
        key = held_set(self.worker_id)
        idle = {m.decode() if isinstance(m, bytes) else m for m in self.redis.smembers(key)}
        idle = {i for i in idle if not self.in_hand(i)}
        stale = [i for i in idle & self._suspects if not self.in_hand(i)]
        self._suspects = idle - set(stale)
        if stale:
            self.redis.srem(key, *stale)
            event(log, "held_released", logging.WARNING, jobs=stale)

    def _listen_cancels(self) -> None:
        """Hear cancels of running jobs (the table already says cancelled; this stops the work)."""
        while not self._stop.is_set():
            try:
                pubsub = redis_client(self.settings).pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and msg.get("type") == "message":
                        data = msg["data"]
                        job_id = data.decode() if isinstance(data, bytes) else str(data)
                        # every worker hears every cancel; only the table says it is one
                        if self.in_hand(job_id) and self._cancelled(job_id):
                            self.control.cancel(job_id)
            except redis.exceptions.RedisError as exc:
                event(log, "cancel_listener_retry", logging.WARNING, error=repr(exc))
                self._stop.wait(1.0)

    def _cancelled(self, job_id: str) -> bool:
        """Whether the task table says this job is cancelled (a publish alone cancels nothing)."""
        try:
            statuses = manager.job_statuses(self.engine, [job_id], tenant=manager.ANY_TENANT)
        except sa.exc.SQLAlchemyError as exc:  # the job then runs on; its late result is not recorded
            event(log, "cancel_unchecked", logging.WARNING, job=job_id, error=first_line(exc))
            return False
        return statuses.get(job_id) == JobStatus.CANCELLED


def _refused(exc: BaseException) -> bool:
    """A database error about the statement or its data (not the connection): retrying won't help."""
    return isinstance(exc, sa.exc.StatementError) and not isinstance(
        exc, (sa.exc.OperationalError, sa.exc.InterfaceError))


def skew_clock(seconds: float) -> None:
    """The LLMOS_FAULT_CLOCK_SKEW_S hook: shift this process's wall clock by `seconds`."""
    real_time, real_utcnow = time.time, manager.utcnow
    time.time = lambda: real_time() + seconds
    manager.utcnow = lambda: real_utcnow() + timedelta(seconds=seconds)


class _EarlySignals:
    """SIGTERM and SIGINT until Celery installs its own handlers (in `Worker.start`).

    While the model loads nothing is held: the signal ends the process at once (SystemExit, 0 for
    SIGTERM, 1 for SIGINT as Celery's Ctrl-C). From `hold()` on (the batcher started, the worker
    about to register) it asks for the warm shutdown Celery would do: the flag Celery's consumer
    checks before taking a message (`state.should_stop`) is set, so it stops at once and the
    worker records its stop. The handler only assigns plain values: no lock is taken in it.
    """

    def __init__(self) -> None:
        self.holding = False
        self.came: int | None = None  # the exit code a signal asked for
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        code = 0 if signum == signal.SIGTERM else 1
        if not self.holding:
            raise SystemExit(code)
        from celery.worker import state

        self.came = code
        state.should_stop = code  # as Celery's own warm-shutdown handler sets it

    def hold(self) -> None:
        self.holding = True

    def pause(self, seconds: float) -> None:
        """Sleep up to `seconds`, less if a signal comes (the start-pause fault hook)."""
        end = time.monotonic() + seconds
        while self.came is None and time.monotonic() < end:
            time.sleep(0.05)

    def restore(self) -> None:
        for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
            signal.signal(sig, default)


def main(model: str, device: str | None = None, concurrency: int | None = None) -> int:
    setup()
    skew = float(os.environ.get(FAULT_CLOCK_SKEW_ENV) or 0.0)
    if skew:
        skew_clock(skew)
        event(log, "fault_injected", logging.WARNING, hook=FAULT_CLOCK_SKEW_ENV, seconds=skew)
    return Worker(model, device, concurrency=concurrency).run()
