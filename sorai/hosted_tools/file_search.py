"""file_search: the vector stores a request names, searched (hybrid: keywords and vectors)
for the model's query; the passages are its tool result and their files the answer's
file_citation annotations."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import FastAPI

from sorai.apps.rag.search import search
from sorai.hosted_tools.vector_stores import VectorStores, vector_stores
from sorai.server.errors import APIError, bad_request
from sorai.server.responses_api.hosted import HostedCall, HostedContext

DEFAULT_RESULTS = 5
RRF_K = 60  # reciprocal rank fusion's constant, as the index's own hybrid search
# How long a search waits for a store whose files are still being indexed.
READY_TIMEOUT = 300.0


class FileSearch:
    kind = "file_search"
    phase = "searching"

    def check(self, spec: dict[str, Any], app: FastAPI) -> None:
        ids = spec.get("vector_store_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise bad_request(
                "a file_search tool needs vector_store_ids: a non-empty list of vector store "
                f"ids (POST /v1/vector_stores makes one); got {ids!r}",
                param="tools.vector_store_ids",
            )
        stores = vector_stores(app)
        for store_id in ids:
            if stores.get(store_id) is None:
                raise APIError(
                    404,
                    f"no vector store has the id {store_id!r}",
                    param="tools.vector_store_ids",
                    code="not_found",
                )

    def function(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": self.kind,
            "description": "Search the user's documents for passages that answer a query.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        }

    async def run(
        self, spec: dict[str, Any], arguments: dict[str, Any], context: HostedContext
    ) -> HostedCall:
        query = arguments.get("query")
        query = query.strip() if isinstance(query, str) else ""
        # The user's own words and the model's query, fused by rank (reciprocal rank fusion);
        # on a tie the user's words win (a small model's query can be noise).
        queries = list(dict.fromkeys(q for q in (context.question.strip(), query) if q))
        limit = spec.get("max_num_results") or DEFAULT_RESULTS
        stores = vector_stores(context.app)
        # One deadline for all the stores: READY_TIMEOUT in all, not for each.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        for store_id in spec["vector_store_ids"]:
            if not await stores.ready(store_id, max(0.0, deadline - loop.time())):
                item = {**self.pending(context.item_id, arguments), "status": "incomplete"}
                return HostedCall(item={**item, "queries": queries, "results": []})
        fused: dict[tuple[str, str], float] = {}
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for text in queries:
            for store_id in spec["vector_store_ids"]:
                hits = await asyncio.to_thread(_search, stores, store_id, text, limit)
                for rank, hit in enumerate(hits):
                    key = (hit["file_id"], hit["text"])
                    fused[key] = fused.get(key, 0.0) + 1.0 / (RRF_K + rank + 1)
                    found.setdefault(key, hit)
        ranked = sorted(fused, key=lambda key: fused[key], reverse=True)[:limit]
        results = [{**found[key], "score": round(fused[key], 6)} for key in ranked]
        item = {
            **self.pending(context.item_id, arguments),
            "status": "completed",
            "queries": queries,
            "results": results,
        }
        cited: dict[str, dict[str, Any]] = {}
        for hit in results:
            cited.setdefault(
                hit["file_id"],
                {"type": "file_citation", "file_id": hit["file_id"], "filename": hit["filename"]},
            )
        return HostedCall(item=item, annotations=list(cited.values()))

    def pending(self, item_id: str, arguments: dict[str, Any]) -> dict[str, Any]:
        query = arguments.get("query")
        return {
            "type": "file_search_call",
            "id": item_id or f"fs_{uuid.uuid4().hex}",
            "status": "in_progress",
            "queries": [query] if isinstance(query, str) and query else [],
            "results": None,
        }

    def replay(self, item: dict[str, Any]) -> tuple[dict[str, Any], str]:
        queries = item.get("queries") or []
        # The model's own query is the last one (the user's words come first).
        arguments = {"query": str(queries[-1]) if queries else ""}
        if item.get("status") == "incomplete":
            return arguments, (
                f"the search did not run: its vector store was still being indexed after "
                f"{READY_TIMEOUT:.0f} s (a store can be searched once its status is completed)"
            )
        passages = [
            f"[{i + 1}] {hit['filename']}: {hit['text']}"
            for i, hit in enumerate(item.get("results") or [])
        ]
        return arguments, "\n\n".join(passages) or "no passage matches the query"


def _search(stores: VectorStores, store_id: str, query: str, limit: int) -> list[dict]:
    index = stores.index(store_id)
    try:
        results = search(index, query, stores.embedder, k=limit)
    finally:
        index.close()
    return [
        {
            "file_id": file_id,
            "filename": filename,
            "score": round(result.score, 6),
            "text": result.text,
            "attributes": {},
        }
        for result in results
        for file_id, filename in [stores.file_of(result.path)]
    ]
