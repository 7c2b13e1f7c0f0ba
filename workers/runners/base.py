"""The runner base: preprocess → forward → postprocess over a batch, under inference_mode.

The base owns `torch.inference_mode` and error isolation: if a batch raises, each request is run
alone so one bad input fails only its own job. Runners get the claimed jobs beside the requests
(the dialogue runner reads a conversation's earlier turns through them).

Token streams (llmos.streaming): `runners_for` gives every runner the worker's Redis client
(`redis`); a runner that can stream asks `publishers()` for the jobs of its batch whose stream
channel has a subscriber: one PUBSUB NUMSUB per batch the worker hands over, the same publishers
for the reruns of its isolation (so a rerun continues a stream rather than starting it again).
Each publisher carries its job's attempt; `run` ends a job's stream (`end`) only once the whole
batch is done and that job's outcome is a result: a failed attempt publishes no end, since the job
may run again.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from typing import Any, Callable, ClassVar, Sequence

from llmos import streaming
from llmos.jobs import Job
from llmos.tasks import Task
from workers.model_cache import LoadedModel

FAULT_RAISE_ENV = "LLMOS_FAULT_RAISE_ON"
"""Fault injection for the fault tests: a batch holding a request whose input contains this text
raises inside the runner, as a model bug would. Unset in production."""

FAULT_KILL_ENV = "LLMOS_FAULT_KILL_ON"
"""Fault injection for the fault tests: running a request whose input contains this text
SIGKILLs the worker, as a native crash on a poison input would. Unset in production."""

FAULT_HANG_ENV = "LLMOS_FAULT_HANG_ON"
"""Fault injection for the fault tests: a batch holding a request whose input contains this text,
on that job's first attempt, blocks the model thread forever, as a hung kernel or driver would.
Unset in production."""

_FAULTS = {fault: marker for fault, marker in (("kill", os.environ.get(FAULT_KILL_ENV)),
                                               ("raise", os.environ.get(FAULT_RAISE_ENV)),
                                               ("hang", os.environ.get(FAULT_HANG_ENV))) if marker}
"""The fault hooks set for this process, read once at start-up (empty in production)."""

History = Callable[[Job], list[tuple[str, str]]]
"""Earlier (user utterance, response) turns of a dialogue job's conversation, oldest first."""


@dataclasses.dataclass(frozen=True)
class ItemOutcome:
    """One request's result (JSON-ready) or error, with its token counts."""

    result: dict[str, Any] | None = None
    error: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    transient: bool = False  # worth retrying later (rate limit, server error, out of memory)


class ItemError(Exception):
    """An error that belongs to one request (its job fails with this message, the batch goes on)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class Runner:
    """Runs one task type on a loaded model, many requests at a time."""

    task_type: ClassVar[str]
    redis: Any = None  # the worker's Redis client (runners_for sets it): token streams go there

    def __init__(self, loaded: LoadedModel, history: History | None = None) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.history = history
        self._jobs: list[Job] | None = None
        self._control: Any = None
        self._batch_jobs: list[Job] | None = None  # the jobs of the batch handed to run()
        self._streams: dict[str, streaming.TokenPublisher] | None = None  # by job id, once asked

    def preprocess(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> Any:
        raise NotImplementedError

    def forward(self, inputs: Any) -> Any:
        raise NotImplementedError

    def postprocess(self, outputs: Any, requests: Sequence[Task]) -> list[ItemOutcome]:
        raise NotImplementedError

    def run(self, requests: Sequence[Task], jobs: Sequence[Job] | None = None,
            control: Any = None) -> list[ItemOutcome]:
        """Results in request order.

        Out of memory: the batch is split in halves and each half retried (a single request
        that still does not fit fails as transient, to be retried later). Any other failure
        of the batch: each request runs alone, so one bad input fails only its own job.
        """
        top = self._batch_jobs is None
        if top:  # the batch the batcher handed over (not one of its isolation reruns)
            self._batch_jobs, self._streams = list(jobs) if jobs else [], None
        try:
            out = self._run_isolated(requests, jobs, control)
            if top and self._streams:
                end_streams(out, [self._streams.get(j.id) for j in self._batch_jobs or []])
            return out
        finally:
            if top:
                self._batch_jobs = self._streams = None

    def _run_isolated(self, requests: Sequence[Task], jobs: Sequence[Job] | None,
                      control: Any) -> list[ItemOutcome]:
        self._jobs, self._control = list(jobs) if jobs else None, control
        try:
            return self._run(requests, jobs)
        except ItemError as exc:
            if len(requests) == 1:
                return [ItemOutcome(error=str(exc), transient=exc.transient)]
        except Exception as exc:
            if is_out_of_memory(exc):
                self._free_memory()
                if len(requests) == 1:
                    return [ItemOutcome(error=f"out of memory even alone: {exc}", transient=True)]
                half = len(requests) // 2
                return (self.run(requests[:half], jobs[:half] if jobs else None, control)
                        + self.run(requests[half:], jobs[half:] if jobs else None, control))
            if len(requests) == 1:
                import sqlalchemy as sa

                transient = isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))  # history read
                return [ItemOutcome(error=f"{type(exc).__name__}: {exc}", transient=transient)]
        js = list(jobs) if jobs else [None] * len(requests)
        return [self.run([r], [j] if j is not None else None, control)[0] for r, j in zip(requests, js)]

    def stopped(self, index: int) -> bool:
        """True if request `index` of the running batch was cancelled or ran over its timeout."""
        if self._control is None or not self._jobs:
            return False
        return self._control.reason(self._jobs[index]) is not None

    def publishers(self, n: int) -> list["streaming.TokenPublisher | None"]:
        """One publisher per request (`n` of them) of the running (sub-)batch, None for a job
        nobody streams. The first call of a batch asks Redis once which of its jobs are listened
        to; without a Redis client, or without jobs, nothing is streamed."""
        if self.redis is None or not self._jobs:
            return [None] * n
        streams = self._streams
        if streams is None:
            batch = self._batch_jobs or self._jobs
            wanted = streaming.listened(self.redis, [j.id for j in batch])
            streams = {j.id: streaming.TokenPublisher(self.redis, j.id, j.attempts) for j in batch if j.id in wanted}
            if self._batch_jobs is not None:  # kept for this batch's reruns only (see `run`)
                self._streams = streams
        return [streams.get(j.id) for j in self._jobs]

    def _stopper(self, index: int) -> Callable[[], bool] | None:
        """A check for the generation loop, or None when nothing can stop this batch early."""
        if self._control is None or not self._jobs:
            return None
        return lambda: self.stopped(index)

    def _free_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _run(self, requests: Sequence[Task], jobs: Sequence[Job] | None) -> list[ItemOutcome]:
        import torch

        if _FAULTS:
            _inject_faults(requests, jobs)
        with torch.inference_mode():
            outputs = self.forward(self.preprocess(requests, jobs))
        out = self.postprocess(outputs, requests)
        if len(out) != len(requests):
            raise RuntimeError(f"{type(self).__name__} returned {len(out)} outcomes for {len(requests)} requests")
        return out


def end_streams(outcomes: Sequence[ItemOutcome], publishers: Sequence[Any]) -> None:
    """End the stream of each job whose outcome is a result (its text is final); a failed
    attempt's stream is left open: the job may run again, as a new attempt (llmos.streaming)."""
    for outcome, publisher in zip(outcomes, publishers):
        if publisher is not None and outcome.error is None and outcome.result is not None:
            publisher.end()


def _inject_faults(requests: Sequence[Task], jobs: Sequence[Job] | None) -> None:
    """The test-only fault hooks (see FAULT_*_ENV): kill the process, raise, or hang."""
    texts = [r.model_dump_json() for r in requests]
    firsts = [j is not None and j.attempts == 1 for j in (jobs or [None] * len(requests))]
    for fault, marker in _FAULTS.items():
        hits = [first for text, first in zip(texts, firsts) if marker in text]
        if fault == "kill" and hits:
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "raise" and hits:
            raise RuntimeError("injected fault")
        if fault == "hang" and any(hits):
            threading.Event().wait()  # forever: only the worker's watchdog ends this
