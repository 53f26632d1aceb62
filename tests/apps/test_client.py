"""The apps' client against sorai's real server (the embedded default model), in-process and
by URL: the same protocol either way."""

from __future__ import annotations

import pytest

from sorai.apps.client import Client, ClientError, parse_json_answer

from .http_double import JSONHandler, closed_port, embeddings_body, serving


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
    with pytest.raises(ClientError, match="cannot reach"):
        Client.connect(f"http://127.0.0.1:{closed_port()}", max_retries=0)


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


class _SmallBatchEmbeddingsDouble(JSONHandler):
    """Test double for an embeddings endpoint that takes at most 3 inputs a request (as some
    hosted ones cap batches), answering more with a 413; it records each batch's size."""

    sizes: list[int] = []

    def do_POST(self) -> None:  # noqa: N802 (the http.server name)
        body = self.read_json()
        inputs = body["input"]
        self.sizes.append(len(inputs))
        if len(inputs) > 3:
            self.send_json(413, {"error": {"message": "too many inputs", "type": "invalid"}})
        else:
            vectors = [[float(len(text)), 1.0] for text in inputs]
            self.send_json(200, embeddings_body(body["model"], vectors))


def test_embed_halves_batches_an_endpoint_refuses_as_too_large() -> None:
    with serving(_SmallBatchEmbeddingsDouble) as url:
        client = Client.connect(f"{url}/v1", model="e", embedding_model="e", max_retries=0)
        texts = ["x" * n for n in range(1, 11)]
        vectors = client.embed(texts)
    assert [v[0] for v in vectors] == [float(n) for n in range(1, 11)]  # in order
    # 10 and 5 refused, then batches of 2 (half of 5) until the end
    assert _SmallBatchEmbeddingsDouble.sizes == [10, 5, 2, 2, 2, 2, 2]
