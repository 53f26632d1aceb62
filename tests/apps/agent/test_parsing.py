"""The calculator's evaluator and the ReAct parser, on the inputs models actually write."""

from __future__ import annotations

import pytest

from sorai.apps.agent.calculator import calculator_tool, evaluate
from sorai.apps.agent.react import parse
from sorai.apps.agent.tools import ToolFailure


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1234 * 5678", 7006652),
        ("2 * (3 + 4)", 14),
        ("2^10", 1024),
        ("-3 ** 2", -9),
        ("7 // 2 + 7 % 2", 4),
        ("1,234 * 2", 2468),
        ("sqrt(16) + abs(-2)", 6),
        ("round(pi, 3)", 3.142),
        ("10 / 4", 2.5),
        ("max(1, 5, 3)", 5),
    ],
)
def test_calculator_evaluates(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('true')", "is not arithmetic"),
        ("().__class__", "is not arithmetic"),
        ("x + 1", "is not arithmetic"),
        ("'a' * 3", "is not arithmetic"),
        ("9 ** 9 ** 9", "exponents above"),
        ("1 / 0", "division by zero"),
        ("sqrt(-1)", "math domain error"),
        ("2 +", "not an expression"),
        ("1" * 600, "longer than"),
    ],
)
def test_calculator_refuses(expression, message):
    with pytest.raises(ToolFailure, match=message):
        evaluate(expression)


def test_calculator_tool_failure_is_an_observation():
    result = calculator_tool()({"expression": "open('x')"})
    assert not result.ok and result.output.startswith("calculator failed: \"open('x')\" is not")
    assert calculator_tool()("6 * 7").output == "42"  # a bare value for its one parameter


def test_react_parse_action():
    d = parse('Thought: add them\nAction: calculator\nAction Input: {"expression": "2+2"}')
    assert d.thought == "add them"
    assert [(c.name, c.arguments) for c in d.calls] == [("calculator", {"expression": "2+2"})]


@pytest.mark.parametrize(
    ("text", "name", "arguments"),
    [
        ("action: calculator\naction input: 2 + 2", "calculator", "2 + 2"),
        ("Action: `calculator`\nAction Input:\n```json\n{\"expression\": \"1+1\"}\n```",
         "calculator", {"expression": "1+1"}),
        ("Action: calculator(3 * 3)", "calculator", "3 * 3"),
        ('**Action:** read_file\n**Action Input:** {"path": "a.txt"} then I will see',
         "read_file", {"path": "a.txt"}),
        ('Action: add\nAction Input: {"a": 1, "b": 2}\nObservation: 3\nFinal Answer: 3',
         "add", {"a": 1, "b": 2}),
        # LangChain's conventions: multi-line JSON input, the MRKL `tool[input]` form, an
        # answer invented after the action (the action runs; its input ends at the label).
        ('Action: add\nAction Input: {\n  "a": 1,\n  "b": 2\n}\n', "add", {"a": 1, "b": 2}),
        ("Action: calculator[2 + 2]", "calculator", "2 + 2"),
        ("Action: calculator\nAction Input: 2 + 2\nFinal Answer: 4", "calculator", "2 + 2"),
        ('Action: python\nAction Input: {"code": "print(1)\\nprint(2)"}', "python",
         {"code": "print(1)\nprint(2)"}),
    ],
)  # fmt: skip
def test_react_parse_is_forgiving(text, name, arguments):
    d = parse(text)
    assert d.error is None and d.answer is None
    assert [(c.name, c.arguments) for c in d.calls] == [(name, arguments)]


def test_react_parse_final_answer_and_errors():
    assert parse("Thought: easy\nFinal Answer: 42\nmore").answer == "42\nmore"
    # An action after the answer is dropped, not made part of the answer.
    assert parse("Final Answer: 4\nAction: calculator\nAction Input: 2+2").answer == "4"
    assert "neither" in parse("I would say 42.").error
    assert "no 'Action Input:'" in parse("Action: add").error
    assert "is empty" in parse("Final Answer:   ").error
