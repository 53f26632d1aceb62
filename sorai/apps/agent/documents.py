"""search_documents: the passages of a `sorai index` nearest a query, for the model to read."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import Field

from sorai.apps.agent.tools import Tool, tool
from sorai.apps.client import Client

PASSAGE_CHARS = 800


def document_tool(client: Client, index_path: str | os.PathLike | None = None) -> Tool:
    """A search over the index at `index_path` (default: sorai's default index), embedding the
    query with `client`. A missing index is a SoraiError now, not at the first call."""
    from sorai.apps.rag import Index, search

    with Index(index_path, create=False) as index:
        path = index.path

    def search_documents(
        query: Annotated[str, Field(description="what to look for", min_length=1, max_length=500)],
        k: Annotated[int, Field(ge=1, le=10)] = 4,
    ) -> str:
        """Search the indexed documents; returns the most relevant passages with their
        source files."""
        # Opened per call: tools run in a worker thread and SQLite connections stay in theirs.
        with Index(path, create=False) as index:
            hits = search(index, query, client, k=k)
        if not hits:
            return "no passage matches"
        return "\n\n".join(
            f"[{n}] {hit.path}{f' (page {hit.page})' if hit.page else ''}:\n"
            f"{hit.text[:PASSAGE_CHARS]}"
            for n, hit in enumerate(hits, start=1)
        )

    return tool(search_documents, timeout=60.0)
