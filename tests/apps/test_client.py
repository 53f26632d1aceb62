"""The apps' client against sorai's real server (the embedded default model), in-process and
by URL: the same protocol either way."""

from __future__ import annotations

import socket

import pytest

from sorai.apps.client import Client, ClientError, parse_json_answer


@pytest.fixture
def local(client: Client) -> Client:
    """The session's in-process server (tests/apps/conftest.py)."""
    return client


def test_in_process_server_answers_chat(local: Client) -> None:
    assert local.model == "smollm2-135m-instruct"
    response = local.chat([{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert response.choices[0].message.content
    assert response.usage.completion_tokens <= 8


def test_by_url_is_the_same_endpoint(local: Client) -> None:
    url = str(local.openai.base_url)
    remote = Client.connect(url, api_key=local.openai.api_key)
    assert remote.model == local.model
    response = remote.chat(
        [{"role": "user", "content": "Count to three."}], max_tokens=6, temperature=0
    )
    again = local.chat(
        [{"role": "user", "content": "Count to three."}], max_tokens=6, temperature=0
    )
    assert response.choices[0].message.content == again.choices[0].message.content


def test_chat_json_follows_the_schema(local: Client) -> None:
    schema = {
        "type": "object",
        # Bounded, so that the answer fits max_tokens whatever the model writes.
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "nights": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["city", "nights"],
        "additionalProperties": False,
    }
    answer = local.chat_json(
        [{"role": "user", "content": "Two nights in Kyoto. Reply as JSON."}],
        schema,
        max_tokens=40,
        temperature=0,
    )
    assert set(answer) == {"city", "nights"}
    assert isinstance(answer["city"], str) and isinstance(answer["nights"], int)


def test_errors_are_one_line(local: Client) -> None:
    with pytest.raises(ClientError, match="chat request refused \\(404\\)") as refused:
        local.chat([{"role": "user", "content": "hi"}], model="no-such-model", max_tokens=2)
    assert refused.value.status == 404
    wrong_key = Client.connect(str(local.openai.base_url), api_key="sk-wrong", model=local.model)
    with pytest.raises(ClientError, match="refused \\(401\\)"):
        wrong_key.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(ClientError, match="cannot reach"):
        Client.connect(f"http://127.0.0.1:{port}", max_retries=0)


def test_json_answers_from_endpoints_that_ignore_the_schema() -> None:
    assert parse_json_answer('{"score": 4}') == {"score": 4}
    assert parse_json_answer('```json\n{"score": 4, "reason": "ok"}\n```') == {
        "score": 4,
        "reason": "ok",
    }
    assert parse_json_answer('Sure! Here it is: {"a": [1, 2]} Hope that helps.') == {"a": [1, 2]}
    assert parse_json_answer('Labels: ["x"] then {broken') == ["x"]
    with pytest.raises(ValueError):
        parse_json_answer("no json here {")
