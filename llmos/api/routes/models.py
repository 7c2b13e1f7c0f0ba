"""Models: the registry's entries, their tasks and limits, and whether a live worker serves each."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter

from llmos import manager
from llmos.api.deps import ClientDep, TenantDep
from llmos.api.routes import AUTHENTICATED, errors
from llmos.api.schemas import ModelList, ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", responses=errors(*AUTHENTICATED))
def list_models(_tenant: TenantDep, client: ClientDep) -> ModelList:
    """Every registered model; `served` says whether a worker heartbeated within LLMOS_DEAD_AFTER_S."""
    live = Counter(w["model"] for w in manager.live_workers(client.engine, within_s=client.settings.dead_after_s))
    return ModelList(models=[ModelOut.of(spec, live[spec.name]) for spec in client.registry.all()])
