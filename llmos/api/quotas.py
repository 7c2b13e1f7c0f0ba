"""Per-tenant quotas: requests per second (shared through Redis), queued jobs, largest body."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import limits
import redis
import sqlalchemy as sa
from limits import storage, strategies
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from llmos import manager
from llmos.api.errors import QuotaExceededError, error_response
from llmos.api.settings import ApiSettings
from llmos.logs import event
from llmos.settings import Settings

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
    """A fixed window of `rate` requests per tenant, counted in storage every API process shares."""

    def __init__(self, rate: str, uri: str) -> None:
        self.rate = rate
        self.item = limits.parse(rate)
        options: dict[str, Any] = {}
        if uri.startswith(("redis", "rediss")):
            options = {"socket_connect_timeout": 2, "socket_timeout": 2}
        self.strategy = strategies.FixedWindowRateLimiter(storage.storage_from_string(uri, **options))

    def hit(self, tenant: str) -> None:
        """Count one request of `tenant`; QuotaExceededError (429) when over the rate.

        If the storage does not answer, the request is let through: the rate limit protects the
        service, and an unreachable Redis already refuses what needs it (submits, waits).
        """
        try:
            if self.strategy.hit(self.item, RATE_NAMESPACE, tenant):
                return
            reset, _ = self.strategy.get_window_stats(self.item, RATE_NAMESPACE, tenant)
        except (redis.exceptions.RedisError, limits.errors.StorageError) as exc:
            event(log, "rate_limit_unavailable", logging.WARNING, error=type(exc).__name__)
            return
        retry = max(1, math.ceil(reset - time.time()))
        raise QuotaExceededError(f"over the rate limit of {self.rate} requests for this tenant "
                                 f"(LLMOS_API_RATE_LIMIT); retry after {retry} s",
                                 limit="rate_limit", retry_after_s=retry)


def check_queued(engine: sa.Engine, tenant: str, adding: int, api: ApiSettings) -> None:
    """QuotaExceededError (429) if `adding` more queued jobs would put `tenant` over its quota.

    Several API processes may pass the check at once: the quota is a bound on backlog, not a
    transaction, so it may be overshot by the jobs of concurrent submits.
    """
    queued = manager.queued_count(engine, tenant=tenant)
    if queued + adding > api.max_queued_jobs:
        raise QuotaExceededError(
            f"this tenant has {queued} queued jobs; {adding} more would pass its quota of "
            f"{api.max_queued_jobs} (LLMOS_API_MAX_QUEUED_JOBS)",
            limit="max_queued_jobs", retry_after_s=api.queue_retry_after_s)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is answered 413, by its Content-Length or as it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body over the limit of {self.max_bytes} bytes (LLMOS_API_MAX_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, "body_too_large", self._message(),
                                      {"limit": "max_body_bytes", "max_bytes": self.max_bytes})
            await response(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Callable:
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # a chunked body without Content-Length
                    raise HTTPException(413, self._message())
            return message

        return counted
