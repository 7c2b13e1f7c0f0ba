"""API keys, for admin keys: create (the key is shown once), list, revoke by prefix."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from llmos import manager
from llmos.api.deps import AdminDep, ClientDep
from llmos.api.routes import AUTHENTICATED, errors
from llmos.api.schemas import KeyCreated, KeyIn, KeyList, KeyOut
from llmos.api.errors import KeyNotFoundError
from llmos.logs import event

log = logging.getLogger("llmos.api")
router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=201, responses=errors(*AUTHENTICATED, 403))
def create_key(body: KeyIn, admin: AdminDep, client: ClientDep) -> KeyCreated:
    """A new key for a tenant; the response is the only time the key is shown."""
    key, secret = manager.create_api_key(client.engine, tenant=body.tenant, name=body.name, admin=body.admin)
    event(log, "api_key_created", prefix=key.prefix, tenant=key.tenant, admin=key.admin, by=admin.prefix)
    return KeyCreated(**KeyOut.of(key).model_dump(), key=secret)


@router.get("", responses=errors(*AUTHENTICATED, 403))
def list_keys(_admin: AdminDep, client: ClientDep) -> KeyList:
    """Every key of every tenant (revoked ones too), without secrets."""
    return KeyList(keys=[KeyOut.of(k) for k in manager.list_api_keys(client.engine)])


@router.delete("/{prefix}", status_code=204, responses=errors(*AUTHENTICATED, 403, 404))
def revoke_key(prefix: str, admin: AdminDep, client: ClientDep) -> None:
    """Revoke a key: it is refused (401) from the next request on."""
    if not manager.revoke_api_key(client.engine, prefix):
        raise KeyNotFoundError(f"no live API key with prefix {prefix!r}")
    event(log, "api_key_revoked", prefix=prefix, by=admin.prefix)
