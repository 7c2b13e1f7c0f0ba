"""The job: a plain, immutable value read from the task table, and its status enum.

No I/O here: `llmos.manager` reads and writes jobs; this module only describes them.
"""

from __future__ import annotations

import dataclasses
import enum
import os
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
    eta_start_at: datetime | None = None  # predicted at submit (llmos/scheduling)
    eta_finish_at: datetime | None = None
    aged: int = 0  # priority steps added by aging (submitted at priority - aged)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Job":
        values = {k: v for k, v in row.items() if k in _FIELDS}
        values["id"] = str(values["id"])
        values["status"] = JobStatus(values["status"])
        return cls(**values)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> "Job":
        """A job from field values already of their types (`id` a str, `status` a JobStatus), the
        rest at their defaults: no check and no per-field `__init__`, for bulk submits (~6x cheaper).

        `fields` must name fields of Job only (the caller's duty: nothing checks it here).
        """
        job = object.__new__(cls)
        values = job.__dict__  # a frozen dataclass refuses setattr only; its __dict__ is its fields
        values.update(_DEFAULTS)
        values.update(fields)
        return job

    def evolve(self, **changes: Any) -> "Job":
        return dataclasses.replace(self, **changes)


_FIELDS = frozenset(f.name for f in dataclasses.fields(Job))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Job) if f.default is not dataclasses.MISSING}

_UUID4_CLEAR = bytes([0xFF] * 6 + [0x0F, 0xFF, 0x3F] + [0xFF] * 7)  # the version and variant bits
_UUID4_SET = bytes([0x00] * 6 + [0x40, 0x00, 0x80] + [0x00] * 7)  # version 4, variant RFC 4122


def new_ids(n: int) -> list[str]:
    """`n` random job ids: version 4 UUIDs in their canonical str form, as `str(uuid.uuid4())` makes.

    One os.urandom call (and a few whole-buffer operations) for all of them: `uuid.uuid4()` reads
    os.urandom once per id, which costs more than the rest of a bulk submit's work per job.
    """
    if n <= 0:
        return []
    bits = int.from_bytes(os.urandom(16 * n), "big")
    bits = (bits & int.from_bytes(_UUID4_CLEAR * n, "big")) | int.from_bytes(_UUID4_SET * n, "big")
    h = bits.to_bytes(16 * n, "big").hex()
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, 32 * n, 32)]
