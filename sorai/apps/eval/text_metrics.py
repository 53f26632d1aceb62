"""Reference-based text metrics: exact match, token F1, ROUGE-L, BLEU, cosine similarity.

One tokenizer serves all of them, so that Japanese and Chinese are scored as carefully as
English: text is NFKC-normalized (full-width digits and letters become ASCII, half-width kana
full-width) and case-folded; each Han, kana or Hangul character is one token (these scripts do
not separate words with spaces, and a character is the unit CJK evaluation usually counts); a
run of other letters, digits and combining marks (Latin, Cyrillic, Devanagari, ...) is one
token; punctuation and symbols are dropped. Whitespace splitting would make a Japanese sentence
one token, and rouge-score's default tokenizer drops every non-ASCII character, so neither is
used. Scripts written without spaces other than CJK (Thai, Lao, Khmer) count a run as one
token: they would need a word segmenter.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

_CJK = (
    "\u1100-\u11ff"  # Hangul Jamo
    "\u3005\u3007"  # 々 〇
    "\u3040-\u30ff"  # Hiragana, Katakana (with ー)
    "\u3130-\u318f"  # Hangul compatibility Jamo
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0003134f"  # CJK extensions B-G
)


@functools.cache
def _token_pattern() -> re.Pattern[str]:
    """One CJK character, or a run of word characters that are not CJK (\\w less the
    underscore) and combining marks. `re` has no \\p{M}, and \\w leaves marks out, which would
    drop the vowel signs and viramas of Devanagari, Bengali, Thai, ... and split their words
    apart; the marks' ranges are read from unicodedata once (Unicode planes 0-1)."""
    ranges, start = [], None
    for code in range(0x300, 0x20001):
        mark = code < 0x20000 and unicodedata.category(chr(code)).startswith("M")
        if mark and start is None:
            start = code
        elif not mark and start is not None:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(code - 1))}")
            start = None
    marks = "".join(ranges)
    return re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_]|[{marks}])+")


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def tokenize(text: str) -> list[str]:
    """The tokens the text metrics count (see the module's docstring)."""
    return _token_pattern().findall(normalize(text))


ARTICLES = frozenset({"a", "an", "the"})


def answer_tokens(text: str) -> list[str]:
    """The tokens less the English articles, as SQuAD's answer normalization drops them
    ("the Eiffel Tower" matches "Eiffel Tower"): exact match and F1 compare answers."""
    return [t for t in tokenize(text) if t not in ARTICLES]


def exact_match(response: str, reference: str) -> float:
    """1.0 when both have the same answer tokens in the same order (so case, punctuation,
    spacing and articles do not count, as in SQuAD), else 0.0."""
    return 1.0 if answer_tokens(response) == answer_tokens(reference) else 0.0


def _f(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def token_f1(response: str, reference: str) -> float:
    """SQuAD F1 over the bags of answer tokens (articles dropped); 1.0 when both are empty."""
    pred, ref = answer_tokens(response), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    return _f(overlap / len(pred), overlap / len(ref))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """The length of the longest common subsequence, bit-parallel (Allison and Dix 1986,
    Crochemore et al. 2001): one bit per token of `b` in a Python integer, so a row is a few
    machine-word operations and two 20,000-token texts take milliseconds, where the textbook
    table would take minutes in Python. The zero bits of `v` count the LCS."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for j, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << j)
    full = (1 << len(b)) - 1
    v = full
    for token in a:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def rouge_l(response: str, reference: str) -> float:
    """ROUGE-L F-measure: LCS / response length (precision) and LCS / reference length
    (recall), combined as their harmonic mean, as rouge-score reports `fmeasure`."""
    pred, ref = tokenize(response), tokenize(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    return _f(lcs / len(pred), lcs / len(ref))


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(response: str, reference: str, max_order: int = 4) -> float:
    """Sentence BLEU (0-1) against one reference, up to 4-grams, with add-one smoothing of the
    2- to 4-gram precisions (Lin and Och 2004, "BLEU+1"): one sentence rarely shares a 4-gram
    with its reference, and unsmoothed BLEU would then be 0 however close it is. The unigram
    precision is not smoothed, so a response sharing no token scores 0."""
    pred, ref = tokenize(response), tokenize(reference)
    if not pred or not ref:
        return float(pred == ref)
    log_sum = 0.0
    for n in range(1, max_order + 1):
        candidates = _ngrams(pred, n)
        matches = sum((candidates & _ngrams(ref, n)).values())
        total = sum(candidates.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_sum += math.log(matches / total)
        else:
            log_sum += math.log((matches + 1) / (total + 1))
    brevity = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return brevity * math.exp(log_sum / max_order)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return 0.0 if norm == 0 else dot / norm
