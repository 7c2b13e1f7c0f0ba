"""One router per resource; `responses` documents every error a route can answer.

Here: those error entries (`errors`), an event stream's entry (`event_stream`) and the parameter
types the routes share, so that `/openapi.json` says what the API answers (the schema check in
tests/integration/test_api_schema.py holds every route to it).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator

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


def event_stream(description: str, data: type[BaseModel], events: list[str]) -> dict[str, Any]:
    """The OpenAPI entry of a 200 that is a Server-Sent Events stream: each event is named one of
    `events` with `data` as JSON (the `data` model), or `error` with `{"message"}` and the stream ends.

    Before OpenAPI 3.2 the `schema` of `text/event-stream` describes one event (`event`, `data`...).
    """
    def json_data(schema: dict[str, Any]) -> dict[str, Any]:
        return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}

    error = {"type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}}
    return {"description": description, "content": {"text/event-stream": {"schema": {"oneOf": [
        {"type": "object", "required": ["event", "data"],
         "properties": {"event": {"enum": events}, "data": json_data({"$ref": f"#/components/schemas/{data.__name__}"})}},
        {"type": "object", "required": ["event", "data"],
         "properties": {"event": {"const": "error"}, "data": json_data(error)}},
    ]}}}}


_ISO_8601 = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_8601(value: Any) -> Any:
    if isinstance(value, str) and not _ISO_8601.match(value):  # pydantic would read "1.5" as Unix seconds
        raise ValueError("not an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z")
    return value


IsoDatetime = Annotated[datetime, BeforeValidator(_iso_8601)]
"""A query parameter's date-time: ISO 8601 only (the schema's `format: date-time`), not a number."""
