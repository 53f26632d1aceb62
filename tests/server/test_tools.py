"""Tools and output constraints without a model: request -> ToolSetup / GuidedSpec, the prompt
(fallback and native), parsing answers, and streams reassembling to the whole answer."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sorai.engine.params import GuidedSpec
from sorai.model.tokenizer import Tokenizer
from sorai.server.errors import APIError
from sorai.server.guided import guided_spec
from sorai.server.protocol import ChatMessage, DeltaMessage
from sorai.server.tools import (
    ToolSetup,
    fallback_messages,
    parse_calls,
    split_forced,
    supports_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now"}}
NAMES = {"get_weather", "now"}


def messages(*items: dict) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in items]


# -- requests --------------------------------------------------------------------------------


def test_tool_choice_modes() -> None:
    assert ToolSetup.from_request(None, None).mode == "none"
    assert ToolSetup.from_request([], None).mode == "none"
    assert ToolSetup.from_request(None, "none").mode == "none"
    assert ToolSetup.from_request([WEATHER], None).mode == "auto"
    assert ToolSetup.from_request([WEATHER], "required").forced
    named = ToolSetup.from_request(
        [WEATHER, CLOCK], {"type": "function", "function": {"name": "now"}}
    )
    assert (named.mode, named.name) == ("named", "now")
    none = ToolSetup.from_request([WEATHER], "none")
    assert not none.active and none.constraint() is None
    # A tool without parameters takes an empty object.
    assert named.tools[1].parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (None, "auto", "tool_choice"),
        (None, {"type": "function", "function": {"name": "now"}}, "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "later"}}, "tool_choice"),
        ([WEATHER], {"type": "function"}, "tool_choice"),
        ([WEATHER], "always", "tool_choice"),
        ("get_weather", None, "tools"),
        ([{"type": "function", "function": {}}], None, "tools.0.function.name"),
        ([{"type": "function", "function": {"name": "a b"}}], None, "tools.0.function.name"),
        ([{"type": "retrieval"}], None, "tools.0.type"),
        ([{"type": "function"}], None, "tools.0.function"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            None,
            "tools.0.function.parameters",
        ),
        ([WEATHER, WEATHER], None, "tools.1.function.name"),
    ],
)
def test_bad_tool_requests(tools, choice, param) -> None:
    with pytest.raises(APIError) as info:
        ToolSetup.from_request(tools, choice)
    assert (info.value.status, info.value.param) == (400, param)


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


def test_guided_fields() -> None:
    def spec(**fields):
        return guided_spec(fields)

    assert spec() == (None, None)
    assert spec(response_format={"type": "text"}) == (None, None)
    assert spec(response_format={"type": "json_object"}) == (
        GuidedSpec(json_object=True),
        "response_format",
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    wrapped = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert json.loads(spec(response_format=wrapped)[0].json_schema) == schema
    assert json.loads(spec(guided_json=json.dumps(schema))[0].json_schema) == schema
    assert spec(guided_choice=["a", "b"])[0].choice == ("a", "b")
    assert spec(guided_regex="a+")[0].regex == "a+"
    assert spec(guided_grammar="start: 'a'")[0].grammar == "start: 'a'"
    for bad, param in [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"guided_json": [1]}, "guided_json"),
        ({"guided_choice": "a"}, "guided_choice"),
        ({"guided_choice": ["a", ""]}, "guided_choice.1"),
        ({"guided_regex": ""}, "guided_regex"),
        ({"guided_regex": "a", "guided_grammar": "start: 'a'"}, "guided_grammar"),
    ]:
        with pytest.raises(APIError) as info:
            spec(**bad)
        assert info.value.param == param, bad


# -- the prompt ------------------------------------------------------------------------------

CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
)


def test_fallback_prompt(tokenizer: Tokenizer) -> None:
    assert not supports_tools(tokenizer)
    setup = ToolSetup.from_request([WEATHER], "auto")
    rendered, tools = setup.template_input(tokenizer, messages(*CONVERSATION))
    assert tools is None
    system, user, assistant, results = rendered
    assert system["content"].startswith("Be brief.\n\nYou can call these functions")
    assert (
        json.dumps(
            {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER["function"]["parameters"],
            }
        )
        in system["content"].splitlines()
    )
    assert '{"name": <function name>, "arguments":' in system["content"]
    assert assistant == {
        "role": "assistant",
        "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '{"name": "get_weather", "arguments": {"city": "Rome"}}',
    }
    assert results == {
        "role": "user",
        "content": "Result of get_weather (call call_1): 18C\n"
        "Result of get_weather (call call_2): 21C",
    }
    # Without a system message the tools get one of their own; "none" offers no tools.
    rendered, _ = setup.template_input(tokenizer, messages(*CONVERSATION[1:2]))
    assert rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    none = ToolSetup.from_request([WEATHER], "none")
    assert none.template_input(tokenizer, messages(*CONVERSATION[1:2]))[0] == [
        {"role": "user", "content": "Weather in Paris and Rome?"}
    ]
    required = ToolSetup.from_request([WEATHER], {"function": {"name": "get_weather"}})
    rendered, _ = required.template_input(tokenizer, messages(*CONVERSATION[1:2]))
    assert "You must call the function get_weather" in rendered[0]["content"]
    text = tokenizer.decode(setup.encode(tokenizer, messages(*CONVERSATION)))
    assert "<|im_start|>user\nResult of get_weather (call call_1): 18C\n" in text


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
    "{% elif m.role == 'tool' %}{{ m.name }}: {{ m.content }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_native_prompt(tokenizer: Tokenizer) -> None:
    native = copy.copy(tokenizer)
    native._chat_templates = {"default": TOOL_TEMPLATE}
    native._compiled = {}
    assert supports_tools(native)
    setup = ToolSetup.from_request([WEATHER, CLOCK], "auto")
    text = native.decode(setup.encode(native, messages(*CONVERSATION)))
    assert text.startswith("<|im_start|>system\nTools: get_weather now<|im_end|>\n")
    assert '<tool_call>get_weather {"city": "Paris"}</tool_call>' in text
    assert "<|im_start|>tool\nget_weather: 21C<|im_end|>" in text
    none = ToolSetup.from_request([WEATHER], "none")
    assert "Tools:" not in native.decode(none.encode(native, messages(*CONVERSATION)))


def test_messages_without_tools_render_as_before() -> None:
    plain = messages({"role": "developer", "content": "x"}, {"role": "user", "content": "y"})
    assert fallback_messages(plain) == [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "y"},
    ]


# -- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('{"name": "now", "arguments": {}}', None, [("now", "{}")]),
        (
            '{"name":"get_weather","arguments":{"city":"Oslo"}}',
            None,
            [("get_weather", '{"city":"Oslo"}')],
        ),
        (
            "<tool_call>\n"
            + json.dumps({"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})})
            + "\n</tool_call>",
            None,
            [("get_weather", '{"city":"Oslo"}')],
        ),
        (
            'Let me check.\n```json\n{"name": "get_weather", "parameters": {"city": "Oslo"}}\n```',
            "Let me check.",
            [("get_weather", '{"city":"Oslo"}')],
        ),
        (
            '[{"name": "now", "arguments": {}}, {"name": "now"}]',
            None,
            [("now", "{}"), ("now", "{}")],
        ),
        (
            '{"type": "function", "function": {"name": "now", "arguments": {}}}',
            None,
            [("now", "{}")],
        ),
        ('{"name": "later", "arguments": {}}', None, None),
        ('{"name": "now", "arguments": [1]}', None, None),
        ("It is sunny {maybe}.", None, None),
        ('{"city": "Oslo"}', None, None),
    ],
)
def test_parse_calls(text: str, content: str | None, calls) -> None:
    parsed = parse_calls(text, NAMES)
    if calls is None:
        assert parsed is None
    else:
        assert parsed == (content, calls)


def test_answers() -> None:
    auto = ToolSetup.from_request([WEATHER, CLOCK], None)
    content, calls, reason = auto.answer('{"name": "now", "arguments": {}}', "stop")
    assert (content, reason) == (None, "tool_calls")
    assert calls[0].function.name == "now" and calls[0].id.startswith("call_")
    assert auto.answer("Sunny.", "stop") == ("Sunny.", None, "stop")
    single = ToolSetup.from_request([CLOCK], None, parallel_tool_calls=False)
    _, calls, _ = single.answer('{"name": "now"}{"name": "now"}', "stop")
    assert len(calls) == 1

    forced = ToolSetup.from_request([WEATHER], "required")
    _, calls, reason = forced.answer('{"name":"get_weather","arguments":{"city":"Oslo"}}', "stop")
    assert (calls[0].function.arguments, reason) == ('{"city":"Oslo"}', "tool_calls")
    # Cut off by max_tokens: the partial call and "length", as OpenAI answers.
    _, calls, reason = forced.answer('{"name":"get_weather","arguments":{"ci', "length")
    assert (calls[0].function.arguments, reason) == ('{"ci', "length")
    assert forced.answer('{"na', "length") == ('{"na', None, "length")


def test_split_forced() -> None:
    assert split_forced('{"name":"a\\"b","arguments":{"x":[1,{}]}}') == (
        'a"b',
        '{"x":[1,{}]}',
        True,
    )
    assert split_forced('{"name":"a","arguments":{"x":{}') == ("a", '{"x":{', False)
    assert split_forced('{"name":"a"') is None


def replay(setup: ToolSetup, pieces: list[str], finish: str) -> tuple[list[DeltaMessage], str]:
    stream = setup.stream()
    deltas = [d for piece in pieces for d in stream.feed(piece)]
    more, reason = stream.finish(finish)
    return deltas + more, reason


def reassemble(deltas: list[DeltaMessage]) -> tuple[str | None, list[tuple[str, str]]]:
    content = "".join(d.content or "" for d in deltas) or None
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for call in d.tool_calls or []:
            if call.id is not None:
                assert call.function.arguments == ""
                calls[call.index] = [call.function.name, ""]
            else:
                calls[call.index][1] += call.function.arguments
    return content, [tuple(calls[i]) for i in sorted(calls)]


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


FORCED_OUTPUTS = [
    '{"name":"get_weather","arguments":{"city":"Oslo"}}',
    '{"name":"now","arguments":{}}',
    '{"name":"get_weather","arguments":{"city":"{}}"}}',
]
AUTO_OUTPUTS = [
    'Sure. {"name": "now", "arguments": {}}',
    "It is sunny in Oslo today.",
    "Use [brackets] and {braces} freely.",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
    'Checking:\n```json\n[{"name": "now", "arguments": {}}, {"name": "now", "arguments": {}}]\n```',
]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(FORCED_OUTPUTS + AUTO_OUTPUTS),
    st.lists(st.integers(min_value=0), max_size=8),
    st.booleans(),
)
def test_streams_reassemble_to_the_whole_answer(text: str, cuts: list[int], forced: bool) -> None:
    """However the text arrives, the streamed deltas say what the whole answer says."""
    if forced and text not in FORCED_OUTPUTS:
        forced = False
    setup = ToolSetup.from_request([WEATHER, CLOCK], "required" if forced else "auto")
    content, calls, reason = setup.answer(text, "stop")
    deltas, streamed_reason = replay(setup, split_at(text, cuts), "stop")
    streamed_content, streamed_calls = reassemble(deltas)
    assert streamed_reason == reason
    assert streamed_content == content
    assert streamed_calls == [(c.function.name, c.function.arguments) for c in calls or []]
    if forced and len(split_at(text, cuts)) > 3:
        # A forced call is sent as it is generated, not all at the end.
        assert len([d for d in deltas if d.tool_calls]) >= 2
