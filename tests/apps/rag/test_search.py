"""Searching: keyword (BM25 over trigrams, with a substring fallback for short Japanese terms),
vector, and the hybrid of both; odd query text; an index that persists across openings."""

from __future__ import annotations

from pathlib import Path

import pytest

from sorai.apps.rag.ingest import add_files
from sorai.apps.rag.search import fts_expression, query_terms, search
from sorai.apps.rag.store import Index
from sorai.errors import SoraiError

from .conftest import TrigramHashEmbedder

DOCUMENTS = {
    "bridge.md": "The Golden Gate Bridge opened to traffic in 1937. It spans the strait at the "
    "entrance to San Francisco Bay and was the longest suspension bridge of its time.",
    "coffee.md": "Coffee beans are the roasted seeds of the Coffea plant. A light roast keeps "
    "more acidity, while a dark roast brings out bitter, smoky notes.",
    "volcano.md": "Mount Fuji is an active stratovolcano. Its last eruption, the Hoei eruption, "
    "began in 1707 during the Edo period and covered Edo in ash.",
    "python.md": "Python lists over-allocate their storage, so appending an item to a list runs "
    "in amortized constant time even though the array is sometimes copied.",
    "tea.md": "Green tea leaves are steamed or pan-fired soon after picking. The heat stops the "
    "oxidation that would otherwise turn them into black tea.",
    "fuji-ja.md": "富士山は標高3776メートルで、日本で最も高い山です。"
    "山梨県と静岡県にまたがっています。",
    "tokyo-ja.md": "東京タワーは1958年に完成した電波塔で、高さは333メートルです。"
    "港区芝公園にあります。",
    "ai.md": "An AI model is trained on data; evaluation measures how well it generalizes.",
}

# (query, the document that answers it): paraphrases, not copies, of the passages.
LABELLED = [
    ("When did the Golden Gate bridge open?", "bridge.md"),
    ("what does roasting do to coffee beans", "coffee.md"),
    ("last eruption of Mount Fuji", "volcano.md"),
    ("cost of appending to a python list", "python.md"),
    ("why are green tea leaves steamed", "tea.md"),
    ("日本で一番高い山は富士山ですか", "fuji-ja.md"),
    ("東京タワーの高さ", "tokyo-ja.md"),
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCUMENTS.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def filled(index: Index, embedder: TrigramHashEmbedder, corpus: Path) -> Index:
    add_files(index, [corpus], embedder)
    return index


def _names(results) -> list[str]:
    return [Path(r.path).name for r in results]


@pytest.mark.parametrize(("query", "expected"), LABELLED)
def test_hybrid_ranks_the_answering_chunk_first(filled: Index, embedder, query, expected):
    results = search(filled, query, embedder, k=3)
    assert _names(results)[0] == expected
    top = results[0]
    assert top.vector_rank is not None and top.keyword_rank is not None
    assert top.score == pytest.approx(1 / (60 + top.vector_rank) + 1 / (60 + top.keyword_rank))


def test_keyword_search_finds_a_japanese_word(filled: Index):
    results = search(filled, "東京タワー", mode="keyword")
    assert _names(results) == ["tokyo-ja.md"]
    assert results[0].keyword_rank == 1 and results[0].vector_rank is None


def test_keyword_search_finds_a_two_character_japanese_word(filled: Index):
    assert _names(search(filled, "標高", mode="keyword")) == ["fuji-ja.md"]
    assert _names(search(filled, "港区", mode="keyword")) == ["tokyo-ja.md"]


def test_a_short_latin_term_falls_back_to_substrings(filled: Index):
    assert _names(search(filled, "AI", mode="keyword")) == ["ai.md"]


def test_japanese_queries_are_split_into_trigrams():
    phrases, short = query_terms("東京タワー 高さ")
    assert phrases == ["東京タ", "京タワ", "タワー"]
    assert short == ["高さ"]


def test_query_text_never_reaches_fts5_as_syntax():
    phrases, short = query_terms('NEAR(a "b c") AND x* ^y col:z -- ;')
    assert phrases == ["NEAR", "AND", "col"]
    assert short == ["a", "b", "c", "x", "y", "z"]
    assert fts_expression(['say "hi"']) == '"say ""hi"""'


def test_terms_in_half_the_chunks_or_more_are_left_out(index: Index, embedder, tmp_path):
    for n in range(4):
        (tmp_path / f"{n}.md").write_text(f"The story number {n} of the river.")
    (tmp_path / "x.md").write_text("A lighthouse.")
    add_files(index, [tmp_path], embedder)
    assert index.trigram_counts(["the", "THE", "lig"]) == {"the": 4, "THE": 4, "lig": 1}
    results = search(index, "the lighthouse", mode="keyword")
    assert _names(results) == ["x.md"]  # "the" (4 of 5 chunks) would rank nothing anyway
    assert len(search(index, "the", mode="keyword")) == 4  # unless nothing else is left


@pytest.mark.parametrize(
    "query",
    [
        'AND OR NOT "unbalanced',
        "foo* ^start col:value NEAR(a b, 3)",
        "'; DROP TABLE chunks; --",
        '"" () {} [] + - ~ \\ % _',
        "***",
        "NOT",
        "東京タワー AND OR",
    ],
)
@pytest.mark.parametrize("mode", ["keyword", "vector", "hybrid"])
def test_query_syntax_characters_are_harmless(filled: Index, embedder, query: str, mode: str):
    search(filled, query, embedder, mode=mode)
    assert filled.chunk_count() == len(DOCUMENTS)


def test_vector_search_ranks_by_cosine(filled: Index, embedder):
    results = search(filled, DOCUMENTS["tea.md"], embedder, mode="vector", k=3)
    assert _names(results)[0] == "tea.md"
    assert results[0].score == pytest.approx(1.0, abs=1e-5)
    assert [r.vector_rank for r in results] == [1, 2, 3]
    assert results[0].score >= results[1].score >= results[2].score


def test_vector_and_hybrid_search_need_an_embedder(filled: Index):
    with pytest.raises(SoraiError, match="needs an embedder"):
        search(filled, "tea", mode="vector")


def test_search_refuses_another_embedding_model(filled: Index):
    with pytest.raises(SoraiError, match="not 'other'"):
        search(filled, "tea", TrigramHashEmbedder("other"))


def test_empty_query_and_bad_arguments_are_refused(filled: Index, embedder):
    for kwargs, message in [
        ({"query": "  "}, "empty"),
        ({"query": "tea", "k": 0}, "k must be"),
        ({"query": "tea", "mode": "fuzzy"}, "mode must be one of"),
    ]:
        with pytest.raises(SoraiError, match=message):
            search(filled, embedder=embedder, **kwargs)


def test_results_carry_page_and_heading(index: Index, embedder, tmp_path: Path):
    (tmp_path / "guide.md").write_text("# Guide\n\n## Keys\n\nRotate the keys monthly.\n")
    add_files(index, [tmp_path], embedder)
    (result,) = search(index, "rotate keys", embedder, k=1)
    assert (result.heading, result.page) == ("Guide > Keys", None)
    assert result.text == "## Keys\n\nRotate the keys monthly."


def test_the_index_persists_across_openings(tmp_path: Path, embedder, corpus: Path):
    path = tmp_path / "persist.sqlite"
    with Index(path) as index:
        add_files(index, [corpus], embedder)
        before = [(r.chunk_id, r.score) for r in search(index, "green tea", embedder)]
    with Index(path, create=False) as index:
        assert (index.embedding_model, index.dimension) == (embedder.embedding_model, 384)
        assert len(index.documents()) == len(DOCUMENTS)
        after = [(r.chunk_id, r.score) for r in search(index, "green tea", embedder)]
    assert after == before


def test_a_write_by_another_connection_reaches_the_cached_vectors(
    filled: Index, embedder, tmp_path: Path
):
    assert _names(search(filled, "lighthouse keepers", embedder, mode="vector", k=1)) != [
        "lighthouse.md"
    ]
    (tmp_path / "lighthouse.md").write_text("Lighthouse keepers tended the lamps every night.")
    with Index(filled.path) as other:
        add_files(other, [tmp_path / "lighthouse.md"], embedder)
    results = search(filled, "lighthouse keepers", embedder, mode="vector", k=1)
    assert _names(results) == ["lighthouse.md"]


def test_an_empty_index_returns_nothing(index: Index, embedder):
    assert search(index, "anything", embedder) == []
