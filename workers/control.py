"""Run control: which running jobs must stop early (cancelled by a user, or over their timeout).

The worker fills `cancelled` from the Redis cancel channel (once the table says so); the batcher
says when each job's group started running (`start`); runners ask `reason(job)` between decoding
steps and between chunks, and the batcher asks once more after each batch. A job's timeout is
counted on this process's monotonic clock from its own group's start, never by comparing the
local wall clock with a timestamp another process wrote.
"""

from __future__ import annotations

import threading
import time

from llmos.jobs import Job


class RunControl:
    def __init__(self) -> None:
        self._cancelled: set[str] = set()
        self._started: dict[str, float] = {}  # job id → monotonic time its group started running
        self._lock = threading.Lock()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)

    def start(self, job_ids: list[str]) -> None:
        """These jobs start running now: their timeouts count from here."""
        now = time.monotonic()
        with self._lock:
            self._started.update(dict.fromkeys(job_ids, now))

    def forget(self, job_ids: list[str]) -> None:
        with self._lock:
            self._cancelled.difference_update(job_ids)
            for job_id in job_ids:
                self._started.pop(job_id, None)

    def reason(self, job: Job | None) -> str | None:
        """'cancelled', 'timeout' or None (keep going)."""
        if job is None:
            return None
        with self._lock:
            if job.id in self._cancelled:
                return "cancelled"
            started = self._started.get(job.id)
        if job.timeout_s is not None and started is not None and time.monotonic() - started > job.timeout_s:
            return "timeout"
        return None
