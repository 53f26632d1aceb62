"""Text helpers the apps share: where sentences end (English and Japanese), a token estimate
without a tokenizer, a length in words that also counts CJK text, and counted nouns."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

# A match's end is where the next sentence starts.
SENTENCE_END = re.compile(
    r"[.!?][\"')\]’”]*\s+"  # Latin sentence ends need following whitespace ("3.14", "e.g.x")
    r"|[。！？｡][」』）)\"'’”]*\s*"  # Japanese ones do not
    r"|\n\s*"  # a line break (list items, PDF lines) is as good as a sentence end
)
# A word of Latin-script text, or one CJK (any non-ASCII) character: the unit of word_count.
WORD_UNITS = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’-]*|[^\x00-\x7f\s]")


def is_cjk(char: str) -> bool:
    """Hiragana, Katakana, CJK ideographs and punctuation, fullwidth forms, Hangul."""
    code = ord(char)
    return 0x2E80 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFFEF


def sentences(text: str) -> list[str]:
    """The sentences of `text`, stripped, in order (their closing quotes kept)."""
    starts = [0] + [m.end() for m in SENTENCE_END.finditer(text)] + [len(text)]
    pieces = (text[a:b].strip() for a, b in zip(starts, starts[1:], strict=False))
    return [piece for piece in pieces if piece]


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """`n` and the noun in the right number: "1 chunk", "2 chunks", "0 entries" (with
    plural_form="entries" where adding an s is wrong)."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural_form or noun + 's'}"


def estimate_tokens(text: str) -> int:
    """A generous token count without the endpoint's tokenizer: ~3.5 ASCII characters per
    token, one token per other character (a CJK character is one to three)."""
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return int(ascii_chars / 3.5) + (len(text) - ascii_chars) + 1


def cut_to_fit(text: str, budget: int) -> list[str]:
    """`text` in consecutive runs of characters of at most `budget` estimated tokens each (for
    a sentence longer than a window; whatever its mix of ASCII and CJK)."""
    pieces, start = [], 0
    longest = int(3.5 * budget) + 4  # no longer run fits: an ASCII character is 1/3.5 token
    while start < len(text):
        end = start + 1
        # estimate_tokens grows with the length: grow by halving steps to the longest fit.
        step = min(len(text) - start, longest)
        while step:
            if end + step <= len(text) and estimate_tokens(text[start : end + step]) <= budget:
                end += step
            else:
                step //= 2
        pieces.append(text[start:end])
        start = end
    return pieces


def pack(units: Iterable[str], budget: int, join: Callable[[str, str], str]) -> list[str]:
    """Consecutive `units` joined (by `join`) into as few pieces as fit `budget` estimated
    tokens each, in order; a unit over the budget on its own is cut by cut_to_fit."""
    out: list[str] = []
    current = ""
    for unit in units:
        if current:
            joined = join(current, unit)
            if estimate_tokens(joined) <= budget:
                current = joined
                continue
            out.append(current)
        if estimate_tokens(unit) <= budget:
            current = unit
        else:
            *whole, current = cut_to_fit(unit, budget)
            out += whole
    if current:
        out.append(current)
    return out


def word_count(text: str) -> int:
    """Words of Latin-script text plus characters of CJK text: the unit of a target length."""
    return len(WORD_UNITS.findall(text))


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
    matches = list(WORD_UNITS.finditer(text))
    return text[: matches[max_words - 1].end()].strip()
