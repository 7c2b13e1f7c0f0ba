"""The batch functions over HTTP (`llmos.remote.HTTPClient`): the file goes up with POST /v1/files,
the batch is made (or resumed, by name) with POST /v1/batches, the results come down from
GET /v1/batches/{id}/results. The server does the rest, as for any OpenAI client."""

from __future__ import annotations

import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx

from llmos.batches.core import BatchInfo, RequestCounts
from llmos.errors import ValidationError
from llmos.settings import redact

UPLOAD_TIMEOUT_S = 600.0
"""An upload of a large file, or a batch made of many lines, may take minutes."""


def _at(value: Any) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, timezone.utc)


def batch_of(data: dict[str, Any]) -> BatchInfo:
    """The BatchInfo of the API's Batch object."""
    counts = data.get("request_counts") or {}
    return BatchInfo(
        id=data["id"], name=data.get("name"), status=data["status"],
        request_counts=RequestCounts(counts.get("total", 0), counts.get("completed", 0), counts.get("failed", 0)),
        created_at=_at(data["created_at"]), endpoint=data["endpoint"], tenant="", input_file_id=data["input_file_id"],
        output_file_id=data.get("output_file_id"), error_file_id=data.get("error_file_id"),
        completion_window=data.get("completion_window", "24h"), priority=data.get("priority", 1),
        metadata=data.get("metadata"), errors=data.get("errors"), task_type=data.get("task"), model=data.get("model"),
        expires_at=_at(data.get("expires_at")),
        **{k: _at(data.get(k)) for k in ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                                         "expired_at", "cancelling_at", "cancelled_at")})


def _path(batch_id: str) -> str:
    return "/v1/batches/" + urllib.parse.quote(str(batch_id), safe="")


def _unavailable(client: Any, exc: Exception) -> Exception:
    from llmos.remote import APIUnavailableError

    return APIUnavailableError(f"cannot reach the LLMOS API at {redact(client.url)}: {exc or type(exc).__name__}")


def submit_file(client: Any, path: Path, *, name: str, endpoint: str, task: str | None, model: str | None,
                priority: int | str | None, options: dict | None, retry_failed: bool) -> BatchInfo:
    from llmos.batches.cli import text_name
    from llmos.remote import _error

    try:
        with open(path, "rb") as f:
            resp = client._http.post("/v1/files", files={"file": (text_name(path), f, "application/jsonl")},
                                     data={"purpose": "batch"}, timeout=UPLOAD_TIMEOUT_S)
    except OSError as exc:
        if isinstance(exc, httpx.TransportError):
            raise _unavailable(client, exc) from None
        raise ValidationError(f"cannot read {path}: {exc.strerror or exc}") from None
    except httpx.TransportError as exc:
        raise _unavailable(client, exc) from None
    if not resp.is_success:
        raise _error(resp, redact(client.url))
    file_id = resp.json()["id"]
    body: dict[str, Any] = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
                            "name": name, "retry_failed": retry_failed}
    for key, value in (("priority", priority), ("task", task), ("model", model), ("options", options)):
        if value is not None:
            body[key] = value
    try:
        data = client._request("POST", "/v1/batches", body=body, timeout=UPLOAD_TIMEOUT_S)
    except BaseException:
        _forget(client, file_id)
        raise
    if data["input_file_id"] != file_id:  # resumed: the batch reads the file uploaded first
        _forget(client, file_id)
    return batch_of(data)


def _forget(client: Any, file_id: str) -> None:
    try:
        client._http.delete(f"/v1/files/{urllib.parse.quote(file_id, safe='')}", timeout=30)
    except httpx.TransportError:
        pass


def find_batch(client: Any, name: str) -> BatchInfo | None:
    data = client._request("GET", "/v1/batches", params={"name": name, "limit": 1})["data"]
    return batch_of(data[0]) if data else None


def batch_info(client: Any, batch_id: str) -> BatchInfo:
    return batch_of(client._request("GET", _path(batch_id)))


def cancel(client: Any, batch_id: str) -> BatchInfo:
    return batch_of(client._request("POST", _path(batch_id) + "/cancel"))


def list_batches(client: Any, limit: int) -> list[BatchInfo]:
    return [batch_of(b) for b in client._request("GET", "/v1/batches", params={"limit": min(limit, 100)})["data"]]


def results(client: Any, batch_id: str) -> Iterator[bytes]:
    """The merged results of a final batch, streamed (an LLMOSError before the first byte otherwise)."""
    from llmos.remote import _error

    try:
        with client._http.stream("GET", _path(batch_id) + "/results", timeout=UPLOAD_TIMEOUT_S) as resp:
            if not resp.is_success:
                resp.read()
                raise _error(resp, redact(client.url))
            yield from resp.iter_bytes()
    except httpx.TransportError as exc:
        raise _unavailable(client, exc) from None
