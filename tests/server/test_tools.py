"""Tools and output constraints at the API without a model: request -> ToolSetup / GuidedSpec
(400s naming the field), the prompt of a request's messages, answers as ToolCall models, and
streams reassembling to the whole answer. The renderer itself is tested in
tests/model/test_chat.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sorai.engine.params import GuidedSpec
from sorai.model.chat import ToolChoice
from sorai.model.tokenizer import Tokenizer
from sorai.server.errors import APIError
from sorai.server.guided import guided_spec
from sorai.server.protocol import ChatMessage, DeltaMessage
from sorai.server.tools import ToolSetup, fallback_messages

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


CONVERSATION = (
    {
        "role": "developer",
        "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}],
    },
    {"role": "user", "content": "Weather in Paris?"},
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
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
)


def test_a_request_renders_as_its_plain_messages(tokenizer: Tokenizer) -> None:
    """The protocol's ChatMessages go to the renderer as the dicts the client sent."""
    for tools, choice in [(None, None), ([WEATHER], None), ([WEATHER, CLOCK], "required")]:
        served = ToolSetup.from_request(tools, choice)
        plain = ToolChoice.from_request(tools, choice)
        ids = served.encode(tokenizer, messages(*CONVERSATION))
        assert ids == plain.encode(tokenizer, CONVERSATION)
        assert "<|im_start|>system\nBe\nbrief." in tokenizer.decode(ids)


def test_bad_messages_are_400s_naming_the_message(tokenizer: Tokenizer) -> None:
    bad = [ChatMessage.model_construct(role="tool", content="18C", tool_call_id=None)]
    with pytest.raises(APIError) as info:
        ToolSetup().encode(tokenizer, bad)
    assert (info.value.status, info.value.param) == (400, "messages.0")


def test_messages_without_tools_render_as_before() -> None:
    plain = messages({"role": "developer", "content": "x"}, {"role": "user", "content": "y"})
    assert fallback_messages(plain) == [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "y"},
    ]


# -- answers ---------------------------------------------------------------------------------


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
