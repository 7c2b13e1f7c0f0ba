"""Dependencies as named types: the client, the caller's key and tenant, an admin key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from llmos import manager
from llmos.api.errors import AuthError, ForbiddenError
from llmos.api.quotas import RateLimiter, check_body
from llmos.api.settings import ApiSettings
from llmos.manager import ApiKey
from llmos.sdk import Client

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer llmos_...`.")


def get_client(request: Request) -> Client:
    return request.app.state.client


def get_api_settings(request: Request) -> ApiSettings:
    return request.app.state.api_settings


ClientDep = Annotated[Client, Depends(get_client)]
ApiSettingsDep = Annotated[ApiSettings, Depends(get_api_settings)]


def get_key(request: Request, client: ClientDep,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiKey:
    """The caller's live API key (401 otherwise); counts the request against its tenant's rate.

    Then the tenant's own body limit, if its [tenants.NAME] table sets one below the global cap.
    """
    if credentials is None:
        raise AuthError("missing API key: send `Authorization: Bearer <key>`")
    key = manager.authenticate_key(client.engine, credentials.credentials)
    if key is None:
        raise AuthError("invalid or revoked API key")
    api: ApiSettings = request.app.state.api_settings
    quota = api.quota(key.tenant)
    limiter: RateLimiter = request.app.state.rate_limiter
    limiter.hit(key.tenant, quota)
    check_body(request, quota, api)
    return key


KeyDep = Annotated[ApiKey, Depends(get_key)]


def get_tenant(key: KeyDep) -> str:
    """The tenant of a request: from its key alone."""
    return key.tenant


TenantDep = Annotated[str, Depends(get_tenant)]


def get_admin(key: KeyDep) -> ApiKey:
    if not key.admin:
        raise ForbiddenError("this route needs an admin key (`llmos keys create --tenant NAME --admin`)")
    return key


AdminDep = Annotated[ApiKey, Depends(get_admin)]
