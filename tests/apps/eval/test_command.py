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
    # the ABC product s warranty lasts 60 days / the warranty lasts 90 days, articles
    # dropped: 3 shared of 7 and of 4.
    assert rows[0]["f1"] == pytest.approx(2 * (3 / 7) * (3 / 4) / (3 / 7 + 3 / 4))
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
    # The source holds what the scripted summary says: summarize drops what it does not.
    source = "The ABC blender's warranty lasts 90 days from purchase. " * 5
    rows = [{"query": source, "ground_truth": "90 days."}]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    argv = ["eval", "run", str(data), "--target", "skill:summarize", "--url", judge_server.url]
    argv += ["-m", "f1", "--out", str(tmp_path / "r"), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["run"]["target"] == "skill:summarize"
    (row,) = [json.loads(x) for x in (tmp_path / "r/rows.jsonl").read_text().splitlines()]
    assert row["response"] == "The warranty lasts 90 days."
    assert row["f1"] == pytest.approx(2 / 3)  # 2 shared of 4 and of 2 ("the" dropped)
    assert main([*argv[:4], "skill:nope", *argv[5:]]) == 2
    assert "skills: summarize, sentiment" in capsys.readouterr().err


def test_retries_is_the_number_of_requests_made_again(tmp_path, judge_server, capsys):
    # The openai client's own two retries used to multiply under the runner's.
    data = write_jsonl(tmp_path / "d.jsonl", warranty_rows(90)[:1])
    judge_server.refuse = [503] * 10
    argv = ["eval", "run", str(data), "-m", "groundedness", "--judge-url", judge_server.url]
    argv += ["--retries", "1", "--out", str(tmp_path / "r")]
    assert main(argv) == 1
    assert len(judge_server.requests) == 2
    assert "refused (503)" in capsys.readouterr().err
    assert main([*argv[:-2], "--out", str(tmp_path / "r2"), "--retries", "-1"]) == 2
    assert "--retries must be 0 or more" in capsys.readouterr().err


def test_outside_csv_bom_quoted_newline_numbers_empty_cells(tmp_path, capsys):
    path = tmp_path / "export.csv"
    path.write_bytes(
        "\ufeffquestion,expected,output\n"
        '"What is\nthe warranty?",90,"It is 90 days."\n'
        '"Price?",,"42"\n'
        "日本語の質問,９０日,90日\n".encode()
    )
    argv = ["eval", "run", str(path), "-m", "f1,exact_match", "--out", str(tmp_path / "r")]
    columns = ["--column", "ground_truth=expected", "--column", "response=output"]
    assert main([*argv, *columns, "--column", "query=question", "--json"]) == 1
    capsys.readouterr()
    rows = [json.loads(x) for x in (tmp_path / "r/rows.jsonl").read_text().splitlines()]
    assert rows[0]["query"] == "What is\nthe warranty?"  # the BOM did not eat the header
    assert rows[0]["f1"] == pytest.approx(0.4)  # "90" in "it is 90 days": P 1/4, R 1
    assert rows[1]["f1_error"].endswith("no ground_truth (needed by f1)")
    assert rows[2]["exact_match"] == 1.0  # full-width ９０ is 90
    # A mapped column the file does not have is named, with the columns it does have.
    assert main([*argv, *columns, "--column", "query=qestion"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sorai: error: {path}: no column 'qestion' (--column query=qestion); columns: "
        "expected, output, question"
    )


def test_resume_with_the_in_process_judge_asks_nothing_again(tmp_path, monkeypatch, capsys):
    # Without --url the judge is sorai's own server, on a new port each run; stand in for it
    # with a judge double on a new port each run.
    import sorai.apps.eval.command as command
    from sorai.apps.client import Client

    servers: list[JudgeServer] = []

    def fresh_local_server(args, embedding_model=None):
        servers.append(JudgeServer())
        client = Client.connect(servers[-1].url)
        client.in_process = True
        return client

    monkeypatch.setattr(command, "connect", fresh_local_server)
    data = write_jsonl(tmp_path / "d.jsonl", warranty_rows(60)[:3])
    argv = ["eval", "run", str(data), "-m", "groundedness", "--out", str(tmp_path / "r")]
    try:
        assert main(argv) == 0 and main(argv) == 0
        assert servers[0].url != servers[1].url
        assert len(servers[0].requests) == 3 and servers[1].requests == []
        assert "3 results came from the cache" in capsys.readouterr().err
    finally:
        for server in servers:
            server.close()


def test_custom_evaluator_from_a_python_file_path(tmp_path, capsys):
    checks = tmp_path / "my checks" / "checks.py"
    checks.parent.mkdir()
    checks.write_text("def cites(row):\n    return '90' in row['context']\n")
    data = write_jsonl(tmp_path / "d.jsonl", warranty_rows(60)[:2])
    argv = ["eval", "run", str(data), "--evaluator", f"cites={checks}:cites", "-m", "cites"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "r/rows.jsonl").read_text().splitlines()]
    assert [r["cites"] for r in rows] == [1.0, 1.0]
    (tmp_path / "bad.py").write_text("import nowhere_to_be_found\n")
    argv[4] = f"bad={tmp_path / 'bad.py'}:f"
    assert main([*argv[:5], "-m", "bad", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "bad.py fails to import: No module named 'nowhere_to_be_found'" in err
