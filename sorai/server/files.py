"""/v1/files: upload (multipart, as the openai client sends it), list, retrieve, content,
delete. Batches read their input from here and write their output and error files here."""

from __future__ import annotations

import email.parser
import email.policy

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sorai.server.errors import APIError, bad_request
from sorai.server.files_store import UPLOAD_PURPOSES, FileStore
from sorai.server.responses import list_page
from sorai.server.state import get_state

router = APIRouter()


def file_store(request: Request) -> FileStore:
    """The app's file store, opened on first use."""
    store = getattr(request.app.state, "file_store", None)
    if store is None:
        store = request.app.state.file_store = FileStore(get_state(request).settings.data_path())
    return store


@router.post("/v1/files")
async def upload_file(request: Request) -> Response:
    fields = _form(request.headers.get("content-type", ""), await request.body())
    purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
    if purpose not in UPLOAD_PURPOSES:
        raise bad_request(
            f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}; got {purpose!r}",
            param="purpose",
        )
    if "file" not in fields:
        raise bad_request("missing required parameter 'file' (a multipart file part)", "file")
    filename, data = fields["file"]
    if not data:
        raise bad_request("the uploaded file is empty", param="file")
    return JSONResponse(file_store(request).add(data, filename or "upload", purpose))


def _form(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body -> {field name: (filename, bytes)} (the stdlib's MIME parser:
    no python-multipart dependency for one form)."""
    if not content_type.startswith("multipart/form-data"):
        raise bad_request(
            f"POST /v1/files takes multipart/form-data (fields 'file' and 'purpose'), got "
            f"{content_type or 'no content type'!r}"
        )
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise bad_request("the multipart body could not be read (bad boundary?)")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


@router.get("/v1/files")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = 10000,
    order: str = "desc",
    after: str | None = None,
) -> Response:
    if order not in ("asc", "desc"):
        raise bad_request(f"order must be 'asc' or 'desc', got {order!r}", param="order")
    data = file_store(request).list(purpose)
    if order == "asc":
        data.reverse()
    return list_page(data, limit, after, "file", max_limit=10000)


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> Response:
    return JSONResponse(known_file(request, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    known_file(request, file_id)
    return Response(file_store(request).content(file_id), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> Response:
    if not file_store(request).delete(file_id):
        raise file_not_found(file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


def known_file(request: Request, file_id: str, param: str = "file_id") -> dict:
    record = file_store(request).get(file_id)
    if record is None:
        raise file_not_found(file_id, param)
    return record


def file_not_found(file_id: str, param: str = "file_id") -> APIError:
    return APIError(404, f"no file has the id {file_id!r}", param=param, code="file_not_found")
