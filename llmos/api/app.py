"""The app factory: routers, error handlers, the body limit, the shared SDK client, the webhook deliverer
and the /metrics registry."""

from __future__ import annotations

import asyncio
import warnings
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from llmos import __version__
from llmos.api import errors
from llmos.api.quotas import BodyLimit, RateLimiter, storage_uri
from llmos.api.routes import batches, dashboard, files, health, jobs, keys, metrics, models, webhooks
from llmos.api.routes import openai as openai_routes
from llmos.api.settings import ApiSettings, get_api_settings
from llmos.api.webhooks import Deliverer
from llmos.batches import Advancer
from llmos.errors import NoWorkerWarning
from llmos.sdk import Client
from llmos.settings import Settings, get_settings


def create_app(settings: Settings | None = None, api_settings: ApiSettings | None = None, *,
               client: Client | None = None) -> FastAPI:
    """A new API app on `settings` (default: the environment's), with `api_settings`' quotas.

    `client`: the SDK client the routes call (default: one on `settings`; unit tests pass one
    with an in-memory dispatcher). It has no tenant of its own: every call names the caller's.
    """
    # A job for a model no worker serves waits queued, and the API answers it; the SDK's warning
    # would only say so on the server's stderr, to nobody.
    warnings.filterwarnings("ignore", category=NoWorkerWarning)
    settings = client.settings if client is not None else (settings or get_settings())
    api_settings = api_settings or get_api_settings(settings)
    client = client or Client(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # every API process delivers webhooks (LLMOS_API_WEBHOOK_DELIVER=false: not this one)
        deliverer = Deliverer(lambda: client.engine, api_settings) if api_settings.webhook_deliver else None
        if deliverer is not None:
            deliverer.start()
        advancer = Advancer(client).start()  # every API process advances open batches
        try:
            yield
        finally:
            await openai_routes.shutdown(_app)  # its waiter threads and its streams' Redis client
            await asyncio.to_thread(advancer.stop)
            if deliverer is not None:
                await asyncio.to_thread(deliverer.stop)
            client.close()

    app = FastAPI(title="LLMOS", version=__version__, lifespan=lifespan,
                  description="NLP jobs on language models: submit, wait, stream, cancel. "
                              "Every /v1 route needs `Authorization: Bearer <API key>`.")
    app.state.client = client
    app.state.api_settings = api_settings
    app.state.metrics = metrics.registry(client)
    app.state.rate_limiter = RateLimiter(api_settings.rate_limit, storage_uri(settings, api_settings))
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=api_settings.max_body_bytes,
                       routes={("POST", files.UPLOAD_PATH): files.upload_limit()})
    for module in (health, jobs, models, keys, webhooks, metrics):
        app.include_router(module.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(openai_routes.router)  # OpenAI-compatible: docs/openai.md
    app.include_router(dashboard.router)  # the operator's page: docs/dashboard.md
    return app
