"""Classification metrics over a whole run: accuracy, macro-F1 and the confusion matrix.

A row's label is its `response` (the predicted label) against its `ground_truth` (the expected
one), compared after NFKC normalization, case folding and trimming, so "Positive " and
"positive" are one label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sorai.apps.eval.text_metrics import normalize


def label(text: str) -> str:
    return " ".join(normalize(text).split())


@dataclass
class Classification:
    accuracy: float
    macro_f1: float
    labels: list[str]  # the rows and columns of `confusion`, sorted
    confusion: list[list[int]]  # confusion[i][j]: rows expected labels[i], predicted labels[j]
    per_label: dict[str, dict[str, float]]  # label -> precision, recall, f1, support


def classification(predicted: Sequence[str], expected: Sequence[str]) -> Classification:
    """Metrics of `predicted` labels against `expected` ones (same length, not empty).

    Macro-F1 is the unweighted mean of the per-label F1 over every label that occurs in either
    list (scikit-learn's `f1_score(average="macro")`); a label never predicted has precision 0.
    """
    if len(predicted) != len(expected) or not expected:
        raise ValueError("classification needs as many predictions as expected labels, > 0")
    pred = [label(p) for p in predicted]
    gold = [label(e) for e in expected]
    labels = sorted(set(pred) | set(gold))
    at = {name: i for i, name in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for p, g in zip(pred, gold, strict=True):
        confusion[at[g]][at[p]] += 1
    per_label: dict[str, dict[str, float]] = {}
    for i, name in enumerate(labels):
        true_positive = confusion[i][i]
        predicted_as = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = true_positive / predicted_as if predicted_as else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
        }
    accuracy = sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
    macro_f1 = sum(v["f1"] for v in per_label.values()) / len(labels)
    return Classification(accuracy, macro_f1, labels, confusion, per_label)
