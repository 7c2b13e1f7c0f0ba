"""One router per resource; `responses` documents every error a route can answer."""

from __future__ import annotations

from typing import Any

from llmos.api.schemas import ErrorOut

_DESCRIPTIONS = {
    401: "No key, or a bad or revoked one.",
    403: "The route needs an admin key.",
    404: "No such job (another tenant's job reads the same).",
    409: "Conflict: the job already ended, or the idempotency key names another job.",
    413: "The request body is over LLMOS_API_MAX_BODY_BYTES.",
    422: "The request is invalid: malformed JSON, a wrong type, an unknown model or task, a limit.",
    429: "Over a quota (rate limit or queued jobs); see Retry-After.",
    503: "The database or Redis does not answer; see Retry-After.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers of a route (every authenticated route: 401, 429, 503)."""
    return {code: {"model": ErrorOut, "description": _DESCRIPTIONS[code]} for code in codes}


AUTHENTICATED = (401, 413, 422, 429, 503)
"""Errors any authenticated route may answer."""
