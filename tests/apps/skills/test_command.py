"""`sorai classify|extract|summarize|sentiment` end to end through `sorai.cli.main`, with --url
pointing at the one in-process server the skills' tests share (the `client` fixture); usage
errors and the batch reader need no server. topics and ask are tested with their skills."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sorai.apps.client import Client
from sorai.apps.skills import command
from sorai.apps.skills.summarize import STYLES
from sorai.cli import main
from sorai.errors import SoraiError

from .test_classify import EXAMPLES, INSTRUCTION, LABELS, NEW


@pytest.fixture(scope="module")
def endpoint(client: Client) -> list[str]:
    """The flags that point a verb at the shared server."""
    return ["--url", str(client.openai.base_url), "--api-key", client.openai.api_key]


def _examples() -> list[str]:
    return [flag for text, label in EXAMPLES for flag in ("--example", f"{text}=>{label}")]


def test_classify_with_labels_and_examples(endpoint, capsys) -> None:
    argv = ["classify", *NEW[:2], "--labels", ",".join(LABELS), *_examples()]
    assert main([*argv, "--instruction", INSTRUCTION, *endpoint]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line in lines:
        label, confidence, text = line.split(maxsplit=2)
        assert label in LABELS
        assert 0.0 <= float(confidence) <= 1.0
        assert text


def test_classify_batch_jsonl_with_a_bad_line(endpoint, tmp_path: Path, capsys) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"restaurant": "booking a table", "flight": "air tickets"}))
    source = tmp_path / "in.jsonl"
    rows = [
        json.dumps({"id": 1, "body": "A table for two at eight, please."}),
        "{not json",
        json.dumps({"id": 3, "text": "no body field"}),
        "",
        json.dumps({"id": 5, "body": "Two seats on the flight to Osaka."}),
    ]
    source.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["classify", "--labels-file", str(labels), "--input", str(source), "--output", str(out)]
    assert main([*argv, "--text-field", "body", *endpoint]) == 1
    err = capsys.readouterr().err
    assert f"{source}:2: not JSON" in err
    assert f"{source}:3: no 'body' field" in err
    assert "2 done, 2 failed" in err
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in written] == [1, 5]
    for row in written:
        assert row["body"] and row["label"] in ("restaurant", "flight")
        assert 0.0 <= row["confidence"] <= 1.0
        assert set(row["scores"]) == {"restaurant", "flight"}


def test_a_batch_stops_at_once_on_a_model_the_endpoint_does_not_serve(
    endpoint, tmp_path: Path, capsys
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("first text\nsecond text\nthird text\n")
    argv = ["sentiment", "--input", str(source), "--model", "no-such-model", *endpoint]
    assert main(argv) == 2  # one error for the run, not three failed rows
    err = capsys.readouterr().err
    assert "refused (404)" in err and "failed" not in err


def test_extract_with_fields(endpoint, capsys) -> None:
    argv = ["extract", "Please call Ann Lee tomorrow.", "--fields", "name: the person's name"]
    assert main([*argv, "--max-tokens", "48", "--json", *endpoint]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["text"] == "Please call Ann Lee tomorrow."
    assert list(result["record"]) == ["name"] and isinstance(result["record"]["name"], str)


def test_summarize_a_file_as_json(endpoint, tmp_path: Path, capsys) -> None:
    source = tmp_path / "report.txt"
    source.write_text(
        "Sales grew by ten percent this quarter. The new office in Osaka opened in May.\n\n"
        "Costs fell slightly, and the customer survey was positive.\n"
    )
    argv = ["summarize", str(source), "--style", "one-line", "--max-words", "15", "--json"]
    assert main([*argv, *endpoint]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["file"] == str(source)
    assert (summary["path"], summary["chunks"], summary["levels"]) == ("direct", 1, 0)
    assert 0 < summary["words"] <= 15 and summary["text"]


def test_sentiment_per_sentence(endpoint, capsys) -> None:
    argv = ["sentiment", "--per-sentence", "The food was wonderful. 店員の態度は最悪でした。"]
    assert main([*argv, *endpoint]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line in lines:
        label, score, _ = line.split(maxsplit=2)
        assert label in ("positive", "neutral", "negative")
        assert -1.0 <= float(score) <= 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["classify", "some text"], "classify needs labels"),
        (["classify", "x", "--labels", "a,b", "--labels-file", "l.json"], "not both"),
        (["classify", "--labels", "a,b"], "nothing to do"),
        (["classify", "x", "--labels", "only"], "at least two labels"),
        (["classify", "x", "--labels", "a,b", "--example", "t=>c"], "not one of the labels"),
        (["classify", "x", "--labels", "a,b", "--example", "no arrow"], "TEXT=>LABEL"),
        (["classify", "x", "--labels", "a,b", "--output", "o.jsonl"], "--output goes with"),
        (["classify", "--labels", "a,b", "--input", "missing.jsonl"], "no such file"),
        (["extract", "x"], "extract needs fields"),
        (["classify", "ok", " ", "--labels", "a,b"], "TEXT argument 2 is empty"),
        (["extract", "", "--fields", "a: b"], "TEXT argument 1 is empty"),
        (["sentiment", "\n"], "TEXT argument 1 is empty"),
        (
            ["sentiment", "--input", __file__, "--output", "no/such/dir/o.jsonl"],
            "no such directory",
        ),
        (["sentiment", "x", "--input", "in.jsonl"], "not both"),
        (["summarize", "missing.txt"], "no such file"),
        (["summarize", "missing.txt", "--max-words", "0"], "at least 1"),
    ],
)
def test_usage_errors_exit_2_before_connecting(argv, message, capsys) -> None:
    # --url at a closed port: reaching for the endpoint would fail differently.
    assert main([*argv, "--url", "http://127.0.0.1:9/v1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sorai: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_argparse_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["summarize", "x.txt", "--style", "haiku"])
    assert exit_.value.code == 2


def test_read_rows_csv_and_txt(tmp_path: Path) -> None:
    table = tmp_path / "in.csv"
    table.write_text('id,text\n1,hello\n2\n\n3,\n4,"two\nlines"\n5,after\n', encoding="utf-8")
    rows = list(command.read_rows(str(table)))
    assert [(r.where, r.text, r.error is None) for r in rows] == [
        (f"{table}:2", "hello", True),
        (f"{table}:3", None, False),
        (f"{table}:5", None, False),  # after a blank line
        (f"{table}:6", "two\nlines", True),  # a record spanning lines 6-7: where it starts
        (f"{table}:8", "after", True),
    ]
    assert rows[0].row == {"id": "1", "text": "hello"}
    with pytest.raises(SoraiError, match="no 'body' column"):
        list(command.read_rows(str(table), "body"))
    lines = tmp_path / "in.txt"
    lines.write_text("first\n\n  second  \n")
    assert [(r.where, r.row) for r in command.read_rows(str(lines), "t")] == [
        (f"{lines}:1", {"t": "first"}),
        (f"{lines}:3", {"t": "second"}),
    ]


def test_styles_match_the_skill() -> None:
    assert tuple(STYLES) == command.STYLES


@pytest.mark.slow
def test_extract_and_classify_read_images(endpoint, capsys, tmp_path: Path) -> None:
    pytest.importorskip("rapidocr", reason="the vision extra (rapidocr) is not installed")
    from tests.vision.rendered import FORM, form

    form().save(tmp_path / "form.png")
    schema = {"name": "the person's name", "phone": "the phone number"}
    (tmp_path / "form.schema.json").write_text(json.dumps(schema))
    argv = ["extract", "--image", str(tmp_path / "form.png")]
    assert main([*argv, "--schema", str(tmp_path / "form.schema.json"), "--json", *endpoint]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["text"].splitlines()[1] == "Name: " + dict(FORM)["Name"]
    assert row["record"] == {"name": dict(FORM)["Name"], "phone": dict(FORM)["Phone"]}
    argv = ["classify", "--image", str(tmp_path / "form.png"), "--labels", "form,poem,recipe"]
    assert main([*argv, "--method", "llm", "--json", *endpoint]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["label"] in ("form", "poem", "recipe")


def test_image_and_input_do_not_mix(tmp_path: Path) -> None:
    assert main(["extract", "--image", "a.png", "--input", "b.jsonl", "--fields", "a: b"]) == 2
