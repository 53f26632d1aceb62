"""Retrieval over your documents: a persistent hybrid (BM25 + vector) index in one SQLite file.

    from sorai.apps.client import Client
    from sorai.apps.rag import Index, add_files, search

    with Index("docs.sqlite") as index, Client.connect(url, model="x") as client:
        add_files(index, ["docs/"], client)
        for hit in search(index, "how do I rotate the keys?", client, k=5):
            print(hit.score, hit.path, hit.page, hit.heading, hit.text[:80])

Importing this package is cheap: NumPy and pypdf load on first use.
"""

from __future__ import annotations

from sorai.apps.rag.chunk import Chunk, Section, chunk_text
from sorai.apps.rag.ingest import AddReport, Document, add_files, read_document
from sorai.apps.rag.search import SearchResult, search
from sorai.apps.rag.store import DocumentInfo, Embedder, Index, default_index_path

__all__ = [
    "AddReport",
    "Chunk",
    "Document",
    "DocumentInfo",
    "Embedder",
    "Index",
    "SearchResult",
    "Section",
    "add_files",
    "chunk_text",
    "default_index_path",
    "read_document",
    "search",
]
