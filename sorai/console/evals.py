"""/v1/sorai/evals: the `sorai eval run` directories under --eval-dir, with the data
report.html shows (summary, histograms, rows) and `sorai eval compare` of two of them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from sorai.console.settings import ConsoleSettings, child

router = APIRouter(prefix="/v1/sorai/evals")
MAX_ROWS = 5000  # rows sent to the page; the table shows them all, filtered in the browser


def _root(request: Request) -> Path | None:
    settings: ConsoleSettings = request.app.state.console
    return settings.eval_dir


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: null instead (an interval of no pairs is NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _run_summary(run: Path) -> dict[str, Any]:
    from sorai.apps.eval.report import ROWS, SUMMARY

    summary: dict[str, Any] = {}
    if (run / SUMMARY).is_file():
        try:
            summary = json.loads((run / SUMMARY).read_text("utf-8"))
        except ValueError:
            summary = {}
    return {
        "name": run.name,
        "rows": summary.get("rows"),
        "metrics": list(summary.get("metrics", {})),
        "run": summary.get("run", {}),
        "finished": (run / SUMMARY).is_file(),
        "modified": (run / ROWS).stat().st_mtime if (run / ROWS).is_file() else None,
    }


@router.get("")
async def list_runs(request: Request) -> JSONResponse:
    from sorai.apps.eval.report import ROWS

    root = _root(request)
    runs = [] if root is None else [p for p in root.iterdir() if (p / ROWS).is_file()]
    items = [_run_summary(p) for p in sorted(runs, key=lambda p: p.name)]
    return JSONResponse({"object": "list", "data": items, "configured": root is not None})


@router.get("/{name}")
async def get_run(request: Request, name: str) -> JSONResponse:
    from sorai.apps.eval.compare import load_run
    from sorai.apps.eval.registry import evaluators
    from sorai.apps.eval.report import histogram

    run = child(_root(request), name, "eval runs")

    def read() -> dict[str, Any]:
        rows, summary = load_run(str(run))
        ordered = [rows[i] for i in sorted(rows)]
        metrics = summary.get("metrics", {})
        known = evaluators()
        charts = {}
        for metric in metrics:
            values = [r[metric] for r in ordered if isinstance(r.get(metric), int | float)]
            # The report's bins (the evaluator's scale); a metric added with --evaluator that
            # this server does not know gets ten bins over its range.
            scale, integer = None, False
            if metric in known:
                e = known[metric]
                scale, integer = e.scale, e.kind == "judge" and e.scale == (1.0, 5.0)
            charts[metric] = histogram(values, scale, integer)
        return {
            "name": name,
            "summary": summary,
            "histograms": charts,
            "rows": ordered[:MAX_ROWS],
            "total_rows": len(ordered),
        }

    return JSONResponse(_finite(await run_in_threadpool(read)))


@router.get("/{a}/compare/{b}")
async def compare_runs(request: Request, a: str, b: str) -> JSONResponse:
    from sorai.apps.eval.compare import compare

    run_a = child(_root(request), a, "eval runs")
    run_b = child(_root(request), b, "eval runs")

    def run() -> list[dict[str, Any]]:
        return [
            {
                "metric": d.metric,
                "pairs": d.pairs,
                "mean_a": d.mean_a,
                "mean_b": d.mean_b,
                "diff": d.diff,
                "low": d.low,
                "high": d.high,
                "higher_is_better": d.higher_is_better,
                "significant": d.significant,
                "few": d.few,
                "changed": [
                    {"index": c.index, "query": c.query, "a": c.a, "b": c.b, "delta": c.delta}
                    for c in d.changed
                ],
            }
            for d in compare(str(run_a), str(run_b))
        ]

    diffs = await run_in_threadpool(run)
    return JSONResponse(_finite({"a": a, "b": b, "metrics": diffs}))
