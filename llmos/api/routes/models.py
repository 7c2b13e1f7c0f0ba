"""Models: the registry's entries in OpenAI's list shape, their tasks and limits, and whether a live
worker serves each."""

from __future__ import annotations

import time
from collections import Counter

from fastapi import APIRouter

from llmos import manager
from llmos.api.deps import ClientDep, TenantDep
from llmos.api.errors import ModelNotFoundError
from llmos.api.routes import AUTHENTICATED, errors
from llmos.api.schemas import ModelList, ModelOut
from llmos.errors import UnknownModelError
from llmos.sdk import Client

router = APIRouter(prefix="/v1/models", tags=["models"])

STARTED = int(time.time())
"""OpenAI's `created` of every model: when this API process started (the registry has no dates)."""


def _live(client: Client) -> Counter[str]:
    return Counter(w["model"] for w in manager.live_workers(client.engine, within_s=client.settings.dead_after_s))


@router.get("", responses=errors(*AUTHENTICATED))
def list_models(_tenant: TenantDep, client: ClientDep) -> ModelList:
    """Every registered model (`{"object": "list", "data": [...]}`, as OpenAI's GET /v1/models);
    `served` says whether a worker heartbeated within LLMOS_DEAD_AFTER_S."""
    live, created = _live(client), STARTED
    return ModelList(data=[ModelOut.of(spec, live[spec.name], created) for spec in client.registry.all()])


@router.get("/{model}", responses={**errors(*AUTHENTICATED),
                                   404: {**errors(404)[404], "description": "No registry model has that name."}})
def get_model(model: str, _tenant: TenantDep, client: ClientDep) -> ModelOut:
    """One registered model (OpenAI's GET /v1/models/{model})."""
    try:
        spec = client.registry.get(model)
    except UnknownModelError as exc:
        raise ModelNotFoundError(str(exc)) from None
    return ModelOut.of(spec, _live(client)[spec.name], STARTED)
