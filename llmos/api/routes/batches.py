"""Batches (OpenAI's Batch API): create over an uploaded file, retrieve, list, cancel; LLMOS's results.

Retrieve and list advance a batch's lifecycle first (so do the API's background thread and the
CLI); docs/batch.md has the states, the line formats and LLMOS's extension fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from llmos.api.deps import ClientDep, TenantDep
from llmos.api.routes import AUTHENTICATED, errors
from llmos.batches import core
from llmos.batches.lines import ENDPOINTS

router = APIRouter(prefix="/v1/batches", tags=["batches"])


class BatchCreateIn(BaseModel):
    """OpenAI's batch create body, and LLMOS's extension fields (all optional)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    input_file_id: StrictStr
    endpoint: Literal[ENDPOINTS] = Field(  # type: ignore[valid-type]
        description="The endpoint every line names; /v1/jobs (LLMOS): plain {\"id\", \"text\"} lines of `task` on `model`.")
    completion_window: Literal["24h"]
    metadata: dict[StrictStr, StrictStr] | None = Field(
        default=None, description="Up to 16 string pairs; `priority` sets the batch's default priority.")
    name: StrictStr | None = Field(default=None, description="LLMOS: unique per tenant; the same name again "
                                                             "resumes that batch (the same file).")
    retry_failed: StrictBool = Field(default=False, description="LLMOS: with a known name, run its failed lines again.")
    priority: StrictInt | StrictStr | None = Field(default=None, description="LLMOS: 0–9 or a name; default batch.")
    task: StrictStr | None = Field(default=None, description="LLMOS, /v1/jobs only: the task of every line.")
    model: StrictStr | None = Field(default=None, description="LLMOS, /v1/jobs only: the model of every line.")
    options: dict[str, Any] | None = Field(default=None, description="LLMOS, /v1/jobs only: the task's other fields.")


class RequestCountsOut(BaseModel):
    total: int
    completed: int
    failed: int


class BatchOut(BaseModel):
    """OpenAI's Batch object (times in Unix seconds), with LLMOS's name, priority, task and model."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired",
                    "cancelling", "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCountsOut
    metadata: dict[str, Any] | None
    name: str | None
    priority: int
    task: str | None
    model: str | None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


def _out(info: core.BatchInfo) -> BatchOut:
    return BatchOut(**info.openai())


@router.post("", responses=errors(*AUTHENTICATED, 404))
def create_batch(body: BatchCreateIn, tenant: TenantDep, client: ClientDep) -> BatchOut:
    """Create a batch from an uploaded file: every good line becomes a job (submitted before this
    answers); bad lines go to the error file. With a known `name`: that batch, resumed."""
    return _out(core.create_batch(client, tenant=tenant, input_file_id=body.input_file_id, endpoint=body.endpoint,
                                  completion_window=body.completion_window, metadata=body.metadata,
                                  name=body.name, task=body.task, model=body.model, options=body.options,
                                  priority=body.priority, retry_failed=body.retry_failed))


@router.get("", responses=errors(*AUTHENTICATED))
def list_batches(tenant: TenantDep, client: ClientDep,
                 after: Annotated[str | None, Query(description="A batch id: the page after it.")] = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20,
                 name: Annotated[str | None, Query(description="LLMOS: only the batch of this name.")] = None,
                 ) -> BatchList:
    """The tenant's batches, newest first."""
    page, more = core.list_batches(client, tenant=tenant, after=after, limit=limit, name=name)
    return BatchList(data=[_out(b) for b in page], first_id=page[0].id if page else None,
                     last_id=page[-1].id if page else None, has_more=more)


@router.get("/{batch_id}", responses=errors(*AUTHENTICATED, 404))
def get_batch(batch_id: str, tenant: TenantDep, client: ClientDep) -> BatchOut:
    """One of the tenant's batches, its lifecycle advanced first."""
    core.advance_one(client, batch_id, tenant=tenant)
    return _out(core.get_batch(client, batch_id, tenant=tenant))


@router.post("/{batch_id}/cancel", responses=errors(*AUTHENTICATED, 404, 409))
def cancel_batch(batch_id: str, tenant: TenantDep, client: ClientDep) -> BatchOut:
    """Cancel an open batch: cancelling (its queued jobs cancelled), cancelled once nothing runs."""
    return _out(core.cancel_batch(client, batch_id, tenant=tenant))


RESULTS: dict[int | str, dict[str, Any]] = {200: {
    "description": "Every line's output or error line in input order (JSON Lines), streamed.",
    "content": {"application/jsonl": {"schema": {"type": "string"}}}}}


@router.get("/{batch_id}/results", response_class=StreamingResponse,
            responses={**RESULTS, **errors(*AUTHENTICATED, 404, 409)})
async def batch_results(batch_id: str, tenant: TenantDep, client: ClientDep) -> StreamingResponse:
    """LLMOS: the output and error lines of a final batch merged, in input order (409 until it is final)."""
    await run_in_threadpool(core.advance_one, client, batch_id, tenant=tenant)
    records = await run_in_threadpool(core.results_of, client, batch_id, tenant=tenant)
    first = await run_in_threadpool(next, records, None)  # the 409 before the stream starts

    def rest():
        if first is not None:
            yield first
            yield from records

    return StreamingResponse(rest(), media_type="application/jsonl")
