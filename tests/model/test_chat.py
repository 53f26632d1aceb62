"""The chat renderer without a model: messages normalised, the prompt (fallback and native) and
parsing calls out of answers. Uses the default model's real tokenizer (its template knows no
tools, so it gets the fallback)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sorai.errors import ToolError
from sorai.model.chat import (
    ToolChoice,
    check_messages,
    fallback_messages,
    parse_calls,
    split_forced,
)
from sorai.model.gguf import GGUFFile
from sorai.model.tokenizer import Tokenizer

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


@pytest.fixture(scope="module")
def tokenizer(default_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(default_gguf).metadata)


# -- messages --------------------------------------------------------------------------------


def test_messages_are_normalised() -> None:
    parts = [{"type": "text", "text": "Use "}, {"type": "text", "text": "日本語"}]
    assert check_messages(
        [
            {"role": "developer", "content": "x", "name": "ignored"},
            {"role": "user", "content": parts},
            {"role": "assistant", "content": None},
        ]
    ) == [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "Use \n日本語"},
        {"role": "assistant", "content": ""},
    ]
    # Normalising twice changes nothing (training stores normalised messages).
    once = check_messages(CONVERSATION)
    assert check_messages(once) == once


@pytest.mark.parametrize(
    ("messages", "where"),
    [
        ("hello", None),
        ([{"role": "tool", "content": "42"}], "messages.0"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "messages.0"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages.0"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}], None),
    ],
)
def test_bad_messages_raise_naming_the_message(messages, where) -> None:
    with pytest.raises(ToolError, match="messages") as info:
        check_messages(messages)
    if where is not None:
        assert info.value.param == where


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
    assert not tokenizer.renders_tools
    setup = ToolChoice.from_request([WEATHER], "auto")
    rendered, tools = setup.template_input(tokenizer, CONVERSATION)
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
    rendered, _ = setup.template_input(tokenizer, CONVERSATION[1:2])
    assert rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    none = ToolChoice.from_request([WEATHER], "none")
    assert none.template_input(tokenizer, CONVERSATION[1:2])[0] == [
        {"role": "user", "content": "Weather in Paris and Rome?"}
    ]
    required = ToolChoice.from_request([WEATHER], {"function": {"name": "get_weather"}})
    rendered, _ = required.template_input(tokenizer, CONVERSATION[1:2])
    assert "You must call the function get_weather" in rendered[0]["content"]
    text = tokenizer.decode(setup.encode(tokenizer, CONVERSATION))
    assert "<|im_start|>user\nResult of get_weather (call call_1): 18C\n" in text


def test_messages_without_tools_render_as_the_template_renders_them(tokenizer: Tokenizer) -> None:
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert fallback_messages(plain) == plain
    for gen in (True, False):
        text = ToolChoice().render(tokenizer, plain, add_generation_prompt=gen)
        assert text == tokenizer.apply_chat_template(plain, add_generation_prompt=gen)
        ids = ToolChoice().encode(tokenizer, plain, add_generation_prompt=gen)
        assert ids == tokenizer.encode_chat(plain, add_generation_prompt=gen)
        assert tokenizer.decode(ids) == text


def test_render_is_the_text_of_encode(tokenizer: Tokenizer) -> None:
    setup = ToolChoice.from_request([WEATHER, CLOCK])
    for gen in (True, False):
        text = setup.render(tokenizer, CONVERSATION, add_generation_prompt=gen)
        assert setup.encode(tokenizer, CONVERSATION, gen) == tokenizer.encode(text)
    assert text.endswith("Result of get_weather (call call_2): 21C<|im_end|>\n")


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


def with_templates(tokenizer: Tokenizer, templates: dict[str, str]) -> Tokenizer:
    other = copy.copy(tokenizer)
    other._chat_templates = templates
    other._compiled = {}
    return other


def test_native_prompt(tokenizer: Tokenizer) -> None:
    native = with_templates(tokenizer, {"default": TOOL_TEMPLATE})
    assert native.renders_tools
    setup = ToolChoice.from_request([WEATHER, CLOCK], "auto")
    text = native.decode(setup.encode(native, CONVERSATION))
    assert text.startswith("<|im_start|>system\nTools: get_weather now<|im_end|>\n")
    assert '<tool_call>get_weather {"city": "Paris"}</tool_call>' in text
    assert "<|im_start|>tool\nget_weather: 21C<|im_end|>" in text
    none = ToolChoice.from_request([WEATHER], "none")
    assert "Tools:" not in native.decode(none.encode(native, CONVERSATION))


def test_which_templates_render_tools(tokenizer: Tokenizer) -> None:
    assert with_templates(tokenizer, {"default": "x", "tool_use": "{{ tools }}"}).renders_tools
    assert not with_templates(tokenizer, {"default": "{{ messages_tools }}"}).renders_tools
    assert not with_templates(tokenizer, {}).renders_tools


def test_call_schema() -> None:
    assert ToolChoice.from_request([WEATHER], "auto").call_schema() is None
    named = ToolChoice.from_request([WEATHER, CLOCK], {"function": {"name": "now"}})
    assert named.call_schema() == {
        "type": "object",
        "properties": {"name": {"const": "now"}, "arguments": {"type": "object", "properties": {}}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    required = ToolChoice.from_request([WEATHER, CLOCK], "required").call_schema()
    assert [s["properties"]["name"]["const"] for s in required["anyOf"]] == ["get_weather", "now"]


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


def test_split_forced() -> None:
    assert split_forced('{"name":"a\\"b","arguments":{"x":[1,{}]}}') == (
        'a"b',
        '{"x":[1,{}]}',
        True,
    )
    assert split_forced('{"name":"a","arguments":{"x":{}') == ("a", '{"x":{', False)
    assert split_forced('{"name":"a"') is None


def test_answers_in_openai_shape() -> None:
    auto = ToolChoice.from_request([WEATHER, CLOCK], None)
    content, calls, reason = auto.answer('Sure. {"name": "now", "arguments": {}}', "stop")
    assert (content, reason) == ("Sure.", "tool_calls")
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "now", "arguments": "{}"}
    assert auto.answer("Sunny.", "stop") == ("Sunny.", None, "stop")
