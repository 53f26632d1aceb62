"""classify's example vote: labelled examples as vectors (the encoder's embeddings, character
n-gram TF-IDF, or both), a nearest-neighbour/centroid score per label, calibrated probabilities.

The bundled encoder (all-MiniLM-L6-v2) is English-only: on Japanese its vectors barely tell
inquiries apart, while character n-grams need no word boundaries. Which representation serves is
measured on the examples themselves (leave-one-out accuracy) rather than guessed from the script,
and the softmax temperature that turns similarities into probabilities is fitted the same way
(leave-one-out negative log-likelihood), so a confidence of 0.8 means about 80% right.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

NGRAMS = (1, 2, 3)
FEATURES = ("both", "ngram", "encoder")  # the order ties are broken in
TEMPERATURES = np.geomspace(0.002, 1.0, 40)
# Where some label has fewer than two examples, leaving one out measures nothing: the vote uses
# both representations and this temperature (typical of the fitted ones on public intent sets).
DEFAULT_TEMPERATURE = 0.05


def _grams(text: str) -> Counter[str]:
    norm = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    padded = f" {norm} "
    grams = (padded[i : i + n] for n in NGRAMS for i in range(len(padded) - n + 1))
    return Counter(g for g in grams if g.strip())  # a lone space says nothing of the topic


def ngram_vectors(documents: Sequence[str], texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unit TF-IDF vectors of character 1-3-grams (sublinear term frequency) for `documents`
    and `texts`, over the documents' vocabulary and document frequencies."""
    counts = [_grams(d) for d in documents]
    vocab: dict[str, int] = {}
    df: Counter[str] = Counter()
    for c in counts:
        df.update(c.keys())
        for g in c:
            vocab.setdefault(g, len(vocab))
    idf = np.zeros(len(vocab))
    for g, i in vocab.items():
        idf[i] = math.log((1 + len(documents)) / (1 + df[g])) + 1.0

    def matrix(grams: Sequence[Counter[str]]) -> np.ndarray:
        m = np.zeros((len(grams), len(vocab)))
        for row, c in enumerate(grams):
            for g, n in c.items():
                if g in vocab:
                    m[row, vocab[g]] = 1.0 + math.log(n)
        m *= idf
        return _unit(m)

    return matrix(counts), matrix([_grams(t) for t in texts])


def _unit(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms > 0, norms, 1.0)


def _label_scores(
    sims: np.ndarray, owner: np.ndarray, n_labels: int, keep: np.ndarray
) -> np.ndarray:
    """Per label: half its nearest example's similarity, half the similarity to the mean of its
    examples' similarities (a centroid vote that one outlier example cannot swing alone).
    `sims` is (texts, documents); `keep` masks the documents that may vote."""
    scores = np.full((sims.shape[0], n_labels), -1.0)
    for label in range(n_labels):
        cols = np.flatnonzero((owner == label) & keep)
        if cols.size:
            block = sims[:, cols]
            scores[:, label] = 0.5 * block.max(axis=1) + 0.5 * block.mean(axis=1)
    return scores


def _softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = scores / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class ExampleVote:
    """The examples' vote, fitted once per label set and example set (see `fit`)."""

    labels: list[str]
    documents: list[str]  # each example's text, then each label's name and description
    owner: np.ndarray  # the label index of each document
    feature: str  # "ngram", "encoder" or "both"
    temperature: float
    loo_accuracy: float | None  # leave-one-out accuracy on the examples; None with no examples
    encode: Callable[[Sequence[str]], np.ndarray] | None
    _encoded: np.ndarray | None = None

    def _scores(self, texts: Sequence[str], feature: str) -> np.ndarray:
        keep = np.ones(len(self.documents), dtype=bool)
        parts = []
        if feature in ("ngram", "both"):
            docs, vecs = ngram_vectors(self.documents, texts)
            parts.append(_label_scores(vecs @ docs.T, self.owner, len(self.labels), keep))
        if feature in ("encoder", "both"):
            assert self.encode is not None and self._encoded is not None
            vecs = _unit(self.encode(texts))
            parts.append(_label_scores(vecs @ self._encoded.T, self.owner, len(self.labels), keep))
        return sum(parts) / len(parts)

    def probabilities(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Each text's probability per label."""
        if not texts:
            return []
        p = _softmax(self._scores(texts, self.feature), self.temperature)
        return [{name: float(row[i]) for i, name in enumerate(self.labels)} for row in p]


def fit(
    labels: Mapping[str, str],
    examples: Sequence[tuple[str, str]],
    encode: Callable[[Sequence[str]], Sequence[Sequence[float]]] | None = None,
) -> ExampleVote:
    """The vote over `examples` ((text, label) pairs) and the labels' names and descriptions,
    with the representation and temperature that do best leaving each example out in turn.
    `encode` embeds texts (the client's encoder); without it only n-grams are used."""
    names = list(labels)
    index = {name: i for i, name in enumerate(names)}
    documents = [text for text, _ in examples]
    documents += [f"{name}: {labels[name]}" if labels[name] else name for name in names]
    owner = np.array([index[label] for _, label in examples] + list(range(len(names))))
    n = len(examples)
    encoded = None
    as_array = None
    if encode is not None:

        def as_array(texts: Sequence[str]) -> np.ndarray:
            return np.asarray(encode(list(texts)), dtype=np.float64)

        encoded = _unit(as_array(documents))
    choices = FEATURES if encoded is not None else ("ngram",)
    per_label = Counter(label for _, label in examples)
    if min(per_label.get(name, 0) for name in names) < 2:
        feature = choices[0]
        return ExampleVote(
            names, documents, owner, feature, DEFAULT_TEMPERATURE, None, as_array, encoded
        )
    truth = owner[:n]
    best: tuple[float, float, str, float] | None = None  # (accuracy, -nll, feature, temperature)
    for feature in choices:
        loo = np.zeros((n, len(names)))
        grams = ngram_vectors(documents, []) if feature != "encoder" else None
        for i in range(n):
            keep = np.ones(len(documents), dtype=bool)
            keep[i] = False
            parts = []
            if grams is not None:
                sims = grams[0][i : i + 1] @ grams[0].T
                parts.append(_label_scores(sims, owner, len(names), keep))
            if feature != "ngram":
                sims = encoded[i : i + 1] @ encoded.T
                parts.append(_label_scores(sims, owner, len(names), keep))
            loo[i] = (sum(parts) / len(parts))[0]
        accuracy = float((loo.argmax(axis=1) == truth).mean())
        nlls = [
            -float(np.log(_softmax(loo, t)[np.arange(n), truth] + 1e-12).mean())
            for t in TEMPERATURES
        ]
        k = int(np.argmin(nlls))
        candidate = (accuracy, -nlls[k], feature, float(TEMPERATURES[k]))
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    assert best is not None
    accuracy, _, feature, temperature = best
    return ExampleVote(names, documents, owner, feature, temperature, accuracy, as_array, encoded)


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> float:
    """The gap between confidence and accuracy, averaged over equal-width confidence bins
    weighted by how many answers fall in each."""
    if not confidences:
        return 0.0
    conf = np.asarray(confidences, dtype=np.float64)
    right = np.asarray(correct, dtype=np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(conf[mask].mean() - right[mask].mean())
    return float(total / len(conf))
