"""Files (OpenAI's Files API for batch input): upload, list, read, download, delete.

An upload is read only after its key is checked, spooled to disk by Starlette's multipart parser
(never whole in memory), then
copied into the database part by part (llmos.batches.store). Its body limit is its own:
LLMOS_FILES_MAX_BYTES plus room for the multipart framing, not LLMOS_API_MAX_BODY_BYTES
(`upload_limit`, given to the BodyLimit middleware in llmos/api/app.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile as StarletteUploadFile

from llmos.api.deps import ClientDep, TenantDep
from llmos.api.routes import AUTHENTICATED, errors
from llmos.batches import core, store
from llmos.batches.settings import get_batch_settings
from llmos.errors import ValidationError

router = APIRouter(prefix="/v1/files", tags=["files"])

UPLOAD_PATH = "/v1/files"
MULTIPART_ROOM = 1 << 20
"""Bytes an upload's body may have beyond LLMOS_FILES_MAX_BYTES: the multipart boundaries and fields."""


def upload_limit() -> int:
    """The body limit of POST /v1/files: the largest file plus the multipart framing."""
    return get_batch_settings().files_max_bytes + MULTIPART_ROOM


class FileOut(BaseModel):
    """OpenAI's File object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def _out(info: store.FileInfo) -> FileOut:
    return FileOut(**info.openai())


_UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "A JSONL file of batch lines."},
                   "purpose": {"type": "string", "description": "Only `batch`."}}}}}}


@router.post("", responses=errors(*AUTHENTICATED), openapi_extra={"requestBody": _UPLOAD_BODY})
async def upload_file(request: Request, tenant: TenantDep, client: ClientDep) -> FileOut:
    """Upload a batch input file (at most LLMOS_FILES_MAX_BYTES and LLMOS_BATCH_MAX_LINES lines).

    The body is read only once the key is checked (the route declares no body parameter, so the
    framework resolves the key first): a client without a valid key cannot make the server spool
    anything."""
    form = await request.form(max_files=1, max_fields=4)
    try:
        file, purpose = form.get("file"), form.get("purpose")
        if not isinstance(file, StarletteUploadFile):
            raise ValidationError("file: required, the JSONL file as a multipart file part")
        if not isinstance(purpose, str):
            raise ValidationError("purpose: required (`batch`)")
        info = await run_in_threadpool(core.upload, client, file.file, tenant=tenant,
                                       filename=file.filename or "file.jsonl", purpose=purpose)
    finally:
        await form.close()
    return _out(info)


@router.get("", responses=errors(*AUTHENTICATED))
def list_files(tenant: TenantDep, client: ClientDep, purpose: str | None = None,
               after: Annotated[str | None, Query(description="A file id: the page after it.")] = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
               order: Literal["asc", "desc"] = "desc") -> FileList:
    """The tenant's files by creation time (newest first by default)."""
    found = store.list_files(client.engine, tenant=tenant, purpose=purpose, after=after, limit=limit + 1, order=order)
    more, page = len(found) > limit, found[:limit]
    return FileList(data=[_out(f) for f in page], first_id=page[0].id if page else None,
                    last_id=page[-1].id if page else None, has_more=more)


@router.get("/{file_id}", responses=errors(*AUTHENTICATED, 404))
def get_file(file_id: str, tenant: TenantDep, client: ClientDep) -> FileOut:
    """One of the tenant's files."""
    return _out(store.get_file(client.engine, file_id, tenant=tenant))


CONTENT: dict[int | str, dict[str, Any]] = {200: {"description": "The file's bytes, streamed.", "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.get("/{file_id}/content", response_class=StreamingResponse,
            responses={**CONTENT, **errors(*AUTHENTICATED, 404)})
def file_content(file_id: str, tenant: TenantDep, client: ClientDep) -> StreamingResponse:
    """The file's body, streamed part by part."""
    info = store.get_file(client.engine, file_id, tenant=tenant)
    return StreamingResponse(store.iter_bytes(client.engine, info.id), media_type="application/octet-stream",
                             headers={"Content-Length": str(info.bytes)})


@router.delete("/{file_id}", responses=errors(*AUTHENTICATED, 404, 409))
def delete_file(file_id: str, tenant: TenantDep, client: ClientDep) -> FileDeleted:
    """Delete a file and its body (409 while an open batch reads it)."""
    core.delete_file(client, file_id, tenant=tenant)
    return FileDeleted(id=file_id, deleted=True)
