"""Search an index: BM25 over the trigram FTS index, exact vector cosine, or both fused by
reciprocal rank fusion."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sorai.apps.rag.store import Embedder, Index
from sorai.errors import SoraiError

Mode = Literal["hybrid", "vector", "keyword"]
MODES: tuple[str, ...] = ("hybrid", "vector", "keyword")
RRF_K = 60  # reciprocal rank fusion: score = sum over rankings of 1 / (RRF_K + rank)

# A query term: word characters, with the joiners that occur inside words ("e-mail", "C++",
# "don't", "v1.2"). Everything else (quotes, parentheses, *, ^, :) separates terms, so no
# user text reaches FTS5 as syntax.
_TERM = re.compile(r"\w(?:[\w.+#@'/-]*[\w+#])?")
# Kana, CJK ideographs and halfwidth katakana: scripts written without spaces between words.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f]")


@dataclass(frozen=True)
class SearchResult:
    """One hit. Ranks are 1-based positions in each ranking (None: not in that ranking's
    candidates). score: the fused RRF score in hybrid mode, the cosine in vector mode,
    -BM25 (or the count of substring hits for short queries) in keyword mode."""

    chunk_id: int
    text: str
    path: str
    page: int | None
    heading: str | None
    score: float
    vector_rank: int | None
    keyword_rank: int | None
    start: int
    end: int


def _quote(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def query_terms(query: str) -> tuple[list[str], list[str]]:
    """(phrases for the trigram index, terms too short for it: 1-2 characters).

    Terms of 3+ characters become phrases (substring matches); runs of Japanese or Chinese,
    which have no spaces to split on, become their overlapping 3-character pieces, so a
    question matches the passages that share most of its words."""
    phrases: dict[str, None] = {}
    short: dict[str, None] = {}
    for term in _TERM.findall(query):
        if len(term) < 3:
            short[term] = None
        elif _CJK.search(term):
            for i in range(len(term) - 2):
                phrases[term[i : i + 3]] = None
        else:
            phrases[term] = None
    return list(phrases), list(short)


def fts_expression(phrases: list[str]) -> str | None:
    """The phrases, quoted (so nothing in them is FTS5 syntax) and OR-ed; BM25 weighs them."""
    return " OR ".join('"' + p.replace('"', '""') + '"' for p in phrases) or None


def _informative(index: Index, phrases: list[str]) -> list[str]:
    """The phrases without the 3-character ones found in half the chunks or more: FTS5's BM25
    gives those an IDF of ~0 (it clamps log((N - n + 0.5) / (n + 0.5)) to 1e-6), so they add
    nothing to any score, yet matching them ("the", "was", "ました") walks most of the index.
    All of them when none would be left."""
    singles = [p for p in phrases if len(p) == 3]
    if not singles:
        return phrases
    total = index.chunk_count()
    counts = index.trigram_counts(singles)
    kept = [p for p in phrases if len(p) != 3 or 2 * counts[p] < total]
    return kept or phrases


def _keyword_ranking(index: Index, query: str, depth: int) -> list[tuple[int, float]]:
    phrases, short = query_terms(query)
    expression = fts_expression(_informative(index, phrases)) if phrases else None
    hits = index.match(expression, depth) if expression else []
    if not hits and short:
        # The trigram index cannot see 1-2 character terms ("東京", "AI"): scan for them.
        hits = _substring_ranking(index, short, depth)
    return hits


def _substring_ranking(index: Index, terms: list[str], depth: int) -> list[tuple[int, float]]:
    """Chunks by how often they contain the terms: Japanese / Chinese terms anywhere, others
    as whole words ("AI" in "AI model", not in "strait")."""
    patterns = [
        re.compile(re.escape(t) if _CJK.search(t) else rf"(?<!\w){re.escape(t)}(?!\w)", re.I)
        for t in terms
    ]
    counted = []
    for chunk_id, text in index.containing(terms):
        hits = sum(len(pattern.findall(text)) for pattern in patterns)
        if hits:
            counted.append((chunk_id, float(hits)))
    counted.sort(key=lambda hit: (-hit[1], hit[0]))
    return counted[:depth]


def search(
    index: Index,
    query: str,
    embedder: Embedder | None = None,
    k: int = 10,
    mode: Mode = "hybrid",
    depth: int | None = None,
    query_vector: Sequence[float] | None = None,
) -> list[SearchResult]:
    """The k best chunks for `query`. vector and hybrid modes need the embedder the index was
    built with (`query_vector`: the query's embedding by it, when the caller has it already).
    depth (default 3k, at least 10) is how many candidates each ranking feeds RRF: deeper
    lists let chunks that are mediocre in both outrank one that is first in one (on
    bench_rag.py's labelled set, recall@10 is 0.85 at depth 30 and 0.77 at 50)."""
    if mode not in MODES:
        raise SoraiError(f"search mode must be one of {', '.join(MODES)}, got {mode!r}")
    if k < 1:
        raise SoraiError(f"k must be at least 1, got {k}")
    if not query.strip():
        raise SoraiError("the search query is empty")
    depth = max(depth or max(3 * k, 10), k)
    vector_hits: list[tuple[int, float]] = []
    keyword_hits: list[tuple[int, float]] = []
    if mode != "keyword":
        if embedder is None:
            raise SoraiError(f"{mode} search needs an embedder (keyword search does not)")
        if index.chunk_count():
            index.check_embedding_model(embedder.embedding_model)
            if query_vector is None:
                query_vector = embedder.embed([query])[0]
            vector_hits = index.nearest(query_vector, depth)
    if mode != "vector":
        keyword_hits = _keyword_ranking(index, query, depth)

    vector_ranks = {chunk_id: rank for rank, (chunk_id, _) in enumerate(vector_hits, 1)}
    keyword_ranks = {chunk_id: rank for rank, (chunk_id, _) in enumerate(keyword_hits, 1)}
    if mode == "hybrid":
        scores: dict[int, float] = {}
        for ranks in (vector_ranks, keyword_ranks):
            for chunk_id, rank in ranks.items():
                scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)

        def order_key(i: int) -> tuple[float, int, int]:  # ties: the better single rank first
            best = min(vector_ranks.get(i, depth + 1), keyword_ranks.get(i, depth + 1))
            return (-scores[i], best, i)

        order = sorted(scores, key=order_key)[:k]
    else:
        hits = vector_hits if mode == "vector" else keyword_hits
        scores = dict(hits)
        order = [chunk_id for chunk_id, _ in hits[:k]]

    chunks = index.chunks(order)
    return [
        SearchResult(
            chunk_id=i,
            text=chunks[i].text,
            path=chunks[i].path,
            page=chunks[i].page,
            heading=chunks[i].heading,
            score=scores[i],
            vector_rank=vector_ranks.get(i),
            keyword_rank=keyword_ranks.get(i),
            start=chunks[i].start,
            end=chunks[i].end,
        )
        for i in order
        if i in chunks
    ]
