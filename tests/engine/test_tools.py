"""Tool calling through the Python API (LLM.chat) on the real default model: the same tools,
tool_choice values, prompt (sorai/model/chat.py), constraints (sorai/engine/tools.py) and
parsing as the server."""

from __future__ import annotations

import json

import jsonschema
import pytest

from sorai.engine.llm import LLM
from sorai.engine.params import GuidedSpec
from sorai.engine.tools import ToolSetup
from sorai.errors import SoraiError, ToolError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SHORT = {"max_tokens": 60, "temperature": 0}


@pytest.fixture(scope="module")
def llm(default_llm: LLM) -> LLM:
    """The session's default model (tests/conftest.py): nothing here changes its weights."""
    return default_llm


def check_call(call: dict, tool: dict) -> dict:
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == tool["function"]["name"]
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, tool["function"].get("parameters", {"type": "object"}))
    return arguments


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_a_forced_call_parses_and_fits_the_schema(llm: LLM, choice) -> None:
    out = llm.chat(ASK, tools=[WEATHER, CLOCK], tool_choice=choice, **SHORT)
    assert out.finish_reason == "tool_calls", out
    assert out.tool_calls is not None and len(out.tool_calls) == 1
    call = out.tool_calls[0]
    if choice != "required":
        assert call["function"]["name"] == "get_weather"
    check_call(call, WEATHER if call["function"]["name"] == "get_weather" else CLOCK)
    assert out.text == ""


def test_a_round_trip_renders_and_generates(llm: LLM) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
    ]
    rendered, _ = ToolSetup.from_request([WEATHER]).template_input(llm.tokenizer, messages)
    assert rendered[-1] == {
        "role": "user",
        "content": "Result of get_weather (call call_1): 18C and sunny",
    }
    out = llm.chat(messages, tools=[WEATHER], tool_choice="none", max_tokens=30, temperature=0)
    assert out.tool_calls is None and out.finish_reason in ("stop", "length") and out.text
    # Plain chat takes the same messages, without tools.
    assert llm.chat(messages, max_tokens=5, temperature=0).tool_calls is None


def test_constraints() -> None:
    named = ToolSetup.from_request([WEATHER, CLOCK], {"function": {"name": "get_weather"}})
    schema = json.loads(named.constraint().json_schema)
    assert schema == {
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": WEATHER["function"]["parameters"],
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    required = json.loads(
        ToolSetup.from_request([WEATHER, CLOCK], "required").constraint().json_schema
    )
    assert [s["properties"]["name"]["const"] for s in required["anyOf"]] == ["get_weather", "now"]
    assert ToolSetup.from_request([WEATHER]).constraint() is None


def test_constrain_keeps_the_request_constraint_unless_a_call_is_forced() -> None:
    own = GuidedSpec(regex="a+")
    assert ToolSetup.from_request([WEATHER], "auto").constrain(own, "guided_regex") is own
    forced = ToolSetup.from_request([WEATHER], "required")
    assert forced.constrain(None) == forced.constraint()
    with pytest.raises(ToolError, match="cannot be combined with guided_regex") as info:
        forced.constrain(own, "guided_regex")
    assert info.value.param == "guided_regex"


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        (None, "required", "needs tools"),
        (None, {"type": "function", "function": {"name": "now"}}, "gives no tools"),
        ([WEATHER], {"type": "function", "function": {"name": "later"}}, "not among the tools"),
        ([WEATHER], "always", "tool_choice must be"),
        ([{"type": "function", "function": {"name": "a b"}}], None, "tools.0.function.name"),
    ],
)
def test_bad_tool_options_raise_with_a_clear_message(llm: LLM, tools, choice, message) -> None:
    with pytest.raises(ToolError, match=message) as info:
        llm.chat(ASK, tools=tools, tool_choice=choice, max_tokens=1)
    assert isinstance(info.value, SoraiError) and info.value.param


def test_a_forced_call_and_another_constraint_conflict(llm: LLM) -> None:
    with pytest.raises(ToolError, match="cannot be combined with guided_regex"):
        llm.chat(ASK, tools=[WEATHER], tool_choice="required", guided_regex="a+", max_tokens=1)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "18C"}],
        [{"role": "user", "content": "hi", "tool_calls": []}],
        [{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}],
    ],
)
def test_malformed_tool_messages_raise(llm: LLM, messages) -> None:
    with pytest.raises(ToolError, match="messages.0"):
        llm.chat(messages, max_tokens=1)


def test_a_module_below_the_server_does_not_import_it() -> None:
    import subprocess
    import sys

    code = "import sys, sorai.engine.llm, sorai.engine.tools; print('sorai.server' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    # The renderer is part of the model layer: it pulls in no engine, server or trainer.
    code = (
        "import sys, sorai.model.chat; "
        "print(' '.join({m.split('.')[1] for m in sys.modules if m.startswith('sorai.')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {"engine", "server", "train", "apps"} & set(out.stdout.split())
