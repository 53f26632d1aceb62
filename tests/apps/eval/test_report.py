"""report.html in headless Chromium (Debian's `chromium`; .ci/run installs it): every row is
in the table after the scripts ran, and a screenshot is saved for a person to look at."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from sorai.apps.eval.data import load_rows
from sorai.apps.eval.registry import Context, resolve
from sorai.apps.eval.report import histogram, render_html, write_run
from sorai.apps.eval.runner import Runner
from sorai.apps.eval.summary import summarize
from tests.console.browser import CHROMIUM, HEADLESS

from .conftest import write_jsonl
from .doubles import NumberJudge, warranty_rows

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def make_report(tmp_path: Path) -> tuple[Path, int]:
    rows = warranty_rows(60) + warranty_rows(90)[:3]
    rows.append(
        {
            "query": "ABC製品の保証期間は？",
            "context": "ABC製品の保証期間は購入日から90日間です。",
            "ground_truth": "保証期間は90日です。",
            "response": "保証期間は60日です。",
        }
    )
    data = write_jsonl(tmp_path / "seed.jsonl", rows)
    with data.open("a") as f:
        f.write("{broken\n")
    evaluators = resolve(["groundedness", "faithfulness", "f1", "rouge_l"])
    run_dir = tmp_path / "run"
    results = Runner(evaluators, Context(NumberJudge()), run_dir, progress=False).run(
        load_rows(str(data))
    )
    meta = {"data": "seed.jsonl", "judge": "number-judge-double", "finished": "now"}
    write_run(run_dir, results, summarize(results, evaluators, {}), evaluators, meta)
    return run_dir / "report.html", len(results)


def test_histogram_bins():
    assert [b["count"] for b in histogram([1, 1, 5, 3], (1.0, 5.0), integer=True)] == [
        2,
        0,
        1,
        0,
        1,
    ]
    bins = histogram([0.0, 0.05, 0.5, 1.0], (0.0, 1.0), integer=False)
    assert len(bins) == 10 and bins[0]["count"] == 2 and bins[5]["count"] == 1
    assert bins[9]["count"] == 1


def test_report_escapes_what_the_rows_say(tmp_path):
    evaluators = resolve(["f1"])
    results = [{"index": 0, "query": "<script>alert(1)</script>", "response": "a", "f1": 1.0}]
    page = render_html(results, summarize(results, evaluators, {}), evaluators, {})
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="no chromium: `apt-get install -y --no-install-recommends chromium` (.ci/run does)",
)
def test_report_opens_in_headless_chromium_with_every_row(tmp_path):
    report, count = make_report(tmp_path)
    assert count == 10
    url = report.as_uri()

    def chromium(*args: str) -> subprocess.CompletedProcess:
        profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
        return subprocess.run(
            [CHROMIUM, *HEADLESS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            text=True,
            timeout=90,
        )

    dom = chromium("--dump-dom").stdout
    # The DOM after the scripts ran: every row is there and the filter counted them all.
    assert len(re.findall(r"<tr data-fail=", dom)) == count
    assert f"showing {count} of {count} rows" in dom
    assert "保証期間は60日です。" in dom
    assert dom.count('class="chart"') == 4

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "eval-report.png"
    shot.unlink(missing_ok=True)
    chromium(f"--screenshot={shot}", "--window-size=1400,1000")
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"\nscreenshot of the report: {shot}")


HOSTILE = (
    "<script>document.body.setAttribute('data-pwned', 'script')</script>"
    "<img src=x onerror=\"document.body.setAttribute('data-pwned', 'img')\">"
)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium")
def test_report_with_1200_rows_and_hostile_text_in_chromium(tmp_path):
    # Responses, reasons and errors that are HTML must show as text and never run, and a
    # report of more than a thousand rows must finish its scripts (filter count, sortable).
    evaluators = resolve(["groundedness", "f1"])
    results = [
        {
            "index": i,
            "query": f"question {i}",
            "context": ["passage one", "passage two"],
            "response": HOSTILE if i % 100 == 7 else f"answer {i} " * 20,
            "ground_truth": 90,
            "groundedness": float(1 + i % 5),
            "groundedness_reason": HOSTILE,
            "groundedness_result": "pass" if i % 5 >= 2 else "fail",
            "f1": (i % 10) / 10,
            **({"f1_error": HOSTILE} if i == 3 else {}),
        }
        for i in range(1200)
    ]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run(run_dir, results, summarize(results, evaluators, {}), evaluators, {"data": HOSTILE})
    page = (run_dir / "report.html").read_text()
    assert "<img src=x" not in page and page.count("&lt;img src=x") > 1200
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [
            CHROMIUM,
            *HEADLESS,
            f"--user-data-dir={profile}",
            "--dump-dom",
            (run_dir / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "showing 1200 of 1200 rows" in dom
    assert len(re.findall(r"<tr data-fail=", dom)) == 1200
    assert "data-pwned" not in dom.replace("setAttribute('data-pwned'", "")


def test_report_shows_the_confusion_matrix():
    evaluators = resolve(["classification"])
    pairs = [("pos", "pos"), ("neg", "pos"), ("neg", "neg"), ("<b>odd</b>", "neg")]
    results = [
        {"index": i, "response": p, "ground_truth": g, "classification": float(p == g)}
        for i, (p, g) in enumerate(pairs)
    ]
    page = render_html(results, summarize(results, evaluators, {}), evaluators, {})
    table = page[page.index('<table class="confusion">') :]
    table = table[: table.index("</table>")]
    # labels sorted: <b>odd</b>, neg, pos; rows expected, columns predicted.
    cells = re.findall(r"<t[hd]>(.*?)</t[hd]>", table)
    assert cells == ["", "&lt;b&gt;odd&lt;/b&gt;", "neg", "pos"] + [
        "&lt;b&gt;odd&lt;/b&gt;", "0", "0", "0",
        "neg", "1", "1", "0",
        "pos", "0", "1", "1",
    ]  # fmt: skip


def test_long_texts_are_cut_in_the_report_not_in_rows_jsonl(tmp_path):
    evaluators = resolve(["f1"])
    context = "保証期間は90日です。" * 5000  # 55,000 characters
    results = [
        {"index": i, "context": context, "response": "a", "ground_truth": "a", "f1": 1.0}
        for i in range(50)
    ]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run(run_dir, results, summarize(results, evaluators, {}), evaluators, {})
    page = (run_dir / "report.html").read_text()
    assert page.count("[51,000 more characters in rows.jsonl]") == 50
    assert len(page) < 50 * 5000 + 20_000
    assert (run_dir / "rows.jsonl").read_text().count(context) == 50


def test_a_negative_cosine_is_charted_where_it_is():
    (e,) = resolve(["embedding_similarity"])
    bins = histogram([-0.5, 0.1, 0.9], e.scale, integer=False)
    # Spanning -0.5 to 0.9; before, a 0-1 scale put -0.5 into the first bin with 0.0.
    assert bins[0]["label"] == "-0.5" and bins[0]["count"] == 1
    assert [b["count"] for b in bins] == [1, 0, 0, 0, 1, 0, 0, 0, 0, 1]
