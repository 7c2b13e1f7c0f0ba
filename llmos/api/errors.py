"""The one error shape of the API, `{"error": {"code", "message", "details", "type", "param"}}`, and its handlers.

`type` is OpenAI's error category (invalid_request_error, authentication_error, permission_error,
rate_limit_error, server_error) and `param` the request field at fault when known, so OpenAI's
client libraries read our errors as they read OpenAI's (they show `message`).

Routes raise LLMOSError subclasses; `install` maps each to its status code here, in one place.
A client's mistake is always a 4xx; a 5xx means LLMOS itself (or a service it needs) failed.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from llmos.batches.errors import (BatchNotFoundError, BatchStateError, FileInUseError,
                                  FileNotFoundInStoreError, FileTooLargeError)
from llmos.errors import (AuthError, BrokerUnavailableError, ConfigError, DatabaseUnavailableError,  # noqa: F401
                          DeadlineUnmeetableError, ModelTooLargeError,
                          ForbiddenError, IdempotencyConflictError, JobFinalError, JobNotFoundError, JobStateError,
                          LLMOSError,
                          NoWorkerError, QuotaExceededError, UnknownModelError, UnsupportedTaskError,
                          ValidationError)
from llmos.logs import event

log = logging.getLogger("llmos.api")


class KeyNotFoundError(LLMOSError, LookupError):
    """No live API key has that prefix."""


class ModelNotFoundError(UnknownModelError):
    """No registry model has that name (the OpenAI-compatible routes answer 404, as OpenAI does)."""


class JobOutcomeError(LLMOSError):
    """An OpenAI-compatible request's job ended without a result; `details` names the job."""

    def __init__(self, message: str | None = None, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class InputRefusedError(JobOutcomeError):
    """The model could not run this input (its job failed with the runner's reason): the client's to change."""


class JobCancelledError(JobOutcomeError):
    """The request's job was cancelled (DELETE /v1/jobs/{id}) before it had an answer."""


class JobCrashedError(JobOutcomeError):
    """The runner raised on this input: an LLMOS fault."""


class WorkerUnavailableError(JobOutcomeError):
    """The work could not be done now (no worker serves the model, a worker died, out of memory): retry later."""


class WaitTimeoutError(JobOutcomeError):
    """The job had no answer within the wait limit (LLMOS_API_OPENAI_TIMEOUT_S); it was cancelled."""


STATUS: list[tuple[type[LLMOSError], int, str]] = [  # first match wins: subclasses before bases
    (ModelNotFoundError, 404, "model_not_found"),
    (InputRefusedError, 422, "input_refused"),
    (JobCancelledError, 409, "job_cancelled"),
    (JobCrashedError, 500, "job_failed"),
    (WorkerUnavailableError, 503, "worker_unavailable"),
    (NoWorkerError, 503, "no_worker"),
    (WaitTimeoutError, 504, "timeout"),
    (IdempotencyConflictError, 409, "idempotency_conflict"),
    (FileTooLargeError, 413, "body_too_large"),
    (FileNotFoundInStoreError, 404, "not_found"),
    (BatchNotFoundError, 404, "not_found"),
    (BatchStateError, 409, "batch_state"),
    (FileInUseError, 409, "file_in_use"),
    (DeadlineUnmeetableError, 422, "deadline_unmeetable"),
    (ModelTooLargeError, 422, "model_too_large"),
    (ValidationError, 422, "invalid_request"),
    (UnknownModelError, 422, "unknown_model"),
    (UnsupportedTaskError, 422, "unsupported_task"),
    (JobNotFoundError, 404, "not_found"),
    (KeyNotFoundError, 404, "not_found"),
    (AuthError, 401, "unauthorized"),
    (ForbiddenError, 403, "forbidden"),
    (JobFinalError, 409, "job_final"),
    (JobStateError, 409, "job_state"),
    (QuotaExceededError, 429, "quota_exceeded"),
    (BrokerUnavailableError, 503, "broker_unavailable"),
    (DatabaseUnavailableError, 503, "database_unavailable"),
    (ConfigError, 503, "not_configured"),  # the deployment's registry, not the request, is wrong
]
"""Status code and error code of each LLMOSError subclass; any other LLMOSError is a 400."""

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}
"""Error codes of the HTTP errors the framework raises itself (unknown route, wrong method...)."""

RETRY_AFTER_UNAVAILABLE_S = 5
"""Retry-After of a 503 (a service LLMOS needs does not answer)."""


OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                429: "rate_limit_error"}
"""OpenAI's error `type` by status (other 4xx: invalid_request_error; 5xx: server_error)."""


def error_type(status: int) -> str:
    return OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, code: str, message: str, details: dict[str, Any] | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The one error shape, as a dict (an event stream sends it as one event's data)."""
    return {"error": {"code": code, "message": message, "details": details or {},
                      "type": error_type(status), "param": param}}


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    """The one error shape."""
    return JSONResponse(error_body(status, code, message, details, param), status_code=status, headers=headers)


def error_status(exc: LLMOSError) -> tuple[int, str]:
    """(HTTP status, error code) of an LLMOSError."""
    return next(((s, c) for cls, s, c in STATUS if isinstance(exc, cls)), (400, "bad_request"))


def llmos_error_response(exc: LLMOSError) -> JSONResponse:
    status, code = error_status(exc)
    details: dict[str, Any] = dict(exc.details) if isinstance(exc, JobOutcomeError) else {}
    headers: dict[str, str] = {}
    if isinstance(exc, QuotaExceededError):
        details = {"limit": exc.limit, "retry_after_s": exc.retry_after_s, **getattr(exc, "details", {})}
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, (JobFinalError, JobStateError)):
        details = {"status": exc.status}
    elif isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    elif status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_UNAVAILABLE_S)
    return error_response(status, code, " ".join(str(exc).split()), details, headers)


METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers on the request's path (the Allow of a 405).

    Asked of the router itself, method by method (included routers are not flattened into
    `app.routes`, and Starlette's own Allow names the methods of the first route only).
    """
    routes = request.app.router.routes
    return [m for m in METHODS
            if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]


def install(app: FastAPI) -> None:
    """Register every handler on `app`."""

    @app.exception_handler(LLMOSError)
    async def _llmos(_request: Request, exc: LLMOSError) -> JSONResponse:
        return llmos_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]  # not the input: it may be the whole (large) body
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        loc = first["loc"][1:] if first["loc"][:2] and first["loc"][0] in ("body", "query", "path") else first["loc"]
        return error_response(422, "invalid_request", f"{where}: {first['msg']}" if where else first["msg"],
                              {"errors": errors}, param=".".join(str(p) for p in loc) or None)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body the framework cannot decode (not UTF-8, say): malformed JSON
            return error_response(422, "invalid_request", f"the request body is not valid JSON ({exc.detail})",
                                  {"errors": [{"loc": ["body"], "msg": str(exc.detail), "type": "json_invalid"}]})
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names the methods of one route of the path, not all
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(sa.exc.OperationalError)
    async def _database(_request: Request, exc: sa.exc.OperationalError) -> JSONResponse:
        event(log, "database_unavailable", logging.WARNING, error=type(exc.orig or exc).__name__)
        return llmos_error_response(DatabaseUnavailableError("the task table's database does not answer"))

    @app.exception_handler(sa.exc.DataError)
    async def _unstorable(_request: Request, exc: sa.exc.DataError) -> JSONResponse:
        # A value from the request the database refused (the routes check what they know of first)
        event(log, "database_refused_value", logging.WARNING, error=type(exc.orig or exc).__name__)
        return error_response(422, "invalid_request", "a value in the request cannot be stored or compared "
                              "by the database (NUL or a lone surrogate?)")

    @app.exception_handler(redis.exceptions.ConnectionError)
    async def _broker(_request: Request, exc: redis.exceptions.ConnectionError) -> JSONResponse:
        event(log, "broker_unavailable", logging.WARNING, error=type(exc).__name__)
        return llmos_error_response(BrokerUnavailableError())

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("action=api_error path=%s error=%s", request.url.path, type(exc).__name__, exc_info=exc)
        return error_response(500, "internal", "internal error; see the API server's log")
