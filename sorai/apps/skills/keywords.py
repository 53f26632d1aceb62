"""Keyword labels for clusters of texts: class-based TF-IDF (each cluster's terms weighed by
how much more often they occur there than across all clusters), CJK-aware (Japanese and
Chinese text, which has no spaces, is read as character bigrams)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from sorai.apps.skills.summary_checks import STOPWORDS

_LATIN = re.compile(r"[a-z][a-z0-9'-]{2,}|[0-9]+[a-z][a-z0-9]*")
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]+")


def terms(text: str) -> list[str]:
    """The terms of `text`: lowercased Latin words of three letters or more but the common
    function words; CJK runs as character bigrams, but those with a hiragana (particles and
    endings: の, です, ました, and their joins to a word) and a run of one character kept
    whole."""
    lowered = text.lower()
    found = [w.strip("'-") for w in _LATIN.findall(lowered)]
    found = [w for w in found if w not in STOPWORDS and len(w) > 2]
    for run in _CJK_RUN.findall(lowered):
        grams = [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
        found += [g for g in grams if not any("\u3040" <= ch <= "\u309f" for ch in g)]
    return found


def class_keywords(clusters: Sequence[Sequence[str]], top: int = 3) -> list[list[str]]:
    """The `top` keywords of each cluster of texts, by c-TF-IDF: a term's share of the
    cluster's terms times log(1 + mean terms per cluster / the term's count in all), times
    log(1 + clusters / clusters using the term), so that a term every cluster uses ranks below
    one only this cluster does. A term
    in fewer than two of a cluster's texts (when it has two or more) is passed over, so one
    long text cannot name its cluster; overlapping CJK bigrams are taken once."""
    counts = [Counter(t for text in texts for t in terms(text)) for texts in clusters]
    spread = [Counter(t for text in texts for t in set(terms(text))) for texts in clusters]
    overall: Counter[str] = Counter()
    for count in counts:
        overall.update(count)
    mean = sum(overall.values()) / max(1, len(clusters))
    # A term every cluster uses ("propose", "existing") names none of them.
    present = Counter(t for count in counts for t in count)
    k = len(clusters)
    out = []
    for texts, count, docs in zip(clusters, counts, spread, strict=True):
        total = sum(count.values()) or 1
        least = 2 if len(texts) >= 2 else 1
        scored = sorted(
            count,
            key=lambda t: (
                -(docs[t] >= least),
                -count[t] / total * math.log1p(mean / overall[t]) * math.log1p(k / present[t]),
                t,
            ),
        )
        chosen: list[str] = []
        for term in scored:
            if any(term in c or c in term or _cjk_overlap(term, c) for c in chosen):
                continue
            chosen.append(term)
            if len(chosen) == top:
                break
        out.append(chosen)
    return out


def _cjk_overlap(a: str, b: str) -> bool:
    """Bigrams of one CJK word ("請求", "求書" of 請求書) share a character."""
    return bool(_CJK_RUN.fullmatch(a) and _CJK_RUN.fullmatch(b) and set(a) & set(b))
