"""Health: `/healthz` (the process answers) and `/readyz` (its database and Redis answer); no key."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter

from llmos.api.deps import ClientDep
from llmos.api.errors import error_response
from llmos.api.routes import errors
from llmos.api.schemas import Health, Ready
from llmos.errors import LLMOSError

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", responses=errors(503))
def readyz(client: ClientDep) -> Ready:
    """Ready when the task table's database and Redis both answer."""
    checks = {"database": "ok", "redis": "ok"}
    try:
        with client.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except (LLMOSError, sa.exc.SQLAlchemyError):
        checks["database"] = "unavailable"
    try:
        client.redis.ping()
    except Exception:  # any failure to answer (connection, timeout, auth) is "not ready"
        checks["redis"] = "unavailable"
    if "unavailable" in checks.values():
        return error_response(503, "not_ready", "not ready: " + ", ".join(k for k, v in checks.items() if v != "ok"),
                              checks, {"Retry-After": "5"})
    return Ready(status="ready", **checks)
