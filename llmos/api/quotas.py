"""Quotas and load shedding: requests per second (shared through Redis), queued jobs, largest body
(each per tenant, from LLMOS_API_* or the tenant's [tenants.NAME] table), and a model's queue length.

Shedding: a model whose queue (messages waiting in its Redis priority lists) is over its maximum
refuses new work of low priority first: 0–3 (batch, low) past 1× the maximum, 4–6 (normal) past
2×, 7–8 (high) past 4×; 9 (critical) is never shed.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable

import limits
import redis
from limits import storage, strategies
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from llmos import manager
from llmos.api.errors import QuotaExceededError, error_response
from llmos.api.settings import ApiSettings, Quota
from llmos.dispatch import pending_set
from llmos.errors import ValidationError
from llmos.logs import event
from llmos.priority import parse_priority
from llmos.settings import Settings

if TYPE_CHECKING:
    from starlette.requests import Request

    from llmos.sdk import Client

log = logging.getLogger("llmos.api")

RATE_NAMESPACE = "llmos-api"
"""First part of every rate-limit counter's key in the storage."""


def storage_uri(settings: Settings, api: ApiSettings) -> str:
    """The limits storage: the configured URI, else the broker's Redis (a unix socket too)."""
    if api.rate_limit_storage:
        return api.rate_limit_storage
    url = settings.broker_url
    return "redis+unix://" + url[len("unix://"):] if url.startswith("unix://") else url


class RateLimiter:
    """A fixed window of `rate` requests per tenant, counted in storage every API process shares.

    A tenant whose [tenants.NAME] table sets its own rate is counted against that rate instead
    (a counter of its own: the storage keys a window by its rate).
    """

    def __init__(self, rate: str, uri: str) -> None:
        self.rate = rate
        self.item = limits.parse(rate)
        self._items: dict[str, limits.RateLimitItem] = {rate: self.item}
        options: dict[str, Any] = {}
        if uri.startswith(("redis", "rediss")):
            options = {"socket_connect_timeout": 2, "socket_timeout": 2}
        self.strategy = strategies.FixedWindowRateLimiter(storage.storage_from_string(uri, **options))

    def hit(self, tenant: str, quota: Quota | None = None) -> None:
        """Count one request of `tenant`; QuotaExceededError (429) when over its rate.

        `quota`: the tenant's quotas (its own rate, if its table sets one); default the global rate.
        If the storage does not answer, the request is let through: the rate limit protects the
        service, and an unreachable Redis already refuses what needs it (submits, waits).
        """
        rate = quota.rate_limit if quota is not None else self.rate
        item = self._items.get(rate)
        if item is None:
            item = self._items[rate] = limits.parse(rate)
        try:
            if self.strategy.hit(item, RATE_NAMESPACE, tenant):
                return
            reset, _ = self.strategy.get_window_stats(item, RATE_NAMESPACE, tenant)
        except (redis.exceptions.RedisError, limits.errors.StorageError) as exc:
            event(log, "rate_limit_unavailable", logging.WARNING, error=type(exc).__name__)
            return
        retry = max(1, math.ceil(reset - time.time()))
        setting = quota.setting("rate_limit") if quota is not None else "LLMOS_API_RATE_LIMIT"
        raise QuotaExceededError(f"over the rate limit of {rate} requests for this tenant "
                                 f"({setting}); retry after {retry} s",
                                 limit="rate_limit", retry_after_s=retry)


class ModelQueueFullError(QuotaExceededError):
    """The model's queue is over its shedding limit for this priority; retry later."""

    def __init__(self, message: str, *, model: str, priority: int, queue_length: int,
                 shed_at: int, max_queue: int, retry_after_s: int) -> None:
        super().__init__(message, limit="model_queue_full", retry_after_s=retry_after_s)
        self.model, self.priority, self.queue_length = model, priority, queue_length
        self.shed_at, self.max_queue = shed_at, max_queue
        self.details = {"model": model, "priority": priority, "queue_length": queue_length,
                        "shed_at": shed_at, "max_queue": max_queue}


SHED_FACTORS: tuple[tuple[int, int], ...] = ((3, 1), (6, 2), (8, 4))
"""(highest user priority, multiple of the model's max_queue it is shed past); above 8: never."""


def shed_at(max_queue: int, priority: int) -> int | None:
    """Queue length past which new work at user `priority` (0–9) is refused; None: never."""
    for top, factor in SHED_FACTORS:
        if priority <= top:
            return max_queue * factor
    return None


def queue_length(client: redis.Redis, model: str) -> int:
    """Jobs waiting in Redis for `model`: its pending set (ids sent, not yet taken by a worker),
    one SCARD, O(1). Not the lists' lengths: a bulk submit's message carries many jobs."""
    return int(client.scard(pending_set(model)))


def check_shedding(client: "Client", model: str, priority: int, adding: int, api: ApiSettings) -> None:
    """ModelQueueFullError (429) if `model`'s queue is at or past its shedding limit for `priority`.

    A submit below the limit is taken whole, so a queue may pass its limit by one submit's jobs.

    If Redis does not answer, the check passes: the send that follows refuses the submit (503).
    """
    max_queue = api.max_queue(model)
    limit = shed_at(max_queue, priority)
    if limit is None:
        return
    try:
        length = queue_length(client.redis, model)
    except (redis.exceptions.RedisError, OSError) as exc:
        event(log, "shedding_unavailable", logging.WARNING, error=type(exc).__name__)
        return
    if length < limit:  # below the limit a submit is taken whole: a batch larger than it is never refused forever
        return
    event(log, "shed", model=model, priority=priority, queue_length=length, jobs=adding)
    raise ModelQueueFullError(
        f"model {model!r} is shedding priority {priority}: {length} jobs wait in its queue, at or past "
        f"{limit} ({limit // max_queue}x its max_queue of {max_queue}, "
        f"{api.max_queue_setting(model)}); retry after {api.queue_retry_after_s} s",
        model=model, priority=priority, queue_length=length, shed_at=limit, max_queue=max_queue,
        retry_after_s=api.queue_retry_after_s)


def check_queued(client: "Client", tenant: str, adding: int, api: ApiSettings, *,
                 model: str, priority: int | str | None) -> None:
    """QuotaExceededError (429) if `adding` more jobs of `model` at `priority` may not be queued now.

    First the model's load shedding (its queue's length in Redis against the limit for this
    priority), then the tenant's quota of queued jobs (one indexed count). Several API
    processes may pass the checks at once: both are bounds on backlog, not transactions, so they
    may be overshot by the jobs of concurrent submits.
    """
    client.registry.get(model)  # an unknown model is a 422 before any count
    check_shedding(client, model, parse_priority(priority), adding, api)
    quota = api.quota(tenant)
    if adding > quota.max_queued_jobs:  # could never fit: not a 429 to retry
        raise ValidationError(f"{adding} jobs in one submit are more than this tenant's quota of "
                              f"{quota.max_queued_jobs} queued jobs ({quota.setting('max_queued_jobs')}); "
                              "split the batch")
    queued = manager.queued_count(client.engine, tenant=tenant)
    if queued + adding > quota.max_queued_jobs:
        raise QuotaExceededError(
            f"this tenant has {queued} queued jobs; {adding} more would pass its quota of "
            f"{quota.max_queued_jobs} ({quota.setting('max_queued_jobs')})",
            limit="max_queued_jobs", retry_after_s=api.queue_retry_after_s)


ROUTE_LIMIT = "llmos.route_body_limit"
"""Scope key `BodyLimit` sets on a request of a route with its own body limit (`routes`)."""

BODY_BYTES = "llmos.body_bytes"
"""Scope key where `BodyLimit` counts the bytes of a body read so far (for the tenant's limit)."""


def check_body(request: "Request", quota: Quota, api: ApiSettings) -> None:
    """413 if the body is over the tenant's own, lower limit (after auth; `BodyLimit` enforces the cap).

    The routes' bodies are read before their dependencies run, so the count is complete here;
    a declared Content-Length over the limit is refused too.
    """
    if quota.max_body_bytes >= api.max_body_bytes or request.scope.get(ROUTE_LIMIT):
        return  # (a route with its own limit, e.g. uploads: that limit is the one)
    length = request.headers.get("content-length", "")
    size = max(int(length) if length.isdigit() else 0, request.scope.get(BODY_BYTES, 0))
    if size > quota.max_body_bytes:
        raise HTTPException(413, f"request body over this tenant's limit of {quota.max_body_bytes} bytes "
                                 f"({quota.setting('max_body_bytes')})")


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is answered 413, by its Content-Length or as it streams.

    `max_bytes` (LLMOS_API_MAX_BODY_BYTES) is the hard cap for everyone, enforced before the key
    is read; a tenant's [tenants.NAME] max_body_bytes can only lower it (`check_body`, after auth).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, routes: dict[tuple[str, str], int] | None = None) -> None:
        """`routes`: (method, path) → a body limit of its own (file uploads), instead of `max_bytes`."""
        self.app = app
        self.max_bytes = max_bytes
        self.routes = routes or {}

    def _message(self, limit: int | None = None) -> str:
        if limit is not None and limit != self.max_bytes:
            return f"request body over this route's limit of {limit} bytes"
        return f"request body over the limit of {self.max_bytes} bytes (LLMOS_API_MAX_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.routes.get((scope.get("method", ""), scope.get("path", "")))
        if limit is not None:
            scope[ROUTE_LIMIT] = limit
        else:
            limit = self.max_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = error_response(413, "body_too_large", self._message(limit),
                                      {"limit": "max_body_bytes", "max_bytes": limit})
            await response(scope, receive, send)
            return
        await self.app(scope, self._counting(scope, receive, limit), send)

    def _counting(self, scope: Scope, receive: Receive, limit: int) -> Callable:
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                scope[BODY_BYTES] = seen
                if seen > limit:  # a chunked body without Content-Length
                    raise HTTPException(413, self._message(limit))
            return message

        return counted
