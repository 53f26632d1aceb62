"""The apps' shared text helpers: one sentence splitter for the skills and the chunker."""

from __future__ import annotations

from sorai.apps.rag.chunk import chunk_text
from sorai.apps.text import (
    cut_to_fit,
    estimate_tokens,
    is_cjk,
    pack,
    plural,
    sentences,
    word_count,
)


def test_sentences_english_japanese_and_lines() -> None:
    text = (
        'Pi is 3.14 and e.g.x stays whole. She said "Really?" Done!\n'
        "- a list item\n"
        "東京は晴れ。「大阪は？」雨です"
    )
    assert sentences(text) == [
        "Pi is 3.14 and e.g.x stays whole.",
        'She said "Really?"',
        "Done!",
        "- a list item",
        "東京は晴れ。",
        "「大阪は？」",
        "雨です",
    ]
    assert sentences("  ") == []


def test_chunker_cuts_where_sentences_end() -> None:
    text = "".join(f"これは{n}番目の文です。" for n in range(40))
    chunks = chunk_text(text, size=64, overlap=0)
    assert len(chunks) > 1
    assert all(chunk.text.endswith("。") for chunk in chunks[:-1])
    assert [s for chunk in chunks for s in sentences(chunk.text)] == sentences(text)


def test_cjk_counts() -> None:
    assert is_cjk("日") and is_cjk("カ") and is_cjk("한") and not is_cjk("a")
    assert word_count("Hello world 東京タワー") == 2 + 5
    assert estimate_tokens("東京") == 3 and estimate_tokens("a" * 35) == 11


def test_cut_to_fit_keeps_every_run_within_the_budget_whatever_the_script() -> None:
    """A sentence with no break: Japanese then ASCII, so no uniform characters-per-token ratio
    predicts the cut; every run fits, the longest that do, and they join into the text."""
    text = "日本語の文章" * 200 + "plain ascii words " * 600
    runs = cut_to_fit(text, 300)
    assert "".join(runs) == text
    assert all(estimate_tokens(run) <= 300 for run in runs)
    assert all(estimate_tokens(run + text[len("".join(runs[: i + 1]))]) > 300
               for i, run in enumerate(runs[:-1]))  # fmt: skip


def test_pack_keeps_order_around_a_unit_too_long_for_the_budget() -> None:
    join = "{} {}".format
    huge = "x" * 400  # ~115 estimated tokens: cut into runs
    pieces = pack(["first one.", "second one.", huge, "last."], 40, join)
    assert pieces[0] == "first one. second one."
    assert "".join(pieces[1:-1]) + pieces[-1].removesuffix(" last.") == huge
    assert pieces[-1].endswith(" last.")
    assert all(estimate_tokens(p) <= 40 for p in pieces)
    assert pack([], 40, join) == []


def test_plural_says_1_chunk_and_2_chunks() -> None:
    assert plural(1, "chunk") == "1 chunk"
    assert [plural(n, "topic") for n in (0, 2)] == ["0 topics", "2 topics"]
    assert plural(1, "bad row") == "1 bad row"
    assert plural(3, "entry", "entries") == "3 entries"
    assert plural(1, "entry", "entries") == "1 entry"
