"""`GET /metrics`: the Prometheus exposition of llmos.monitoring's collector, for admin keys or the scrape token.

The registry is the app's own (one collector, no process metrics), and every figure is read from
the task table and Redis at the scrape, so every API process answers the same (docs/monitoring.md).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CollectorRegistry, generate_latest

from llmos.api.deps import ClientDep, _bearer, get_key
from llmos.api.errors import AuthError, ForbiddenError
from llmos.api.routes import AUTHENTICATED, errors
from llmos.api.settings import ApiSettings
from llmos.monitoring.metrics import LlmosCollector, make_registry
from llmos.sdk import Client

router = APIRouter(tags=["metrics"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Prometheus's text format 0.0.4, which `generate_latest` writes."""


def registry(client: Client) -> CollectorRegistry:
    """The app's registry: one collector on `client`'s database, Redis and registry models."""
    return make_registry(LlmosCollector(lambda: client.engine, lambda: client.redis,
                                        lambda: client.registry.names(),
                                        live_within_s=client.settings.dead_after_s))


def get_scraper(request: Request, client: ClientDep,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """'token' for LLMOS_API_METRICS_TOKEN, else the admin key's prefix; 401 without either, 403 for
    a tenant's key."""
    if credentials is None:
        raise AuthError("missing credentials: send `Authorization: Bearer <admin key or LLMOS_API_METRICS_TOKEN>`")
    api: ApiSettings = request.app.state.api_settings
    token = api.metrics_token.get_secret_value() if api.metrics_token is not None else None
    if token is not None and hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        return "token"
    key = get_key(request, client, credentials)
    if not key.admin:
        raise ForbiddenError("/metrics needs an admin key or LLMOS_API_METRICS_TOKEN")
    return key.prefix


ScraperDep = Annotated[str, Depends(get_scraper)]

_OK = {200: {"description": "Prometheus text exposition (format 0.0.4).",
             "content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.get("/metrics", response_class=Response, responses={**_OK, **errors(*AUTHENTICATED, 403)})
def metrics(_scraper: ScraperDep, request: Request) -> Response:
    """Jobs by status, model, task and tenant; queue depths; latency histograms; tokens; workers;
    webhook failures; capacity. Read at the scrape from the task table and Redis: every API process
    answers the same. A service that does not answer reads `llmos_up{component=...} 0`."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE)
