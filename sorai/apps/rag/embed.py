"""Chunk vectors that see the whole chunk: a chunk longer than the embedding model's window
(MiniLM reads 256 tokens; 800 characters of Japanese are ~800) is embedded in pieces that fit,
cut at sentence ends, and its vector is the normalized mean of theirs. Truncating instead would
leave most of a CJK chunk out of its vector."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sorai.apps.rag.store import Embedder
from sorai.apps.text import estimate_tokens, is_cjk, pack, sentences

SPECIAL_TOKENS = 2  # [CLS] and [SEP] take two of the window's tokens


def embedding_window(embedder: Embedder) -> int | None:
    """The embedding model's window in tokens, when the embedder can tell (a `Client` asks the
    endpoint's /v1/models); None: no limit known, texts go whole."""
    ask = getattr(embedder, "context_length", None)
    if ask is None:
        return None
    window = ask(embedder.embedding_model)
    return window - SPECIAL_TOKENS if window and window > SPECIAL_TOKENS else None


def _join_sentences(first: str, then: str) -> str:
    # Japanese sentences follow each other without a space; others get one.
    return first + ("" if is_cjk(first[-1]) else " ") + then


def pieces(text: str, budget: int) -> list[str]:
    """`text` in consecutive pieces of whole sentences, each within `budget` estimated tokens
    (a generous estimate, so a piece fits the real tokenizer's window too)."""
    if estimate_tokens(text) <= budget:
        return [text]
    return pack(sentences(text), budget, _join_sentences)


def embed_texts(embedder: Embedder, texts: Sequence[str], window: int | None) -> list[np.ndarray]:
    """One L2-normalized float32 vector per text; texts longer than `window` tokens are the
    mean of their pieces' vectors. One embeddings call for all the pieces."""
    split = [pieces(text, window) if window else [text] for text in texts]
    flat = [piece for parts in split for piece in parts]
    vectors = embedder.embed(flat) if flat else []
    if len(vectors) != len(flat):
        raise ValueError(f"the embedder returned {len(vectors)} vectors for {len(flat)} texts")
    out, at = [], 0
    for parts in split:
        group = np.asarray(vectors[at : at + len(parts)], dtype=np.float32)
        at += len(parts)
        group /= np.maximum(np.linalg.norm(group, axis=1, keepdims=True), 1e-12)
        mean = group.mean(axis=0)
        out.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return out
