"""Text helpers the skills share: sentences (English and Japanese), a token estimate and a
length in words that also counts CJK text."""

from __future__ import annotations

import re

# A sentence ends at . ! ? (followed by space or the end) or at 。！？ (no space in Japanese).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")
_UNITS = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’-]*|[^\x00-\x7f\s]")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def estimate_tokens(text: str) -> int:
    """A generous token count without the endpoint's tokenizer: ~3.5 ASCII characters per
    token, one token per other character (a CJK character is one to three)."""
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return int(ascii_chars / 3.5) + (len(text) - ascii_chars) + 1


def word_count(text: str) -> int:
    """Words of Latin-script text plus characters of CJK text: the unit of a target length."""
    return len(_UNITS.findall(text))


def truncate_words(text: str, max_words: int) -> str:
    """`text` cut to `max_words` (see word_count), at the end of a sentence when one ends
    within the limit."""
    if word_count(text) <= max_words:
        return text.strip()
    kept = ""
    for sentence in sentences(text):
        candidate = f"{kept} {sentence}".strip() if kept else sentence
        if word_count(candidate) > max_words:
            break
        kept = candidate
    if kept:
        return kept
    matches = list(_UNITS.finditer(text))
    return text[: matches[max_words - 1].end()].strip()
