"""`sorai eval compare RUN_A RUN_B`: per-metric differences (B - A) of two runs over the same
rows, with paired bootstrap 95% confidence intervals, and the rows that changed most.

Rows are paired by their index (their position in the data file), so both runs must have
evaluated the same data; a row scored in only one run is left out of that metric's pairs. The
bootstrap resamples the paired differences (rows with replacement) and takes the 2.5th and
97.5th percentiles of the resampled mean differences: pairing removes the variation between
rows that both runs share, so a real improvement shows with fewer rows than comparing two
independent means would need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sorai.apps.command import read_jsonl
from sorai.apps.eval.report import ROWS, SUMMARY
from sorai.errors import SoraiError

RESAMPLES = 2000


@dataclass
class Changed:
    index: int
    query: str
    a: float
    b: float

    @property
    def delta(self) -> float:
        return self.b - self.a


@dataclass
class MetricDiff:
    metric: str
    pairs: int
    mean_a: float
    mean_b: float
    diff: float  # mean of B - A
    low: float  # 95% interval of diff
    high: float
    higher_is_better: bool = True
    changed: list[Changed] = field(default_factory=list)  # largest |B - A| first

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def load_run(run_dir: str) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    path = Path(run_dir)
    rows_path = path / ROWS if path.is_dir() else path
    if not rows_path.is_file():
        raise SoraiError(f"{run_dir}: no {ROWS} (a run directory of `sorai eval run`)")
    rows = {}
    for where, row in read_jsonl(str(rows_path)):
        if not isinstance(row, dict) or not isinstance(row.get("index"), int):
            raise SoraiError(f"{where}: not a result row (no index)")
        rows[row["index"]] = row
    summary_path = rows_path.parent / SUMMARY
    summary = json.loads(summary_path.read_text("utf-8")) if summary_path.is_file() else {}
    return rows, summary


def bootstrap_interval(
    differences: np.ndarray, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The 95% percentile interval of the mean of `differences` under resampling."""
    if len(differences) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def compare(run_a: str, run_b: str, top: int = 5, seed: int = 0) -> list[MetricDiff]:
    rows_a, summary_a = load_run(run_a)
    rows_b, summary_b = load_run(run_b)
    common = sorted(set(rows_a) & set(rows_b))
    if not common:
        raise SoraiError(f"{run_a} and {run_b} share no rows: were they run on the same data?")
    for i in common:
        qa, qb = rows_a[i].get("query"), rows_b[i].get("query")
        if qa is not None and qb is not None and qa != qb:
            raise SoraiError(
                f"row {i} differs between the runs ({str(qa)[:40]!r} vs {str(qb)[:40]!r}): "
                "compare pairs rows by position, so both runs need the same data"
            )
    metrics_a = summary_a.get("metrics", {})
    metrics_b = summary_b.get("metrics", {})
    names = [m for m in metrics_a if m in metrics_b] or _numeric_columns(rows_a, rows_b, common)
    diffs = []
    for name in names:
        pairs = [
            (i, float(rows_a[i][name]), float(rows_b[i][name]))
            for i in common
            if _is_number(rows_a[i].get(name)) and _is_number(rows_b[i].get(name))
        ]
        if not pairs:
            continue
        a = np.array([p[1] for p in pairs])
        b = np.array([p[2] for p in pairs])
        low, high = bootstrap_interval(b - a, seed=seed)
        changed = sorted(
            (
                Changed(i, str(rows_b[i].get("query") or rows_a[i].get("query") or ""), x, y)
                for i, x, y in pairs
            ),
            key=lambda c: (-abs(c.delta), c.index),
        )
        diffs.append(
            MetricDiff(
                name,
                len(pairs),
                float(a.mean()),
                float(b.mean()),
                float((b - a).mean()),
                low,
                high,
                metrics_a.get(name, {}).get("higher_is_better", True),
                [c for c in changed[:top] if c.delta != 0],
            )
        )
    return diffs


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numeric_columns(rows_a: dict, rows_b: dict, common: list[int]) -> list[str]:
    # Without summaries: every numeric column both runs have that is a score, not the index.
    names: dict[str, None] = {}
    for i in common:
        for k, v in rows_a[i].items():
            if k != "index" and _is_number(v) and _is_number(rows_b[i].get(k)):
                names[k] = None
    return list(names)
