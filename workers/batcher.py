"""The in-process batcher: Celery's threads hand it claimed jobs; it runs them in batches.

It collects jobs for up to `max_wait_ms` after the first, or until `max_batch_size`, groups
them by task type, runs each group as one batch on its runner, and hands every job its own
outcome. A job whose input does not parse, or whose item raises, fails alone.
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
from workers.runners.base import ItemOutcome, Runner

log = logging.getLogger("llmos.batcher")


class Finished:
    """One job's outcome with the batch it ran in."""

    __slots__ = ("job", "outcome", "compute_ms", "batch_size")

    def __init__(self, job: Job, outcome: ItemOutcome, compute_ms: float, batch_size: int) -> None:
        self.job, self.outcome, self.compute_ms, self.batch_size = job, outcome, compute_ms, batch_size


Complete = Callable[[Sequence[Finished]], None]


class Batcher:
    """Runs jobs handed in by many threads as batches on one thread (the model's owner)."""

    def __init__(self, runners: dict[str, Runner], *, max_batch_size: int, max_wait_ms: float,
                 complete: Complete) -> None:
        self.runners = runners
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.complete = complete
        self._queue: queue.Queue[tuple[Job, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="llmos-batcher", daemon=True)
        self._stopping = threading.Event()
        self.batches = 0

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish what is queued, then stop the thread."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> Future:
        fut: Future = Future()
        if self._stopping.is_set():
            fut.set_exception(LLMOSError("worker is shutting down"))
            return fut
        self._queue.put((job, fut))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                if self._queue.empty():
                    return
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
            self._run(batch)

    def _run(self, batch: list[tuple[Job, Future]]) -> None:
        groups: dict[str, list[tuple[Job, Future]]] = {}
        for job, fut in batch:
            groups.setdefault(job.task_type, []).append((job, fut))
        for task_type, items in groups.items():
            finished = self.run_group(task_type, [job for job, _ in items])
            try:
                self.complete(finished)
            except Exception as exc:  # the table could not be written: the callers see it
                event(log, "complete_failed", logging.ERROR, error=repr(exc), jobs=len(items))
                for _, fut in items:
                    fut.set_exception(exc)
                continue
            for _, fut in items:
                fut.set_result(None)
        self.batches += 1

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
            results = runner.run([task for _, task in ready], [jobs[i] for i, _ in ready])
            for (i, _), res in zip(ready, results):
                outcomes[i] = res
        compute_ms = (time.perf_counter() - started) * 1000.0
        event(log, "batch", task=task_type, size=len(ready), compute_ms=round(compute_ms, 2))
        return [Finished(job, outcomes[i], compute_ms, len(ready) or 1) for i, job in enumerate(jobs)]
