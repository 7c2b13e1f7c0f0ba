"""Webhooks: the tenant's signing secret (read, rotate) and its deliveries (how each went)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query

from llmos import manager
from llmos.api.deps import ClientDep, TenantDep
from llmos.api.routes import AUTHENTICATED, errors
from llmos.api.schemas import DeliveryList, DeliveryOut, WebhookSecretOut
from llmos.db import UNSTORABLE
from llmos.errors import ValidationError
from llmos.logs import event
from llmos.sdk import _job_id

log = logging.getLogger("llmos.api")
router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.get("/secret", responses=errors(*AUTHENTICATED))
def get_secret(tenant: TenantDep, client: ClientDep) -> WebhookSecretOut:
    """The secret this tenant's webhooks are signed with (made on first read or first delivery)."""
    secret, created_at = manager.webhook_secret(client.engine, tenant)
    return WebhookSecretOut(secret=secret, created_at=created_at)


@router.post("/secret:rotate", responses=errors(*AUTHENTICATED))
def rotate_secret(tenant: TenantDep, client: ClientDep) -> WebhookSecretOut:
    """A new secret: every delivery from now on (retries too) is signed with it; the old one stops."""
    secret, created_at = manager.rotate_webhook_secret(client.engine, tenant)
    event(log, "webhook_secret_rotated", tenant=tenant)
    return WebhookSecretOut(secret=secret, created_at=created_at)


@router.get("/deliveries", responses=errors(*AUTHENTICATED))
def list_deliveries(tenant: TenantDep, client: ClientDep, job_id: str | None = None, batch_id: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DeliveryList:
    """The tenant's webhook deliveries newest first (of one job or batch): attempts, last status, outcome."""
    if batch_id is not None and UNSTORABLE.search(batch_id):
        raise ValidationError("batch_id contains a character no batch id can have (NUL or a lone surrogate)")
    if job_id is not None:
        try:
            job_id = _job_id(job_id)
        except LookupError:  # not a UUID: it names no job, so no delivery
            return DeliveryList(deliveries=[])
    found = manager.list_deliveries(client.engine, tenant=tenant, job_id=job_id, batch_id=batch_id, limit=limit)
    return DeliveryList(deliveries=[DeliveryOut.of(d) for d in found])
