"""Batches: create one from a stored file, submit its lines as jobs, advance its lifecycle, write its files.

A batch's row (`batches`) is OpenAI's Batch object; `batch_lines` has one row per non-blank input
line (its job, or why it was refused), so output comes in input order. Lines are read from the
stored input file and submitted through the SDK in chunks (`Client._submit`, an idempotency key per
line: `<batch id>:<attempt>:<custom_id>`), so a crash anywhere is resumed by submitting again: a
line whose job exists is not submitted twice.

States (OpenAI's): validating (lines being submitted) → in_progress → finalizing (writing the
output and error files) → completed; a file with no good line → failed; cancel → cancelling
(queued jobs cancelled) → cancelled once nothing runs; past the completion window → expired
(queued jobs expired; what finished is kept). Every transition is a conditional UPDATE on the
current state; whoever submits lines or writes files holds the batch's lease (`lease_until`, and
`lease_owner`: the token of its take, checked by every renewal and release), so when that
process dies, another one's `advance` takes over once the lease has passed, and a process that
lost its lease stops at its next renewal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import uuid
from datetime import datetime, timedelta
from typing import Any, Iterable, Iterator

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from llmos import manager
from llmos.batches import store
from llmos.batches.errors import BatchNotFoundError, BatchStateError
from llmos.batches.lines import (ENDPOINTS, MAX_BATCH_PRIORITY, PLAIN, BadLine, BatchShape, GoodLine, error_code,
                                 parse_line)
from llmos.batches.settings import BatchSettings, get_batch_settings
from llmos.constants import MAX_IDEMPOTENCY_KEY_CHARS, PRIORITY_NAMES
from llmos.db import UNSTORABLE, batch_lines, batches, begin_write
from llmos.errors import (IdempotencyConflictError, UnknownModelError, UnsupportedTaskError,
                          ValidationError)
from llmos.jobs import JobStatus
from llmos.logs import event
from llmos.manager import as_utc, db_now
from llmos.openai_protocol import Request, response_body
from llmos.priority import parse_priority

log = logging.getLogger("llmos.batches")

COMPLETION_WINDOW = "24h"
WINDOW = timedelta(hours=24)
OPEN = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")
DEFAULT_PRIORITY = PRIORITY_NAMES["batch"]
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_NAME_CHARS = 256
MAX_ERRORS_LISTED = 100
"""At most this many line errors in a failed batch's `errors` (all of them are in its error file)."""

_NOT_DONE = (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED)
_REFUSED = (ValidationError, IdempotencyConflictError, UnknownModelError, UnsupportedTaskError)
"""What a submit raises for its input (not for a service): the line is refused, the others go on."""
RENEW_EVERY = 500
"""Records written between two renewals of the lease while the output and error files are written."""


def _open_statuses() -> Any:
    """`batches.status` among the open states, as SQL literals (so the plan matches ix_batches_open)."""
    return batches.c.status.in_([sa.literal_column(f"'{s}'") for s in OPEN])


def _token() -> str:
    """A lease holder's token (`batches.lease_owner`): renewing and letting go check it."""
    return uuid.uuid4().hex


class _LeaseLost(Exception):
    """Another process took the batch's lease (or its state changed): this one stops."""


class _WindowPassed(Exception):
    """The batch's completion window passed while its lines were submitted: the rest are not."""


@dataclasses.dataclass(frozen=True)
class RequestCounts:
    total: int
    completed: int
    failed: int


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """A batch as it is now: OpenAI's fields (times aware UTC) and LLMOS's name, tenant, priority."""

    id: str
    name: str | None
    status: str
    request_counts: RequestCounts
    created_at: datetime
    endpoint: str
    tenant: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    completion_window: str
    priority: int
    metadata: dict[str, Any] | None
    errors: dict[str, Any] | None
    task_type: str | None
    model: str | None
    expires_at: datetime | None
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL

    def openai(self) -> dict[str, Any]:
        """OpenAI's Batch object (Unix seconds), with LLMOS's `name`, `priority`, `task` and `model`."""
        def unix(at: datetime | None) -> int | None:
            return None if at is None else int(at.timestamp())

        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": self.errors,
                "input_file_id": self.input_file_id, "completion_window": self.completion_window,
                "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": unix(self.created_at), "in_progress_at": unix(self.in_progress_at),
                "expires_at": unix(self.expires_at), "finalizing_at": unix(self.finalizing_at),
                "completed_at": unix(self.completed_at), "failed_at": unix(self.failed_at),
                "expired_at": unix(self.expired_at), "cancelling_at": unix(self.cancelling_at),
                "cancelled_at": unix(self.cancelled_at),
                "request_counts": dataclasses.asdict(self.request_counts), "metadata": self.metadata,
                "name": self.name, "priority": self.priority, "task": self.task_type, "model": self.model}


_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
          "cancelled_at")


def _info(engine: sa.Engine, row: Any) -> BatchInfo:
    m = row._mapping
    if m["status"] in FINAL:
        counts = RequestCounts(m["total"], m["completed_count"], m["failed_count"])
    elif m["status"] == "validating":  # lines still being submitted: counted as they are recorded
        with engine.connect() as conn:
            total, bad, superseded = _counters(conn, m["id"])
        counts = _live_counts(engine, {**m, "total": total, "bad": bad, "superseded": superseded})
    else:
        counts = _live_counts(engine, m)
    return BatchInfo(id=m["id"], name=m["name"], status=m["status"], request_counts=counts,
                     created_at=as_utc(m["created_at"]), endpoint=m["endpoint"], tenant=m["tenant"],
                     input_file_id=m["input_file_id"], output_file_id=m["output_file_id"],
                     error_file_id=m["error_file_id"], completion_window=m["completion_window"],
                     priority=m["priority"], metadata=m["batch_metadata"], errors=m["errors"],
                     task_type=m["task_type"], model=m["model"], expires_at=as_utc(m["expires_at"]),
                     **{t: as_utc(m[t]) for t in _TIMES})


def _live_counts(engine: sa.Engine, m: Any) -> RequestCounts:
    jobs = manager.batch_status_counts(engine, m["id"], tenant=m["tenant"])
    failed = sum(jobs.get(s, 0) for s in _NOT_DONE) - m["superseded"] + m["bad"]
    return RequestCounts(m["total"], jobs.get(JobStatus.SUCCEEDED, 0), max(0, failed))


def _open_jobs(engine: sa.Engine, m: Any) -> int:
    return manager.batch_open_jobs(engine, m["id"], tenant=m["tenant"])


def _row(engine: sa.Engine, batch_id: str, tenant: str | manager._AnyTenant) -> Any:
    if not isinstance(batch_id, str) or UNSTORABLE.search(batch_id):  # no row can have that id
        raise BatchNotFoundError(f"no batch with id {batch_id!r}")
    cond = [batches.c.id == batch_id]
    if tenant is not manager.ANY_TENANT:
        cond.append(batches.c.tenant == tenant)
    with engine.connect() as conn:
        row = conn.execute(sa.select(batches).where(*cond)).first()
    if row is None:
        raise BatchNotFoundError(f"no batch with id {batch_id!r}")
    return row


def _row_by_name(engine: sa.Engine, name: str, tenant: str) -> Any:
    if not isinstance(name, str) or UNSTORABLE.search(name):  # no row can have that name
        return None
    with engine.connect() as conn:
        return conn.execute(sa.select(batches).where(batches.c.tenant == tenant, batches.c.name == name)).first()


def get_batch(client: Any, batch_id: str, *, tenant: str) -> BatchInfo:
    """One of `tenant`'s batches, as it is now (no advancing)."""
    return _info(client.engine, _row(client.engine, batch_id, tenant))


def batch_by_name(client: Any, name: str, *, tenant: str) -> BatchInfo | None:
    row = _row_by_name(client.engine, name, tenant)
    return None if row is None else _info(client.engine, row)


def list_batches(client: Any, *, tenant: str, after: str | None = None, limit: int = 20,
                 name: str | None = None) -> tuple[list[BatchInfo], bool]:
    """`tenant`'s batches newest first after the batch `after`, each advanced first; and whether more follow."""
    engine = client.engine
    cond = [batches.c.tenant == tenant]
    if name is not None:
        if not isinstance(name, str) or UNSTORABLE.search(name):
            return [], False
        cond.append(batches.c.name == name)
    key = (batches.c.created_at, batches.c.id)
    if after is not None:
        cond.append(store.after_clause(engine, batches, after, tenant=tenant, what="batch"))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(batches).where(*cond).order_by(*(c.desc() for c in key))
                            .limit(limit + 1)).all()
    more = len(rows) > limit
    out = []
    for row in rows[:limit]:
        if row.status in OPEN:
            advance_one(client, row.id, tenant=tenant)
            row = _row(engine, row.id, tenant)
        out.append(_info(engine, row))
    return out, more


# --- creating -------------------------------------------------------------------------------------

def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_METADATA_KEY and len(v) <= MAX_METADATA_VALUE
            for k, v in value.items()):
        raise ValidationError(f"metadata: at most {MAX_METADATA_KEYS} string keys (≤ {MAX_METADATA_KEY} chars) "
                              f"with string values (≤ {MAX_METADATA_VALUE} chars)")
    return value


def create_batch(client: Any, *, tenant: str, input_file_id: str, endpoint: str,
                 completion_window: str = COMPLETION_WINDOW, metadata: dict[str, str] | None = None,
                 name: str | None = None, task: str | None = None, model: str | None = None,
                 options: dict[str, Any] | None = None, priority: int | str | None = None,
                 retry_failed: bool = False, settings: BatchSettings | None = None) -> BatchInfo:
    """A batch over one of `tenant`'s stored files, its lines submitted before it returns.

    `name` (unique per tenant): a batch of that name already there is resumed instead (the same
    file: its lines already submitted are skipped; with `retry_failed` its failed, cancelled and
    expired lines run again). `priority` (else `metadata["priority"]`, else `batch`) is every
    line's default. Plain lines (`endpoint` /v1/jobs) need `task` and `model` (`options`: the
    task's other fields).
    """
    bs = settings or get_batch_settings()
    engine = client.engine
    if endpoint not in ENDPOINTS:
        raise ValidationError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    if completion_window != COMPLETION_WINDOW:
        raise ValidationError(f"completion_window: only {COMPLETION_WINDOW!r} is supported, got {completion_window!r}")
    metadata = _metadata(metadata)
    if priority is None and metadata and "priority" in metadata:
        priority = metadata["priority"]
    prio = DEFAULT_PRIORITY if priority is None else parse_priority(priority)
    if prio > MAX_BATCH_PRIORITY:  # batch jobs skip the queue cap and shedding: they may not run high
        raise ValidationError(f"priority: a batch runs at normal ({MAX_BATCH_PRIORITY}) or lower, got {prio}")
    if endpoint == PLAIN:
        if not task or not model:
            raise ValidationError("plain lines ({\"id\", \"text\"}) need a task and a model (--task, --model)")
        from llmos.tasks import task_class

        task_class(task)
        client.registry.get(model).require_task(task)
        if options is not None and not isinstance(options, dict):
            raise ValidationError("options: an object of the task's other fields")
    elif task is not None or model is not None or options:
        raise ValidationError(f"task, model and options are for plain lines (endpoint {PLAIN}); "
                              f"OpenAI lines name their model in their body")
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS
                             or UNSTORABLE.search(name)):
        raise ValidationError(f"name: 1–{MAX_NAME_CHARS} characters, no NUL or lone surrogate")
    if not isinstance(input_file_id, str) or UNSTORABLE.search(input_file_id):
        raise ValidationError(f"input_file_id: no file has the id {input_file_id!r}")
    source = store.get_file(engine, input_file_id, tenant=tenant)
    if source.purpose != "batch":
        raise ValidationError(f"input_file_id: file {input_file_id} has purpose {source.purpose!r}, not 'batch'")
    if name is not None:
        found = _row_by_name(engine, name, tenant)
        if found is not None:
            return _resume(client, found, source, endpoint, task, model, retry_failed, bs)
    batch_id, token = "batch_" + uuid.uuid4().hex, _token()
    try:
        with begin_write(engine) as conn:
            now = db_now(conn)
            conn.execute(batches.insert().values(
                id=batch_id, tenant=tenant, name=name, endpoint=endpoint, input_file_id=source.id,
                input_sha256=source.sha256, completion_window=completion_window, status="validating",
                priority=prio, task_type=task, model=model, options=options, batch_metadata=metadata,
                created_at=now, expires_at=now + WINDOW, lease_until=now + timedelta(seconds=bs.batch_lease_s),
                lease_owner=token))
    except sa.exc.IntegrityError:  # a concurrent create of the same name: that one is the batch
        found = _row_by_name(engine, name, tenant) if name is not None else None
        if found is None:
            raise
        return _resume(client, found, source, endpoint, task, model, retry_failed, bs)
    event(log, "batch_created", batch_id=batch_id, tenant=tenant, endpoint=endpoint, lines=source.lines)
    _submit_lines(client, batch_id, tenant, token, retry_failed=False, bs=bs)
    return get_batch(client, batch_id, tenant=tenant)


def _resume(client: Any, row: Any, source: store.FileInfo, endpoint: str, task: str | None,
            model: str | None, retry_failed: bool, bs: BatchSettings) -> BatchInfo:
    engine = client.engine
    if (row.endpoint, row.task_type, row.model) != (endpoint, task, model):
        raise ValidationError(f"batch {row.name!r} ({row.id}) runs {row.endpoint}"
                              f"{f' {row.task_type} on {row.model}' if row.task_type else ''}; "
                              "resume it with the same task and model, or use another name")
    if row.input_sha256 != source.sha256:  # kept on the row: compared even once the input is deleted
        raise ValidationError(f"this file differs from the one batch {row.name!r} ({row.id}) was made from; "
                              "resume it with the same file, or use another name for a new batch")
    try:
        store.get_file(engine, row.input_file_id, tenant=row.tenant)
    except LookupError:  # the input was deleted: the same bytes, uploaded again, take its place
        with begin_write(engine) as conn:
            conn.execute(batches.update().where(batches.c.id == row.id).values(input_file_id=source.id))
    status, token = row.status, _token()
    if status in FINAL:
        if not retry_failed or status == "failed" and row.total == row.bad:
            return _info(engine, row)
        _reopen(client, row, bs, token)
    elif status != "validating" and not retry_failed:
        return _info(engine, row)  # every line is submitted already
    elif status not in ("validating", "in_progress"):
        return _info(engine, row)  # finalizing or cancelling: nothing to resume
    else:
        # in_progress with retry_failed: validating again until every line is seen; validating (a
        # submit that died, or is slow): this call takes over. Either way the lease is taken in the
        # same UPDATE, so no writer of the files and no other submitter runs beside this one (a
        # submitter it took over from stops at its next renewal).
        with begin_write(engine) as conn:
            now = db_now(conn)
            took = conn.execute(batches.update().where(batches.c.id == row.id, batches.c.status == status)
                                .values(status="validating", lease_owner=token,
                                        lease_until=now + timedelta(seconds=bs.batch_lease_s))).rowcount
        if not took:
            raise BatchStateError(f"batch {row.id} changed meanwhile; try again", status=status)
    event(log, "batch_resumed", batch_id=row.id, tenant=row.tenant, retry_failed=retry_failed)
    _submit_lines(client, row.id, row.tenant, token, retry_failed=retry_failed, bs=bs)
    return get_batch(client, row.id, tenant=row.tenant)


def _reopen(client: Any, row: Any, bs: BatchSettings, token: str) -> None:
    """A final batch back to validating (its lines to retry), its old output and error files deleted."""
    engine = client.engine
    with begin_write(engine) as conn:
        now = db_now(conn)
        done = conn.execute(batches.update().where(batches.c.id == row.id, batches.c.status == row.status).values(
            status="validating", expires_at=now + WINDOW, output_file_id=None, error_file_id=None, errors=None,
            lease_until=now + timedelta(seconds=bs.batch_lease_s), lease_owner=token,
            **{t: None for t in _TIMES})).rowcount
    if not done:
        raise BatchStateError(f"batch {row.id} changed meanwhile; try again", status=row.status)
    for file_id in (row.output_file_id, row.error_file_id):
        if file_id:
            try:
                store.delete_file(engine, file_id, tenant=row.tenant)
            except LookupError:
                pass


def idempotency_key(batch_id: str, attempt: int, custom_id: str) -> str:
    """The key of one line's job: the batch, the line's attempt (0, then one more per retry), its custom_id."""
    key = f"{batch_id}:{attempt}:{custom_id}"
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        key = f"{batch_id}:{attempt}:sha256:{hashlib.sha256(custom_id.encode()).hexdigest()}"
    return key


def _shape(row: Any) -> BatchShape:
    return BatchShape(endpoint=row.endpoint, priority=row.priority, task_type=row.task_type, model=row.model,
                      options=row.options)


def _chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _renew(engine: sa.Engine, batch_id: str, token: str, bs: BatchSettings, status: str = "validating") -> bool:
    """Hold the batch's lease a while longer, if it is still ours and the batch still `status`."""
    with begin_write(engine) as conn:
        now = db_now(conn)
        return bool(conn.execute(batches.update().where(
            batches.c.id == batch_id, batches.c.status == status, batches.c.lease_owner == token)
            .values(lease_until=now + timedelta(seconds=bs.batch_lease_s))).rowcount)


def _let_go(engine: sa.Engine, batch_id: str, token: str) -> None:
    """Give the lease up, if it is still ours (another process may have taken it meanwhile)."""
    with begin_write(engine) as conn:
        conn.execute(batches.update().where(batches.c.id == batch_id, batches.c.lease_owner == token)
                     .values(lease_until=None, lease_owner=None))


def _insert_ignoring(conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    """Insert batch_lines rows; a row another process wrote first stays as it is."""
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(batch_lines).on_conflict_do_nothing(), rows)


def _submit_lines(client: Any, batch_id: str, tenant: str, token: str, *, retry_failed: bool,
                  bs: BatchSettings) -> None:
    """Submit the batch's lines not yet submitted (and with `retry_failed` re-run its failed ones)
    in chunks, then move it on: in_progress, or failed if no line was good. Flat in memory: one
    chunk of lines at a time, and a set of 8-byte hashes of the custom_ids (duplicates are refused).

    The caller holds the lease (`token`); it is renewed before each chunk and each submit call,
    and whoever lost it (a cancel, a takeover) stops there. Past the batch's window the submit
    stops too: the batch moves on with the lines recorded so far, and expires.

    A custom_id is taken by the first line that names it, whether that line runs or is refused,
    on the first pass and on a resume alike (a resume rebuilds the same set from the recorded
    lines), so no line's job is ever left without its line."""
    engine = client.engine
    row = _row(engine, batch_id, tenant)
    shape, expires = _shape(row), as_utc(row.expires_at)
    seen: set[bytes] = set()

    def renew() -> None:
        if not _renew(engine, batch_id, token, bs):
            raise _LeaseLost

    try:
        if db_now(engine) >= expires:  # stuck in validating past its window: on, to expire
            raise _WindowPassed
        for chunk in _chunked(store.iter_lines(engine, row.input_file_id, bs.batch_max_line_bytes),
                              bs.batch_chunk_lines):
            renew()
            now = db_now(engine)
            if now >= expires:
                raise _WindowPassed
            _submit_one_chunk(client, row, tenant, chunk, shape, expires, now, seen, retry_failed, renew)
    except _WindowPassed:
        event(log, "batch_submit_expired", logging.WARNING, batch_id=batch_id)
    except _LeaseLost:
        _let_go(engine, batch_id, token)  # cancelled meanwhile, or taken over: let go at once
        event(log, "batch_submit_stopped", batch_id=batch_id)
        return
    _submitted(client, batch_id, tenant, token)


def _submit_one_chunk(client: Any, row: Any, tenant: str, chunk: list[tuple[int, bytes | None]], shape: BatchShape,
                      expires: datetime, now: datetime, seen: set[bytes], retry_failed: bool, renew: Any) -> None:
    engine, batch_id = client.engine, row.id
    first, last = chunk[0][0], chunk[-1][0]
    with engine.connect() as conn:
        existing = {r.line: r for r in conn.execute(sa.select(batch_lines).where(
            batch_lines.c.batch_id == batch_id, batch_lines.c.line.between(first, last)))}
    statuses = {}
    if retry_failed:
        statuses = manager.job_statuses(engine, [r.job_id for r in existing.values() if r.job_id], tenant=tenant)
    new_rows: list[dict[str, Any]] = []
    todo: list[tuple[GoodLine, int, bool]] = []  # (line, attempt, a retry)
    for number, raw in chunk:
        old = existing.get(number)
        if old is not None:
            if old.custom_id is not None:  # taken, as it was on the pass that recorded it
                seen.add(_digest(old.custom_id))
            if retry_failed and old.job_id and statuses.get(str(old.job_id)) in _NOT_DONE:
                parsed = parse_line(raw, number, shape, client.registry, now)
                if isinstance(parsed, GoodLine):
                    todo.append((parsed, old.attempt + 1, True))
            continue
        parsed = parse_line(raw, number, shape, client.registry, now)
        if parsed.custom_id is not None:
            digest = _digest(parsed.custom_id)
            if digest in seen:
                parsed = BadLine(number, parsed.custom_id, "duplicate_custom_id",
                                 f"custom_id {parsed.custom_id!r} is taken by an earlier line; each must be unique")
            else:
                seen.add(digest)
        if isinstance(parsed, BadLine):
            new_rows.append(_bad_row(batch_id, parsed))
        else:
            todo.append((parsed, 0, False))
    retried = _submit_chunk(client, row, tenant, todo, expires, new_rows, renew)
    renew()  # still ours: record what was submitted
    with begin_write(engine) as conn:
        _insert_ignoring(conn, new_rows)
        for line, attempt, job_id in retried:
            conn.execute(batch_lines.update().where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.line == line,
                batch_lines.c.attempt == attempt - 1).values(job_id=job_id, attempt=attempt))


def _bad_row(batch_id: str, bad: BadLine) -> dict[str, Any]:
    return dict(batch_id=batch_id, line=bad.line, custom_id=bad.custom_id, job_id=None, attempt=0, error=bad.error())


def _digest(custom_id: str) -> bytes:
    return hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _submit_chunk(client: Any, row: Any, tenant: str, todo: list[tuple[GoodLine, int, bool]],
                  expires: datetime, new_rows: list[dict[str, Any]], renew: Any = None) -> list[tuple[int, int, str]]:
    """Submit one chunk's good lines, grouped by model, priority and deadline; new lines' rows go to
    `new_rows`; returns (line, attempt, job id) of the retried ones.

    A group the submit refuses as input (a ValidationError, an idempotency conflict) is submitted
    again line by line: the lines it refuses are recorded as bad lines, the others run (a retried
    line it refuses keeps its earlier job)."""
    groups: dict[tuple[str, int, datetime], list[tuple[GoodLine, int, bool]]] = {}
    for item in todo:
        g = item[0]
        deadline = expires if g.deadline is None else min(g.deadline, expires)
        groups.setdefault((g.model, g.priority, deadline), []).append(item)
    retried = []

    def submit(model: str, priority: int, deadline: datetime, items: list[tuple[GoodLine, int, bool]]) -> list[Any]:
        handles, _ = client._submit(  # warn=False: no worker yet only means the jobs wait queued
            model, [g.task for g, _, _ in items], priority=priority,
            idempotency_key=[idempotency_key(row.id, attempt, g.custom_id) for g, attempt, _ in items],
            tenant=tenant, batch_id=row.id, timeout_s=None, deadline=deadline, max_attempts=3, warn=False)
        return handles

    for (model, priority, deadline), items in groups.items():
        if renew is not None:
            renew()
        try:
            done = list(zip(items, submit(model, priority, deadline, items)))
        except _REFUSED:
            done = []
            for item in items:  # one line at a time: only the lines at fault are refused
                try:
                    done.append((item, submit(model, priority, deadline, [item])[0]))
                except _REFUSED as exc:
                    g, _, retry = item
                    if not retry:
                        new_rows.append(_bad_row(row.id, BadLine(g.line, g.custom_id, error_code(exc),
                                                                 " ".join(str(exc).split()))))
        for (g, attempt, retry), handle in done:
            if retry:
                retried.append((g.line, attempt, handle.id))
            else:
                new_rows.append(dict(batch_id=row.id, line=g.line, custom_id=g.custom_id, job_id=handle.id,
                                     attempt=0, error=None))
    return retried


def _counters(conn: sa.Connection, batch_id: str) -> tuple[int, int, int]:
    """(lines, refused lines, superseded jobs) of a batch, from its batch_lines."""
    total, jobs, retries = conn.execute(sa.select(
        sa.func.count(), sa.func.count(batch_lines.c.job_id), sa.func.coalesce(sa.func.sum(batch_lines.c.attempt), 0))
        .where(batch_lines.c.batch_id == batch_id)).one()
    return int(total), int(total) - int(jobs), int(retries)


def _submitted(client: Any, batch_id: str, tenant: str, token: str) -> None:
    """Every line seen: the counters written, validating → in_progress (or failed: no good line),
    if the lease is still ours. Past its window it goes in_progress whatever it holds (advance
    then expires it)."""
    engine = client.engine
    with begin_write(engine) as conn:
        total, bad, superseded = _counters(conn, batch_id)
        values: dict[str, Any] = dict(total=total, bad=bad, superseded=superseded, lease_until=None,
                                      lease_owner=None)
        now = db_now(conn)
        expired = now >= as_utc(conn.execute(sa.select(batches.c.expires_at).where(batches.c.id == batch_id)).scalar())
        if total == bad and not expired:
            errors = [dict(r.error or {}, line=r.line, param=None) for r in conn.execute(
                sa.select(batch_lines.c.line, batch_lines.c.error).where(batch_lines.c.batch_id == batch_id)
                .order_by(batch_lines.c.line).limit(MAX_ERRORS_LISTED))]
            if not errors:
                errors = [{"code": "empty_file", "message": "the input file has no line", "line": None, "param": None}]
            values.update(status="finalizing", errors={"object": "list", "data": errors})
        else:
            values.update(status="in_progress", in_progress_at=now)
        moved = conn.execute(batches.update().where(batches.c.id == batch_id, batches.c.status == "validating",
                                                    batches.c.lease_owner == token).values(**values)).rowcount
    if not moved:
        event(log, "batch_submit_stopped", batch_id=batch_id)
        return
    if values["status"] == "finalizing":  # the error file, then failed
        _close(client, _row(engine, batch_id, tenant), "finalizing", "failed")
    event(log, "batch_submitted", batch_id=batch_id, lines=total, refused=bad)


# --- advancing ------------------------------------------------------------------------------------

def advance_one(client: Any, batch_id: str, *, tenant: str | manager._AnyTenant) -> None:
    """Move one batch on as far as it can go now (a no-op for a final one, or one another process holds)."""
    engine = client.engine
    row = _row(engine, batch_id, tenant)
    status = row.status
    now = db_now(engine)
    leased = row.lease_until is not None and as_utc(row.lease_until) > now
    bs = get_batch_settings()
    if status == "validating":
        if not leased:  # whoever submitted its lines died: take over (past the window: to expire it)
            token = _token()
            with begin_write(engine) as conn:
                took = conn.execute(batches.update().where(
                    batches.c.id == row.id, batches.c.status == "validating",
                    sa.or_(batches.c.lease_until.is_(None), batches.c.lease_until <= now))
                    .values(lease_until=now + timedelta(seconds=bs.batch_lease_s), lease_owner=token)).rowcount
            if took:
                event(log, "batch_submit_taken_over", batch_id=row.id)
                _submit_lines(client, row.id, row.tenant, token, retry_failed=False, bs=bs)
        return
    if status == "in_progress":
        # completion first: a batch whose jobs all ended in time is completed, whenever it is advanced
        past = now >= as_utc(row.expires_at)
        if _open_jobs(engine, row._mapping) == 0:
            _close(client, row, "in_progress", "expired" if past and _ran_out(client, row) else "completed")
        elif past:
            manager.end_queued_batch_jobs(engine, row.id, tenant=row.tenant, status=JobStatus.EXPIRED,
                                          error="expired: the batch's completion window passed before it started")
            if _open_jobs(engine, row._mapping) == 0:
                _close(client, row, "in_progress", "expired")
        return
    if status == "cancelling":
        manager.end_queued_batch_jobs(engine, row.id, tenant=row.tenant, status=JobStatus.CANCELLED,
                                      error="cancelled: its batch was cancelled")
        if not leased and _open_jobs(engine, row._mapping) == 0:  # a submit in flight holds the lease
            _close(client, row, "cancelling", "cancelled")
        return
    if status == "finalizing" and not leased:  # the writer died: write the files again
        _close(client, row, "finalizing", "failed" if row.errors else "completed")


def _ran_out(client: Any, row: Any) -> bool:
    """Whether the window cut the batch short: a job of it expired, or lines were never submitted."""
    if manager.batch_status_counts(client.engine, row.id, tenant=row.tenant).get(JobStatus.EXPIRED, 0):
        return True
    try:
        lines = store.get_file(client.engine, row.input_file_id, tenant=row.tenant).lines
    except LookupError:
        return False
    with client.engine.connect() as conn:
        return _counters(conn, row.id)[0] < lines


def advance_all(client: Any, *, limit: int = 100) -> int:
    """Advance every open batch of every tenant (the API's background thread); how many it looked at.

    Walks all of them, `limit` ids at a time (a keyset over the id), and one batch's failure is
    logged and skipped: it stops neither the pass nor the stale uploads' cleanup after it."""
    engine = client.engine
    seen, after = 0, ""
    while True:
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(sa.select(batches.c.id).where(_open_statuses(), batches.c.id > after)
                                              .order_by(batches.c.id).limit(limit))]
        for batch_id in ids:
            try:
                advance_one(client, batch_id, tenant=manager.ANY_TENANT)
            except BatchNotFoundError:
                pass
            except Exception as exc:  # this batch's problem (or a passing outage): the next pass tries again
                event(log, "batch_advance_failed", logging.WARNING, batch_id=batch_id,
                      error=f"{type(exc).__name__}: {exc}"[:300])
        seen += len(ids)
        if len(ids) < limit:
            break
        after = ids[-1]
    try:
        store.delete_stale_uploads(engine)
    except Exception as exc:
        event(log, "stale_uploads_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}"[:300])
    return seen


def cancel_batch(client: Any, batch_id: str, *, tenant: str) -> BatchInfo:
    """validating or in_progress → cancelling (queued jobs cancelled), → cancelled once nothing runs."""
    engine = client.engine
    row = _row(engine, batch_id, tenant)
    if row.status in FINAL:
        raise BatchStateError(f"batch {batch_id} is already {row.status}; only an open batch can be cancelled",
                              status=row.status)
    with begin_write(engine) as conn:
        conn.execute(batches.update().where(batches.c.id == batch_id,
                                            batches.c.status.in_([sa.literal_column("'validating'"),
                                                                  sa.literal_column("'in_progress'")]))
                     .values(status="cancelling", cancelling_at=db_now(conn)))
    event(log, "batch_cancel", batch_id=batch_id, tenant=tenant)
    advance_one(client, batch_id, tenant=tenant)
    return get_batch(client, batch_id, tenant=tenant)


def _close(client: Any, row: Any, from_status: str, to_status: str) -> None:
    """Write the output and error files under the lease, then `to_status` with the final counts.

    Completed goes through finalizing (OpenAI's state while the files are written). The lease is
    taken only once it has passed (so never while a submit of the batch holds it) and renewed every
    RENEW_EVERY records; the files stay `uploading` (invisible, and removed by the stale-upload
    cleanup if this process dies) until the UPDATE that points the batch at them publishes them."""
    engine = client.engine
    bs = get_batch_settings()
    token = _token()
    with begin_write(engine) as conn:
        now = db_now(conn)
        values: dict[str, Any] = dict(lease_until=now + timedelta(seconds=bs.batch_lease_s), lease_owner=token)
        if to_status == "completed" and from_status == "in_progress":
            values.update(status="finalizing", finalizing_at=now)
        took = conn.execute(batches.update().where(
            batches.c.id == row.id, batches.c.status == from_status,
            sa.or_(batches.c.lease_until.is_(None), batches.c.lease_until <= now)).values(**values)).rowcount
    if not took:
        return  # another process is at it
    held = values.get("status", from_status)

    def renew() -> None:
        if not _renew(engine, row.id, token, bs, status=held):
            raise _LeaseLost

    written: list[str] = []
    done = 0
    try:
        with begin_write(engine) as conn:  # (a batch cancelled while its lines were submitted: counted now)
            total, bad, superseded = _counters(conn, row.id)
            conn.execute(batches.update().where(batches.c.id == row.id).values(
                total=total, bad=bad, superseded=superseded))
        row = _row(engine, row.id, row.tenant)
        counts = _live_counts(engine, row._mapping)
        output = _write_file(client, row, ok=True, name=f"{row.id}_output.jsonl", renew=renew)
        if output is not None:
            written.append(output)
        errors = _write_file(client, row, ok=False, name=f"{row.id}_error.jsonl", renew=renew)
        if errors is not None:
            written.append(errors)
        with begin_write(engine) as conn:
            now = db_now(conn)
            done = conn.execute(batches.update().where(
                batches.c.id == row.id, batches.c.status == held, batches.c.lease_owner == token).values(
                status=to_status, **{f"{to_status}_at": now}, lease_until=None, lease_owner=None,
                output_file_id=output, error_file_id=errors,
                completed_count=counts.completed, failed_count=counts.failed)).rowcount
            if done and written:
                store.publish(conn, written)
    except _LeaseLost:
        pass
    except BaseException:
        for file_id in written:
            store._delete(engine, file_id)
        raise
    if not done:
        for file_id in written:
            store._delete(engine, file_id)
        return
    event(log, "batch_final", batch_id=row.id, status=to_status, total=counts.total,
          completed=counts.completed, failed=counts.failed)


def _write_file(client: Any, row: Any, *, ok: bool, name: str, renew: Any = None) -> str | None:
    """The output (ok lines) or error file (the others) of a batch, left `uploading` (the caller
    publishes it); its id, None if it would be empty. `renew` is called every RENEW_EVERY records."""
    writer = store.FileWriter(client.engine, tenant=row.tenant, filename=name, purpose="batch_output",
                              max_bytes=2**62)
    try:
        buf = bytearray()
        for n, (good, record) in enumerate(result_records(client, row), 1):
            if renew is not None and n % RENEW_EVERY == 0:
                renew()
            if good == ok:
                buf += json.dumps(record, ensure_ascii=False).encode() + b"\n"
                if len(buf) >= store.READ_BYTES:
                    writer.write(bytes(buf))
                    buf.clear()
        if buf:
            writer.write(bytes(buf))
        if writer.counter.bytes == 0:
            writer.abort()
            return None
        writer.close(publish=False)
        return writer.id
    except BaseException:
        writer.abort()
        raise


def result_records(client: Any, row: Any, chunk: int = 500) -> Iterator[tuple[bool, dict[str, Any]]]:
    """(good, record) per input line in input order: an output line, or an error line.

    OpenAI batches: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`;
    plain batches: `{"id": the line's id, "result", "error"}`. Errors are OpenAI's BatchError shape
    `{"code", "message", "line", "param"}`.
    """
    engine = client.engine
    plain = row.endpoint == PLAIN
    inputs = None if plain else _input_bodies(engine, row)
    last = 0
    while True:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(batch_lines).where(batch_lines.c.batch_id == row.id,
                                                             batch_lines.c.line > last)
                                .order_by(batch_lines.c.line).limit(chunk)).all()
        if not rows:
            return
        last = rows[-1].line
        jobs = manager.get_jobs(engine, [str(r.job_id) for r in rows if r.job_id], tenant=row.tenant)
        for r in rows:
            body = _body_for(inputs, r.line) if inputs is not None else None
            yield _record(row, r, jobs.get(str(r.job_id)) if r.job_id else None, body, plain)


def _input_bodies(engine: sa.Engine, row: Any) -> Iterator[tuple[int, dict[str, Any]]] | None:
    try:
        store.get_file(engine, row.input_file_id, tenant=row.tenant)
    except LookupError:
        return None

    def bodies() -> Iterator[tuple[int, dict[str, Any]]]:
        for number, raw in store.iter_lines(engine, row.input_file_id):
            try:
                body = json.loads(raw).get("body") if raw is not None else None
            except (ValueError, AttributeError, RecursionError):
                body = None
            yield number, body if isinstance(body, dict) else {}
    return _Cursor(bodies())


class _Cursor:
    """The input's bodies read forward in step with the batch's lines (both in line order)."""

    def __init__(self, it: Iterator[tuple[int, dict[str, Any]]]) -> None:
        self.it, self.current = it, (0, {})

    def at(self, line: int) -> dict[str, Any]:
        while self.current[0] < line:
            nxt = next(self.it, None)
            if nxt is None:
                return {}
            self.current = nxt
        return self.current[1] if self.current[0] == line else {}


def _body_for(inputs: Any, line: int) -> dict[str, Any]:
    return inputs.at(line)


_JOB_ERRORS = {JobStatus.EXPIRED: "batch_expired", JobStatus.CANCELLED: "batch_cancelled"}


def _record(batch: Any, line: Any, job: Any, body: dict[str, Any] | None, plain: bool) -> tuple[bool, dict[str, Any]]:
    custom_id = line.custom_id
    error = None
    if line.job_id is None:
        error = dict(line.error or {"code": "invalid_request", "message": "refused"}, line=line.line, param=None)
    elif job is None:
        error = {"code": "job_not_found", "message": f"job {line.job_id} is gone (pruned?)", "line": line.line,
                 "param": None}
    elif job.status in _JOB_ERRORS:
        error = {"code": _JOB_ERRORS[job.status], "message": job.error or job.status.value, "line": line.line,
                 "param": None}
    if plain:
        if error is None and job.status != JobStatus.SUCCEEDED:
            error = {"code": f"job_{job.status.value}", "message": job.error or job.status.value,
                     "line": line.line, "param": None}
        if error is not None:
            return False, {"id": custom_id, "result": None, "error": error}
        return True, {"id": custom_id, "result": job.result, "error": None}
    req_id = "batch_req_" + (job.id.replace("-", "") if job is not None else
                             uuid.uuid5(uuid.NAMESPACE_URL, f"{batch.id}/{line.line}").hex)
    if error is not None:
        return False, {"id": req_id, "custom_id": custom_id, "response": None, "error": error}
    if job.status != JobStatus.SUCCEEDED:
        return False, {"id": req_id, "custom_id": custom_id, "error": None, "response": {
            "status_code": 500, "request_id": job.id,
            "body": {"error": {"message": job.error or job.status.value, "type": "server_error",
                               "code": f"job_{job.status.value}", "param": None}}}}
    body = body or {}
    request = Request(batch.endpoint, body.get("model") if isinstance(body.get("model"), str) else job.model, [],
                      encoding_format="base64" if body.get("encoding_format") == "base64" else "float")
    return True, {"id": req_id, "custom_id": custom_id, "error": None, "response": {
        "status_code": 200, "request_id": job.id, "body": response_body(request, [job])}}


def results_of(client: Any, batch_id: str, *, tenant: str) -> Iterator[bytes]:
    """Every line's record (good or not) in input order, one JSON line each (BatchStateError unless final)."""
    row = _row(client.engine, batch_id, tenant)
    if row.status not in FINAL:
        raise BatchStateError(f"batch {batch_id} is {row.status}; its results are ready once it is final "
                              f"(completed, failed, expired or cancelled)", status=row.status)
    for _, record in result_records(client, row):
        yield json.dumps(record, ensure_ascii=False).encode() + b"\n"


# --- files, as the API and the CLI use them -------------------------------------------------------

def upload(client: Any, source: Any, *, tenant: str, filename: str, purpose: str = "batch",
           settings: BatchSettings | None = None) -> store.FileInfo:
    """Store an uploaded batch input file (only purpose `batch` is uploaded), within the limits."""
    bs = settings or get_batch_settings()
    if purpose != "batch":
        raise ValidationError(f"purpose: only 'batch' is supported, got {purpose!r}")
    return store.put_file(client.engine, source, tenant=tenant, filename=filename, purpose=purpose,
                          max_bytes=bs.files_max_bytes, max_lines=bs.batch_max_lines)


def delete_file(client: Any, file_id: str, *, tenant: str) -> None:
    """Delete one of `tenant`'s files, unless an open batch reads it (FileInUseError)."""
    from llmos.batches.errors import FileInUseError

    engine = client.engine
    store.get_file(engine, file_id, tenant=tenant)
    with engine.connect() as conn:
        user = conn.execute(sa.select(batches.c.id).where(
            batches.c.tenant == tenant, batches.c.input_file_id == file_id, _open_statuses())).scalar()
    if user is not None:
        raise FileInUseError(f"file {file_id} is the input of batch {user}, still open; delete it once the batch is final")
    store.delete_file(engine, file_id, tenant=tenant)
