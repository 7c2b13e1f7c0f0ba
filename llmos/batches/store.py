"""File bodies in the database: the `files` row and its ~1 MiB `file_parts`, streamed in and out.

Every function streams: a file goes in part by part (each part its own short transaction) and
comes out part by part (one query each), so memory stays flat whatever the file's size. A file is
`uploading` until its last part is written, and only then `processed` (seen by reads and lists);
a failed or refused upload deletes what it wrote. Everything is scoped by tenant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from datetime import datetime, timedelta
from typing import Any, BinaryIO, Iterable, Iterator

import sqlalchemy as sa

from llmos.batches.errors import FileNotFoundInStoreError, FileTooLargeError
from llmos.db import UNSTORABLE, begin_write, file_parts, files, storable
from llmos.errors import ValidationError
from llmos.manager import as_utc, db_now

PART_BYTES = 1 << 20
"""Size of each stored part (the last part of a file is smaller)."""

READ_BYTES = 256 * 1024
"""How much is read from a source at once."""

UPLOADING, PROCESSED = "uploading", "processed"
PURPOSES = ("batch", "batch_output")
"""`batch`: an uploaded batch input file; `batch_output`: an output or error file LLMOS wrote."""

STALE_UPLOAD_S = 3600.0
"""An upload not finished after this long is of a process that died: `delete_stale_uploads` removes it."""


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """A stored file's row (not its body)."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    lines: int
    sha256: str | None
    created_at: datetime
    status: str

    @classmethod
    def from_row(cls, m: Any) -> "FileInfo":
        return cls(id=m["id"], tenant=m["tenant"], filename=m["filename"], purpose=m["purpose"],
                   bytes=int(m["bytes"]), lines=int(m["lines"]), sha256=m["sha256"],
                   created_at=as_utc(m["created_at"]), status=m["status"])

    def openai(self) -> dict[str, Any]:
        """OpenAI's File object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(self.created_at.timestamp()),
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": None}


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


class _Counter:
    """Bytes, non-blank lines and sha256 of a body seen chunk by chunk; the line limit checked as it goes."""

    def __init__(self, max_bytes: int, max_lines: int | None) -> None:
        self.max_bytes, self.max_lines = max_bytes, max_lines
        self.bytes = self.lines = 0
        self.sha = hashlib.sha256()
        self._blank_so_far = True  # the current (unfinished) line has only whitespace so far

    def add(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if self.bytes > self.max_bytes:
            raise FileTooLargeError(f"the file is over the limit of {self.max_bytes:,} bytes "
                                    "(LLMOS_FILES_MAX_BYTES); nothing was kept")
        self.sha.update(chunk)
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:  # each ends a line
            if not (self._blank_so_far and not piece.strip()):
                self.lines += 1
            self._blank_so_far = True
        if pieces[-1].strip():
            self._blank_so_far = False
        self._check_lines(self.lines)

    def finish(self) -> None:
        if not self._blank_so_far:  # a last line without a newline
            self.lines += 1
            self._blank_so_far = True
        self._check_lines(self.lines)

    def _check_lines(self, n: int) -> None:
        if self.max_lines is not None and n > self.max_lines:
            raise ValidationError(f"the file has more than {self.max_lines:,} lines, the most a batch file may have "
                                  "(LLMOS_BATCH_MAX_LINES); split it; nothing was kept")


def _chunks_of(source: BinaryIO | Iterable[bytes]) -> Iterator[bytes]:
    if hasattr(source, "read"):
        while True:
            chunk = source.read(READ_BYTES)  # type: ignore[union-attr]
            if not chunk:
                return
            yield chunk
    else:
        yield from source  # type: ignore[misc]


class FileWriter:
    """A new file of `tenant` written chunk by chunk: `write`, then `close` (its row, processed) or `abort`.

    Over `max_bytes`: FileTooLargeError; over `max_lines` non-blank lines: ValidationError; either
    way the caller aborts and nothing is kept.
    """

    def __init__(self, engine: sa.Engine, *, tenant: str, filename: str, purpose: str, max_bytes: int,
                 max_lines: int | None = None) -> None:
        if purpose not in PURPOSES:
            raise ValidationError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
        self.engine, self.tenant = engine, tenant
        self.id = new_file_id()
        self.counter = _Counter(max_bytes, max_lines)
        self._buf, self._part = bytearray(), 0
        with begin_write(engine) as conn:
            conn.execute(files.insert().values(id=self.id, tenant=tenant,
                                               filename=storable(filename or "file.jsonl")[:512],
                                               purpose=purpose, bytes=0, lines=0, created_at=db_now(conn),
                                               status=UPLOADING))

    def write(self, chunk: bytes) -> None:
        self.counter.add(chunk)
        self._buf += chunk
        while len(self._buf) >= PART_BYTES:
            self._flush(bytes(self._buf[:PART_BYTES]))
            del self._buf[:PART_BYTES]

    def _flush(self, data: bytes) -> None:
        with begin_write(self.engine) as conn:
            conn.execute(file_parts.insert().values(file_id=self.id, part=self._part, data=data))
        self._part += 1

    def close(self, *, publish: bool = True) -> FileInfo | None:
        """The last part written, the row's counters; `processed` now, or with `publish=False`
        left `uploading` until the caller's `publish` (None is returned then)."""
        self.counter.finish()
        if self._buf:
            self._flush(bytes(self._buf))
            self._buf.clear()
        c = self.counter
        with begin_write(self.engine) as conn:
            conn.execute(files.update().where(files.c.id == self.id).values(
                bytes=c.bytes, lines=c.lines, sha256=c.sha.hexdigest(), status=PROCESSED if publish else UPLOADING))
        return get_file(self.engine, self.id, tenant=self.tenant) if publish else None

    def abort(self) -> None:
        _delete(self.engine, self.id)


def put_file(engine: sa.Engine, source: BinaryIO | Iterable[bytes], *, tenant: str, filename: str,
             purpose: str, max_bytes: int, max_lines: int | None = None) -> FileInfo:
    """Store `source` (a binary file or byte chunks) as a new file of `tenant`; its row once processed.

    Over a limit (see FileWriter), or on any other error, nothing is kept.
    """
    writer = FileWriter(engine, tenant=tenant, filename=filename, purpose=purpose, max_bytes=max_bytes,
                        max_lines=max_lines)
    try:
        for chunk in _chunks_of(source):
            writer.write(chunk)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def publish(conn: sa.Connection, file_ids: list[str]) -> None:
    """Files written with `close(publish=False)` made `processed`, in the caller's transaction."""
    conn.execute(files.update().where(files.c.id.in_(file_ids), files.c.status == UPLOADING).values(status=PROCESSED))


def get_file(engine: sa.Engine, file_id: str, *, tenant: str) -> FileInfo:
    """One of `tenant`'s processed files (FileNotFoundInStoreError for none, or another tenant's)."""
    if not isinstance(file_id, str) or not file_id or UNSTORABLE.search(file_id):
        raise FileNotFoundInStoreError(f"no file with id {file_id!r}")
    with engine.connect() as conn:
        row = conn.execute(sa.select(files).where(files.c.id == file_id, files.c.tenant == tenant,
                                                  files.c.status == PROCESSED)).first()
    if row is None:
        raise FileNotFoundInStoreError(f"no file with id {file_id!r}")
    return FileInfo.from_row(row._mapping)


def after_clause(engine: sa.Engine, table: sa.Table, after: str, *, tenant: str, what: str,
                 order: str = "desc") -> Any:
    """The keyset condition of a page after the row `after` of `table` (`tenant`'s rows ordered by
    (created_at, id), newest first with order="desc"); ValidationError if `tenant` has no such row."""
    if UNSTORABLE.search(after):
        raise ValidationError(f"after: no {what} with id {after!r}")
    with engine.connect() as conn:
        at = conn.execute(sa.select(table.c.created_at).where(table.c.id == after,
                                                              table.c.tenant == tenant)).scalar()
    if at is None:
        raise ValidationError(f"after: no {what} with id {after!r}")
    key = sa.tuple_(table.c.created_at, table.c.id)
    mark = sa.tuple_(sa.literal(at, table.c.created_at.type), sa.literal(after, table.c.id.type))
    return key < mark if order == "desc" else key > mark


def list_files(engine: sa.Engine, *, tenant: str, purpose: str | None = None, after: str | None = None,
               limit: int = 100, order: str = "desc") -> list[FileInfo]:
    """`tenant`'s processed files by creation (newest first with order="desc"), after the file `after`."""
    cond = [files.c.tenant == tenant, files.c.status == PROCESSED]
    if purpose is not None:
        cond.append(files.c.purpose == purpose)
    key = (files.c.created_at, files.c.id)
    if after is not None:
        cond.append(after_clause(engine, files, after, tenant=tenant, what="file", order=order))
    by = [c.desc() for c in key] if order == "desc" else list(key)
    with engine.connect() as conn:
        return [FileInfo.from_row(r._mapping) for r in conn.execute(sa.select(files).where(*cond).order_by(*by).limit(limit))]


def delete_file(engine: sa.Engine, file_id: str, *, tenant: str) -> None:
    """Delete one of `tenant`'s files and its body (FileNotFoundInStoreError if there is none)."""
    get_file(engine, file_id, tenant=tenant)
    _delete(engine, file_id)


def _delete(engine: sa.Engine, file_id: str) -> None:
    with begin_write(engine) as conn:
        conn.execute(files.delete().where(files.c.id == file_id))
        conn.execute(file_parts.delete().where(file_parts.c.file_id == file_id))


def delete_stale_uploads(engine: sa.Engine) -> int:
    """Remove uploads (and output files) left `uploading` for over STALE_UPLOAD_S (their process
    died); how many. The status is a literal: the query reads the partial index ix_files_uploading."""
    with engine.connect() as conn:
        cutoff = db_now(conn) - timedelta(seconds=STALE_UPLOAD_S)
        ids = [r[0] for r in conn.execute(sa.select(files.c.id).where(
            files.c.status == sa.literal_column(f"'{UPLOADING}'"), files.c.created_at < cutoff).limit(100))]
    for file_id in ids:
        _delete(engine, file_id)
    return len(ids)


def iter_bytes(engine: sa.Engine, file_id: str) -> Iterator[bytes]:
    """The file's body part by part (one query per part: one part in memory at a time)."""
    part = 0
    while True:
        with engine.connect() as conn:
            data = conn.execute(sa.select(file_parts.c.data).where(file_parts.c.file_id == file_id,
                                                                   file_parts.c.part == part)).scalar()
        if data is None:
            return
        yield bytes(data)
        part += 1


def _lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, the line without its newline) of every non-blank line of a body
    given in chunks; a line over `max_line_bytes` is (number, None), and is never held whole
    (what is past the limit is skipped as it comes). Linear in the body's size."""
    number, buf, over, blank = 0, bytearray(), False, True
    for chunk in chunks:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            end = len(chunk) if nl < 0 else nl
            if over:
                blank = blank and not chunk[start:end].strip()
            elif len(buf) + end - start > max_line_bytes:
                over, blank = True, not (buf.strip() or chunk[start:end].strip())
                buf.clear()
            else:
                buf += chunk[start:end]
            if nl < 0:
                break
            number += 1
            if over:
                if not blank:
                    yield number, None
            elif buf.strip():
                yield number, bytes(buf)
            buf.clear()
            over, blank, start = False, True, nl + 1
    if over and not blank:
        yield number + 1, None
    elif not over and buf.strip():
        yield number + 1, bytes(buf)


def _max_line_bytes(value: int | None) -> int:
    if value is not None:
        return value
    from llmos.batches.settings import get_batch_settings

    return get_batch_settings().batch_max_line_bytes


def iter_lines(engine: sa.Engine, file_id: str, max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, the line without its newline) of every non-blank line, in order; a
    line over `max_line_bytes` (default LLMOS_BATCH_MAX_LINE_BYTES) is (number, None)."""
    return _lines(iter_bytes(engine, file_id), _max_line_bytes(max_line_bytes))


def iter_path_lines(path: Any, max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """`iter_lines` for a local file."""
    limit = _max_line_bytes(max_line_bytes)
    with open(path, "rb") as f:
        yield from _lines(iter(lambda: f.read(READ_BYTES), b""), limit)
