"""OpenAI-compatible endpoints: POST /v1/chat/completions, /v1/completions and /v1/embeddings, and
GET /v1/chat/completions/{id} (a chat completion read again). docs/openai.md says what they do.

A request becomes LLMOS jobs (llmos.openai_protocol: `model` names a registry entry), submitted
for the key's tenant at priority 7 (high) over the queue, with the checks of POST /v1/jobs (key,
rate limit, body limit, load shedding, the queued-jobs quota), then waited for, at most
LLMOS_API_OPENAI_TIMEOUT_S (also each job's deadline to start and its run timeout: work nobody
waits for is not done). The waiting runs on threads of its own (LLMOS_API_OPENAI_WAITERS), in
slices, so the routes' other threads stay free and a client that went away is noticed between
slices: its jobs are cancelled.

A job that ends without a result answers by why (`job_error`): the model refused the input
(422 input_refused), the job was cancelled (409), the runner raised (500 job_failed), the work
could not be done now (503 worker_unavailable, Retry-After) or the wait ran out (504 timeout, the
jobs cancelled). A model no live worker serves is a 503 no_worker at once, not a wait.

`stream: true` answers Server-Sent Events in OpenAI's chunk format: the route subscribes to the
jobs' token streams (llmos.streaming) after they are written and before they are sent, relays each
piece as a chunk, and once the jobs are final sends what the pieces did not cover (the recorded
result is the truth: the joined deltas equal it), the finish_reason, the usage chunk when asked,
then `data: [DONE]`. Pieces of an older attempt of a job are dropped (llmos.streaming.Relay); a
recorded text that does not start with what was sent ends the stream with a `stream_mismatch`
error event, as a failed job or a failed wait (database, Redis) ends it with theirs. A client that
disconnects has its jobs cancelled and its subscription closed, wherever the response stops
(`_EventStream`: also when the body never started).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, AsyncIterator, Callable, Literal

import redis
import redis.asyncio as aioredis
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from llmos import openai_protocol as oa
from llmos import streaming
from llmos.api.deps import ApiSettingsDep, ClientDep, TenantDep
from llmos.api.errors import (InputRefusedError, JobCancelledError, JobCrashedError, JobOutcomeError,
                              ModelNotFoundError, WaitTimeoutError, WorkerUnavailableError, error_body,
                              error_status, llmos_error_response)
from llmos.api.quotas import check_queued
from llmos.api.routes import AUTHENTICATED, errors
from llmos.api.settings import ApiSettings
from llmos.errors import (BrokerUnavailableError, DatabaseUnavailableError, JobNotFoundError, LLMOSError,
                          NoWorkerError, UnknownModelError)
from llmos.jobs import Job, JobStatus
from llmos.logs import event
from llmos.registry import ModelSpec
from llmos.sdk import Client, no_worker_message, validate_for
from llmos.tasks import ChatTask

log = logging.getLogger("llmos.api")
router = APIRouter(tags=["openai"])

PRIORITY = 7
"""Priority of every job an OpenAI-compatible request makes (high: a caller waits on the line)."""

WAIT_SLICE_S = 5.0
"""One wait's length on a waiter thread; between slices the route checks the client is still there."""

KEEPALIVE_S = 15.0
"""A quiet stream gets an SSE comment this often (proxies close idle connections)."""

# -- request and response bodies (the schema; parsing is llmos.openai_protocol's) -----------------

Number = StrictFloat | StrictInt


class _OpenAIIn(BaseModel):
    """Fields OpenAI defines; any other field is read (and refused) by llmos.openai_protocol."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: StrictStr = Field(description="A registry model's name (GET /v1/models).")


class _Sampling(_OpenAIIn):
    stream: StrictBool | None = Field(default=None, description="Answer Server-Sent Events (chunks), then `data: [DONE]`.")
    stream_options: dict[str, Any] | None = Field(default=None, description="`{\"include_usage\": true}`: a last chunk with the usage.")
    max_tokens: StrictInt | None = Field(default=None, description="Most new tokens (default: the model's max_new_tokens).")
    temperature: Number | None = Field(default=None, description="0 (default): greedy; up to 2.")
    top_p: Number | None = None
    stop: StrictStr | list[StrictStr] | None = Field(default=None, description="Up to 8 stop strings; the text ends before the first.")
    seed: StrictInt | None = Field(default=None, description="Makes sampling reproducible, whatever else is batched.")
    n: StrictInt | None = Field(default=None, description="Only 1.")


class ChatCompletionIn(_Sampling):
    """OpenAI's chat completion request (text messages of system, developer, user, assistant)."""

    messages: list[dict[str, Any]] = Field(description="`{role, content}` objects; content a string or text parts.")
    max_completion_tokens: StrictInt | None = Field(default=None, description="Same as max_tokens.")


class CompletionIn(_Sampling):
    """OpenAI's (legacy) completion request: one choice per prompt."""

    prompt: StrictStr | list[StrictStr] = Field(description="A prompt, or a list of prompts (token ids are not supported).")


class EmbeddingIn(_OpenAIIn):
    """OpenAI's embeddings request."""

    input: StrictStr | list[StrictStr] = Field(description="A text or a list of texts (token ids are not supported).")
    encoding_format: Literal["float", "base64"] | None = Field(
        default=None, description="`float` (default) or `base64`: little-endian float32s.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str = Field(description="`stop` (EOS or a stop string) or `length`.")
    logprobs: None = None


class ChatCompletionOut(BaseModel):
    id: str = Field(description="`chatcmpl-` and the job's id without dashes (GET /v1/jobs/{id} shows the job).")
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class CompletionOut(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class EmbeddingItem(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="The vector, or base64 of its little-endian float32s.")


class EmbeddingsOut(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: Usage


def _answers(model: type[BaseModel], stream: bool) -> dict[int | str, dict[str, Any]]:
    """The route's documented answers: 200 (JSON, or a stream of chunks), and its errors."""
    ok: dict[str, Any] = {"model": model, "description": "The answer (all the jobs succeeded)."}
    if stream:
        ok["description"] = "The answer; with `stream: true` Server-Sent Events instead."
        ok["content"] = {"text/event-stream": {"schema": {
            "type": "object", "required": ["data"], "description": "Each event is `data: <a CompletionChunk as "
            "JSON>`, or `data: {\"error\": {...}}` (then the stream ends), and last `data: [DONE]`.",
            "properties": {"data": {"type": "string"}}}}}
    out: dict[int | str, dict[str, Any]] = {200: ok, **errors(*AUTHENTICATED, 409)}
    out[404] = {**errors(404)[404], "description": "No registry model has that name."}
    out[409] = {**out[409], "description": "A job of the request was cancelled before it had an answer."}
    for code, text in ((500, "The model's runner failed on this input (an LLMOS fault)."),
                       (504, "No answer within LLMOS_API_OPENAI_TIMEOUT_S; the jobs were cancelled.")):
        out[code] = {**errors(503)[503], "description": text}
    out[503] = {**out[503], "description": "No live worker serves the model, a worker died, or the database "
                "or Redis does not answer; see Retry-After."}
    return out


# -- the routes -----------------------------------------------------------------------------------

@router.post("/v1/chat/completions", response_model=None, responses=_answers(ChatCompletionOut, stream=True))
async def chat_completions(body: ChatCompletionIn, http: HttpRequest, tenant: TenantDep, client: ClientDep,
                           api: ApiSettingsDep) -> JSONResponse | StreamingResponse:
    """The next assistant message of a conversation (OpenAI's chat completion), from one `chat` job."""
    return await _serve(oa.CHAT, body, http, tenant, client, api)


@router.post("/v1/completions", response_model=None, responses=_answers(CompletionOut, stream=True))
async def completions(body: CompletionIn, http: HttpRequest, tenant: TenantDep, client: ClientDep,
                      api: ApiSettingsDep) -> JSONResponse | StreamingResponse:
    """Continue each prompt (OpenAI's completion): one `writing` job per prompt, one choice each."""
    return await _serve(oa.COMPLETIONS, body, http, tenant, client, api)


@router.post("/v1/embeddings", response_model=None, responses=_answers(EmbeddingsOut, stream=False))
async def embeddings(body: EmbeddingIn, http: HttpRequest, tenant: TenantDep, client: ClientDep,
                     api: ApiSettingsDep) -> JSONResponse:
    """Vectors of the input texts (OpenAI's embeddings), from one `embed` job."""
    return await _serve(oa.EMBEDDINGS, body, http, tenant, client, api)  # type: ignore[return-value]


_COMPLETION_ID = re.compile(r"^chatcmpl-([0-9a-f]{32})$")


@router.get("/v1/chat/completions/{completion_id}", responses={
    **errors(*AUTHENTICATED), 404: {**errors(404)[404], "description": "No answered chat completion of this "
                                    "tenant has that id (another tenant's reads the same)."}})
def get_chat_completion(completion_id: str, tenant: TenantDep, client: ClientDep) -> ChatCompletionOut:
    """A chat completion answered before, by its id (its job's id): the tenant's own only."""
    found = _COMPLETION_ID.match(completion_id)
    job = None
    if found:
        try:
            job = client.job(str(uuid.UUID(found.group(1))), tenant=tenant)
        except JobNotFoundError:
            job = None
    if job is None or job.task_type != ChatTask.task_type or job.status != JobStatus.SUCCEEDED:
        raise JobNotFoundError(f"no answered chat completion with id {completion_id!r}")
    return ChatCompletionOut(**oa.response_body(oa.Request(oa.CHAT, job.model, []), [job]))


# -- submitting and waiting -----------------------------------------------------------------------

def _spec(client: Client, name: str) -> ModelSpec:
    try:
        return client.registry.get(name)
    except UnknownModelError as exc:
        raise ModelNotFoundError(str(exc)) from None


def _submit(client: Client, api: ApiSettings, tenant: str, req: oa.Request,
            before_send: Callable[[list[Job]], None] | None) -> list[str]:
    """Check the request as POST /v1/jobs does, then submit its jobs; their ids in task order."""
    spec = _spec(client, req.model)
    for task in req.tasks:
        validate_for(spec, task)  # task served, input within limits: a 422 before any count
    check_queued(client, tenant, len(req.tasks), api, model=spec.name, priority=PRIORITY)
    if not client.has_worker(spec.name):
        raise NoWorkerError(no_worker_message(spec.name) + "; nothing was queued")
    limit = min(api.openai_timeout_s, float(client.settings.max_job_seconds))
    handles = client.submit(spec.name, req.tasks, priority=PRIORITY, tenant=tenant, timeout_s=limit,
                            deadline=api.openai_timeout_s, before_send=before_send)
    event(log, "api_openai_submit", tenant=tenant, model=spec.name, endpoint=req.endpoint, jobs=len(handles),
          stream=req.stream)
    return [h.id for h in handles]


async def shutdown(app: FastAPI) -> None:
    """The app's end (its lifespan calls this): the waiter threads stopped (waits still queued
    dropped) and the token streams' Redis client closed."""
    pool, app.state.openai_waiters = getattr(app.state, "openai_waiters", None), None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    conn, app.state.openai_redis = getattr(app.state, "openai_redis", None), None
    if conn is not None:
        try:
            await conn.aclose()
        except (redis.RedisError, OSError) as exc:
            event(log, "api_openai_redis_close_failed", logging.WARNING, error=repr(exc)[:200])


def _waiters(app: FastAPI, api: ApiSettings) -> ThreadPoolExecutor:
    pool = getattr(app.state, "openai_waiters", None)
    if pool is None:  # made on the event loop's thread: no race
        pool = app.state.openai_waiters = ThreadPoolExecutor(api.openai_waiters, thread_name_prefix="llmos-openai")
    return pool


async def _wait(http: HttpRequest, client: Client, api: ApiSettings, tenant: str, ids: list[str],
                deadline: float, watch_client: bool) -> dict[str, Job] | None:
    """The jobs once all are final, or as they are at `deadline`; None if the client went away first."""
    loop = asyncio.get_running_loop()
    pool = _waiters(http.app, api)
    while True:
        left = max(0.0, deadline - time.monotonic())
        jobs = await loop.run_in_executor(pool, partial(client.wait, ids, timeout=min(left, WAIT_SLICE_S),
                                                        tenant=tenant))
        if all(j.status.is_final for j in jobs.values()) or time.monotonic() >= deadline:
            return jobs
        if watch_client and await http.is_disconnected():
            return None


def _cancel_later(http: HttpRequest, client: Client, api: ApiSettings, tenant: str, ids: list[str]) -> None:
    """Cancel the jobs on a waiter thread, not waiting for it (a disconnected stream's cleanup)."""
    def cancel() -> None:
        for job_id in ids:
            try:
                client.cancel(job_id, tenant=tenant)
            except Exception as exc:  # the database or Redis may be what failed
                event(log, "api_openai_cancel_failed", logging.WARNING, job=job_id, error=repr(exc)[:200])
    _waiters(http.app, api).submit(cancel)


def job_error(job: Job | None, job_id: str) -> JobOutcomeError:
    """Why a job of an OpenAI-compatible request has no result, as the error to answer (module doc).

    The job's error text says it: the runner's own refusal of an input (ItemError: a prompt over
    the window with on_overflow = "reject", a chat template that refuses the roles...) has no
    exception name in front; a runner that raised does; the reconciler's and the worker's own
    reasons start with what happened (timeout, expired, worker lost, out of memory)."""
    details: dict[str, Any] = {"job_id": job_id}
    if job is None or not job.status.is_final:
        return WaitTimeoutError("no answer within LLMOS_API_OPENAI_TIMEOUT_S; the request's jobs were cancelled",
                                details={**details, "status": job.status.value if job else None})
    reason = job.error or job.status.value
    details.update(status=job.status.value, reason=reason)
    message = f"job {job_id} {job.status.value}: {reason}"
    if job.status == JobStatus.CANCELLED:
        return JobCancelledError(message, details=details)
    lowered = reason.lower()
    if lowered.startswith(("timeout", "expired")):
        return WaitTimeoutError(message, details=details)
    if "worker" in lowered and "lost" in lowered or "out of memory" in lowered or "cannot run" in lowered:
        return WorkerUnavailableError(message, details=details)
    if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", reason):
        return JobCrashedError(message, details=details)
    return InputRefusedError(message, details=details)


async def _serve(endpoint: str, body: BaseModel, http: HttpRequest, tenant: str, client: Client,
                 api: ApiSettings) -> JSONResponse | StreamingResponse:
    req = oa.parse_request(endpoint, body.model_dump(exclude_unset=True))
    if req.stream:
        return await _serve_stream(req, http, tenant, client, api)
    deadline = time.monotonic() + api.openai_timeout_s
    ids = await run_in_threadpool(_submit, client, api, tenant, req, None)
    jobs = await _wait(http, client, api, tenant, ids, deadline, watch_client=True)
    if jobs is None:  # the client went away: nobody wants the answer
        _cancel_later(http, client, api, tenant, ids)
        event(log, "api_openai_client_gone", tenant=tenant, jobs=len(ids))
        return JSONResponse(error_body(499, "client_closed_request", "the client closed the connection"),
                            status_code=499)
    failed = [i for i in ids if jobs.get(i) is None or jobs[i].status != JobStatus.SUCCEEDED]
    if failed:
        if any(jobs.get(i) is None or not jobs[i].status.is_final for i in ids):
            _cancel_later(http, client, api, tenant, ids)
        return llmos_error_response(job_error(jobs.get(failed[0]), failed[0]))
    return JSONResponse(oa.response_body(req, [jobs[i] for i in ids]))


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def _stream_client(http: HttpRequest, client: Client) -> aioredis.Redis:
    """The app's asyncio Redis client for token streams (one pool; a pub/sub connection per stream)."""
    conn = getattr(http.app.state, "openai_redis", None)
    if conn is None:
        conn = http.app.state.openai_redis = aioredis.Redis.from_url(client.settings.broker_url,
                                                                    socket_connect_timeout=5)
    return conn


_CLEANUPS: set[asyncio.Task] = set()
"""Pub/sub closes started by streams that were cancelled (kept referenced until they are done)."""


async def _serve_stream(req: oa.Request, http: HttpRequest, tenant: str, client: Client,
                        api: ApiSettings) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    pubsub = _stream_client(http, client).pubsub(ignore_subscribe_messages=True)
    created: list[Job] = []

    def before_send(jobs: list[Job]) -> None:
        """Subscribed to every job's stream before a worker can have it (on the submit's thread)."""
        created.extend(jobs)
        channels = [streaming.stream_channel(j.id) for j in jobs]
        try:
            asyncio.run_coroutine_threadsafe(pubsub.subscribe(*channels), loop).result(timeout=5)
        except Exception as exc:  # the answer then comes whole at the end, from the recorded result
            event(log, "api_openai_stream_unsubscribed", logging.WARNING, error=repr(exc)[:200])

    deadline = time.monotonic() + api.openai_timeout_s
    try:
        ids = await run_in_threadpool(_submit, client, api, tenant, req, before_send)
    except BaseException:
        await pubsub.aclose()
        raise
    stream = _Stream(http, client, api, tenant, pubsub, ids)
    return _EventStream(_chunks(req, stream, created, deadline), stream, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Stream:
    """What one streamed request holds: its pub/sub subscription, its jobs, its wait.

    `close` releases them (once) wherever the stream ends: after the answer, in the body's own
    `finally`, or in `_EventStream.__call__`'s when the body never ran (a client gone before the
    first byte); jobs without their answer yet are cancelled."""

    def __init__(self, http: HttpRequest, client: Client, api: ApiSettings, tenant: str, pubsub: Any,
                 ids: list[str]) -> None:
        self.http, self.client, self.api, self.tenant, self.pubsub, self.ids = http, client, api, tenant, pubsub, ids
        self.waiting: asyncio.Future | None = None
        self.done = False  # every job is final: nothing to cancel
        self.closed = False

    def close(self) -> None:
        """Synchronous, so a cancellation cannot cut it short: the pub/sub close runs as a task."""
        if self.closed:
            return
        self.closed = True
        if self.waiting is not None:
            self.waiting.cancel()
        if not self.done:  # the client went away (or the stream failed) before the answer: stop the work
            _cancel_later(self.http, self.client, self.api, self.tenant, self.ids)
            event(log, "api_openai_stream_ended_early", tenant=self.tenant, jobs=len(self.ids))
        task = asyncio.get_running_loop().create_task(_close_pubsub(self.pubsub))
        _CLEANUPS.add(task)
        task.add_done_callback(_CLEANUPS.discard)


async def _close_pubsub(pubsub: Any) -> None:
    try:
        await pubsub.aclose()
    except (redis.RedisError, OSError) as exc:
        event(log, "api_openai_stream_close_failed", logging.WARNING, error=repr(exc)[:200])


class _EventStream(StreamingResponse):
    """A StreamingResponse whose stream's resources are released however the response ends: a
    body generator that never started (the client left before the response began) runs no
    `finally` of its own."""

    def __init__(self, content: AsyncIterator[str], stream: _Stream, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:  # a body left suspended at a yield runs its finally now
                with contextlib.suppress(Exception):
                    await aclose()


async def _chunks(req: oa.Request, stream: _Stream, created: list[Job], deadline: float) -> AsyncIterator[str]:
    """The stream of one request (module doc); its jobs are cancelled if it ends before their answer."""
    http, client, api, tenant, pubsub, ids = (stream.http, stream.client, stream.api, stream.tenant,
                                              stream.pubsub, stream.ids)
    index = {streaming.stream_channel(i): k for k, i in enumerate(ids)}
    relays = [streaming.Relay() for _ in ids]  # per job: attempts told apart, what was sent
    chat = req.endpoint == oa.CHAT
    first = created[0]
    waiting = stream.waiting = asyncio.ensure_future(_wait(http, client, api, tenant, ids, deadline,
                                                           watch_client=False))
    try:
        if chat:
            yield _sse(oa.chunk(req, first, delta={"role": "assistant", "content": ""}))
        reading, quiet = bool(pubsub.subscribed), 0.0
        while not waiting.done() and not all(r.ended for r in relays):
            message = None
            if reading:
                try:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                except (redis.RedisError, OSError) as exc:  # the rest comes from the recorded results
                    event(log, "api_openai_stream_broken", logging.WARNING, error=repr(exc)[:200])
                    reading = False
            else:
                await asyncio.wait({waiting}, timeout=1.0)
            piece = _piece(message, index)
            if piece is None:
                quiet += 1.0
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                continue
            k, m = piece
            text = relays[k].feed(m)  # "" for an older attempt's piece, a lost one's successors...
            if text:
                quiet = 0.0
                yield _sse(_text_chunk(req, first, text, k))
        try:
            jobs = await waiting
        except Exception as exc:  # the database or Redis stopped answering: an error event, not a traceback
            yield _sse(_failure(exc, tenant))
            return
        bad = [i for i in ids if jobs.get(i) is None or jobs[i].status != JobStatus.SUCCEEDED]
        if bad:
            err = job_error(jobs.get(bad[0]), bad[0])
            status, code = error_status(err)
            yield _sse(error_body(status, code, " ".join(str(err).split()), err.details))
            return
        stream.done = True  # every job is final: nothing to cancel
        results = [jobs[job_id].result or {} for job_id in ids]
        rests = [r.rest(str(result.get("text", ""))) for r, result in zip(relays, results)]
        wrong = [k for k, rest in enumerate(rests) if rest is None]
        if wrong:  # what was sent is not the recorded text's beginning: say so, never end short
            job_id = ids[wrong[0]]
            event(log, "api_openai_stream_mismatch", logging.ERROR, tenant=tenant, job=job_id)
            yield _sse(error_body(500, "stream_mismatch", f"the text streamed for job {job_id} is not the "
                                  "beginning of its recorded result; read the answer again by its id",
                                  {"job_id": job_id, "status": jobs[job_id].status.value}))
            return
        for k, (result, rest) in enumerate(zip(results, rests)):
            if rest:
                yield _sse(_text_chunk(req, first, rest, k))
            finish = result.get("finish_reason", "stop")
            yield _sse(oa.chunk(req, first, finish_reason=finish, index=k))
        if req.include_usage:
            yield _sse(oa.chunk(req, first, usage=oa.response_body(req, [jobs[i] for i in ids])["usage"]))
        yield _sse("[DONE]")
    finally:
        stream.close()


def _failure(exc: Exception, tenant: str) -> dict[str, Any]:
    """The error event of a stream whose wait failed (its jobs are then cancelled, best effort)."""
    err: LLMOSError
    if isinstance(exc, LLMOSError):
        err = exc
    elif isinstance(exc, sa.exc.OperationalError):
        err = DatabaseUnavailableError("the task table's database does not answer")
    elif isinstance(exc, (redis.RedisError, OSError)):
        err = BrokerUnavailableError()
    else:
        log.error("action=api_openai_stream_failed error=%s", type(exc).__name__, exc_info=exc)
        return error_body(500, "internal", "internal error; see the API server's log")
    status, code = error_status(err)
    event(log, "api_openai_stream_failed", logging.WARNING, tenant=tenant, code=code, error=repr(exc)[:200])
    return error_body(status, code, " ".join(str(err).split()) or code)


def _piece(message: Any, index: dict[str, int]) -> tuple[int, dict[str, Any]] | None:
    """(request index, stream message) of a pub/sub message of one of the request's channels."""
    if not message or message.get("type") != "message":
        return None
    channel = message.get("channel")
    channel = channel.decode() if isinstance(channel, bytes) else channel
    parsed = streaming.parse_message(message.get("data"))
    if channel not in index or parsed is None:
        return None
    return index[channel], parsed


def _text_chunk(req: oa.Request, job: Job, text: str, k: int) -> dict[str, Any]:
    if req.endpoint == oa.CHAT:
        return oa.chunk(req, job, delta={"content": text}, index=k)
    return oa.chunk(req, job, text=text, index=k)

