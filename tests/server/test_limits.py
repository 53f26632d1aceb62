"""OpenAI's documented request limits and hostile text, over the scripted engine: every refusal
is a 400 in OpenAI's shape whose `param` names the field, never a 500 or a silent acceptance.

The engine is scripted (tests/server/fake_engine.py) because these are the server's checks,
made before a request reaches any engine; the real engine's share is in test_api_live.py.
"""

from __future__ import annotations

import json

import httpx2
import openai
import pytest

from tests.server.conftest import Served
from tests.server.fake_engine import REPLY, FakeEngine

MESSAGES = [{"role": "user", "content": "Hello there"}]


def tool(name: str, description: str = "does a thing") -> dict:
    parameters = {"type": "object", "properties": {}}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


def raw_post(fake: Served, path: str, text: str) -> httpx2.Response:
    """`text` as the body, sent as is: JSON escapes such as \\ud800 reach the server intact."""
    headers = {**fake.headers, "Content-Type": "application/json"}
    return httpx2.post(fake.url + path, content=text.encode("ascii"), headers=headers)


def assert_400(response: httpx2.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    return error["message"]


# -- OpenAI's limits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stop": ["s"] * 1000}, "stop", "at most 4"),
        ({"temperature": 2.01}, "temperature", "[0, 2]"),
        ({"top_p": 1.01}, "top_p", "[0, 1]"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
        ({"n": 129}, "n", "128"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "[0, 20]"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias", "vocabulary"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"tools": [tool(f"f{i}") for i in range(129)]}, "tools", "at most 128"),
        ({"tools": [tool("get weather")]}, "tools.0.function.name", "^[a-zA-Z0-9_-]{1,64}$"),
        ({"tools": [tool("ok"), tool("a.b")]}, "tools.1.function.name", "letters, digits"),
        ({"tools": [tool("x" * 65)]}, "tools.0.function.name", "1 to 64"),
    ],
)
def test_openai_limits_are_400_naming_the_field(
    fake: Served, fields: dict, param: str, words: str
) -> None:
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 2, **fields}
    message = assert_400(raw_post(fake, "/v1/chat/completions", json.dumps(body)), param)
    assert words in message


def test_limits_at_their_bounds_are_accepted(fake: Served, fake_engine: FakeEngine) -> None:
    reply = fake.client().chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        max_tokens=2,
        stop=["a1", "b2", "c3", "d4"],
        temperature=2,
        top_p=0,
        logprobs=True,
        top_logprobs=20,
        presence_penalty=-2,
        logit_bias={"5": 100, "6": -100},
        tools=[tool("fn_0-x")],
    )
    assert reply.choices[0].finish_reason == "length"
    params = fake_engine.requests[-1][1]
    assert params.stop == ("a1", "b2", "c3", "d4") and params.temperature == 2.0
    # 128 tools pass the tools limit; their definitions then overflow the scripted engine's
    # 256-token window, the next check.
    with pytest.raises(openai.BadRequestError) as info:
        fake.client().chat.completions.create(
            model="fake-model", messages=MESSAGES, tools=[tool(f"f{i}") for i in range(128)]
        )
    assert info.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": 6}, "logprobs"),
        ({"stop": ["1", "2", "3", "4", "5"]}, "stop"),
        ({"best_of": 21}, "best_of"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"echo": True, "suffix": "x"}, "echo"),
    ],
)
def test_completion_limits_are_400(fake: Served, fields: dict, param: str) -> None:
    body = {"model": "fake-model", "prompt": "Once", "max_tokens": 2, **fields}
    assert_400(raw_post(fake, "/v1/completions", json.dumps(body)), param)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ([{"type": "image_url", "image_url": {}}], "without an 'image_url' object"),
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "does not read"),
        ([{"type": "file", "file": {"file_id": "f"}}], "does not read"),
        ([{"type": "text", "text": "a"}, {"type": "video"}], "content[1] has type 'video'"),
        ([{"type": "text"}], "without a 'text' string"),
    ],
)
def test_content_parts_other_than_text_are_refused_clearly(
    fake: Served, content: list, words: str
) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": content}]}
    response = raw_post(fake, "/v1/chat/completions", json.dumps(body))
    message = assert_400(response, "messages.0.content")
    assert words in message


def test_every_openai_role_is_accepted(fake: Served, fake_engine: FakeEngine) -> None:
    # Including the deprecated function calling: an assistant function_call and the
    # "function" message answering it read as a tool call and its result.
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    ]
    body = {"model": "fake-model", "messages": messages, "max_tokens": 2}
    response = raw_post(fake, "/v1/chat/completions", json.dumps(body))
    assert response.status_code == 200, response.text
    prompt = fake.engine.tokenizer.decode(fake_engine.requests[-1][0])
    assert "sunny" in prompt and "I cannot." in prompt and "get_weather" in prompt
    body["messages"] = [{"role": "function", "content": "sunny"}]
    assert "needs 'name'" in assert_400(
        raw_post(fake, "/v1/chat/completions", json.dumps(body)), "messages.0"
    )
    body["messages"] = [{"role": "narrator", "content": "x"}]
    assert_400(raw_post(fake, "/v1/chat/completions", json.dumps(body)), "messages.0.role")


# -- lone surrogates: were a 500 "internal server error (TypeError)" --------------------------

LONE = "a\\ud800b"  # as JSON text: the escape of a lone high surrogate


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": "{LONE}"}}]}}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "system", "content": "{LONE}"}}, '
            '{"role": "user", "content": "hi"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"}, '
            f'{{"type": "text", "text": "{LONE}"}}]}}]}}',
            "messages.0.content.1.text",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
            f'"function": {{"name": "f", "description": "{LONE}"}}}}]}}',
            "tools.0.function.description",
        ),
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": ["x", "{LONE}"]}}',
            "stop.1",
        ),
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": "hi"}}], "guided_choice": ["{LONE}"]}}',
            "guided_choice.0",
        ),
        (
            "/v1/chat/completions",
            f'{{"messages": [{{"role": "user", "content": "hi"}}], "guided_regex": "{LONE}"}}',
            "guided_regex",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "guided_json": '
            f'{{"type": "object", "properties": {{"{LONE}": {{"type": "string"}}}}}}}}',
            "guided_json.properties",
        ),
        ("/v1/completions", f'{{"prompt": "{LONE}"}}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "\\udc00"]}', "prompt.1"),
        ("/tokenize", f'{{"prompt": "{LONE}"}}', "prompt"),
        ("/v1/embeddings", f'{{"input": ["{LONE}"]}}', "input.0"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    fake: Served, path: str, body: str, param: str
) -> None:
    message = assert_400(raw_post(fake, path, body), param)
    assert "lone UTF-16 surrogate" in message


def test_surrogate_pairs_are_characters(fake: Served, fake_engine: FakeEngine) -> None:
    body = '{"model": "fake-model", "prompt": "smile \\ud83d\\ude00", "max_tokens": 1}'
    response = raw_post(fake, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert "😀" in fake.engine.tokenizer.decode(fake_engine.requests[-1][0])


# -- code completion --------------------------------------------------------------------------


def test_suffix_on_a_model_without_fill_in_the_middle_tokens_is_400(fake: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        fake.client().completions.create(
            model="fake-model", prompt="def add(a, b):\n", suffix="\n    return c\n"
        )
    assert info.value.body["param"] == "suffix"
    assert "no fill-in-the-middle tokens" in info.value.body["message"]
    # An empty suffix asks for nothing to be inserted before: an ordinary completion.
    reply = fake.client().completions.create(
        model="fake-model", prompt="Once", suffix="", max_tokens=2
    )
    assert reply.choices[0].text == " The quick"


def test_best_of_returns_the_n_most_likely_candidates(fake: Served, fake_engine: FakeEngine):
    # The scripted engine gives every token the same logprob, so a choice that stops early
    # (candidate j starts j tokens into REPLY, all end with it) sums the least negative.
    reply = fake.client().completions.create(
        model="fake-model", prompt=["Once", "Twice"], max_tokens=40, best_of=3, n=2
    )
    params = fake_engine.requests[-1][1]
    assert (params.n, params.logprobs) == (3, 0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.text for c in reply.choices]
    replies = [fake.engine.tokenizer.decode(fake.engine.reply_ids[j:]) for j in (2, 1)]
    assert texts == replies * 2
    assert all(c.logprobs is None for c in reply.choices)
    # Usage counts every candidate's tokens, as OpenAI bills best_of.
    per_prompt = sum(len(fake.engine.reply_ids) - j for j in range(3))
    assert reply.usage.completion_tokens == 2 * per_prompt
    assert REPLY.endswith(texts[0])
