"""The run's summary: mean and pass rate per metric, and the run-level metrics that are not a
mean of rows (classification accuracy, macro-F1 and confusion; extraction micro P/R/F1)."""

from __future__ import annotations

from typing import Any

from sorai.apps.eval.classification import classification
from sorai.apps.eval.data import as_text
from sorai.apps.eval.extraction import FieldCounts, prf
from sorai.apps.eval.registry import Evaluator


def scores(results: list[dict[str, Any]], name: str) -> list[float]:
    return [r[name] for r in results if isinstance(r.get(name), int | float)]


def summarize(
    results: list[dict[str, Any]], evaluators: list[Evaluator], thresholds: dict[str, Any]
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for evaluator in evaluators:
        name = evaluator.name
        values = scores(results, name)
        outcomes = [r[f"{name}_result"] for r in results if f"{name}_result" in r]
        entry: dict[str, Any] = {
            "kind": evaluator.kind,
            "scored": len(values),
            "errors": sum(1 for r in results if f"{name}_error" in r or "error" in r),
            "mean": sum(values) / len(values) if values else None,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
            "threshold": thresholds.get(name, evaluator.threshold),
            "pass_rate": outcomes.count("pass") / len(outcomes) if outcomes else None,
            "higher_is_better": evaluator.higher_is_better,
        }
        if name == "classification" and values:
            scored = [r for r in results if isinstance(r.get(name), int | float)]
            c = classification(
                [as_text(r.get("response")) for r in scored],
                [as_text(r.get("ground_truth")) for r in scored],
            )
            entry.update(
                accuracy=c.accuracy,
                macro_f1=c.macro_f1,
                labels=c.labels,
                confusion=c.confusion,
                per_label=c.per_label,
            )
        if name == "extraction" and values:
            total = FieldCounts()
            for r in results:
                if isinstance(r.get("extraction_fields"), dict):
                    part = FieldCounts(by_field=r["extraction_fields"])
                    part.correct = sum(c[0] for c in part.by_field.values())
                    part.predicted = sum(c[1] for c in part.by_field.values())
                    part.expected = sum(c[2] for c in part.by_field.values())
                    total.add(part)
            entry["micro"] = total.scores()
            entry["per_field"] = {k: prf(*v) for k, v in sorted(total.by_field.items())}
        metrics[name] = entry
    return {
        "rows": len(results),
        "rows_with_errors": sum(
            1 for r in results if any(k == "error" or k.endswith("_error") for k in r)
        ),
        "metrics": metrics,
    }
