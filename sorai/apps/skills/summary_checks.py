"""The checks a generated summary must pass before it is shown: no loop (a repeated run of
words), no number that is not in the source, not a refusal; and the source's own key
sentences (an extractive summary) for when it does not pass."""

from __future__ import annotations

import math
import re
from collections import Counter

from sorai.apps.text import WORD_UNITS, is_cjk, sentences, word_count

LOOP_NGRAM = 4  # words (a CJK character is a word): a run this long said twice is a loop
CJK_LOOP_NGRAM = 8  # CJK characters: common two-character words recur legitimately
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CONTENT = re.compile(r"[a-z0-9]{3,}|[^\x00-\x7f\s]")
REFUSALS = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i (?:can(?:no|')t|am unable|'m unable)"
    r"|as an ai\b|unable to (?:assist|help|provide)|i don'?t have)"
    r"|申し訳|できません",
    re.I,
)
STOPWORDS = frozenset(
    [
        "the",
        "a",
        "an",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "for",
        "with",
        "by",
        "at",
        "from",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "this",
        "that",
        "these",
        "those",
        "it",
        "its",
        "their",
        "they",
        "we",
        "our",
        "you",
        "your",
        "he",
        "she",
        "his",
        "her",
        "which",
        "who",
        "what",
        "when",
        "where",
        "how",
        "not",
        "no",
        "but",
        "if",
        "then",
        "than",
        "so",
        "such",
        "can",
        "could",
        "will",
        "would",
        "should",
        "may",
        "might",
        "also",
        "more",
        "most",
        "has",
        "have",
        "had",
        "do",
        "does",
        "did",
        "into",
        "over",
        "under",
        "about",
        "after",
        "before",
        "between",
        "both",
        "each",
        "other",
        "some",
        "any",
        "all",
        "there",
        "here",
        "one",
        "two",
        "cannot",
        "can't",
        "don't",
        "won't",
        "i'm",
        "just",
        "very",
    ]
)


def units(text: str) -> list[str]:
    """The words of `text` lowercased, each CJK character a word (word_count's units)."""
    return [w.lower() for w in WORD_UNITS.findall(text)]


def cut_loop(text: str) -> str:
    """`text` up to where it starts to repeat itself: before the second occurrence of a run of
    LOOP_NGRAM words (CJK_LOOP_NGRAM characters), at the last sentence end before it when
    there is one. Text that does not repeat comes back unchanged."""
    spans = [(m.start(), m.group().lower()) for m in WORD_UNITS.finditer(text)]
    seen: set[tuple[str, ...]] = set()
    for i in range(len(spans)):
        cjk = is_cjk(spans[i][1][0])
        n = CJK_LOOP_NGRAM if cjk else LOOP_NGRAM
        gram = tuple(word for _, word in spans[i : i + n])
        if len(gram) < n:
            break
        if gram in seen:
            head = text[: spans[i][0]].rstrip()
            whole = sentences(head)
            # Keep whole sentences when the loop starts inside one ("Q3: Q3: Q3:" keeps none).
            kept = [s for s in whole if head.find(s) + len(s) <= len(head)]
            if whole and not re.search(r"[.!?。！？]$", whole[-1]):
                kept = whole[:-1]
            return (" ".join(kept) if kept else head).strip()
        seen.add(gram)
    return text


def has_loop(text: str) -> bool:
    """Whether `text` says a run of words twice (see cut_loop)."""
    return cut_loop(text) != text


def numbers(text: str) -> set[str]:
    """The numbers in `text`, as digits without thousands separators ("1,200" -> "1200")."""
    found = set()
    for match in _NUMBER.findall(text):
        plain = re.sub(r",(?=\d{3}\b)", "", match)
        found.add(plain)
        found.add(plain.rstrip("0").rstrip(".") if "." in plain else plain)
    return found


def unsupported_numbers(claim: str, source_numbers: set[str]) -> list[str]:
    """The numbers in `claim` that its source does not hold."""
    return sorted(n for n in numbers(claim) if n not in source_numbers)


def is_refusal(text: str) -> bool:
    """An apology or refusal ("I'm sorry, but I'm unable to ...") rather than an answer."""
    return bool(REFUSALS.search(text))


def grounded_share(text: str, source: str) -> float:
    """The share of `text`'s content words (CJK characters) found in `source`: 1.0 for a
    summary that only reuses the source's words, low for one about something else."""
    words = [w for w in _CONTENT.findall(text.lower()) if w not in STOPWORDS]
    if not words:
        return 0.0
    have = set(_CONTENT.findall(source.lower()))
    return sum(w in have for w in words) / len(words)


def key_sentences(text: str, max_words: int, limit: int | None = None) -> list[str]:
    """The source's own most central sentences, in source order, within `max_words` in all (at
    most `limit` of them): each scored by how frequent its content words are in the whole
    text (CJK: character bigrams), per word, with a small lead bonus (openings state the
    point). The first sentence is cut to `max_words` when no whole one fits."""
    found = [s for s in sentences(text) if word_count(s) >= 3] or sentences(text)
    if not found:
        return []
    terms = [_terms(s) for s in found]
    frequency = Counter(t for ts in terms for t in set(ts))
    scores = []
    for i, ts in enumerate(terms):
        weight = sum(math.log1p(frequency[t]) for t in ts) / math.sqrt(len(ts) + 1)
        scores.append(weight * (1.0 + 0.5 / (1 + i)))
    chosen: list[int] = []
    used = 0
    for i in sorted(range(len(found)), key=lambda i: -scores[i]):
        words = word_count(found[i])
        if used + words > max_words or (limit is not None and len(chosen) >= limit):
            continue
        chosen.append(i)
        used += words
    if not chosen:
        best = max(range(len(found)), key=lambda i: scores[i])
        return [_first_words(found[best], max_words)]
    return [found[i] for i in sorted(chosen)]


def _terms(sentence: str) -> list[str]:
    lowered = sentence.lower()
    words = [w for w in re.findall(r"[a-z0-9]{3,}", lowered) if w not in STOPWORDS]
    cjk = re.findall(r"[^\x00-\x7f\s]+", lowered)
    bigrams = [run[i : i + 2] for run in cjk for i in range(len(run) - 1)]
    return words + [b for b in bigrams if not _all_kana(b)]


def _all_kana(text: str) -> bool:
    return all("\u3040" <= ch <= "\u309f" or not ch.isalnum() for ch in text)


def _first_words(text: str, max_words: int) -> str:
    spans = list(WORD_UNITS.finditer(text))
    if len(spans) <= max_words:
        return text
    return text[: spans[max_words - 1].end()]
