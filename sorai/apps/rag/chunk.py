"""Cutting a document's text into overlapping chunks at paragraph, sentence and word boundaries.

A chunk never crosses a section (a PDF page, a Markdown or HTML heading), so each one has one
page and one heading; its text is exactly `document_text[start:end]`.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from sorai.apps.text import SENTENCE_END, is_cjk
from sorai.errors import SoraiError

DEFAULT_CHUNK_SIZE = 800  # characters
DEFAULT_OVERLAP = 100
MIN_CHUNK_SIZE = 32


@dataclass(frozen=True)
class Section:
    """A span of a document's text under one heading, on one page."""

    start: int
    end: int
    heading: str | None = None
    page: int | None = None  # 1-based, PDFs only


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: `text == document_text[start:end]`."""

    ord: int  # position in the document, from 0
    text: str
    start: int
    end: int
    page: int | None
    heading: str | None


# Boundary tiers, strongest first. Each pattern's match *end* is where the next unit starts.
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_CLAUSE = re.compile(r"[、，,;；:：][」』）)]*\s*")
_SPACE = re.compile(r"\s+")
# Japanese has no spaces; a word most likely starts where kanji or katakana follow hiragana
# (after a particle or an inflection) and where a katakana run ends.
_CJK_WORD = re.compile(
    r"(?<=[\u3040-\u309f])(?=[\u30a0-\u30ff\u3400-\u9fff])"
    r"|(?<=[\u30a0-\u30ff])(?=[^\u30a0-\u30ff])"
    r"|(?<=[\u3400-\u9fff])(?=[\u30a0-\u30ff])"
)


def _breaks(pattern: re.Pattern[str], text: str, start: int, end: int) -> list[int]:
    return [m.end() for m in pattern.finditer(text, start, end) if start < m.end() < end]


def _last_in(breaks: list[int], low: int, high: int) -> int | None:
    """The largest break in (low, high], or None."""
    i = bisect.bisect_right(breaks, high)
    return breaks[i - 1] if i and breaks[i - 1] > low else None


def _first_in(breaks: list[int], low: int, high: int) -> int | None:
    """The smallest break in [low, high), or None."""
    i = bisect.bisect_left(breaks, low)
    return breaks[i] if i < len(breaks) and breaks[i] < high else None


def _char_break(text: str, low: int, high: int) -> int | None:
    """The largest position in (low, high] not inside a Latin word."""
    for i in range(high, low, -1):
        left, right = text[i - 1], text[i] if i < len(text) else " "
        if not (_is_latin_letter(left) and _is_latin_letter(right)):
            return i
    return None


def _is_latin_letter(char: str) -> bool:
    return char.isalnum() and not is_cjk(char)


class _SectionCutter:
    """Boundaries of one section, computed once, and the choice of each chunk's end and the
    next chunk's start among them."""

    def __init__(self, text: str, start: int, end: int, size: int, overlap: int) -> None:
        self.text, self.end = text, end
        self.size, self.overlap = size, overlap
        # Strongest first: paragraphs, sentences, clauses, words (spaces, then Japanese).
        self.tiers = [
            _breaks(pattern, text, start, end)
            for pattern in (_PARAGRAPH, SENTENCE_END, _CLAUSE, _SPACE, _CJK_WORD)
        ]

    def chunk_end(self, start: int) -> int:
        """Where the chunk that starts at `start` ends: the strongest boundary in the second
        half of its longest extent, else the last word boundary, else a character boundary
        outside a word, else a hard cut."""
        limit = start + self.size
        if limit >= self.end:
            return self.end
        half = start + self.size // 2
        for breaks in self.tiers:
            cut = _last_in(breaks, half, limit)
            if cut is not None:
                return cut
        for breaks in self.tiers[3:]:
            cut = _last_in(breaks, start, half)
            if cut is not None:
                return cut
        cut = _char_break(self.text, start, limit)
        return cut if cut is not None else limit

    def next_start(self, start: int, end: int) -> int:
        """Where the chunk after [start, end) starts: the earliest boundary of the strongest
        tier within `overlap` characters before `end`, so the overlap is as long as allowed
        and starts cleanly; `end` (no overlap) when none is clean."""
        if self.overlap == 0 or end - start <= 2 * self.overlap:
            return end
        for breaks in self.tiers:
            cut = _first_in(breaks, end - self.overlap, end)
            if cut is not None:
                return cut
        return end


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def check_sizes(size: int, overlap: int) -> None:
    if size < MIN_CHUNK_SIZE:
        raise SoraiError(f"chunk size must be at least {MIN_CHUNK_SIZE} characters, got {size}")
    if not 0 <= overlap < size // 2:
        raise SoraiError(
            f"overlap must be in [0, {size // 2}) (under half the chunk size {size}), got {overlap}"
        )


def chunk_text(
    text: str,
    sections: list[Section] | None = None,
    size: int = DEFAULT_CHUNK_SIZE,
    overlap: int = DEFAULT_OVERLAP,
) -> list[Chunk]:
    """Chunks of at most `size` characters (at least half of it unless a section ends), each
    starting up to `overlap` characters before the previous one ends. `sections` default to
    one section over the whole text."""
    check_sizes(size, overlap)
    if sections is None:
        sections = [Section(0, len(text))]
    chunks: list[Chunk] = []
    for section in sections:
        cutter = _SectionCutter(text, section.start, section.end, size, overlap)
        start, _ = _strip(text, section.start, section.end)
        previous_end = start
        while start < section.end:
            end = cutter.chunk_end(start)
            if end <= previous_end:  # only when a huge word blocks every cleaner cut
                start, _ = _strip(text, previous_end, section.end)
                end = cutter.chunk_end(start)
            previous_end = end
            a, b = _strip(text, start, end)
            if b > a:
                chunks.append(Chunk(len(chunks), text[a:b], a, b, section.page, section.heading))
            if end >= section.end:
                break
            following = cutter.next_start(start, end)
            start, _ = _strip(text, following, section.end)
    return chunks
