"""The apps' client against sorai's real server (the embedded default model), in-process and
by URL: the same protocol either way; and which endpoint it finds, against loopback servers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import sorai
from sorai import hub
from sorai.apps import client as client_module
from sorai.apps.client import (
    Client,
    ClientError,
    find_endpoint,
    parse_json_answer,
    request_options,
)
from sorai.cli import main
from sorai.engine.params import SamplingParams

from .http_double import JSONHandler, closed_port, embeddings_body, serving


@pytest.fixture
def local(client: Client) -> Client:
    """The session's in-process server (tests/apps/conftest.py)."""
    return client


def test_in_process_server_answers_chat(local: Client) -> None:
    assert local.model == "smollm2-135m-instruct"
    assert local.in_process
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


# -- streams ----------------------------------------------------------------------------------


def test_stream_chat_yields_the_same_answer_in_pieces(local: Client) -> None:
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = local.chat(messages, max_tokens=8, temperature=0)
    with local.stream_chat(messages, max_tokens=8, temperature=0) as stream:
        pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    assert stream.finish_reason == whole.choices[0].finish_reason
    assert stream.usage.completion_tokens == whole.usage.completion_tokens
    assert stream.usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_completion_continues_the_prompt(local: Client) -> None:
    stream = local.stream_completion("The sky is", max_tokens=4, temperature=0)
    text = "".join(stream)
    whole = local.openai.completions.create(
        model=local.model, prompt="The sky is", max_tokens=4, temperature=0
    )
    assert text == whole.choices[0].text
    assert (stream.finish_reason, stream.usage.completion_tokens) == ("length", 4)


def test_a_refused_stream_is_a_client_error_at_once(local: Client) -> None:
    with pytest.raises(ClientError, match="chat request refused \\(404\\)") as refused:
        local.stream_chat([{"role": "user", "content": "hi"}], model="no-such-model")
    assert refused.value.fatal


def test_request_options_split_openai_fields_from_extras() -> None:
    params = SamplingParams(max_tokens=5, temperature=0.0, top_k=3, stop=["END"], seed=7)
    assert request_options(params) == {
        "max_tokens": 5,
        "temperature": 0.0,
        "top_p": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seed": 7,
        "stop": ["END"],
        "extra_body": {"top_k": 3},
    }


# -- which endpoint: --url, the environment, sorai serve on the default port, this process ----


def models_double(owner: str = "sorai", ids: tuple[str, ...] = ("m1",), key: str | None = None):
    """A /v1/models double listing `ids` as owned by `owner`, wanting `key` when one is set;
    `keys` records the Authorization header of each request (None without one)."""

    class Double(JSONHandler):
        keys: list[str | None] = []

        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            sent = self.headers.get("Authorization")
            self.keys.append(sent)
            if key is not None and sent != f"Bearer {key}":
                self.send_json(401, {"error": {"message": "incorrect API key provided"}})
                return
            cards = [{"id": i, "object": "model", "created": 0, "owned_by": owner} for i in ids]
            self.send_json(200, {"object": "list", "data": cards})

    return Double


@pytest.fixture
def servers() -> Iterator[dict[str, tuple[str, type]]]:
    """Four sorai-like model listings on loopback: named --url, $SORAI_URL, $OPENAI_BASE_URL
    and the default port, each its own double."""
    names = ("given", "sorai_url", "openai_base_url", "default")
    doubles = {name: models_double(ids=(f"{name}-model",)) for name in names}
    with (
        serving(doubles["given"]) as given,
        serving(doubles["sorai_url"]) as sorai_url,
        serving(doubles["openai_base_url"]) as openai_base_url,
        serving(doubles["default"]) as default,
    ):
        urls = dict(zip(names, (given, sorai_url, openai_base_url, default), strict=True))
        yield {name: (urls[name], doubles[name]) for name in names}


def test_url_then_environment_then_the_default_port(servers, monkeypatch) -> None:
    given, sorai_url, openai_base_url, default = (servers[n][0] for n in servers)
    monkeypatch.setenv("SORAI_URL", sorai_url)
    monkeypatch.setenv("OPENAI_BASE_URL", openai_base_url + "/v1")
    monkeypatch.setenv("SORAI_DEFAULT_URL", default)

    endpoint = find_endpoint(given)
    assert (endpoint.url, endpoint.status) == (f"{given}/v1", f"using {given}/v1 (--url)")
    endpoint = find_endpoint()
    assert endpoint.status == f"using {sorai_url}/v1 ($SORAI_URL)"
    monkeypatch.delenv("SORAI_URL")
    assert find_endpoint().status == f"using {openai_base_url}/v1 ($OPENAI_BASE_URL)"
    monkeypatch.delenv("OPENAI_BASE_URL")
    lines: list[str] = []
    with Client.find(report=lines.append) as found:
        assert (found.where, found.model, found.in_process) == (
            f"{default}/v1",
            "default-model",
            False,
        )
    assert lines == [f"using sorai serve at {default}/v1 (found on the default port)"]
    # Only the default port is probed; the endpoints named outright are not asked beforehand.
    assert servers["given"][1].keys == servers["sorai_url"][1].keys == []


def test_each_endpoint_gets_its_own_key(servers, monkeypatch) -> None:
    monkeypatch.setenv("SORAI_API_KEY", "sk-sorai")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("SORAI_DEFAULT_URL", servers["default"][0])
    assert find_endpoint(servers["given"][0]).api_key == "sk-sorai"
    assert find_endpoint(servers["given"][0], api_key="sk-mine").api_key == "sk-mine"
    monkeypatch.setenv("OPENAI_BASE_URL", servers["openai_base_url"][0])
    assert find_endpoint().api_key == "sk-openai"
    monkeypatch.setenv("SORAI_URL", servers["sorai_url"][0])
    assert find_endpoint().api_key == "sk-sorai"
    monkeypatch.delenv("SORAI_URL")
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert find_endpoint().api_key == "sk-sorai"
    # Whatever listens on the default port never gets OpenAI's key.
    monkeypatch.delenv("SORAI_API_KEY")
    assert find_endpoint().api_key is None
    assert servers["default"][1].keys == ["Bearer sk-sorai", None]


class _NotSoraiDouble(JSONHandler):
    """Test double for another server on the default port: a web page for every path."""

    def do_GET(self) -> None:  # noqa: N802
        page = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)


def _starting(reason: str) -> str:
    return (
        f"starting sorai's server in this process with {hub.DEFAULT_MODEL} ({reason}; "
        "--url uses a running endpoint)"
    )


def test_the_default_port_is_passed_over_unless_sorai_serve_answers(monkeypatch) -> None:
    def on_default_port(url: str, model: str | None = None) -> str:
        monkeypatch.setenv("SORAI_DEFAULT_URL", url)
        endpoint = find_endpoint(model=model)
        assert endpoint.url is None and endpoint.api_key is None
        return endpoint.status

    nowhere = f"http://127.0.0.1:{closed_port()}/v1"
    assert on_default_port(nowhere) == _starting(f"no sorai serve answers at {nowhere}")
    with serving(models_double(owner="vllm")) as url:
        assert on_default_port(url) == _starting(f"{url}/v1 answers, but not as sorai serve")
    with serving(_NotSoraiDouble) as url:
        assert on_default_port(url) == _starting(f"{url}/v1 answers, but not as sorai serve")
    with serving(models_double(ids=("m1",))) as url:
        assert on_default_port(url, model="m2") == (
            f"starting sorai's server in this process with m2 (sorai serve at {url}/v1 does "
            "not serve m2; --url uses a running endpoint)"
        )
        assert find_endpoint(model="m1").url == f"{url}/v1"
    double = models_double()
    with serving(double) as url:
        monkeypatch.setenv("SORAI_DEFAULT_URL", "none")
        assert find_endpoint().status == _starting("$SORAI_DEFAULT_URL is none")
    assert double.keys == []  # not even asked


def test_a_default_port_that_does_not_answer_is_given_up_quickly(monkeypatch) -> None:
    release = threading.Event()

    class Hanging(JSONHandler):
        def do_GET(self) -> None:  # noqa: N802
            release.wait(10)

    monkeypatch.setattr(client_module, "PROBE_TIMEOUT", 0.2)
    with serving(Hanging) as url:
        monkeypatch.setenv("SORAI_DEFAULT_URL", url)
        try:
            assert find_endpoint().status == _starting(f"no sorai serve answers at {url}/v1")
        finally:
            release.set()


def test_a_default_port_server_wanting_a_key_is_reported(monkeypatch) -> None:
    with serving(models_double(key="sk-right")) as url:
        monkeypatch.setenv("SORAI_DEFAULT_URL", url)
        with pytest.raises(ClientError, match="asks for an API key \\(401\\)") as asked:
            find_endpoint()
        assert asked.value.status == 401 and f"{url}/v1" in str(asked.value)
        assert "SORAI_DEFAULT_URL=none" in str(asked.value)
        monkeypatch.setenv("SORAI_API_KEY", "sk-wrong")
        with pytest.raises(ClientError, match="refused the API key given \\(401\\)"):
            find_endpoint()
        monkeypatch.setenv("SORAI_API_KEY", "sk-right")
        assert find_endpoint().url == f"{url}/v1"


def test_nothing_found_starts_sorais_server_in_this_process(monkeypatch) -> None:
    started: list[tuple] = []

    def local(model=None, embedding_model=None):
        started.append((model, embedding_model))
        return "in-process client"

    monkeypatch.setattr(Client, "local", local)
    lines: list[str] = []
    assert Client.find(model="m", embedding_model="e", report=lines.append) == "in-process client"
    assert Client.find(model="m", embedding_model="e", chat=False) == "in-process client"
    assert started == [("m", "e"), (None, "e")]
    assert lines == [
        "starting sorai's server in this process with m ($SORAI_DEFAULT_URL is none; "
        "--url uses a running endpoint)"
    ]


def test_a_running_sorai_server_is_found_on_the_default_port(local: Client, monkeypatch) -> None:
    monkeypatch.setenv("SORAI_DEFAULT_URL", local.where)
    with pytest.raises(ClientError, match="asks for an API key"):
        sorai.connect()  # the real server's 401
    monkeypatch.setenv("SORAI_API_KEY", local.openai.api_key)
    with sorai.connect() as found:
        assert (found.where, found.model, found.in_process) == (local.where, local.model, False)
    with Client.find(embedding_model=hub.DEFAULT_EMBEDDING_MODEL, chat=False) as embedder:
        assert len(embedder.embed(["a"])[0]) == 384


def test_an_app_verb_says_which_endpoint_it_uses(local: Client, monkeypatch, capsys) -> None:
    # A `sorai serve` running on the default port: the verb uses it, starting no model.
    monkeypatch.setenv("SORAI_DEFAULT_URL", local.where)
    monkeypatch.setenv("SORAI_API_KEY", local.openai.api_key)
    monkeypatch.setattr(Client, "local", None)  # calling it would fail the test
    assert main(["sentiment", "I love this phone.", "--json"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"using sorai serve at {local.where} (found on the default port)"
    url = f"http://127.0.0.1:{closed_port()}/v1"
    assert main(["sentiment", "I love this phone.", "--url", url]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"using {url} (--url)"
