"""Run control: which running jobs must stop early (cancelled by a user, or over their timeout).

The worker fills `cancelled` from the Redis cancel channel; runners ask `reason(job)` between
decoding steps and between chunks, and the batcher asks once more after each batch.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone

from llmos.jobs import Job
from llmos.manager import as_utc



class RunControl:
    def __init__(self) -> None:
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)

    def forget(self, job_ids: list[str]) -> None:
        with self._lock:
            self._cancelled.difference_update(job_ids)

    def reason(self, job: Job | None) -> str | None:
        """'cancelled', 'timeout' or None (keep going)."""
        if job is None:
            return None
        with self._lock:
            if job.id in self._cancelled:
                return "cancelled"
        if job.timeout_s is not None and job.started_at is not None:
            elapsed = (datetime.now(timezone.utc) - as_utc(job.started_at)).total_seconds()
            if elapsed > job.timeout_s:
                return "timeout"
        return None
