"""The job: a plain, immutable value read from the task table, and its status enum.

No I/O here: `llmos.manager` reads and writes jobs; this module only describes them.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import Any, Mapping


class JobStatus(enum.StrEnum):
    """Where a job is in its life; the table column, API and SDK all use these values."""

    QUEUED = "queued"  # written and sent to its model's queue, not yet claimed by a worker
    RUNNING = "running"  # claimed by a worker (conditional update), computing
    SUCCEEDED = "succeeded"  # result written; final
    FAILED = "failed"  # error written (bad input, runner error, attempts used up); final
    CANCELLED = "cancelled"  # cancelled by a user before it finished; final
    EXPIRED = "expired"  # its deadline passed before it ran; final

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED,
                            JobStatus.EXPIRED})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """One row of the task table."""

    id: str
    model: str
    task_type: str
    priority: int
    status: JobStatus
    input: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    max_attempts: int = 3
    tenant: str = "default"
    idempotency_key: str | None = None
    batch_id: str | None = None
    conversation_id: str | None = None
    created_at: datetime | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_wait_ms: float | None = None
    compute_ms: float | None = None
    batch_size: int | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    worker_id: str | None = None
    device: str | None = None
    timeout_s: float | None = None
    deadline: datetime | None = None
    run_after: datetime | None = None
    dispatched_at: datetime | None = None
    finishes: int = 0

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Job":
        values = {k: v for k, v in row.items() if k in _FIELDS}
        values["id"] = str(values["id"])
        values["status"] = JobStatus(values["status"])
        return cls(**values)

    def evolve(self, **changes: Any) -> "Job":
        return dataclasses.replace(self, **changes)


_FIELDS = frozenset(f.name for f in dataclasses.fields(Job))
