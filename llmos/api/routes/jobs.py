"""Jobs: submit one or a batch, list, read, long-poll, stream events, cancel."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid
from datetime import datetime, timezone
from typing import Annotated, AsyncIterator

import sqlalchemy as sa
from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from llmos import manager
from llmos.api.deps import ApiSettingsDep, ClientDep, TenantDep
from llmos.api.errors import JobFinalError
from llmos.api.quotas import check_queued
from llmos.api.routes import AUTHENTICATED, IsoDatetime, errors, event_stream
from llmos.api.schemas import BatchIn, BatchOut, JobIn, JobOut, JobPage
from llmos.api.settings import WAIT_MAX_S, ApiSettings
from llmos.api.webhooks import check_url
from llmos.db import UNSTORABLE
from llmos.errors import LLMOSError, ValidationError
from llmos.jobs import JobStatus
from llmos.logs import event
from llmos.sdk import Client
from llmos.tasks import parse_task

log = logging.getLogger("llmos.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _submit(client: Client, api: ApiSettings, tenant: str, body: JobIn | BatchIn,
            items: list, batch_id: str | None) -> list[JobOut]:
    """Validate every task and the webhook URL (nothing is written if one is bad), check the quota, submit."""
    tasks = [parse_task(item.task, item.input) for item in items]
    keys = [item.idempotency_key for item in items]
    if body.webhook_url is not None:  # its addresses too: a tenant's URL never reaches a private one
        check_url(body.webhook_url, allow_private=api.webhook_allow_private)
    check_queued(client, tenant, len(tasks), api, model=body.model, priority=body.priority)
    handles = client.submit(body.model, tasks, priority=body.priority, tenant=tenant, batch_id=batch_id,
                            idempotency_key=keys, timeout_s=body.timeout_s, deadline=body.deadline,
                            max_attempts=body.max_attempts, webhook_url=body.webhook_url)
    found = manager.get_jobs(client.engine, [h.id for h in handles], tenant=tenant)
    event(log, "api_submit", tenant=tenant, model=body.model, jobs=len(handles), batch_id=batch_id)
    return [JobOut.of(found[h.id]) for h in handles]


@router.post("", status_code=201, responses=errors(*AUTHENTICATED, 409))
def submit_job(body: JobIn, tenant: TenantDep, client: ClientDep, api: ApiSettingsDep) -> JobOut:
    """Submit one job; a resubmit with the same idempotency key returns the same job."""
    return _submit(client, api, tenant, body, [body], None)[0]


@router.post(":batch", status_code=201, responses=errors(*AUTHENTICATED, 409))
def submit_batch(body: BatchIn, tenant: TenantDep, client: ClientDep, api: ApiSettingsDep) -> BatchOut:
    """Submit up to 10,000 jobs for one model: one insert, one send; all or none are accepted."""
    batch_id = body.batch_id or uuid.uuid4().hex
    out = _submit(client, api, tenant, body, body.jobs, batch_id)
    if body.batch_id is None:  # a retry whose keys all name earlier jobs: their batch, not the new id
        earlier = {j.batch_id for j in out}
        if len(earlier) == 1 and None not in earlier:
            batch_id = earlier.pop()
    return BatchOut(batch_id=batch_id, jobs=out)


@router.get("", responses=errors(*AUTHENTICATED))
def list_jobs(tenant: TenantDep, client: ClientDep,
              status: JobStatus | None = None, model: str | None = None, task: str | None = None,
              batch_id: str | None = None,
              created_since: Annotated[IsoDatetime | None, Query(description="ISO 8601; naive is UTC.")] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
              ) -> JobPage:
    """The tenant's jobs newest first, filtered; follow `next_cursor` for the next page."""
    for name, value in (("model", model), ("task", task), ("batch_id", batch_id)):
        if value is not None and UNSTORABLE.search(value):
            raise ValidationError(f"{name} contains a character no job can have (NUL or a lone surrogate)")
    if created_since is not None:
        created_since = manager.as_utc(created_since).astimezone(timezone.utc)
    page = manager.list_jobs(client.engine, tenant=tenant, status=status, model=model, task_type=task,
                             batch_id=batch_id, created_since=created_since,
                             before=_decode_cursor(cursor), limit=limit + 1)
    more = len(page) > limit
    page = page[:limit]
    return JobPage(jobs=[JobOut.of(j) for j in page],
                   next_cursor=_encode_cursor(page[-1].created_at, page[-1].id) if more else None)


def _encode_cursor(created_at: datetime, job_id: str) -> str:
    at = manager.as_utc(created_at).astimezone(timezone.utc).isoformat()
    return base64.urlsafe_b64encode(json.dumps([at, job_id]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    """(created_at, id) of the last job of the previous page; ValidationError for a cursor we did not make."""
    if cursor is None:
        return None
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(at).astimezone(timezone.utc), str(uuid.UUID(job_id))
    except (ValueError, TypeError, binascii.Error):
        raise ValidationError("invalid cursor: pass the next_cursor of a previous page as it is") from None


@router.get("/{job_id}", responses=errors(*AUTHENTICATED, 404))
def get_job(job_id: str, tenant: TenantDep, client: ClientDep) -> JobOut:
    """One job of the tenant."""
    return JobOut.of(client.job(job_id, tenant=tenant))


@router.get("/{job_id}/wait", responses=errors(*AUTHENTICATED, 404))
def wait_job(job_id: str, tenant: TenantDep, client: ClientDep,
             timeout: Annotated[float, Query(ge=0, le=WAIT_MAX_S, description="Seconds, at most 60.")] = 30.0,
             ) -> JobOut:
    """The job once it is final, or as it is when `timeout` passes (then poll again)."""
    job = client.job(job_id, tenant=tenant)
    if not job.status.is_final:
        job = client.wait([job.id], timeout=timeout, tenant=tenant)[job.id]
    return JobOut.of(job)


@router.get("/{job_id}/events", response_class=StreamingResponse, responses={
    200: event_stream("Server-Sent Events: one event per status the job reaches (event name: the "
                      "status, data: the job as JSON); the stream ends after the final one.",
                      JobOut, [s.value for s in JobStatus]),
    **errors(*AUTHENTICATED, 404)})
async def job_events(job_id: str, tenant: TenantDep, client: ClientDep, api: ApiSettingsDep) -> StreamingResponse:
    """Stream the job's statuses as Server-Sent Events: queued, running, then its final status."""
    job = await run_in_threadpool(client.job, job_id, tenant=tenant)  # a 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        current, last, quiet = job, None, 0.0
        while True:
            if current.status != last:
                last, quiet = current.status, 0.0
                yield f"event: {current.status.value}\ndata: {JobOut.of(current).model_dump_json()}\n\n"
                if current.status.is_final:
                    return
            elif quiet >= api.events_keepalive_s:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(api.events_poll_s)
            quiet += api.events_poll_s
            try:  # two columns read per poll; the whole row only when the status changed
                status = (await run_in_threadpool(manager.job_statuses, client.engine, [current.id],
                                                  tenant=tenant)).get(current.id)
                if status != last:
                    current = await run_in_threadpool(client.job, current.id, tenant=tenant)
            except (LLMOSError, sa.exc.OperationalError) as exc:
                yield f"event: error\ndata: {json.dumps({'message': ' '.join(str(exc).split())})}\n\n"
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def cancel_or_409(client: Client, job_id: str, tenant: str) -> None:
    """Cancel a queued or running job of `tenant` (Client.cancel); JobFinalError (409) naming its
    status if it has already ended, JobNotFoundError (404) if there is none. The /v1 route's and
    the dashboard's."""
    if not client.cancel(job_id, tenant=tenant):
        job = client.job(job_id, tenant=tenant)
        raise JobFinalError(f"job {job.id} is already {job.status.value}; only queued or running jobs "
                            "can be cancelled", status=job.status.value)


@router.delete("/{job_id}", responses=errors(*AUTHENTICATED, 404, 409))
def cancel_job(job_id: str, tenant: TenantDep, client: ClientDep) -> JobOut:
    """Cancel a queued or running job; 409 if it has already ended."""
    cancel_or_409(client, job_id, tenant)
    return JobOut.of(client.job(job_id, tenant=tenant))


@router.post("/{job_id}/retry", responses=errors(*AUTHENTICATED, 404, 409))
def retry_job(job_id: str, tenant: TenantDep, client: ClientDep) -> JobOut:
    """Run a failed job again (it is queued and sent anew); 409 if it is not failed."""
    return JobOut.of(client.retry(job_id, tenant=tenant))
