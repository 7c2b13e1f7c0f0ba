"""Files and batches: OpenAI's Files and Batch API server side, and the nightly batch files of `llmos batch`.

Owns the `files`, `file_parts`, `batches` and `batch_lines` tables (their rows are written here
only): file bodies stored in the database in ~1 MiB parts (`store`), batch lines parsed into tasks
(`lines`), batches created, submitted, advanced through OpenAI's states and their output and error
files written (`core`), the background thread every API process runs (`Advancer`), and the
`llmos batch` commands (`cli`). Jobs are created through the SDK (`llmos.sdk.Client`) and ended
through `llmos.manager`, which stays the only writer of the jobs table. docs/batch.md says how.

May import llmos.manager, llmos.sdk, llmos.remote, llmos.db, llmos.openai_protocol, llmos.tasks,
llmos.registry, llmos.priority and settings; never llmos.api (the API imports this package).

The functions below take a client: `llmos.sdk.Client` (direct: the database and Redis) or
`llmos.remote.HTTPClient` (the REST API: /v1/files and /v1/batches).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from llmos.batches.core import BatchInfo, RequestCounts
from llmos.batches.errors import BatchNotFoundError, BatchStateError, FileTooLargeError
from llmos.errors import LLMOSError, ValidationError
from llmos.logs import event

__all__ = ["BatchInfo", "RequestCounts", "submit_file", "find_batch", "batch_info", "write_results",
           "cancel", "list_batches", "Advancer", "BatchNotFoundError", "BatchStateError", "FileTooLargeError"]

log = logging.getLogger("llmos.batches")

DETECT_LINES = 20
"""How many of a file's first non-blank lines tell plain lines from OpenAI lines."""


def _is_http(client: Any) -> bool:
    from llmos.remote import HTTPClient

    return isinstance(client, HTTPClient)


def _endpoint_of(path: Path) -> str:
    from llmos.batches import store
    from llmos.batches.lines import detect

    try:
        first = []
        for _, raw in store.iter_path_lines(path):
            first.append(raw)
            if len(first) >= DETECT_LINES:
                break
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror or exc}") from None
    endpoint = detect(first)
    if endpoint is None:
        raise ValidationError(f"{path}: none of its first {DETECT_LINES} lines is a JSON object; "
                              "expected {\"id\", \"text\"} lines or OpenAI batch lines")
    return endpoint


def submit_file(client: Any, path: Path, *, name: str, task: str | None = None, model: str | None = None,
                priority: int | str | None = None, options: dict | None = None, tenant: str | None = None,
                retry_failed: bool = False) -> BatchInfo:
    """Run a JSONL file as the batch `name`: plain lines `{"id", "text"}` (`task` and `model`
    needed, `options` the task's other fields) or OpenAI batch lines (told apart by their fields).

    The same name again resumes that batch (the same file is required): lines already submitted
    are skipped, and failed, cancelled or expired ones run again only with `retry_failed`.
    Returns once every line is submitted (the batch is then in_progress, or final).
    """
    from llmos.batches.lines import PLAIN

    path = Path(path)
    endpoint = _endpoint_of(path)
    if endpoint != PLAIN:
        if task is not None or options:
            raise ValidationError("this file has OpenAI batch lines: they name their model and endpoint; "
                                  "drop --task and --option")
        model = None
    if _is_http(client):
        from llmos.batches import http

        client._no_tenant(tenant)
        return http.submit_file(client, path, name=name, endpoint=endpoint, task=task, model=model,
                                priority=priority, options=options, retry_failed=retry_failed)
    from llmos.batches import core, store
    from llmos.batches.settings import get_batch_settings

    tenant = client._tenant(tenant)
    bs = get_batch_settings()
    found = core.batch_by_name(client, name, tenant=tenant)
    file_id = None
    if found is not None:
        try:
            original = store.get_file(client.engine, found.input_file_id, tenant=tenant)
            if original.sha256 == _sha256(path):
                file_id = original.id  # the same file: resume from what is stored
        except LookupError:
            pass
    uploaded = None
    if file_id is None:
        try:
            with open(path, "rb") as f:
                uploaded = store.put_file(client.engine, f, tenant=tenant, filename=path.name, purpose="batch",
                                          max_bytes=bs.files_max_bytes, max_lines=bs.batch_max_lines)
        except OSError as exc:
            raise ValidationError(f"cannot read {path}: {exc.strerror or exc}") from None
        file_id = uploaded.id
    try:
        info = core.create_batch(client, tenant=tenant, input_file_id=file_id, endpoint=endpoint, name=name,
                                 task=task if endpoint == PLAIN else None, model=model,
                                 options=options if endpoint == PLAIN else None, priority=priority,
                                 retry_failed=retry_failed, settings=bs)
    except BaseException:
        if uploaded is not None:
            made = core.batch_by_name(client, name, tenant=tenant)
            if made is None or made.input_file_id != uploaded.id:
                store._delete(client.engine, uploaded.id)  # refused: the upload is not kept
        raise
    if uploaded is not None and info.input_file_id != uploaded.id:
        store._delete(client.engine, uploaded.id)
    return info


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def find_batch(client: Any, name: str, *, tenant: str | None = None) -> BatchInfo | None:
    """The batch called `name`, as it is now (advanced first), or None."""
    if _is_http(client):
        from llmos.batches import http

        client._no_tenant(tenant)
        return http.find_batch(client, name)
    from llmos.batches import core

    found = core.batch_by_name(client, name, tenant=client._tenant(tenant))
    return None if found is None else batch_info(client, found.id, tenant=tenant)


def batch_info(client: Any, batch_id: str, *, tenant: str | None = None) -> BatchInfo:
    """One batch as it is now, its lifecycle advanced first (BatchNotFoundError for none)."""
    if _is_http(client):
        from llmos.batches import http

        client._no_tenant(tenant)
        return http.batch_info(client, batch_id)
    from llmos.batches import core

    tenant = client._tenant(tenant)
    core.advance_one(client, batch_id, tenant=tenant)
    return core.get_batch(client, batch_id, tenant=tenant)


def write_results(client: Any, batch_id: str, out: Path, *, tenant: str | None = None) -> int:
    """Write every line's result or error to `out` in input order; how many lines.

    BatchStateError (an LLMOSError) if the batch is not final yet. The file appears whole or not
    at all (written beside it, then renamed).
    """
    out = Path(out)
    if _is_http(client):
        from llmos.batches import http

        client._no_tenant(tenant)
        chunks = http.results(client, batch_id)
    else:
        from llmos.batches import core

        tenant = client._tenant(tenant)
        core.advance_one(client, batch_id, tenant=tenant)
        chunks = core.results_of(client, batch_id, tenant=tenant)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    lines = 0
    try:
        with open(partial, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                lines += chunk.count(b"\n")
        os.replace(partial, out)
    except OSError as exc:
        raise LLMOSError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if partial.exists():
            partial.unlink()
    return lines


def cancel(client: Any, batch_id: str, *, tenant: str | None = None) -> BatchInfo:
    """Cancel an open batch: cancelling (queued jobs cancelled), then cancelled once nothing runs."""
    if _is_http(client):
        from llmos.batches import http

        client._no_tenant(tenant)
        return http.cancel(client, batch_id)
    from llmos.batches import core

    return core.cancel_batch(client, batch_id, tenant=client._tenant(tenant))


def list_batches(client: Any, *, limit: int = 20, tenant: str | None = None) -> list[BatchInfo]:
    """The newest `limit` batches, newest first."""
    if _is_http(client):
        from llmos.batches import http

        client._no_tenant(tenant)
        return http.list_batches(client, limit)
    from llmos.batches import core

    return core.list_batches(client, tenant=client._tenant(tenant), limit=limit)[0]


class Advancer:
    """A daemon thread that advances every open batch every LLMOS_BATCH_ADVANCE_S (one per API process)."""

    def __init__(self, client: Any, interval_s: float | None = None) -> None:
        from llmos.batches.settings import get_batch_settings

        self.client = client
        self.interval_s = interval_s or get_batch_settings().batch_advance_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Advancer":
        self._thread = threading.Thread(target=self._run, name="llmos-batch-advancer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        from llmos.batches import core

        while not self._stop.wait(self.interval_s):
            try:
                core.advance_all(self.client)
            except Exception as exc:  # a database or Redis outage: the next pass tries again
                event(log, "batch_advance_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}"[:300])

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
