"""Reference-based text metrics: exact match, token F1, ROUGE-L, BLEU, cosine similarity.

One tokenizer serves all of them, so that Japanese and Chinese are scored as carefully as
English: text is NFKC-normalized (full-width digits and letters become ASCII, half-width kana
full-width) and case-folded; each Han, kana or Hangul character is one token (these scripts do
not separate words with spaces, and a character is the unit CJK evaluation usually counts); a
run of other letters and digits (Latin, Cyrillic, ...) is one token; punctuation and symbols are
dropped. Whitespace splitting would make a Japanese sentence one token, and rouge-score's
default tokenizer drops every non-ASCII character, so neither is used.
"""

from __future__ import annotations

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
# One CJK character, or a run of word characters that are not CJK (\w less the underscore).
_TOKEN = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def tokenize(text: str) -> list[str]:
    """The tokens the text metrics count (see the module's docstring)."""
    return _TOKEN.findall(normalize(text))


def exact_match(response: str, reference: str) -> float:
    """1.0 when both have the same tokens in the same order (so case, punctuation and spacing
    do not count), else 0.0."""
    return 1.0 if tokenize(response) == tokenize(reference) else 0.0


def _f(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def token_f1(response: str, reference: str) -> float:
    """SQuAD-style F1 over the bags of tokens."""
    pred, ref = tokenize(response), tokenize(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    return _f(overlap / len(pred), overlap / len(ref))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """The length of the longest common subsequence (one row of the table kept at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


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
