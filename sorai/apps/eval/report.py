"""The run directory's outputs (rows.jsonl, summary.json, report.html) and the terminal
summary table."""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from sorai.apps.command import pad, short, width
from sorai.apps.eval.registry import Evaluator

ROWS, SUMMARY, REPORT = "rows.jsonl", "summary.json", "report.html"


def histogram(values: list[float], scale: tuple[float, float] | None, integer: bool) -> list[dict]:
    """Bins for the report's chart: one per score on an integer 1-5 scale, else ten."""
    if integer and scale:
        low, high = int(scale[0]), int(scale[1])
        return [
            {"label": str(v), "count": sum(1 for x in values if round(x) == v)}
            for v in range(low, high + 1)
        ]
    if not values:
        return []
    low, high = scale if scale else (min(values), max(values))
    if high <= low:
        return [{"label": f"{low:g}", "count": len(values)}]
    step = (high - low) / 10
    bins = [0] * 10
    for x in values:
        bins[min(9, max(0, int((x - low) / step)))] += 1
    # Labelled by the bin's lower edge; the tooltip gives the whole range.
    return [
        {
            "label": f"{low + i * step:.2g}",
            "range": f"{low + i * step:.3g}-{low + (i + 1) * step:.3g}",
            "count": c,
        }
        for i, c in enumerate(bins)
    ]


def svg_chart(bins: list[dict], w: int = 280, h: int = 130) -> str:
    """An inline SVG bar chart (no script, no external library: the report works offline)."""
    if not bins:
        return '<svg width="280" height="30"><text x="4" y="20">no scores</text></svg>'
    top = max(b["count"] for b in bins) or 1
    slot = (w - 10) / len(bins)
    parts = [f'<svg class="chart" width="{w}" height="{h}" role="img">']
    for i, b in enumerate(bins):
        bar = (h - 40) * b["count"] / top
        x = 5 + i * slot
        y = h - 20 - bar
        parts.append(
            f'<rect x="{x + 2:.1f}" y="{y:.1f}" width="{slot - 4:.1f}" height="{bar:.1f}">'
            f"<title>{html.escape(b.get('range', b['label']))}: {b['count']}</title></rect>"
            f'<text x="{x + slot / 2:.1f}" y="{y - 3:.1f}" class="n">{b["count"]}</text>'
            f'<text x="{x + slot / 2:.1f}" y="{h - 6}" class="l">{html.escape(b["label"])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def render_html(
    results: list[dict[str, Any]],
    summary: dict[str, Any],
    evaluators: list[Evaluator],
    meta: dict[str, Any],
) -> str:
    template_text = resources.files("sorai.apps.eval").joinpath("report.html.j2").read_text("utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["cell"] = _cell
    env.filters["has_fail"] = lambda r: any(
        k.endswith("_result") and v == "fail" for k, v in r.items()
    )
    env.filters["row_errors"] = lambda r: "\n".join(
        str(v) for k, v in r.items() if k == "error" or k.endswith("_error")
    )
    metrics = []
    for e in evaluators:
        values = [r[e.name] for r in results if isinstance(r.get(e.name), int | float)]
        chart = svg_chart(histogram(values, e.scale, e.kind == "judge" and e.scale == (1.0, 5.0)))
        metrics.append(
            {
                "name": e.name,
                "description": e.description,
                "summary": summary["metrics"][e.name],
                "chart": Markup(chart),
                # A reasoning column only where some row has a reason (the judges).
                "reasons": any(f"{e.name}_reason" in r for r in results),
            }
        )
    meta = {"data": "", "target": None, "judge": None, "finished": "", **meta}
    return env.from_string(template_text).render(
        rows=results, metrics=metrics, summary=summary, meta=meta
    )


def write_run(
    run_dir: Path,
    results: list[dict[str, Any]],
    summary: dict[str, Any],
    evaluators: list[Evaluator],
    meta: dict[str, Any],
) -> None:
    with (run_dir / ROWS).open("w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (run_dir / SUMMARY).write_text(
        json.dumps({"run": meta, **summary}, ensure_ascii=False, indent=2) + "\n", "utf-8"
    )
    (run_dir / REPORT).write_text(render_html(results, summary, evaluators, meta), "utf-8")


def _number(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(width(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(pad(str(c), w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(pad(str(c), w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def summary_table(summary: dict[str, Any]) -> str:
    rows = []
    for name, m in summary["metrics"].items():
        rate = "-" if m["pass_rate"] is None else f"{100 * m['pass_rate']:.0f}%"
        rows.append(
            [
                name,
                _number(m["mean"]),
                rate,
                "-" if m["threshold"] is None else f"{m['threshold']:g}",
                str(m["scored"]),
                str(m["errors"]),
            ]
        )
    text = table(["metric", "mean", "pass", "threshold", "scored", "errors"], rows)
    extras = []
    for name, m in summary["metrics"].items():
        if "macro_f1" in m:
            extras.append(f"{name}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
        if "micro" in m:
            micro = m["micro"]
            extras.append(
                f"{name}: micro precision {micro['precision']:.3f}, recall "
                f"{micro['recall']:.3f}, F1 {micro['f1']:.3f}"
            )
    return "\n".join([text, *extras])


def first_errors(results: list[dict[str, Any]], limit: int = 5) -> list[str]:
    found = [
        short(str(v), 160)
        for r in results
        for k, v in r.items()
        if k == "error" or k.endswith("_error")
    ]
    return found[:limit]
