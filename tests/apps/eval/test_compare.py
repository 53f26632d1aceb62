"""`sorai eval compare`: paired bootstrap intervals and the rows that changed most."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sorai.apps.eval.compare import bootstrap_interval, compare
from sorai.apps.eval.data import load_rows
from sorai.apps.eval.registry import Context, resolve
from sorai.apps.eval.report import write_run
from sorai.apps.eval.runner import Runner
from sorai.apps.eval.summary import summarize
from sorai.cli import main

from .conftest import write_jsonl
from .doubles import WARRANTY_CONTEXT, NumberJudge

QUESTIONS = [f"Question {i} about the ABC warranty?" for i in range(20)]


def make_run(tmp_path, name: str, correct: set[int]):
    """A run over 20 rows whose response is right (90 days) for the rows in `correct`."""
    rows = [
        {
            "query": q,
            "context": WARRANTY_CONTEXT,
            "ground_truth": "The warranty lasts 90 days.",
            "response": f"The warranty lasts {90 if i in correct else 60} days.",
        }
        for i, q in enumerate(QUESTIONS)
    ]
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    evaluators = resolve(["groundedness", "f1"])
    run_dir = tmp_path / name
    results = Runner(evaluators, Context(NumberJudge()), run_dir, progress=False).run(
        load_rows(str(data))
    )
    write_run(run_dir, results, summarize(results, evaluators, {}), evaluators, {"data": name})
    return run_dir


def test_bootstrap_interval():
    assert bootstrap_interval(np.full(10, 0.5)) == (0.5, 0.5)
    low, high = bootstrap_interval(np.array([-1.0, 1.0] * 20))
    assert low < 0 < high


def test_a_clearly_better_run_has_a_positive_difference_excluding_zero(tmp_path, capsys):
    a = make_run(tmp_path, "a", correct={0, 1, 2, 3})
    b = make_run(tmp_path, "b", correct=set(range(18)))
    diffs = {d.metric: d for d in compare(str(a), str(b))}
    g = diffs["groundedness"]
    # The claim judge scores a right answer 4 (90 and its words in the context, 'lasts' not),
    # a wrong one 1.
    assert (g.mean_a, g.mean_b, g.pairs) == (pytest.approx(1.6), pytest.approx(3.7), 20)
    assert g.diff == pytest.approx(2.1)
    assert 0 < g.low < g.diff < g.high and g.significant
    assert diffs["f1"].diff > 0 and diffs["f1"].low > 0
    # Rows 4-17 went from 1 to 4; the rest did not change and are not listed.
    assert [c.index for c in g.changed] == [4, 5, 6, 7, 8]
    assert {c.delta for c in g.changed} == {3.0}

    assert main(["eval", "compare", str(a), str(b), "--json"]) == 0
    out = {m["metric"]: m for m in json.loads(capsys.readouterr().out)}
    assert out["groundedness"]["ci95"][0] > 0 and out["groundedness"]["significant"]
    assert main(["eval", "compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "B better" in text and "most changed, groundedness:" in text
    # The other way round: worse, interval below zero.
    (back,) = [d for d in compare(str(b), str(a)) if d.metric == "groundedness"]
    assert back.diff == pytest.approx(-2.1) and back.high < 0


def test_a_run_against_itself_shows_no_change(tmp_path):
    a = make_run(tmp_path, "a", correct={0, 1, 2, 3})
    for d in compare(str(a), str(a)):
        assert (d.diff, d.low, d.high, d.significant, d.changed) == (0.0, 0.0, 0.0, False, [])


def test_bootstrap_of_many_rows_in_bounded_memory():
    import tracemalloc

    rng = np.random.default_rng(1)
    differences = rng.normal(0.1, 1.0, size=50_000)
    tracemalloc.start()
    try:
        low, high = bootstrap_interval(differences)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6  # all at once: 2,000 x 50,000 picks, 800 MB
    # The standard error of the mean is 1 / sqrt(50,000) = 0.0045: the interval is about
    # 0.1 +- 2 * 0.0045.
    assert 0.08 < low < 0.1 < high < 0.12 and high - low == pytest.approx(0.0175, abs=0.003)
    # Same seed, same interval.
    assert bootstrap_interval(differences) == (low, high)


def test_a_damaged_run_is_one_line_naming_the_file(tmp_path, capsys):
    a = make_run(tmp_path, "a", correct={0})
    b = make_run(tmp_path, "b", correct={1})
    (b / "summary.json").write_text('{"metrics": {"groundedness": ')  # a kill mid-write
    assert main(["eval", "compare", str(a), str(b)]) == 2
    assert capsys.readouterr().err.startswith(f"sorai: error: {b / 'summary.json'}:1: not JSON")
    (b / "summary.json").write_text("[]")
    assert main(["eval", "compare", str(a), str(b)]) == 2
    assert "not a summary" in capsys.readouterr().err
    (b / "rows.jsonl").write_text('{"index": 0}\n{"ind')
    assert main(["eval", "compare", str(a), str(b)]) == 2
    assert capsys.readouterr().err.startswith(f"sorai: error: {b / 'rows.jsonl'}:2: not JSON")


def test_too_few_rows_are_flagged(tmp_path, capsys):
    # Three rows that all improved: the bootstrap interval is [3, 3], which proves nothing.
    a = make_run(tmp_path, "a", correct=set())
    b = make_run(tmp_path, "b", correct=set(range(20)))
    for run in (a, b):
        lines = (run / "rows.jsonl").read_text().splitlines()[:3]
        (run / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (g,) = [d for d in compare(str(a), str(b)) if d.metric == "groundedness"]
    assert (g.pairs, g.low, g.high, g.few) == (3, 3.0, 3.0, True)
    assert main(["eval", "compare", str(a), str(b)]) == 0
    assert "B better (only 3 rows: not enough to decide)" in capsys.readouterr().out
    assert main(["eval", "compare", str(a), str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["few_rows"] is True
