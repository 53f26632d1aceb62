"""`sorai eval` end to end: the command line against an OpenAI-compatible judge endpoint (the
judge double `JudgeServer`, see doubles.py, so verdicts are deterministic and requests can be
counted where they arrive)."""

from __future__ import annotations

import csv
import json

import pytest

from sorai.cli import main

from .conftest import write_jsonl
from .doubles import JudgeServer, warranty_rows


@pytest.fixture
def judge_server():
    server = JudgeServer()
    yield server
    server.close()


def test_run_writes_rows_summary_report_and_resumes(tmp_path, judge_server, capsys):
    data = write_jsonl(tmp_path / "seed.jsonl", warranty_rows(60))
    out = tmp_path / "run"
    argv = ["eval", "run", str(data), "-m", "groundedness,f1,rouge_l,exact_match"]
    argv += ["--judge-url", judge_server.url, "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "groundedness" in table and "0%" in table

    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["groundedness_result"] == "fail" for r in rows)
    assert rows[0]["f1"] == pytest.approx(2 * (4 / 8) * (4 / 5) / (4 / 8 + 4 / 5))
    summary = json.loads((out / "summary.json").read_text())
    g = summary["metrics"]["groundedness"]
    assert (g["mean"], g["pass_rate"], g["scored"], g["threshold"]) == (1.0, 0.0, 5, 3.0)
    assert summary["run"]["judge"] == "judge-double"
    assert (out / "report.html").read_text().count("<tr data-fail=") == 5
    assert len(judge_server.requests) == 5

    # Again into the same directory: every result is cached, no request reaches the judge.
    assert main(argv) == 0
    assert len(judge_server.requests) == 5
    assert "20 results came from the cache" in capsys.readouterr().err


def test_csv_with_mapped_columns_and_thresholds(tmp_path, judge_server, capsys):
    path = tmp_path / "qa.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "passage", "answer", "expected"])
        for r in warranty_rows(90)[:2]:
            writer.writerow([r["query"], r["context"], r["response"], r["ground_truth"]])
    argv = ["eval", "run", str(path), "-m", "groundedness", "-m", "bleu", "--json"]
    argv += ["--column", "query=question", "--column", "context=passage"]
    argv += ["--column", "response=answer", "--column", "ground_truth=expected"]
    argv += [
        "--threshold",
        "bleu=0.9",
        "--judge-url",
        judge_server.url,
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metrics"]["groundedness"]["pass_rate"] == 1.0
    assert summary["metrics"]["bleu"]["threshold"] == 0.9
    assert summary["metrics"]["bleu"]["pass_rate"] == 0.0


def test_bad_input_is_one_line_naming_file_and_line(tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "context"} for r in warranty_rows(60)]
    data = write_jsonl(tmp_path / "no_context.jsonl", rows)
    assert main(["eval", "run", str(data), "-m", "groundedness"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"sorai: error: {data}:1: no row has 'context', which groundedness needs "
        "(--column context=COLUMN maps one)"
    )
    assert main(["eval", "run", str(data), "-m", "groundness"]) == 2
    assert (
        "unknown metric 'groundness'; metrics: groundedness, relevance" in capsys.readouterr().err
    )
    assert main(["eval", "run", str(data), "-m", "latency"]) == 2
    assert "add --target" in capsys.readouterr().err
    assert main(["eval", "run", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path), str(tmp_path)]) == 2
    assert "no rows.jsonl" in capsys.readouterr().err


def test_custom_python_evaluator_by_name(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_metrics.py").write_text(
        "def says_ninety(row):\n    return {'score': '90' in row['response'], 'reason': 'ok'}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "d.jsonl", warranty_rows(60)[:2] + warranty_rows(90)[:2])
    argv = ["eval", "run", str(data), "--evaluator", "ninety=my_metrics:says_ninety"]
    argv += ["-m", "ninety", "--threshold", "ninety=1", "--out", "r"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "r/rows.jsonl").read_text().splitlines()]
    assert [r["ninety"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert [r["ninety_result"] for r in rows] == ["fail", "fail", "pass", "pass"]


def test_target_generates_responses_with_latency_and_tokens(tmp_path, judge_server, capsys):
    rows = [{k: v for k, v in r.items() if k != "response"} for r in warranty_rows(60)[:3]]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    argv = ["eval", "run", str(data), "--target", "default", "--url", judge_server.url]
    argv += ["-m", "groundedness,latency,tokens", "--out", str(tmp_path / "r"), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run"]["target"] == "model:judge-double"
    assert summary["metrics"]["groundedness"]["pass_rate"] == 1.0
    results = [json.loads(x) for x in (tmp_path / "r/rows.jsonl").read_text().splitlines()]
    assert {r["response"] for r in results} == {"The warranty lasts 90 days."}
    assert all(r["tokens"] == 15 and r["tokens_completion"] == 5 for r in results)
    assert all(r["latency"] > 0 for r in results)
    # 3 generations and 3 judgements reached the endpoint.
    assert len(judge_server.requests) == 6
    # Another system prompt generates afresh; the same responses are not judged again.
    assert main([*argv, "--system", "Answer briefly."]) == 0
    assert len(judge_server.requests) == 9


def test_skill_target(tmp_path, judge_server, capsys):
    rows = [{"query": "A long text about ABC's warranty. " * 5, "ground_truth": "90 days."}]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    argv = ["eval", "run", str(data), "--target", "skill:summarize", "--url", judge_server.url]
    argv += ["-m", "f1", "--out", str(tmp_path / "r"), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["run"]["target"] == "skill:summarize"
    (row,) = [json.loads(x) for x in (tmp_path / "r/rows.jsonl").read_text().splitlines()]
    assert row["response"] == "The warranty lasts 90 days."
    assert row["f1"] == pytest.approx(4 / 7)  # 2 shared of 5 and of 2: P 0.4, R 1
    assert main([*argv[:4], "skill:nope", *argv[5:]]) == 2
    assert "skills: summarize, sentiment" in capsys.readouterr().err
