"""/v1/sorai/indexes: the document indexes named with `--index`, their search (keyword,
vector or hybrid, with scores), ask with citations, and one passage by id."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from sorai.console.fields import count, json_body, text
from sorai.console.loopback import client_for
from sorai.console.settings import ConsoleSettings, NotFound

router = APIRouter(prefix="/v1/sorai/indexes")


def _settings(request: Request) -> ConsoleSettings:
    return request.app.state.console


def _path(request: Request, name: str) -> Path:
    indexes = _settings(request).indexes
    if name not in indexes:
        known = ", ".join(sorted(indexes)) or "none: start sorai serve with --index NAME=PATH"
        raise NotFound(f"no index named {name!r} (indexes: {known})")
    return indexes[name]


@router.get("")
async def list_indexes(request: Request) -> JSONResponse:
    from sorai.apps.rag import Index

    def describe(name: str, path: Path) -> dict[str, Any]:
        with Index(path, create=False) as index:
            documents = index.documents()
            return {
                "name": name,
                "documents": len(documents),
                "chunks": index.chunk_count(),
                "embedding_model": index.embedding_model,
                "files": [d.path for d in documents[:200]],
            }

    items = [
        await run_in_threadpool(describe, name, path)
        for name, path in _settings(request).indexes.items()
    ]
    return JSONResponse({"object": "list", "data": items})


@router.post("/{name}/search")
async def search_index(request: Request, name: str) -> JSONResponse:
    from sorai.apps.rag import Index, search

    path = _path(request, name)
    body = await json_body(request)
    query, mode = text(body, "query"), body.get("mode", "hybrid")
    k = count(body, "k", 5, 1, 50)

    def run() -> list[dict[str, Any]]:
        with Index(path, create=False) as index:
            if mode == "keyword":
                return [asdict(h) for h in search(index, query, None, k=k, mode="keyword")]
            with client_for(request) as client:
                return [asdict(h) for h in search(index, query, client, k=k, mode=mode)]

    return JSONResponse({"object": "list", "data": await run_in_threadpool(run)})


@router.post("/{name}/ask")
async def ask_index(request: Request, name: str) -> JSONResponse:
    from sorai.apps.rag import Index
    from sorai.apps.skills.ask import ask

    path = _path(request, name)
    body = await json_body(request)
    question, k = text(body, "question"), count(body, "k", 5, 1, 50)
    mode, model = body.get("mode", "hybrid"), body.get("model")

    def run() -> dict[str, Any]:
        with Index(path, create=False) as index, client_for(request, model) as client:
            return asdict(ask(client, question, index, k=k, mode=mode))

    return JSONResponse(await run_in_threadpool(run))


@router.get("/{name}/chunks/{chunk_id}")
async def passage(request: Request, name: str, chunk_id: int) -> JSONResponse:
    from sorai.apps.rag import Index

    path = _path(request, name)

    def run() -> dict[str, Any]:
        with Index(path, create=False) as index:
            found = index.chunks([chunk_id]).get(chunk_id)
            if found is None:
                raise NotFound(f"index {name!r} has no passage {chunk_id}")
            return asdict(found)

    return JSONResponse(await run_in_threadpool(run))
