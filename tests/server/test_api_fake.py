"""The HTTP API over a scripted engine: response shapes, every error status, auth, limits,
refusals and aborts the real engine only produces under load or at shutdown.

Driven through the official openai client (its exception classes follow the status codes) and,
for bodies the client cannot send, through raw HTTP.
"""

from __future__ import annotations

import json
import threading
import time

import httpx2
import openai
import pytest

from sorai.errors import QueueFullError
from sorai.model.tokenizer import Tokenizer
from tests.server.conftest import API_KEY, Served
from tests.server.fake_engine import FakeEngine

MESSAGES = [{"role": "user", "content": "Hello there"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def post(fake: Served, path: str, content: bytes, headers: dict | None = None) -> httpx2.Response:
    return httpx2.post(
        fake.url + path, content=content, headers={**fake.headers, **(headers or {})}
    )


def sse_events(response: httpx2.Response) -> list:
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_chat_completion_shape(fake: Served, tokenizer: Tokenizer) -> None:
    reply = fake.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=4
    )
    assert reply.id.startswith("chatcmpl-") and len(reply.id) > len("chatcmpl-") + 16
    assert reply.object == "chat.completion"
    assert reply.model == "fake-model"
    assert abs(reply.created - time.time()) < 60
    (choice,) = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == " The quick brown fox"
    assert choice.finish_reason == "length" and choice.logprobs is None
    prompt_tokens = len(tokenizer.encode_chat(MESSAGES))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == 4
    assert reply.usage.total_tokens == prompt_tokens + 4
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


def test_raw_json_is_exactly_openai_shape(fake: Served) -> None:
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 2}
    data = post(fake, "/v1/chat/completions", json.dumps(body).encode()).json()
    assert set(data) == {
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "system_fingerprint",
    }
    assert data["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": " The quick", "refusal": None},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_model_alias_and_default(fake: Served) -> None:
    client = fake.client()
    for name in ("fake-model", "fake-alias"):
        reply = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=1)
        assert reply.model == name
    body = json.dumps({"messages": MESSAGES, "max_tokens": 1}).encode()
    assert post(fake, "/v1/chat/completions", body).json()["model"] == "fake-model"
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-model", "fake-alias"]
    assert client.models.retrieve("fake-alias").id == "fake-alias"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_chat_stream_shape(fake: Served) -> None:
    stream = fake.client().chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        max_tokens=3,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert all(c.object == "chat.completion.chunk" and c.id == last.id for c in chunks)
    for j in range(2):
        mine = [c.choices[0] for c in body if c.choices[0].index == j]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert all(c.delta.role is None for c in mine[1:])
        assert [c.finish_reason for c in mine].count("length") == 1
        assert mine[-1].finish_reason == "length"
        text = "".join(c.delta.content or "" for c in mine)
        assert text == [" The quick brown", " quick brown fox"][j]


def test_raw_stream_framing(fake: Served) -> None:
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    response = post(fake, "/v1/chat/completions", json.dumps(body).encode())
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    # Without include_usage the chunks carry no usage key at all.
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_completions_index_prompts_times_n(fake: Served) -> None:
    reply = fake.client().completions.create(
        model="fake-model", prompt=["one", "two", "three"], n=2, max_tokens=2
    )
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert [c.index for c in reply.choices] == list(range(6))
    texts = [c.text for c in reply.choices]
    assert texts == [" The quick", " quick brown"] * 3
    assert reply.usage.completion_tokens == 12
    # Each prompt gets its own engine request; the prompts' ids come in order.
    prompts = [ids for ids, _, _ in fake.engine.requests[-3:]]
    assert prompts == [
        fake.engine.tokenizer.encode(p, add_special_tokens=True) for p in ("one", "two", "three")
    ]


def test_completions_token_prompts_and_echo(fake: Served, tokenizer: Tokenizer) -> None:
    client = fake.client()
    ids = tokenizer.encode("Hello world")
    reply = client.completions.create(model="fake-model", prompt=[ids, ids], max_tokens=1)
    assert reply.usage.prompt_tokens == 2 * len(ids)
    reply = client.completions.create(model="fake-model", prompt="Hi", max_tokens=2, echo=True)
    assert reply.choices[0].text == "Hi The quick"
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="fake-model", prompt=[10**9], max_tokens=1)


def test_completions_stream_matches(fake: Served) -> None:
    client = fake.client()
    whole = client.completions.create(model="fake-model", prompt=["a", "b"], max_tokens=3, n=2)
    chunks = list(
        client.completions.create(
            model="fake-model", prompt=["a", "b"], max_tokens=3, n=2, stream=True
        )
    )
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine].count("length") == 1


def test_chat_logprobs_shape(fake: Served) -> None:
    reply = fake.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert [e.token for e in content] == [" The", " quick"]
    for entry in content:
        assert entry.logprob == -0.25 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token


def test_text_answer_with_tools_offered(fake: Served) -> None:
    """With tools in "auto", an answer that calls none streams as plain content, logprobs
    and all, and says what the whole answer says."""
    options = {
        "model": "fake-model",
        "messages": MESSAGES,
        "max_tokens": 6,
        "tools": TOOLS,
        "logprobs": True,
        "n": 2,
    }
    whole = fake.client().chat.completions.create(**options)
    chunks = list(fake.client().chat.completions.create(**options, stream=True))
    for j, choice in enumerate(whole.choices):
        assert choice.message.tool_calls is None and choice.finish_reason == "length"
        mine = [c.choices[0] for c in chunks if c.choices[0].index == j]
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert len([c for c in mine if c.delta.content]) > 2  # streamed, not held to the end
        tokens = [e.token for c in mine if c.logprobs for e in c.logprobs.content]
        assert tokens == [e.token for e in choice.logprobs.content]
        assert [c.finish_reason for c in mine][-1] == "length"
    raw = json.loads(
        post(fake, "/v1/chat/completions", json.dumps({**options, "n": 1}).encode()).text
    )
    assert "tool_calls" not in raw["choices"][0]["message"]


def test_completion_logprobs_shape(fake: Served) -> None:
    reply = fake.client().completions.create(
        model="fake-model", prompt="x", max_tokens=3, logprobs=2
    )
    lp = reply.choices[0].logprobs
    assert lp.tokens == [" The", " quick", " brown"]
    assert lp.token_logprobs == [-0.25] * 3
    assert lp.text_offset == [0, 4, 10]
    assert all(
        len(top) == 2 and top[tok] == -0.25
        for top, tok in zip(lp.top_logprobs, lp.tokens, strict=True)
    )
    streamed = fake.client().completions.create(
        model="fake-model", prompt="x", max_tokens=3, logprobs=2, stream=True
    )
    offsets = [
        o
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for o in c.choices[0].logprobs.text_offset
    ]
    assert offsets == [0, 4, 10]


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"tools": [{"type": "function", "function": {"description": "f"}}]}, "tools.0"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"guided_choice": ["a", "b"], "guided_regex": "a+"}, "guided_"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
    ],
)
def test_bad_values_are_400(fake: Served, fields: dict, param: str) -> None:
    body = {"model": "fake-model", "messages": MESSAGES, "max_tokens": 2, **fields}
    extra = {k: body.pop(k) for k in list(body) if k.startswith("guided_")}
    with pytest.raises(openai.BadRequestError) as info:
        fake.client().chat.completions.create(**body, extra_body=extra)
    error = info.value.body
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param)
    assert set(error) == {"message", "type", "param", "code"}


def test_context_window_is_400_with_numbers(fake: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        fake.client().chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=1000
        )
    message = info.value.body["message"]
    assert "1000" in message and str(fake.engine.context_length) in message
    assert info.value.body["code"] == "context_length_exceeded"


def test_bad_completion_values_are_400(fake: Served) -> None:
    client = fake.client()
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="fake-model", prompt="x", logprobs=21)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="fake-model", prompt=[])
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="fake-model", prompt="")


def test_unknown_model_is_404(fake: Served) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        fake.client().chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        fake.client().completions.create(model="gpt-4", prompt="x")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"messages": [', b"\xff\xfe\x00{", b"[1, 2]", b"", b"   ", b"null"],
)
def test_unparseable_bodies_are_400(fake: Served, content: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
        response = post(fake, path, content, {"Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_missing_field_is_400_not_422(fake: Served) -> None:
    response = post(fake, "/v1/chat/completions", b'{"model": "fake-model"}')
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


def test_body_too_large_is_413(fake: Served) -> None:
    big = json.dumps({"model": "fake-model", "prompt": "x" * (70 * 1024)}).encode()
    response = post(fake, "/v1/completions", big)
    assert response.status_code == 413
    assert "limit" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b"x" * 8192

    response = httpx2.post(fake.url + "/v1/completions", content=chunks(), headers=fake.headers)
    assert response.status_code == 413
    with pytest.raises(openai.APIStatusError) as info:
        fake.client().completions.create(model="fake-model", prompt="x" * (70 * 1024))
    assert info.value.status_code == 413


def test_unknown_route_and_method(fake: Served) -> None:
    response = httpx2.get(fake.url + "/v1/nothing", headers=fake.headers)
    assert response.status_code == 404 and "error" in response.json()
    response = httpx2.get(fake.url + "/v1/chat/completions", headers=fake.headers)
    assert response.status_code == 405 and "error" in response.json()


# -- auth ------------------------------------------------------------------------------------


def test_api_keys(fake: Served) -> None:
    for key in ("wrong", API_KEY + "x", API_KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as info:
            fake.client(api_key=key).models.list()
        assert API_KEY not in str(info.value.body) and key not in info.value.body["message"]
    assert fake.client(api_key="second-key").models.list().data
    for path in ("/v1/models", "/tokenize"):
        response = httpx2.get(fake.url + path)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    response = httpx2.get(fake.url + "/v1/models", headers={"Authorization": "Basic abc"})
    assert response.status_code == 401
    # Unauthenticated bodies are refused before they are read, whatever their size.
    response = httpx2.post(fake.url + "/v1/completions", content=b"x" * 100_000)
    assert response.status_code == 401
    assert httpx2.get(fake.url + "/health").status_code == 200
    assert httpx2.get(fake.url + "/metrics").status_code == 200


# -- refusals, aborts, disconnects -----------------------------------------------------------


def test_queue_full_is_429(fake: Served, fake_engine: FakeEngine) -> None:
    fake_engine.refuse = QueueFullError("the queue is full; retry later")
    client = fake.client()
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="fake-model", messages=MESSAGES, max_tokens=2, stream=stream
            )
        assert info.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="fake-model", prompt=["a", "b"], max_tokens=2)
    assert not fake_engine.active


def test_dead_engine_is_503(fake: Served, fake_engine: FakeEngine) -> None:
    fake_engine.dead = True
    with pytest.raises(openai.InternalServerError) as info:
        fake.client().chat.completions.create(model="fake-model", messages=MESSAGES)
    assert info.value.status_code == 503
    assert httpx2.get(fake.url + "/health").status_code == 503


def test_abort_mid_request(fake: Served, fake_engine: FakeEngine) -> None:
    fake_engine.abort_after = 2
    client = fake.client()
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=10)
    assert info.value.status_code == 503
    received = []
    with pytest.raises(openai.APIError, match="shutting down"):
        for chunk in client.chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=10, stream=True
        ):
            received.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in received) == " The quick"


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_disconnect_aborts_engine_requests(fake: Served, fake_engine: FakeEngine) -> None:
    fake_engine.step_delay = 0.02
    client = fake.client()
    body = {"model": "fake-model", "max_tokens": 10_000 // 100, "extra_body": {"ignore_eos": True}}
    stream = client.chat.completions.create(messages=MESSAGES, stream=True, **body)
    next(iter(stream))
    assert len(fake_engine.active) == 1
    stream.close()
    assert wait_until(lambda: not fake_engine.active)
    # Several prompts of one completions request: every engine request is aborted.
    stream = client.completions.create(prompt=["a", "b", "c"], stream=True, **body)
    next(iter(stream))
    assert len(fake_engine.active) == 3
    stream.close()
    assert wait_until(lambda: not fake_engine.active)
    # A non-streamed request whose client gives up is aborted too.
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(messages=MESSAGES, **body)
    assert wait_until(lambda: not fake_engine.active)


def test_disconnect_while_waiting_for_first_token(fake: Served, fake_engine: FakeEngine) -> None:
    fake_engine.step_delay = 0.5
    with pytest.raises(openai.APITimeoutError):
        fake.client().with_options(timeout=0.1).chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=5, stream=True
        )
    assert wait_until(lambda: not fake_engine.active)


# -- the small endpoints ---------------------------------------------------------------------


def test_tokenize_and_detokenize(fake: Served, tokenizer: Tokenizer) -> None:
    response = post(fake, "/tokenize", json.dumps({"prompt": "Hello world"}).encode())
    data = response.json()
    assert data["tokens"] == tokenizer.encode("Hello world", add_special_tokens=True)
    assert data["count"] == len(data["tokens"]) and data["max_model_len"] == 256
    data = post(fake, "/tokenize", json.dumps({"messages": MESSAGES}).encode()).json()
    assert data["tokens"] == tokenizer.encode_chat(MESSAGES)
    data = post(fake, "/detokenize", json.dumps({"tokens": data["tokens"]}).encode()).json()
    assert data["prompt"] == tokenizer.apply_chat_template(MESSAGES)
    response = post(fake, "/detokenize", json.dumps({"tokens": [-1]}).encode())
    assert response.status_code == 400
    response = post(fake, "/tokenize", json.dumps({"prompt": "x", "model": "nope"}).encode())
    assert response.status_code == 404


def test_metrics_count_requests(fake: Served) -> None:
    def scrape() -> str:
        return httpx2.get(fake.url + "/metrics").text

    fake.client().chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2)
    text = scrape()
    assert 'sorai_requests_finished_total{finish_reason="length"}' in text
    assert "sorai_time_to_first_token_seconds_count" in text
    assert "sorai_kv_cache_blocks_total 100.0" in text


def test_concurrent_requests_do_not_mix(fake: Served) -> None:
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        reply = fake.client().completions.create(
            model="fake-model", prompt=f"p{i}", max_tokens=1 + i % 4
        )
        results[i] = reply.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    words = ["", "The", "quick", "brown", "fox"][1:]
    assert results == {i: "".join(" " + w for w in words[: 1 + i % 4]) for i in range(12)}
