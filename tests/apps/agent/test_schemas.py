"""The built-in tools' argument schemas, as guided decoding gets them: tight enough that the
small default model can only write a number expression, a workspace path, or the name of a
file that exists. Checked here against the schemas themselves and llguidance's compiler;
test_real_model.py checks what the model then does."""

from __future__ import annotations

import json
import re

import llguidance
import pytest

from sorai.apps.agent.calculator import EXPRESSION_PATTERN, calculator_tool, evaluate
from sorai.apps.agent.files import PATH_PATTERN, Workspace, file_tools
from sorai.apps.agent.native import FINAL_TOOL


@pytest.fixture
def space(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("buy milk")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / ".hidden").write_text("h")
    return Workspace(tmp_path)


def _parameters(tool):
    return tool.definition()["function"]["parameters"]


@pytest.mark.parametrize(
    "text", ["4321 * 8765", "4321*8765", "2 * (3 + 4)", "-(1.5 - 2) ** 3", "7 // 2", "9 % 4"]
)
def test_the_calculator_pattern_takes_arithmetic(text):
    assert re.fullmatch(EXPRESSION_PATTERN, text)
    evaluate(text)  # and the evaluator agrees


@pytest.mark.parametrize(
    "text",
    ["{{number}}*{{number}}", "4321 * 8765, 4321 * 8765", "x + 1", "", "1 +", "2  *  3", "1e5"],
)
def test_the_calculator_pattern_refuses_templates_words_and_lists(text):
    assert not re.fullmatch(EXPRESSION_PATTERN, text)


def test_the_calculator_schema_is_closed_and_bounded():
    parameters = _parameters(calculator_tool())
    expression = parameters["properties"]["expression"]
    assert expression["pattern"] == EXPRESSION_PATTERN and expression["maxLength"] <= 200
    assert parameters["additionalProperties"] is False and parameters["required"] == ["expression"]


def test_existing_paths_are_offered_by_name(space):
    tools = {t.name: t for t in file_tools(space)}
    read = _parameters(tools["read_file"])["properties"]["path"]
    assert read["enum"] == ["a.txt", "notes/todo.txt"] and "pattern" not in read
    listing = _parameters(tools["list_files"])["properties"]["path"]
    assert listing["enum"] == [".", "notes"]
    write = _parameters(tools["write_file"])["properties"]["path"]
    assert write["pattern"] == PATH_PATTERN and "enum" not in write
    (space.root / "notes" / "new.txt").write_text("n")  # each request sees the files now
    assert "notes/new.txt" in _parameters(tools["read_file"])["properties"]["path"]["enum"]


def test_an_empty_workspace_leaves_read_file_to_its_pattern(tmp_path):
    tools = {t.name: t for t in file_tools(Workspace(tmp_path))}
    assert _parameters(tools["read_file"])["properties"]["path"]["pattern"] == PATH_PATTERN


@pytest.mark.parametrize(
    ("path", "fits"),
    [
        ("notes/todo.txt", True),
        ("a b.txt", True),
        ("日本語.txt", True),
        ("../secret", False),
        ("/etc/passwd", False),
        (".env", False),
        ("notes/", False),
        ("a//b", False),
    ],
)
def test_the_path_pattern_is_workspace_relative(path, fits):
    assert bool(re.fullmatch(PATH_PATTERN, path)) == fits


def test_every_builtin_schema_compiles_for_guided_decoding(space):
    # llguidance's own compiler (what sorai/engine/guided.py runs) takes each schema as sent.
    tools = [calculator_tool(), *file_tools(space)]
    schemas = [_parameters(t) for t in tools] + [FINAL_TOOL["function"]["parameters"]]
    for schema in schemas:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        assert llguidance.LLMatcher.validate_grammar(grammar) == "", json.dumps(schema)
