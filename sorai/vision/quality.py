"""Character error rate: how far OCR's text is from the text drawn (tests and benchmarks)."""

from __future__ import annotations


def _chars(text: str) -> str:
    # Whitespace is left out: Japanese has none, and OCR's spacing of Latin text varies.
    return "".join(text.split())


def character_error_rate(reference: str, hypothesis: str) -> float:
    """Edit distance (insertions, deletions, substitutions) between the two texts' characters,
    whitespace ignored, over the reference's length."""
    ref, hyp = _chars(reference), _chars(hypothesis)
    if not ref:
        return float(bool(hyp))
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i]
        for j, h in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / len(ref)
