"""The SDK over HTTP: `llmos.connect(url, api_key=...)`, a client with `llmos.Client`'s surface.

`HTTPClient` speaks the REST API (docs/api.md) with httpx and hands back the SDK's own values:
`sdk.Model` and `sdk.JobHandle` (which call the client's methods), typed TaskResults and `Job`
rows. The API's error codes map back to the LLMOSError subclasses the direct client raises, so
code moves between the two clients by changing the line that makes the client.
"""

from __future__ import annotations

import json
import time
import warnings
from datetime import datetime
from typing import Any, Iterable, Sequence

import httpx
import pydantic

from llmos.errors import (BrokerUnavailableError, ConfigError, DatabaseUnavailableError,
                          DeadlineUnmeetableError, IdempotencyConflictError, ModelTooLargeError, JobNotFoundError, LLMOSError, NoWorkerWarning,
                          UnknownModelError, UnsupportedTaskError, ValidationError)
from llmos.jobs import Job
from llmos.registry import ModelSpec
from llmos.sdk import JobHandle, Model, _job_id, _keys, _task_list, no_worker_message
from llmos.settings import Settings, get_settings, redact
from llmos.tasks import Task, ensure_task

LONG_POLL_S = 60.0
"""Longest one `GET /v1/jobs/{id}/wait` call asks the server to block (the API's WAIT_MAX_S)."""

REQUEST_TIMEOUT_S = 30.0
"""How long a call waits for the server's answer, beyond the long poll it asked for."""

_DATETIME_FIELDS = ("created_at", "started_at", "finished_at", "deadline", "eta_start_at", "eta_finish_at")
"""The fields of the API's job that are ISO 8601 times."""

_ERRORS: dict[str, type[LLMOSError]] = {
    "idempotency_conflict": IdempotencyConflictError,
    "deadline_unmeetable": DeadlineUnmeetableError,
    "model_too_large": ModelTooLargeError,
    "invalid_request": ValidationError,
    "body_too_large": ValidationError,
    "unknown_model": UnknownModelError,
    "unsupported_task": UnsupportedTaskError,
    "not_found": JobNotFoundError,
    "broker_unavailable": BrokerUnavailableError,
    "database_unavailable": DatabaseUnavailableError,
    "not_configured": ConfigError,
}
"""The API's error codes that the direct client raises as the same class (others: `_error`)."""


class APIUnavailableError(LLMOSError, ConnectionError):
    """The LLMOS API cannot be reached."""


class APIError(LLMOSError):
    """The LLMOS API answered with an error this client has no class for."""

    def __init__(self, message: str | None = None, *, status_code: int, code: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.details = details or {}


class HTTPClient:
    """A connection to an LLMOS REST API; every call acts for the tenant of its API key."""

    tenant = None
    """The key's tenant is known to the server only; handles carry None."""

    def __init__(self, url: str, api_key: str | None = None, *, settings: Settings | None = None,
                 timeout: float = REQUEST_TIMEOUT_S, transport: httpx.BaseTransport | None = None) -> None:
        """`settings`: local ones (`no_worker_grace_s` of `execute`); `transport`: httpx's, e.g. for a proxy."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"the LLMOS API URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.settings = settings or get_settings()
        self._timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, transport=transport)

    def __repr__(self) -> str:
        return f"HTTPClient({redact(self.url)!r})"  # never the key

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "HTTPClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- models ------------------------------------------------------------------------------
    def load_model(self, name: str) -> Model:
        """The model as the server's registry has it (UnknownModelError if it has none by that name)."""
        models = self._models()
        if not isinstance(name, str) or name not in models:
            raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(models)}")
        m = models[name]
        try:
            spec = ModelSpec(name=m["name"], engine=m["engine"], source=self.url, kind=m["kind"],
                             tasks=tuple(m["tasks"]), language_pairs=tuple(map(tuple, m["language_pairs"])),
                             **m["limits"])
        except (pydantic.ValidationError, KeyError, TypeError) as exc:
            raise APIError(f"the API at {redact(self.url)} describes model {name!r} in a way this "
                           f"client does not read (another LLMOS version?): {exc}", status_code=200) from None
        return Model(self, spec)

    def has_worker(self, model: str) -> bool:
        """Whether the server sees a live worker serving `model`."""
        return bool(self._models().get(model, {}).get("served"))

    def _models(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self._request("GET", "/v1/models")["data"]}

    # -- jobs --------------------------------------------------------------------------------
    def submit(self, model: str, tasks: Iterable[Task], *, priority: int | str | None = None,
               idempotency_key: str | Sequence[str | None] | None = None,
               tenant: str | None = None, batch_id: str | None = None,
               timeout_s: float | None = None, deadline: datetime | float | None = None,
               max_attempts: int = 3, webhook_url: str | None = None) -> list[JobHandle]:
        """`Client.submit` over HTTP: one request (a batch for many tasks); the server validates.

        `webhook_url`: a job webhook for one task without a batch id, else a batch webhook.
        """
        return self._submit(model, tasks, priority=priority, idempotency_key=idempotency_key,
                            tenant=tenant, batch_id=batch_id, timeout_s=timeout_s,
                            deadline=deadline, max_attempts=max_attempts, warn=True,
                            webhook_url=webhook_url)[0]

    def _submit(self, model: str, tasks: Iterable[Task], *, priority: int | str | None,
                idempotency_key: str | Sequence[str | None] | None, tenant: str | None,
                batch_id: str | None, timeout_s: float | None, deadline: datetime | float | None,
                max_attempts: int, warn: bool, webhook_url: str | None = None) -> tuple[list[JobHandle], bool]:
        """`submit` (`warn`: a NoWorkerWarning if no worker serves the model), and whether one does."""
        self._no_tenant(tenant)
        checked = [ensure_task(t) for t in _task_list(tasks)]
        keys = _keys(idempotency_key, len(checked))
        if not checked:
            return [], False
        options = {"model": model, "priority": priority, "timeout_s": timeout_s,
                   "deadline": deadline.isoformat() if isinstance(deadline, datetime) else deadline,
                   "max_attempts": max_attempts}
        if webhook_url is not None:  # only when given: a server without webhooks refuses the field
            options["webhook_url"] = webhook_url
        items = [{"task": t.task_type, "input": t.model_dump(mode="json"), "idempotency_key": k}
                 for t, k in zip(checked, keys)]
        if len(items) == 1 and batch_id is None:
            jobs = [self._request("POST", "/v1/jobs", body={**options, **items[0]})]
        else:
            jobs = self._request("POST", "/v1/jobs:batch",
                                 body={**options, "batch_id": batch_id, "jobs": items})["jobs"]
        served = self.has_worker(model)
        if not served and warn:
            warnings.warn(no_worker_message(model), NoWorkerWarning, stacklevel=4)
        return [JobHandle(self, j["id"], j["model"], j["task"], eta_start_at=_time(j.get("eta_start_at")),
                          eta_finish_at=_time(j.get("eta_finish_at"))) for j in jobs], served

    def job(self, job_id: str, *, tenant: str | None = None) -> Job:
        """One of the key's tenant's jobs (JobNotFoundError for another tenant's id, as for none)."""
        self._no_tenant(tenant)
        return job_from_json(self._request("GET", f"/v1/jobs/{_job_id(job_id)}"))

    def wait(self, job_ids: Sequence[str], timeout: float | None = None, *,
             tenant: str | None = None) -> dict[str, Job]:
        """Wait until every job is final (or `timeout` passes); returns every job as last read.

        One long poll per job at a time, so a wait costs about one request per job.
        """
        self._no_tenant(tenant)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):  # `not >=`: NaN too
            raise ValidationError(f"timeout must be a number of seconds (0 or more) or None, got {timeout!r}")
        until = None if timeout is None else time.monotonic() + timeout
        latest: dict[str, Job] = {}
        for job_id in dict.fromkeys(_job_id(j) for j in job_ids):
            while True:
                left = None if until is None else max(0.0, until - time.monotonic())
                poll = LONG_POLL_S if left is None else min(left, LONG_POLL_S)
                job = job_from_json(self._request("GET", f"/v1/jobs/{job_id}/wait", params={"timeout": poll},
                                                  timeout=poll + self._timeout))
                latest[job_id] = job
                if job.status.is_final or poll == left:
                    break
        return latest

    def cancel(self, job_id: str, *, tenant: str | None = None) -> bool:
        """Cancel a queued or running job; True if this call cancelled it (False: it had ended)."""
        from llmos.errors import JobFinalError

        self._no_tenant(tenant)
        try:
            self._request("DELETE", f"/v1/jobs/{_job_id(job_id)}")
        except JobFinalError:
            return False
        return True

    def retry(self, job_id: str, *, tenant: str | None = None) -> Job:
        """Run a failed job again (POST /v1/jobs/{id}/retry); JobStateError if it is not failed."""
        self._no_tenant(tenant)
        return job_from_json(self._request("POST", f"/v1/jobs/{_job_id(job_id)}/retry"))

    # -- the wire ----------------------------------------------------------------------------
    @staticmethod
    def _no_tenant(tenant: str | None) -> None:
        if tenant is not None:
            raise ValidationError("over HTTP the tenant is the API key's: drop tenant= "
                                  "(connect with a key of that tenant instead)")

    def _request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                 params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """The JSON answer of one call; an LLMOSError for an error answer or no answer."""
        content = None
        if body is not None:
            try:
                content = json.dumps(body, allow_nan=False)
            except (TypeError, ValueError) as exc:  # an argument JSON cannot carry
                raise ValidationError(f"the request cannot be sent as JSON: {exc}") from None
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            resp = self._http.request(method, path, content=content, params=params, headers=headers,
                                      timeout=timeout or self._timeout)
        except httpx.TransportError as exc:
            raise APIUnavailableError(f"cannot reach the LLMOS API at {redact(self.url)}: "
                                      f"{exc or type(exc).__name__}") from None
        if resp.is_success:
            return resp.json()
        raise _error(resp, redact(self.url))


def _error(resp: httpx.Response, url: str) -> LLMOSError:
    """The LLMOSError of an error answer in the API's shape (APIError for anything else)."""
    from llmos.errors import AuthError, ForbiddenError, JobFinalError, QuotaExceededError

    try:
        err = resp.json()["error"]
        code, message, details = err["code"], err["message"], err.get("details") or {}
    except (ValueError, KeyError, TypeError):
        return APIError(f"HTTP {resp.status_code} from {url}: {resp.text[:200]}", status_code=resp.status_code)
    if code == "unauthorized":
        return AuthError(message)
    if code == "forbidden":
        return ForbiddenError(message)
    if code == "quota_exceeded":
        return QuotaExceededError(message, limit=details.get("limit", ""),
                                  retry_after_s=int(details.get("retry_after_s")
                                                    or resp.headers.get("Retry-After", 1)))
    if code == "job_final":
        return JobFinalError(message, status=details.get("status", ""))
    if code == "job_state":
        from llmos.errors import JobStateError

        return JobStateError(message, status=details.get("status", ""))
    if code in _ERRORS:
        return _ERRORS[code](message)
    return APIError(message, status_code=resp.status_code, code=code, details=details)


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def job_from_json(data: dict[str, Any]) -> Job:
    """The `Job` of the API's job JSON (fields the API does not show keep their defaults)."""
    row = {**data, "task_type": data["task"]}
    for name in _DATETIME_FIELDS:
        if row.get(name):
            row[name] = datetime.fromisoformat(row[name])
    return Job.from_row(row)
