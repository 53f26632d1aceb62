"""Chunking: sizes, overlap, and cuts at paragraph, sentence and word boundaries (English and
Japanese)."""

from __future__ import annotations

import re

import pytest

from sorai.apps.rag.chunk import Section, chunk_text
from sorai.errors import SoraiError

WORDS = ["river", "stone", "maple", "harbor", "lantern", "copper", "meadow", "violet", "thunder"]


def _sentence(n: int, length: int) -> str:
    words = [WORDS[(n * 7 + i * 3) % len(WORDS)] for i in range(length)]
    return " ".join(words).capitalize() + "."


def _english(paragraphs: int, sentences: int, words: int = 12) -> str:
    return "\n\n".join(
        " ".join(_sentence(p * 100 + s, words) for s in range(sentences)) for p in range(paragraphs)
    )


JAPANESE = (
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
    "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している！"
    "吾輩はここで始めて人間というものを見たのだろうか？"
    "しかもあとで聞くとそれは書生という人間中で一番獰悪な種族であったそうだ。"
) * 6


def test_chunk_text_is_the_span_it_records_and_fits_the_size():
    text = _english(paragraphs=8, sentences=6)
    chunks = chunk_text(text, size=300, overlap=60)
    assert len(chunks) > 5
    for n, chunk in enumerate(chunks):
        assert chunk.ord == n
        assert text[chunk.start : chunk.end] == chunk.text
        assert len(chunk.text) <= 300
        assert chunk.text == chunk.text.strip()


def test_chunks_cover_the_whole_text():
    text = _english(paragraphs=5, sentences=7)
    chunks = chunk_text(text, size=250, overlap=50)
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.start, chunk.end))
    assert all(i in covered for i, char in enumerate(text) if not char.isspace())


def test_consecutive_chunks_overlap_by_at_most_the_overlap():
    text = _english(paragraphs=1, sentences=40, words=6)
    chunks = chunk_text(text, size=300, overlap=80)
    overlaps = [a.end - b.start for a, b in zip(chunks, chunks[1:], strict=False)]
    assert all(0 < overlap <= 80 for overlap in overlaps)
    # One paragraph of short sentences: each overlap starts at a sentence.
    assert all(b.text[0].isupper() for b in chunks[1:])


def test_zero_overlap_gives_disjoint_chunks():
    text = _english(paragraphs=3, sentences=10)
    chunks = chunk_text(text, size=200, overlap=0)
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:], strict=False))


def test_paragraph_boundaries_come_first():
    # Paragraphs of ~250 characters: a 600-character chunk holds two whole ones.
    text = _english(paragraphs=6, sentences=3, words=12)
    paragraphs = text.split("\n\n")
    chunks = chunk_text(text, size=600, overlap=0)
    assert [chunk.text for chunk in chunks] == [
        "\n\n".join(paragraphs[i : i + 2]) for i in range(0, 6, 2)
    ]


def test_a_long_paragraph_is_cut_at_sentence_ends():
    text = _english(paragraphs=1, sentences=30)
    chunks = chunk_text(text, size=400, overlap=0)
    assert len(chunks) > 3
    assert all(chunk.text.endswith(".") for chunk in chunks)


def test_a_long_sentence_is_cut_between_words():
    text = " ".join(WORDS[i % len(WORDS)] for i in range(300))  # no punctuation at all
    chunks = chunk_text(text, size=200, overlap=40)
    words = set(WORDS)
    for chunk in chunks:
        assert set(chunk.text.split()) <= words  # no word was cut in two


def test_japanese_is_cut_after_sentence_ends():
    chunks = chunk_text(JAPANESE, size=120, overlap=0)
    assert len(chunks) > 4
    assert all(chunk.text[-1] in "。！？" for chunk in chunks)
    assert "".join(chunk.text for chunk in chunks) == JAPANESE


def test_japanese_overlap_starts_at_a_sentence():
    chunks = chunk_text(JAPANESE, size=120, overlap=50)
    sentence_starts = {m.end() for m in re.finditer("[。！？]", JAPANESE)} | {0}
    assert all(chunk.start in sentence_starts for chunk in chunks)
    assert any(a.end > b.start for a, b in zip(chunks, chunks[1:], strict=False))


def test_japanese_without_punctuation_still_fits():
    text = "東京特許許可局" * 100
    chunks = chunk_text(text, size=128, overlap=16)
    assert all(len(chunk.text) <= 128 for chunk in chunks)
    assert chunks[-1].end == len(text)


def test_a_word_longer_than_a_chunk_is_cut_hard():
    text = "short words here " + "x" * 500 + " and after"
    chunks = chunk_text(text, size=100, overlap=10)
    assert all(len(chunk.text) <= 100 for chunk in chunks)
    assert chunks[-1].text.endswith("and after")
    assert sum(chunk.text.count("x") for chunk in chunks) >= 500


def test_chunks_stay_inside_their_section_and_keep_its_heading_and_page():
    text = "First page text. " * 10 + "\n\n" + "Second page text. " * 10
    middle = text.index("\n\n")
    sections = [
        Section(0, middle, heading="Intro", page=1),
        Section(middle + 2, len(text), heading="Body", page=2),
    ]
    chunks = chunk_text(text, sections, size=1000, overlap=0)
    assert [(c.heading, c.page) for c in chunks] == [("Intro", 1), ("Body", 2)]
    assert chunks[0].end <= middle < chunks[1].start


@pytest.mark.parametrize(("size", "overlap"), [(10, 0), (800, -1), (800, 400), (800, 800)])
def test_bad_sizes_are_refused(size: int, overlap: int):
    with pytest.raises(SoraiError, match="chunk size|overlap"):
        chunk_text("some text", size=size, overlap=overlap)
