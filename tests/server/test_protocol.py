"""Request bodies -> engine inputs, and error shapes: no server, no model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sorai.errors import ContextLengthError, EngineDeadError, QueueFullError, SamplingError
from sorai.server.auth import APIKeys
from sorai.server.errors import APIError, describe_validation_error, from_sorai_error
from sorai.server.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    DeltaMessage,
    TokenizeRequest,
)
from sorai.server.tools import fallback_messages

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def test_chat_defaults_follow_openai() -> None:
    params = chat().sampling_params(prompt_len=10, context_length=100)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.n == 1
    assert params.max_tokens == 90  # the rest of the context window
    assert params.logprobs is None


def test_chat_max_completion_tokens_is_max_tokens() -> None:
    assert chat(max_completion_tokens=7).sampling_params(10, 100).max_tokens == 7
    assert chat(max_tokens=5).sampling_params(10, 100).max_tokens == 5
    assert chat(max_tokens=5, max_completion_tokens=7).sampling_params(10, 100).max_tokens == 7


def test_chat_logprobs_map_to_top_k() -> None:
    assert chat(logprobs=True).sampling_params(1, 100).logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).sampling_params(1, 100).logprobs == 5
    assert chat(logprobs=False).sampling_params(1, 100).logprobs is None
    with pytest.raises(APIError) as info:
        chat(top_logprobs=2).check()
    assert info.value.status == 400 and info.value.param == "top_logprobs"
    with pytest.raises(SamplingError, match="logprobs"):
        chat(logprobs=True, top_logprobs=21).sampling_params(1, 100)


def test_extras_at_top_level() -> None:
    params = chat(
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        min_tokens=2,
        stop_token_ids=[7],
        ignore_eos=True,
        stop="END",
        seed=3,
        logit_bias={"42": -100},
    ).sampling_params(1, 100)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (5, 0.1, 1.2)
    assert (params.min_tokens, params.stop_token_ids, params.ignore_eos) == (2, (7,), True)
    assert params.stop == ("END",) and params.seed == 3
    assert params.logit_bias == ((42, -100.0),)
    assert chat(top_k=-1).sampling_params(1, 100).top_k == 0  # vLLM's "off"


def test_unknown_fields_are_ignored() -> None:
    assert chat(metadata={"a": 1}, store=False, parallel_tool_calls=True).n is None


def test_content_parts_and_roles() -> None:
    body = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None},
        ]
    )
    assert fallback_messages(body.messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("messages", "where"),
    [
        ([], "messages"),
        ([{"role": "robot", "content": "x"}], "messages.0.role"),
        ([{"role": "user"}], "messages.0"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages.0"),
        ([{"role": "user", "content": 5}], "messages.0.content"),
        ([{"role": "tool", "content": "42"}], "messages.0"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "messages.0"),
        ("hello", "messages"),
    ],
)
def test_bad_messages_name_the_field(messages, where) -> None:
    with pytest.raises(ValidationError) as info:
        chat(messages=messages)
    error = describe_validation_error(info.value)
    assert error.status == 400
    assert error.param is not None and error.param.startswith(where)
    assert where in error.message


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": "5"},
        {"max_tokens": True},
        {"temperature": "hot"},
        {"n": 1.5},
        {"stream": "yes"},
        {"stop": 5},
        {"logit_bias": {"1": "x"}},
    ],
)
def test_wrong_types_are_refused(fields) -> None:
    with pytest.raises(ValidationError):
        chat(**fields)


def test_stream_options_need_stream() -> None:
    with pytest.raises(APIError, match="stream_options"):
        chat(stream_options={"include_usage": True}).check()
    body = chat(stream=True, stream_options={"include_usage": True})
    body.check()
    assert body.include_usage
    with pytest.raises(APIError, match="stream_options"):
        completion(stream_options={"include_usage": True}).check()


def test_unsupported_features_are_refused_not_ignored() -> None:
    chat(response_format={"type": "text"}, tools=[]).check()
    completion(best_of=3, n=2).check()
    for fields in ({"best_of": 3, "stream": True}, {"best_of": 1, "n": 2}, {"best_of": 21}):
        with pytest.raises(APIError, match="best_of"):
            completion(**fields).check()
    with pytest.raises(APIError, match="echo"):
        completion(echo=True, logprobs=1).check()
    with pytest.raises(APIError, match="echo"):
        completion(echo=True, suffix="x").check()


def test_best_of_generates_candidates_with_logprobs() -> None:
    params = completion(best_of=3).sampling_params(3, 100)
    assert (params.n, params.logprobs) == (3, 0)  # ranked by the tokens' logprobs
    params = completion(best_of=2, n=2, logprobs=4).sampling_params(3, 100)
    assert (params.n, params.logprobs) == (2, 4)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt, expected) -> None:
    assert completion(prompt=prompt).prompts() == expected


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [True], 5, None, [[1], "a"]])
def test_bad_completion_prompts(prompt) -> None:
    with pytest.raises(ValidationError) as info:
        completion(prompt=prompt)
    assert describe_validation_error(info.value).param == "prompt"


def test_completion_defaults() -> None:
    params = completion().sampling_params(prompt_len=3, context_length=100)
    assert params.max_tokens == COMPLETIONS_DEFAULT_MAX_TOKENS
    assert completion(max_tokens=None).sampling_params(3, 100).max_tokens == 97
    assert completion(logprobs=3).sampling_params(3, 100).logprobs == 3


def test_tokenize_takes_one_input() -> None:
    TokenizeRequest.model_validate({"prompt": "x"})
    TokenizeRequest.model_validate({"messages": USER})
    for body in ({}, {"prompt": "x", "messages": USER}):
        with pytest.raises(ValidationError):
            TokenizeRequest.model_validate(body)


def test_sorai_errors_map_to_statuses() -> None:
    assert from_sorai_error(QueueFullError("full")).status == 429
    assert from_sorai_error(EngineDeadError("dead")).status == 503
    error = from_sorai_error(ContextLengthError("the prompt is 9000 tokens"))
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", None)
    # A message's first word names the field only when it is one.
    error = from_sorai_error(SamplingError("the JSON schema is not valid: oops"))
    assert (error.status, error.param) == (400, None)
    error = from_sorai_error(SamplingError("top_p must be in [0, 1], got 2.0"))
    assert (error.status, error.param) == (400, "top_p")
    assert error.body() == {
        "error": {
            "message": "top_p must be in [0, 1], got 2.0",
            "type": "invalid_request_error",
            "param": "top_p",
            "code": None,
        }
    }


def test_delta_lists_only_what_it_carries() -> None:
    chunk = ChatCompletionChunk(
        id="c",
        created=1,
        model="m",
        choices=[ChatChunkChoice(index=0, delta=DeltaMessage(), finish_reason="stop")],
    )
    data = chunk.model_dump(exclude={"usage"})
    assert data["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert "usage" not in data
    assert DeltaMessage(role="assistant", content="").model_dump() == {
        "role": "assistant",
        "content": "",
    }


def test_api_keys_are_digests() -> None:
    keys = APIKeys(["alpha", " beta "])
    assert keys.enabled and len(keys) == 2
    assert keys.accepts("alpha") and keys.accepts("beta")
    assert not keys.accepts("alph") and not keys.accepts("")
    assert "alpha" not in repr(vars(keys))
    assert not APIKeys().enabled


def test_api_key_file(tmp_path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nk1\n\n  k2  \n")
    keys = APIKeys.from_sources(["k0"], [path])
    assert all(keys.accepts(k) for k in ("k0", "k1", "k2"))
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    with pytest.raises(Exception, match="no keys"):
        APIKeys.from_sources([], [empty])
    with pytest.raises(Exception, match="cannot read"):
        APIKeys.from_sources([], [tmp_path / "missing"])
