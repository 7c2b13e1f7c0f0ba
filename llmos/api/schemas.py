"""The wire protocol: pydantic models of every request and response body, apart from the row type.

Types are strict (a string is not a number, a boolean is not a priority) so a client's mistake is
a 422 here; ranges and limits are the SDK's to check, with the same messages as for Python callers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from llmos.constants import MAX_JOBS_PER_SUBMIT, MAX_TENANT_CHARS
from llmos.db import MAX_WEBHOOK_URL_CHARS
from llmos.jobs import Job, JobStatus
from llmos.manager import ApiKey, Delivery, as_utc
from llmos.registry import ModelSpec

Priority = StrictInt | StrictStr
"""0–9 (9 most urgent) or a name: critical, high, normal, low, batch."""

Seconds = StrictFloat | StrictInt


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class JobOptions(_In):
    """Submission options apart from the task's own fields."""

    priority: Priority | None = Field(default=None, description="0–9 (9 most urgent) or a name; default 5.")
    timeout_s: Seconds | None = Field(default=None, description="Longest the job may run, in seconds.")
    deadline: datetime | Seconds | None = Field(
        default=None, description="An ISO 8601 time with offset, or seconds from now; a job not started by then expires.")
    max_attempts: StrictInt = Field(default=3, description="Runs before a job whose worker keeps dying is failed.")
    webhook_url: StrictStr | None = Field(
        default=None, max_length=MAX_WEBHOOK_URL_CHARS,
        description="An http(s) URL POSTed the final job (POST /v1/jobs) or the final batch (POST /v1/jobs:batch), "
                    "signed; see docs/api.md, Webhooks.")


class JobIn(JobOptions):
    """One job: a task for a model."""

    model: StrictStr = Field(description="A registered model's name (GET /v1/models).")
    task: StrictStr = Field(description="The task type: embed, sentiment, summarize, writing, dialogue, translate, qa.")
    input: dict[str, Any] = Field(description="The task's fields, e.g. {\"text\": \"...\"} for sentiment.")
    idempotency_key: StrictStr | None = Field(default=None, description="A resubmit with the same key returns the same job.")


class BatchJobIn(_In):
    """One job of a batch (the model and options are the batch's)."""

    task: StrictStr
    input: dict[str, Any]
    idempotency_key: StrictStr | None = None


class BatchIn(JobOptions):
    """Up to 10,000 jobs for one model, written in one insert and sent in one pipeline."""

    model: StrictStr
    jobs: list[BatchJobIn] = Field(min_length=1, max_length=MAX_JOBS_PER_SUBMIT)
    batch_id: StrictStr | None = Field(default=None, description="Names the batch; default: a new id.")


class JobOut(_Out):
    """A job as the API shows it."""

    id: str
    model: str
    task: str
    status: JobStatus
    priority: int
    input: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int
    max_attempts: int
    batch_id: str | None = None
    idempotency_key: str | None = None
    conversation_id: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_wait_ms: float | None = None
    compute_ms: float | None = None
    batch_size: int | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    timeout_s: float | None = None
    deadline: datetime | None = None
    eta_start_at: datetime | None = None  # predicted at submit (llmos.scheduling.eta)
    eta_finish_at: datetime | None = None

    @classmethod
    def of(cls, job: Job) -> "JobOut":
        return cls(id=job.id, model=job.model, task=job.task_type, status=job.status, priority=job.priority,
                   input=job.input, result=job.result, error=job.error, attempts=job.attempts,
                   max_attempts=job.max_attempts, batch_id=job.batch_id, idempotency_key=job.idempotency_key,
                   conversation_id=job.conversation_id, created_at=as_utc(job.created_at),
                   started_at=as_utc(job.started_at), finished_at=as_utc(job.finished_at),
                   queue_wait_ms=job.queue_wait_ms, compute_ms=job.compute_ms, batch_size=job.batch_size,
                   tokens_in=job.tokens_in, tokens_out=job.tokens_out, timeout_s=job.timeout_s,
                   deadline=as_utc(job.deadline), eta_start_at=as_utc(job.eta_start_at),
                   eta_finish_at=as_utc(job.eta_finish_at))


class BatchOut(_Out):
    batch_id: str
    jobs: list[JobOut]


class JobPage(_Out):
    """One page of jobs, newest first; pass `next_cursor` as `cursor` for the next (null: the last page)."""

    jobs: list[JobOut]
    next_cursor: str | None = None


class ModelLimits(_Out):
    max_input_chars: int
    max_input_tokens: int | None = None
    max_new_tokens: int
    max_batch_size: int


class ModelOut(_Out):
    """A registry entry (OpenAI's model object: id, object, created, owned_by), and whether a live
    worker serves it now."""

    id: str = Field(description="The model's name, as OpenAI's `id` (the `model` of a request).")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds: when this API process loaded the registry.")
    owned_by: str = "llmos"
    name: str
    engine: str
    kind: str
    tasks: list[str]
    language_pairs: list[tuple[str, str]]
    limits: ModelLimits
    served: bool
    workers: int

    @classmethod
    def of(cls, spec: ModelSpec, workers: int, created: int = 0) -> "ModelOut":
        return cls(id=spec.name, created=created, name=spec.name, engine=spec.engine, kind=spec.kind, tasks=list(spec.tasks),
                   language_pairs=[tuple(p) for p in spec.language_pairs],
                   limits=ModelLimits(max_input_chars=spec.max_input_chars, max_input_tokens=spec.max_input_tokens,
                                      max_new_tokens=spec.max_new_tokens, max_batch_size=spec.max_batch_size),
                   served=workers > 0, workers=workers)


class ModelList(_Out):
    """OpenAI's list shape: `data` holds the models."""

    object: Literal["list"] = "list"
    data: list[ModelOut]


class KeyIn(_In):
    tenant: StrictStr = Field(min_length=1, max_length=MAX_TENANT_CHARS)
    name: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_TENANT_CHARS)
    admin: StrictBool = False


class KeyOut(_Out):
    """An API key as lists show it: its prefix names it; the secret is never shown again."""

    prefix: str
    tenant: str
    name: str | None = None
    admin: bool
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    @classmethod
    def of(cls, key: ApiKey) -> "KeyOut":
        return cls(prefix=key.prefix, tenant=key.tenant, name=key.name, admin=key.admin,
                   created_at=key.created_at, revoked_at=key.revoked_at, last_used_at=key.last_used_at)


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself, shown only in this response.")


class KeyList(_Out):
    keys: list[KeyOut]


class WebhookSecretOut(_Out):
    """The tenant's webhook signing secret (X-LLMOS-Signature is an HMAC-SHA256 with it)."""

    secret: str
    created_at: datetime


class DeliveryOut(_Out):
    """One webhook delivery: a final job or batch POSTed (or to be POSTed) to `url`."""

    id: str
    kind: str = Field(description="`job` or `batch`.")
    target_id: str = Field(description="The job id or the batch id.")
    url: str
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="When the next attempt is due (null once delivered or given up).")
    attempts: int
    last_status: int | None = Field(description="The receiver's HTTP status at the last attempt (null: no answer).")
    last_error: str | None = None
    last_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    given_up_at: datetime | None = None

    @classmethod
    def of(cls, d: Delivery) -> "DeliveryOut":
        done = d.delivered_at is not None or d.given_up_at is not None
        return cls(id=d.id, kind=d.kind, target_id=d.target_id, url=d.url, created_at=d.created_at,
                   next_attempt_at=None if done else d.next_attempt_at, attempts=d.attempts,
                   last_status=d.last_status, last_error=d.last_error, last_attempt_at=d.last_attempt_at,
                   delivered_at=d.delivered_at, given_up_at=d.given_up_at)


class DeliveryList(_Out):
    deliveries: list[DeliveryOut]


class Health(_Out):
    status: str


class Ready(_Out):
    status: str
    database: str
    redis: str


class ErrorBody(_Out):
    code: str = Field(description="A stable, machine-readable code, e.g. not_found, quota_exceeded.")
    message: str
    details: dict[str, Any]
    type: str = Field(description="OpenAI's error category: invalid_request_error, authentication_error, "
                                  "permission_error, rate_limit_error or server_error.")
    param: str | None = Field(default=None, description="The request field at fault, when known.")


class ErrorOut(_Out):
    """The one error shape of every 4xx and 5xx."""

    error: ErrorBody
