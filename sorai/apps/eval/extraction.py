"""Field-level precision, recall and F1 of extracted records.

`response` and `ground_truth` are JSON objects (or strings holding one). A field counts as
predicted when the response has it with a non-empty value (null, "" and [] mean "not found"),
as expected when the ground truth has it so; a predicted field is correct when the ground
truth has the same value: strings compared after NFKC normalization, case folding and
collapsing whitespace, numbers by value ("90" and 90 agree), lists and objects as wholes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sorai.apps.eval.text_metrics import normalize


class RecordError(ValueError):
    """A response or ground truth that is not a JSON object."""


def record(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(f"{what} is not JSON: {value[:80]!r}") from None
    if not isinstance(value, dict):
        raise RecordError(f"{what} is not a JSON object but {type(value).__name__}")
    return value


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _canonical(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = " ".join(normalize(value).split())
        try:
            return float(text)
        except ValueError:
            return text
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    return value


@dataclass
class FieldCounts:
    """True positives, predicted and expected field counts (summed over rows for micro-F1)."""

    correct: int = 0
    predicted: int = 0
    expected: int = 0
    by_field: dict[str, list[int]] = field(default_factory=dict)  # name -> [tp, pred, exp]

    def add(self, other: FieldCounts) -> None:
        self.correct += other.correct
        self.predicted += other.predicted
        self.expected += other.expected
        for name, counts in other.by_field.items():
            mine = self.by_field.setdefault(name, [0, 0, 0])
            for i in range(3):
                mine[i] += counts[i]

    def scores(self) -> dict[str, float]:
        return prf(self.correct, self.predicted, self.expected)


def prf(correct: int, predicted: int, expected: int) -> dict[str, float]:
    """precision, recall, f1; an empty prediction of an empty truth is perfect."""
    precision = correct / predicted if predicted else float(expected == 0)
    recall = correct / expected if expected else float(predicted == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def field_counts(response: Any, ground_truth: Any) -> FieldCounts:
    pred = {k: v for k, v in record(response, "response").items() if _present(v)}
    gold = {k: v for k, v in record(ground_truth, "ground_truth").items() if _present(v)}
    counts = FieldCounts()
    for name in sorted(set(pred) | set(gold)):
        hit = name in pred and name in gold and _canonical(pred[name]) == _canonical(gold[name])
        counts.by_field[name] = [int(hit), int(name in pred), int(name in gold)]
    counts.correct = sum(c[0] for c in counts.by_field.values())
    counts.predicted = len(pred)
    counts.expected = len(gold)
    return counts
