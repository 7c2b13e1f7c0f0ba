"""The in-process batcher: Celery's threads hand it job ids; it claims and runs them in batches.

Its claimer thread collects ids for up to `max_wait_ms` after the first, or until
`max_batch_size`, and claims them with one conditional UPDATE while the model's thread computes
the batch before (claim ahead: at most one claimed batch waits). The model's thread groups the
claimed jobs by task type, runs each group as one batch
on its runner, and hands every job its own outcome; the outcomes of a group are written by one
`complete` call (one transaction, one notice pipeline). A job whose input does not parse, or
whose item raises, fails alone; a job cancelled or over its timeout is stopped and says so.
A job that ran before (its worker died, or it is retrying) is claimed and run alone, after the
rest of its batch is recorded, so a poison input that crashes the process takes only itself down.
`busy_since` tells the worker's watchdog since when the model thread has been running its
current group (a thread stuck there for longer than any job may run is a hung worker).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

from llmos.errors import LLMOSError
from llmos.jobs import Job
from llmos.logs import event
from llmos.tasks import Task, parse_task
from workers.control import RunControl
from workers.runners.base import ItemOutcome, Runner

log = logging.getLogger("llmos.batcher")


class Finished:
    """One job's outcome with the batch it ran in."""

    __slots__ = ("job", "outcome", "compute_ms", "batch_size")

    def __init__(self, job: Job, outcome: ItemOutcome, compute_ms: float, batch_size: int) -> None:
        self.job, self.outcome, self.compute_ms, self.batch_size = job, outcome, compute_ms, batch_size


RESTART_AFTER_S = 1.0
"""A batch claimed ahead that waited longer than this for the model gets its started_at moved to
when it runs (one more UPDATE, only then): the reconciler times jobs out from started_at."""

Claim = Callable[[list[str], bool], list[Job]]
"""claim(ids, fresh_only) → the jobs this call moved from queued to running."""
Complete = Callable[[Sequence[Finished]], None]


class Batcher:
    """Runs jobs handed in by many threads as batches on one thread (the model's owner)."""

    def __init__(self, runners: dict[str, Runner], *, max_batch_size: int, max_wait_ms: float,
                 claim: Claim, complete: Complete, control: RunControl | None = None,
                 on_start: Callable[[], None] | None = None,
                 restart: Callable[[list[Job]], list[Job]] | None = None) -> None:
        self.runners = runners
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.claim = claim
        self.complete = complete
        self.control = control or RunControl()
        self._on_start = on_start  # run first on the model's thread (its CPU placement)
        # restart(jobs) → jobs with started_at now: for a claimed batch that waited RESTART_AFTER_S
        # behind the one before, so a job's timeout counts from when it runs
        self._restart = restart
        self._queue: queue.Queue[tuple[str, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="llmos-batcher", daemon=True)
        # The claimer claims the next batch while the model computes this one (claim ahead).
        self._claimer = threading.Thread(target=self._collect_loop, name="llmos-claimer", daemon=True)
        self._claimed: queue.Queue[tuple[dict[str, list[Future]], list[Job]] | None] = queue.Queue()
        self._slot = threading.Semaphore(1)
        # Recording runs on its own thread, so the model starts the next batch while the last
        # one's results are written (one transaction) and announced (one pipeline).
        self._records: queue.Queue[tuple[list[Finished], list[Job], dict] | None] = queue.Queue()
        self._recorder = threading.Thread(target=self._record_loop, name="llmos-recorder", daemon=True)
        self._stopping = threading.Event()
        self._busy_since: float | None = None
        self.batches = 0

    @property
    def busy_since(self) -> float | None:
        """Monotonic time the model thread started its current group; None while it is not running one."""
        return self._busy_since

    def start(self) -> "Batcher":
        self._thread.start()
        self._claimer.start()
        self._recorder.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish what is queued and record it, then stop the threads."""
        self._stopping.set()
        self._queue.put(None)
        self._claimer.join(timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():  # still running a batch: its results must still be recorded
            self._thread.join()
        self._records.put(None)
        self._recorder.join(timeout)

    def submit(self, job_id: str) -> Future:
        """Hand in a job id; the future resolves once its outcome is written (or it was skipped)."""
        fut: Future = Future()
        if self._stopping.is_set():
            fut.set_exception(LLMOSError("worker is shutting down"))
            return fut
        self._queue.put((job_id, fut))
        return fut

    def _collect_loop(self) -> None:
        """The claimer: gathers the next batch's ids and claims them while the model computes.

        It takes a slot before gathering (one slot: at most one claimed batch waits for the model,
        so jobs are marked running at most one batch ahead of their compute), gathers up to
        `max_batch_size` ids or `max_wait_ms` after the first, claims the fresh ones with one
        conditional UPDATE and hands the batch over; the model thread frees the slot as it takes it.
        """
        while True:
            self._slot.acquire()
            item = self._queue.get()
            if item is None:
                if self._queue.empty():
                    self._claimed.put(None)
                    return
                self._queue.put(None)  # jobs came in behind the marker: serve them first
                self._slot.release()
                continue
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # keep the stop marker for after this batch
                    break
                batch.append(nxt)
            try:
                claimed = self._claim_fresh(batch)
            except BaseException as exc:  # never let the claimer die: callers would hang
                event(log, "batch_crashed", logging.ERROR, error=repr(exc))
                _resolve([f for _, f in batch], exc)
                claimed = None
            if claimed is None:
                self._slot.release()
            else:
                self._claimed.put((*claimed, time.monotonic()))

    def _claim_fresh(self, batch: list[tuple[str, Future]]) -> tuple[dict[str, list[Future]], list[Job]] | None:
        """Claim a gathered batch's jobs that never ran: (futures by id, claimed jobs), or None
        when the claim failed (its callers have the error)."""
        futures: dict[str, list[Future]] = {}
        for job_id, fut in batch:
            futures.setdefault(job_id, []).append(fut)
        try:
            return futures, self.claim(list(futures), True)
        except Exception as exc:  # the table could not be read or written: the callers see it
            event(log, "claim_failed", logging.ERROR, error=repr(exc), jobs=len(futures))
            _resolve([f for fs in futures.values() for f in fs], exc)
            return None

    def _loop(self) -> None:
        """The model's thread: runs each claimed batch, group by group."""
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception as exc:  # e.g. the cores went away: run unpinned rather than not at all
                event(log, "model_thread_start_failed", logging.ERROR, error=repr(exc))
        while True:
            item = self._claimed.get()
            self._slot.release()  # the claimer may gather and claim the next batch meanwhile
            if item is None:
                return
            futures, fresh, claimed_at = item
            try:
                if fresh and self._restart is not None and time.monotonic() - claimed_at > RESTART_AFTER_S:
                    fresh = self._restarted(fresh)
                self._run(futures, fresh)
            except BaseException as exc:  # never let the model's thread die: callers would hang
                event(log, "batch_crashed", logging.ERROR, error=repr(exc))
                _resolve([f for fs in futures.values() for f in fs], exc)

    def _restarted(self, jobs: list[Job]) -> list[Job]:
        """The jobs with their started_at moved to now (the table's too); on a database error, as they were."""
        try:
            return self._restart(jobs)  # type: ignore[misc]
        except Exception as exc:
            event(log, "restart_clock_failed", logging.WARNING, error=repr(exc), jobs=len(jobs))
            return jobs

    def _run(self, futures: dict[str, list[Future]], fresh: list[Job]) -> None:
        # Jobs that never ran were claimed together and run as batches. A job that ran before may
        # be what killed its last worker: it is claimed and run alone, after the others are
        # recorded, so a poison input only ever takes itself down.
        for task_type in dict.fromkeys(j.task_type for j in fresh):
            self._run_and_record(task_type, [j for j in fresh if j.task_type == task_type], futures)
        for job_id in [i for i in futures if i not in {j.id for j in fresh}]:
            try:
                again = self.claim([job_id], False)
            except Exception as exc:
                _resolve(futures.pop(job_id), exc)
                continue
            if again:
                self._records.join()  # the rest of the batch is recorded before a suspect runs
                self._run_and_record(again[0].task_type, again, futures)
                self._records.join()
            _resolve(futures.pop(job_id, []), None)  # duplicate, cancelled, expired, done...
        self.batches += 1

    def _run_and_record(self, task_type: str, jobs: list[Job], futures: dict[str, list[Future]]) -> None:
        waiting = {j.id: futures.pop(j.id, []) for j in jobs}
        try:
            finished = self.run_group(task_type, jobs)
        except Exception as exc:  # a runner bug or a database error outside its isolation
            event(log, "group_failed", logging.ERROR, error=repr(exc), jobs=len(jobs))
            transient = _is_transient(exc)
            finished = [Finished(j, ItemOutcome(error=f"{type(exc).__name__}: {exc}", transient=transient), 0.0, len(jobs))
                        for j in jobs]
        self._records.put((finished, jobs, waiting))

    def _record_loop(self) -> None:
        while True:
            item = self._records.get()
            try:
                if item is None:
                    return
                finished, jobs, waiting = item
                error: BaseException | None = None
                try:
                    self.complete(finished)
                except BaseException as exc:
                    event(log, "complete_failed", logging.ERROR, error=repr(exc), jobs=len(jobs))
                    error = exc
                for fs in waiting.values():
                    _resolve(fs, error)
                self.control.forget([j.id for j in jobs])
            except BaseException as exc:  # never let the recorder die: every later batch would wait
                event(log, "recorder_error", logging.ERROR, error=repr(exc))
            finally:
                self._records.task_done()

    def run_group(self, task_type: str, jobs: list[Job]) -> list[Finished]:
        """Run jobs of one task type as one batch; every job gets its own outcome."""
        runner = self.runners.get(task_type)
        outcomes: dict[int, ItemOutcome] = {}
        ready: list[tuple[int, Task]] = []
        for i, job in enumerate(jobs):
            if runner is None:
                outcomes[i] = ItemOutcome(error=f"this worker cannot run {task_type!r} tasks")
                continue
            try:
                ready.append((i, parse_task(task_type, job.input)))
            except LLMOSError as exc:
                outcomes[i] = ItemOutcome(error=str(exc))
        started = time.perf_counter()
        if ready and runner is not None:
            self.control.start([jobs[i].id for i, _ in ready])  # timeouts count from here
            self._busy_since = time.monotonic()
            try:
                results = runner.run([task for _, task in ready], [jobs[i] for i, _ in ready], self.control)
            finally:
                self._busy_since = None
            for (i, _), res in zip(ready, results):
                outcomes[i] = res
        compute_ms = (time.perf_counter() - started) * 1000.0
        for i, job in enumerate(jobs):  # stopped early, or finished after its time was up
            reason = self.control.reason(job)
            if reason == "cancelled":
                outcomes[i] = ItemOutcome(error="cancelled while running")
            elif reason == "timeout":
                outcomes[i] = ItemOutcome(error=f"timeout: ran over its {job.timeout_s:g} s limit")
        event(log, "batch", task=task_type, size=len(ready), compute_ms=round(compute_ms, 2))
        return [Finished(job, outcomes[i], compute_ms, len(ready) or 1) for i, job in enumerate(jobs)]


def _is_transient(exc: BaseException) -> bool:
    import sqlalchemy as sa

    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, ConnectionError, TimeoutError))


def _resolve(futures: list[Future], error: BaseException | None) -> None:
    for fut in futures:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
