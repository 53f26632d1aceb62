"""/v1/vector_stores: a vector store is a `sorai index` file built from uploaded files (under
<data dir>/vector_stores/), embedded by the server's own embedding model; file_search reads it.

Each attached file is copied to <store>/<file id>/<its filename>, so an index hit's path names
its file id and name. Files are indexed in the background, one at a time per store, as in
OpenAI's API: a store and its files are answered "in_progress" at once and turn "completed"
(or the file "failed") when indexed; a restarted server indexes the ones it left unfinished."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sorai.apps.rag.ingest import add_files
from sorai.apps.rag.store import Index
from sorai.server.body import read_json
from sorai.server.errors import APIError
from sorai.server.files import file_store, known_file
from sorai.server.protocol import _Request
from sorai.server.responses import list_page

router = APIRouter()
logger = logging.getLogger("sorai.server")


class _ServerEmbedder:
    """The index's Embedder over the server's embedding engine (called from worker threads,
    so each call is handed to the event loop the engine's futures live on)."""

    def __init__(self, app: FastAPI, loop: asyncio.AbstractEventLoop) -> None:
        engine = app.state.sorai.embeddings
        if engine is None:
            raise APIError(
                400,
                "vector stores need an embedding model: this server was started with "
                "--embedding-model none",
                code="embeddings_unavailable",
            )
        self.engine = engine
        self.loop = loop
        self.embedding_model = engine.name

    def embed(self, texts: list[str]) -> list[list[float]]:
        future = asyncio.run_coroutine_threadsafe(self._embed(texts), self.loop)
        return future.result()

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        await self.engine.load()
        return (await self.engine.embed(texts)).vectors.tolist()

    def context_length(self, model: str) -> int | None:
        return self.engine.max_seq_length


class VectorStores:
    def __init__(self, app: FastAPI, loop: asyncio.AbstractEventLoop) -> None:
        self.root = app.state.sorai.settings.data_path() / "vector_stores"
        self.root.mkdir(parents=True, exist_ok=True)
        self.app = app
        self.loop = loop
        self._embedder: _ServerEmbedder | None = None
        self._builds: dict[str, set[asyncio.Task[None]]] = {}  # store id -> its files' tasks
        self._locks: dict[str, asyncio.Lock] = {}  # one file indexed at a time per store
        for store in self.list():
            for entry in store.get("files", []):
                if entry["status"] == "in_progress":  # a stopped server's unfinished file
                    self._build(store["id"], entry["id"])

    @property
    def embedder(self) -> _ServerEmbedder:
        if self._embedder is None:
            self._embedder = _ServerEmbedder(self.app, self.loop)
        return self._embedder

    def get(self, store_id: str) -> dict[str, Any] | None:
        path = self.root / f"{store_id}.json"
        if "/" in store_id or not path.exists():
            return None
        return json.loads(path.read_text())

    def put(self, store: dict[str, Any]) -> None:
        path = self.root / f"{store['id']}.json"
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(store))
        partial.replace(path)

    def list(self) -> list[dict[str, Any]]:
        stores = [json.loads(p.read_text()) for p in self.root.glob("*.json")]
        return sorted(stores, key=lambda s: s["created_at"], reverse=True)

    def index(self, store_id: str) -> Index:
        return Index(self.root / f"{store_id}.sqlite")

    def file_of(self, path: str) -> tuple[str, str]:
        """(file id, filename) of an index hit's path."""
        where = Path(path)
        return where.parent.name, where.name

    async def attach(
        self, store_id: str, file_id: str, filename: str, data: bytes
    ) -> dict[str, Any]:
        """Copy a file into the store and start indexing it; its entry, in_progress."""
        folder = self.root / store_id / file_id
        # A worker thread writes the copy: a file of hundreds of MB would otherwise hold up
        # every stream the event loop serves. The task below must start on the loop.
        await asyncio.to_thread(_write_file, folder / Path(filename).name, data)
        entry = {
            "id": file_id,
            "object": "vector_store.file",
            "created_at": int(time.time()),
            "vector_store_id": store_id,
            "status": "in_progress",
            "usage_bytes": len(data),
            "last_error": None,
        }
        self._set_file(store_id, entry)
        self._build(store_id, file_id)
        return entry

    async def ready(self, store_id: str, timeout: float) -> bool:
        """Wait until the store's files are indexed; False if some still are not after
        `timeout` seconds."""
        tasks = self._builds.get(store_id)
        if not tasks:
            return True
        _, pending = await asyncio.wait(set(tasks), timeout=timeout)
        return not pending

    def _build(self, store_id: str, file_id: str) -> None:
        task = self.loop.create_task(self._index(store_id, file_id), name=f"index {file_id}")
        tasks = self._builds.setdefault(store_id, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _index(self, store_id: str, file_id: str) -> None:
        async with self._locks.setdefault(store_id, asyncio.Lock()):
            if self.get(store_id) is None:
                return  # deleted while the file waited its turn
            try:
                error = await asyncio.to_thread(self._add, store_id, file_id)
            except Exception as exc:  # the file fails, saying why; the store stays usable
                logger.exception("indexing %s into %s failed", file_id, store_id)
                error = f"{type(exc).__name__}: {exc}"
        store = self.get(store_id)
        if store is None:  # deleted while the file was indexed: its index goes too
            (self.root / f"{store_id}.sqlite").unlink(missing_ok=True)
            return
        entry = next((f for f in store.get("files", []) if f["id"] == file_id), None)
        if entry is None:
            return
        entry["status"] = "failed" if error else "completed"
        entry["last_error"] = {"code": "unsupported_file", "message": error} if error else None
        self._set_file(store_id, entry)

    def _add(self, store_id: str, file_id: str) -> str | None:
        """Index one copied file (in a worker thread); None, or why it could not be read."""
        index = self.index(store_id)
        try:
            report = add_files(index, [self.root / store_id / file_id], self.embedder)
        finally:
            index.close()
        return "; ".join(why for _, why in report.failures) or None

    def _set_file(self, store_id: str, entry: dict[str, Any]) -> None:
        """Put a file's entry in its store, with the store's counts and status."""
        store = self.get(store_id)
        if store is None:
            return
        files = [f for f in store.get("files", []) if f["id"] != entry["id"]] + [entry]
        store["files"] = files
        counts = store["file_counts"]
        for status in ("in_progress", "completed", "failed", "cancelled"):
            counts[status] = sum(f["status"] == status for f in files)
        counts["total"] = len(files)
        store["usage_bytes"] = sum(f["usage_bytes"] for f in files)
        store["status"] = "in_progress" if counts["in_progress"] else "completed"
        self.put(store)

    def delete(self, store_id: str) -> bool:
        if self.get(store_id) is None:
            return False
        (self.root / f"{store_id}.json").unlink()
        (self.root / f"{store_id}.sqlite").unlink(missing_ok=True)
        shutil.rmtree(self.root / store_id, ignore_errors=True)
        return True


def vector_stores(app: FastAPI) -> VectorStores:
    stores = getattr(app.state, "vector_stores", None)
    if stores is None:
        stores = app.state.vector_stores = VectorStores(app, asyncio.get_running_loop())
    return stores


class CreateVectorStore(_Request):
    name: str | None = None
    file_ids: list[str] | None = None
    metadata: dict[str, str] | None = None


class AttachFile(_Request):
    file_id: str


@router.post("/v1/vector_stores")
async def create_vector_store(request: Request) -> Response:
    body = await read_json(request, CreateVectorStore)
    for file_id in body.file_ids or []:
        known_file(request, file_id, param="file_ids")
    stores = vector_stores(request.app)
    store = {
        "id": f"vs_{uuid.uuid4().hex}",
        "object": "vector_store",
        "created_at": int(time.time()),
        "name": body.name,
        "status": "completed",
        "usage_bytes": 0,
        "file_counts": {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0, "total": 0},
        "metadata": body.metadata or {},
        "expires_at": None,
        "expires_after": None,
        "last_active_at": None,
        "file_ids": [],
    }
    stores.put(store)
    for file_id in body.file_ids or []:
        await _attach(request, store["id"], file_id)
    return JSONResponse(_public(stores.get(store["id"])))


# OpenAI's cursor paging (limit, after); by default the whole list, as before it took them.
LIST_LIMIT = 10000


@router.get("/v1/vector_stores")
async def list_vector_stores(
    request: Request, limit: int = LIST_LIMIT, after: str | None = None
) -> Response:
    data = [_public(s) for s in vector_stores(request.app).list()]
    return list_page(data, limit, after, "vector store", max_limit=LIST_LIMIT)


@router.get("/v1/vector_stores/{store_id}")
async def retrieve_vector_store(request: Request, store_id: str) -> Response:
    return JSONResponse(_public(_known(request, store_id)))


@router.delete("/v1/vector_stores/{store_id}")
async def delete_vector_store(request: Request, store_id: str) -> Response:
    if not vector_stores(request.app).delete(store_id):
        raise _not_found(store_id)
    return JSONResponse({"id": store_id, "object": "vector_store.deleted", "deleted": True})


@router.post("/v1/vector_stores/{store_id}/files")
async def attach_file(request: Request, store_id: str) -> Response:
    _known(request, store_id)
    body = await read_json(request, AttachFile)
    known_file(request, body.file_id)
    return JSONResponse(await _attach(request, store_id, body.file_id))


@router.get("/v1/vector_stores/{store_id}/files")
async def list_files(
    request: Request, store_id: str, limit: int = LIST_LIMIT, after: str | None = None
) -> Response:
    files = _known(request, store_id).get("files", [])
    return list_page(files, limit, after, "file of this store", max_limit=LIST_LIMIT)


@router.get("/v1/vector_stores/{store_id}/files/{file_id}")
async def retrieve_file(request: Request, store_id: str, file_id: str) -> Response:
    store = _known(request, store_id)
    entry = next((f for f in store.get("files", []) if f["id"] == file_id), None)
    if entry is None:
        raise APIError(
            404,
            f"vector store {store_id!r} has no file {file_id!r}",
            param="file_id",
            code="not_found",
        )
    return JSONResponse(entry)


async def _attach(request: Request, store_id: str, file_id: str) -> dict[str, Any]:
    record = known_file(request, file_id)
    data = await asyncio.to_thread(file_store(request).content, file_id)
    return await vector_stores(request.app).attach(store_id, file_id, record["filename"], data)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _public(store: dict[str, Any] | None) -> dict[str, Any]:
    assert store is not None
    return {k: v for k, v in store.items() if k not in ("files", "file_ids")}


def _known(request: Request, store_id: str) -> dict[str, Any]:
    store = vector_stores(request.app).get(store_id)
    if store is None:
        raise _not_found(store_id)
    return store


def _not_found(store_id: str) -> APIError:
    return APIError(
        404, f"no vector store has the id {store_id!r}", param="vector_store_id", code="not_found"
    )
