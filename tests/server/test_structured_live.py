"""Structured outputs and tool calling over the real default model, through the openai client.

SmolLM2-135M's chat template knows no tools, so these exercise the fallback format
(sorai/server/tools.py). Schemas are small and bounded (maxLength, maxItems) so that outputs
finish well inside max_tokens.
"""

from __future__ import annotations

import json
import re

import httpx2
import jsonschema
import openai
import pytest

from sorai.model.tokenizer import Tokenizer
from tests.server.conftest import Served

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "maxLength": 15},
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}


def chat(live: Served, messages: list[dict], **options):
    options.setdefault("max_tokens", 80)
    options.setdefault("temperature", 0)
    return live.client().chat.completions.create(model=live.model, messages=messages, **options)


def schema_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


# -- response_format and guided_* ------------------------------------------------------------


def test_response_format_json_schema(live: Served) -> None:
    reply = chat(
        live,
        [{"role": "user", "content": "Describe a person as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_response_format_json_object(live: Served) -> None:
    reply = chat(
        live,
        [{"role": "user", "content": "Give me a JSON object with a colour and a number."}],
        response_format={"type": "json_object"},
        max_tokens=60,
        extra_body={"seed": 1},
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


def test_guided_choice_and_regex(live: Served) -> None:
    choices = ["positive", "negative", "neutral"]
    reply = chat(
        live,
        [{"role": "user", "content": "Sentiment of 'I love this film'?"}],
        n=3,
        temperature=1.0,
        extra_body={"guided_choice": choices},
    )
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in reply.choices)

    pattern = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
    reply = chat(
        live,
        [{"role": "user", "content": "A word and a number, please."}],
        n=2,
        temperature=1.0,
        extra_body={"guided_regex": pattern},
    )
    assert all(re.fullmatch(pattern, c.message.content) for c in reply.choices)


def test_completions_take_constraints(live: Served) -> None:
    client = live.client()
    reply = client.completions.create(
        model=live.model,
        prompt="The colour of the sky is",
        max_tokens=10,
        temperature=0,
        extra_body={"guided_choice": [" blue", " green"]},
    )
    assert reply.choices[0].text in (" blue", " green")
    reply = client.completions.create(
        model=live.model,
        prompt="A person as JSON:",
        max_tokens=80,
        temperature=0,
        extra_body={"guided_json": json.dumps(PERSON)},
    )
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


def test_streamed_constrained_text_equals_whole(live: Served) -> None:
    options = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    }
    messages = [{"role": "user", "content": "A person, as JSON."}]
    whole = chat(live, messages, **options).choices[0].message.content
    stream = chat(live, messages, stream=True, **options)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), PERSON)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, None),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_grammar": "start: foo\nfoo: undefined_rule"}, "guided_grammar"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ],
)
def test_bad_constraints_are_400(live: Served, extra: dict, param: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(live, ASK_WEATHER, max_tokens=5, extra_body=extra)
    error = info.value.body
    assert error["param"] == (param or next(iter(extra)))
    assert error["message"]


def test_bad_response_format_schema_is_400(live: Served) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}
    with pytest.raises(openai.BadRequestError) as info:
        chat(
            live,
            ASK_WEATHER,
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
        )
    assert info.value.body["param"] == "response_format"
    assert "minimum" in info.value.body["message"]  # llguidance's reason, passed on
    with pytest.raises(openai.BadRequestError) as info:
        live.client().completions.create(
            model=live.model, prompt="x", max_tokens=5, extra_body={"guided_regex": "(("}
        )
    assert info.value.body["param"] == "guided_regex"


# -- tools -----------------------------------------------------------------------------------


def check_call(call, tools: list[dict]) -> dict:
    by_name = {t["function"]["name"]: t for t in tools}
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in by_name
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema_of(by_name[call.function.name]))
    return arguments


def test_tool_choice_required(live: Served) -> None:
    reply = chat(live, ASK_WEATHER, tools=TOOLS, tool_choice="required")
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    check_call(call, TOOLS)


def test_tool_choice_named(live: Served) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = chat(live, ASK_WEATHER, tools=TOOLS, tool_choice=named)
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time"
    check_call(call, TOOLS)


def test_streamed_tool_call_reassembles(live: Served) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = chat(live, ASK_WEATHER, tools=TOOLS, tool_choice=named).choices[0].message
    chunks = list(chat(live, ASK_WEATHER, tools=TOOLS, tool_choice=named, stream=True))
    deltas = [c.choices[0] for c in chunks if c.choices]
    calls = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    first, *rest = calls
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather")
    assert first.id.startswith("call_") and first.function.arguments == ""
    assert len(rest) > 1  # the arguments arrive as they are generated
    assert all(c.index == 0 and c.id is None and c.function.name is None for c in rest)
    arguments = "".join(c.function.arguments for c in rest)
    assert arguments == whole.tool_calls[0].function.arguments
    check_call(whole.tool_calls[0], TOOLS)
    assert deltas[-1].finish_reason == "tool_calls"
    assert not any(d.delta.content for d in deltas)


def test_tool_round_trip(live: Served, tokenizer: Tokenizer) -> None:
    first = chat(live, ASK_WEATHER, tools=TOOLS, tool_choice="required").choices[0].message
    (call,) = first.tool_calls
    result = json.dumps({"temperature": 18, "sky": "sunny"})
    messages = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump(exclude_none=True)],
        },
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    # The fallback rendering: the call as assistant text, the result as a user turn.
    response = httpx2.post(
        live.url + "/tokenize",
        json={"model": live.model, "messages": messages},
        headers=live.headers,
    )
    prompt = tokenizer.decode(response.json()["tokens"])
    written = {"name": "get_weather", "arguments": json.loads(call.function.arguments)}
    assert f"<|im_start|>assistant\n{json.dumps(written)}<|im_end|>" in prompt
    assert f"<|im_start|>user\nResult of get_weather (call {call.id}): {result}" in prompt

    # Asked for the answer ("none"), the model writes text. (With "auto" the 135M model
    # mostly calls the tool again, which is as valid an answer.)
    final = chat(live, messages, tools=TOOLS, tool_choice="none", max_tokens=40)
    (choice,) = final.choices
    assert choice.message.tool_calls is None
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content and choice.message.content.strip()
    again = chat(live, messages, tools=TOOLS, max_tokens=40).choices[0]
    if again.finish_reason == "tool_calls":
        check_call(again.message.tool_calls[0], TOOLS)
    else:
        assert again.message.tool_calls is None and again.message.content


def test_auto_answers_in_text_or_a_valid_call(live: Served) -> None:
    reply = chat(live, ASK_WEATHER, tools=TOOLS, n=3, temperature=1.0, extra_body={"seed": 3})
    for choice in reply.choices:
        if choice.finish_reason == "tool_calls":
            for call in choice.message.tool_calls:
                check_call(call, TOOLS)
        else:
            assert choice.message.tool_calls is None and choice.message.content is not None


def test_tool_choice_none_is_plain_text(live: Served) -> None:
    reply = chat(live, ASK_WEATHER, tools=TOOLS, tool_choice="none", max_tokens=20)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "options",
    [
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS},
        {"tool_choice": "required"},
        {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        {"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]},
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
            ]
        },
    ],
)
def test_bad_tool_requests_are_400(live: Served, options: dict) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(live, ASK_WEATHER, max_tokens=5, **options)
    assert info.value.body["param"].startswith(("tool_choice", "tools"))


# -- the seed's flight-ticket extraction -----------------------------------------------------

# From the seed document's slides (shared/seed/000_515b3d0ab32d8da6.txt): a customer request
# and its fields, then a second request to extract the same way.
FLIGHT_EXAMPLE = (
    "2月10日 19:20 成田発、シアトル行きなのユナイテッド航空 616 便をエコノミークラスで6枚ください。"
)
FLIGHT_EXAMPLE_FIELDS = {
    "日時": "02/10 19:20",
    "出発": "成田",
    "到着": "シアトル",
    "航空会社": "ユナイテッド航空",
    "クラス": "エコノミー",
    "枚数": 6,
}
FLIGHT_REQUEST = (
    "全日空の羽田発、ロサンゼルス行きで、10月20日午後3:00出発をエコノミークラスで1枚ください。"
)
FLIGHT_SCHEMA = {
    "type": "object",
    "properties": {
        "日時": {"type": "string", "pattern": "^[0-9]{2}/[0-9]{2} [0-9]{2}:[0-9]{2}$"},
        "出発": {"type": "string", "maxLength": 10},
        "到着": {"type": "string", "maxLength": 10},
        "航空会社": {"type": "string", "maxLength": 10},
        "クラス": {"type": "string", "maxLength": 10},
        "枚数": {"type": "integer", "minimum": 1, "maximum": 99},
    },
    "required": ["日時", "出発", "到着", "航空会社", "クラス", "枚数"],
    "additionalProperties": False,
}


def test_flight_ticket_extraction(live: Served) -> None:
    messages = [
        {"role": "system", "content": "顧客の問い合わせを以下の例にそって分類してください。"},
        {"role": "user", "content": FLIGHT_EXAMPLE},
        {"role": "assistant", "content": json.dumps(FLIGHT_EXAMPLE_FIELDS, ensure_ascii=False)},
        {"role": "user", "content": FLIGHT_REQUEST},
    ]
    reply = chat(
        live,
        messages,
        max_tokens=300,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "flight", "schema": FLIGHT_SCHEMA, "strict": True},
        },
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "stop", choice.message.content
    fields = json.loads(choice.message.content)
    jsonschema.validate(fields, FLIGHT_SCHEMA)
    assert list(fields) == list(FLIGHT_SCHEMA["properties"])


# -- output that fits its budget, and constraints that fail ----------------------------------

OPEN_RECORD = {  # open objects, unbounded strings: what a small model rambles in
    "type": "object",
    "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
    "required": ["name", "city"],
}


def test_a_closed_early_answer_says_so_in_stop_reason(live: Served) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": OPEN_RECORD}}
    body = {
        "model": live.model,
        "messages": [{"role": "user", "content": "A person as JSON with name and city."}],
        "response_format": fmt,
        "temperature": 1.0,
    }
    seen = set()
    for seed, max_tokens in enumerate((12, 16, 20, 24)):
        request = {**body, "seed": seed, "max_tokens": max_tokens}
        response = httpx2.post(
            live.url + "/v1/chat/completions", json=request, headers=live.headers, timeout=300
        )
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), OPEN_RECORD)
        # vLLM's extra field, listed only when set.
        seen.add(choice.get("stop_reason", "absent"))
        assert choice.get("stop_reason", "absent") in ("budget", "absent")
        options = {k: v for k, v in request.items() if k not in ("model", "messages")}
        chunks = list(chat(live, body["messages"], stream=True, **options))
        last = chunks[-1].choices[0]
        assert last.finish_reason == "stop"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == choice["message"]["content"]
        assert getattr(last, "stop_reason", None) == choice.get("stop_reason")
    assert "budget" in seen


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"},
    ],
)
def test_a_schema_that_admits_no_output_is_400(live: Served, schema: dict) -> None:
    # Before: 200 with an empty answer and finish_reason "stop".
    with pytest.raises(openai.BadRequestError) as info:
        chat(live, ASK_WEATHER, max_tokens=5, extra_body={"guided_json": schema})
    assert info.value.body["param"] == "guided_json"
    assert "admits no complete output" in info.value.body["message"]


def test_a_matcher_error_mid_generation_is_an_error_the_client_sees(
    live: Served, tokenizer: Tokenizer
) -> None:
    # llguidance refuses the 2,500-item row after "b", which logit_bias makes the model pick
    # (tests/engine/test_guided.py has the engine's side). Before: a normal "stop".
    items = " | ".join(f'"item{i}"' for i in range(2500))
    b = tokenizer.encode("b")
    options = {
        "max_tokens": 8,
        "logit_bias": {str(b[0]): 100},
        "extra_body": {"guided_grammar": f'start: "a" | "b" many\nmany: {items}'},
    }
    with pytest.raises(openai.BadRequestError) as info:
        chat(live, ASK_WEATHER, **options)
    assert info.value.body["code"] == "guided_decoding_failed"
    assert "during generation" in info.value.body["message"]
    with pytest.raises(openai.APIError, match="during generation"):
        list(chat(live, ASK_WEATHER, stream=True, **options))


def test_five_thousand_choices_answer_one_of_them(live: Served) -> None:
    choices = [f"option {i}" for i in range(5000)]
    reply = chat(
        live, ASK_WEATHER, max_tokens=12, temperature=1.0, extra_body={"guided_choice": choices}
    )
    assert reply.choices[0].message.content in choices
    assert reply.choices[0].finish_reason == "stop"


def test_the_docs_json_schema_snippet_ends_without_max_tokens(live: Served) -> None:
    # docs/structured-outputs.md's example, as written (no max_tokens: the rest of the context).
    # Without closed objects the model added keys for minutes; strict closes them.
    schema = {
        "type": "object",
        "required": ["name", "age"],
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
    }
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "strict": True, "schema": schema},
    }
    for seed in range(3):
        reply = live.client().chat.completions.create(
            model=live.model,
            messages=[{"role": "user", "content": "A person as JSON."}],
            response_format=fmt,
            seed=seed,
        )
        (choice,) = reply.choices
        assert choice.finish_reason == "stop" and reply.usage.completion_tokens < 40
        person = json.loads(choice.message.content)
        assert set(person) == {"name", "age"}
        jsonschema.validate(person, schema)
