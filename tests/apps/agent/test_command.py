"""`sorai agent`: options checked before a model loads, and a real run over --url (the session
server's endpoint, so the CLI goes through the same protocol as with any other)."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest

from sorai import cli
from tests.apps.agent.scripted import Calls, ScriptedModel
from tests.apps.agent.test_real_model import PRODUCT, QUESTION


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["t", "--tools", "calculator,teleport"], "unknown tool 'teleport'"),
        (["t", "--tools", ","], "--tools names no tool"),
        (["t", "--workspace", "/no/such/dir"], "--workspace /no/such/dir is not a directory"),
        (["  ", "--tools", "calculator"], "the task is empty"),
        (["t", "--tools", "search_documents", "--index", "/no/index.sqlite"], "no index at"),
        (["t", "--max-iterations", "0"], "--max-iterations must be at least 1"),
        (["t", "--max-seconds", "-5"], "--max-seconds must be positive"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("sorai.apps.agent.command.connect", no_model)
    assert cli.main(["agent", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sorai: error:") and message in err and "\n" not in err


def test_agent_verb_against_an_endpoint(client, tmp_path, capsys):
    argv = [
        "agent",
        QUESTION,
        "--tools", "calculator",
        "--url", str(client.openai.base_url),
        "--api-key", client.openai.api_key,
        "--trace-dir", str(tmp_path),
        "--json",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    trace = json.loads(out)
    assert trace["steps"][0]["tool"] == "calculator"
    assert PRODUCT in trace["answer"]
    assert "Action: calculator" in err and "trace:" in err  # the live steps, on stderr
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_without_workspace_a_run_writes_in_a_fresh_directory(tmp_path, monkeypatch, capsys):
    # The default used to be the current directory. A scripted model (tests/apps/agent/
    # scripted.py) makes the write the test is about; the real one cannot be relied on to.
    model = ScriptedModel(
        [
            Calls([("write_file", {"path": "notes/todo.txt", "content": "hi"})]),
            Calls([("final_answer", {"answer": "done"})]),
        ]
    )
    monkeypatch.setattr("sorai.apps.agent.command.connect", lambda *a, **k: nullcontext(model))
    monkeypatch.setenv("SORAI_HOME", str(tmp_path / "home"))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    argv = ["agent", "Write hi to notes/todo.txt", "--tools", "files"]
    assert cli.main([*argv, "--trace-dir", str(tmp_path / "traces")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "done"
    assert list(here.iterdir()) == []
    (workspace,) = (tmp_path / "home" / "agent" / "workspaces").iterdir()
    assert (workspace / "notes" / "todo.txt").read_text() == "hi"
    assert f"workspace: {workspace}" in err
