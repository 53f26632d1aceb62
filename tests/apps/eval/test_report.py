"""report.html in headless Chromium (Debian's `chromium`; .ci/run installs it): every row is
in the table after the scripts ran, and a screenshot is saved for a person to look at."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sorai.apps.eval.data import load_rows
from sorai.apps.eval.registry import Context, resolve
from sorai.apps.eval.report import histogram, render_html, write_run
from sorai.apps.eval.runner import Runner
from sorai.apps.eval.summary import summarize

from .conftest import write_jsonl
from .doubles import NumberJudge, warranty_rows

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
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
