"""Chunks longer than the embedding model's window are embedded whole, in pieces that fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sorai.apps.client import Client
from sorai.apps.rag.embed import embed_texts, embedding_window, pieces
from sorai.apps.rag.ingest import add_files
from sorai.apps.rag.store import Index
from sorai.apps.text import estimate_tokens

from .conftest import TrigramHashEmbedder

JAPANESE = "".join(f"第{n}条では、利用者は契約の内容を確認しなければならない。" for n in range(30))


class WindowedEmbedder(TrigramHashEmbedder):
    """The trigram double with a window, as a Client reports its model's max_model_len; it
    records what it was asked to embed."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.seen: list[str] = []

    def context_length(self, model: str | None = None) -> int:
        return self.window

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.seen += texts
        return super().embed(texts)


def test_pieces_fit_the_budget_and_keep_every_sentence() -> None:
    parts = pieces(JAPANESE, 100)
    assert len(parts) > 1
    assert all(estimate_tokens(p) <= 100 for p in parts)
    assert "".join(parts) == JAPANESE
    english = "The warranty lasts ninety days. " * 40
    parts = pieces(english, 60)
    assert all(estimate_tokens(p) <= 60 for p in parts)
    assert " ".join(parts).split() == english.split()
    assert pieces("short text", 60) == ["short text"]


def test_a_sentence_longer_than_the_window_is_cut_into_runs() -> None:
    run = "あ" * 250
    parts = pieces(run, 100)
    assert [len(p) for p in parts] == [99, 99, 52]  # estimate_tokens counts one extra


def test_a_long_chunk_is_the_mean_of_its_pieces() -> None:
    embedder = WindowedEmbedder(window=102)
    [vector] = embed_texts(embedder, [JAPANESE], embedding_window(embedder))
    parts = pieces(JAPANESE, 100)
    assert embedder.seen == parts
    expected = np.mean(np.asarray(TrigramHashEmbedder().embed(parts)), axis=0)
    np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)
    assert embed_texts(embedder, ["short"], None)[0].shape == (384,)


def test_ingest_embeds_japanese_chunks_in_pieces(tmp_path: Path) -> None:
    (tmp_path / "規約.txt").write_text(JAPANESE, encoding="utf-8")
    embedder = WindowedEmbedder(window=258)
    with Index(tmp_path / "i.sqlite") as index:
        report = add_files(index, [tmp_path / "規約.txt"], embedder)
        assert report.chunks >= 2
        assert len(embedder.seen) > report.chunks
        assert all(estimate_tokens(text) <= 256 for text in embedder.seen)


def test_the_real_embedding_window_comes_from_the_endpoint(client: Client) -> None:
    """all-MiniLM-L6-v2 as sorai serves it: 256 tokens, two of them [CLS] and [SEP]."""
    assert embedding_window(client) == 254
    [whole] = embed_texts(client, [JAPANESE], embedding_window(client))
    first_window = np.asarray(client.embed([JAPANESE])[0])  # the server truncates at 256
    assert abs(np.linalg.norm(whole) - 1) < 1e-5
    assert float(whole @ first_window / np.linalg.norm(first_window)) < 0.999
