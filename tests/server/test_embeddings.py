"""POST /v1/embeddings through the official openai client, on a live server that serves the
default chat model and the default embedding model side by side.

The vectors must be the ones SentenceEncoder gives in-process (itself checked against
sentence-transformers in tests/model/test_bert.py); errors must be OpenAI's.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest
import torch

from sorai import hub
from sorai.model.bert import SentenceEncoder
from sorai.server.app import create_app
from sorai.server.state import ServerSettings
from tests.server.conftest import API_KEY, Served
from tests.server.fake_engine import FakeEngine
from tests.server.harness import ServerThread

EMBEDDING_MODEL = hub.DEFAULT_EMBEDDING_MODEL
TEXTS = [
    "The cat sits on the mat.",
    "How do I reset my password?",
    "Paris is the capital of France.",
]


@pytest.fixture(scope="module")
def encoder(default_encoder_dir: Path) -> SentenceEncoder:
    return SentenceEncoder.from_dir(default_encoder_dir, device="cpu")


def expected(encoder: SentenceEncoder, texts: list[str]) -> np.ndarray:
    return encoder.encode(texts).numpy()


def embed(served: Served, **kwargs) -> openai.types.CreateEmbeddingResponse:
    kwargs.setdefault("model", EMBEDDING_MODEL)
    return served.client().embeddings.create(**kwargs)


def post(served: Served, body: dict, key: str | None = API_KEY) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx2.post(served.url + "/v1/embeddings", json=body, headers=headers, timeout=120)


def assert_error(response: httpx2.Response, status: int, param: str | None, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"]


# ---- answers -------------------------------------------------------------------------------


def test_a_string_input_gets_one_embedding(live: Served, encoder: SentenceEncoder) -> None:
    response = embed(live, input=TEXTS[0], encoding_format="float")
    assert response.object == "list" and response.model == EMBEDDING_MODEL
    (item,) = response.data
    assert (item.object, item.index) == ("embedding", 0)
    assert len(item.embedding) == 384
    np.testing.assert_allclose(item.embedding, expected(encoder, TEXTS[:1])[0], atol=1e-6)


def test_a_list_input_gets_embeddings_in_order(live: Served, encoder: SentenceEncoder) -> None:
    response = embed(live, input=TEXTS, encoding_format="float")
    assert [item.index for item in response.data] == [0, 1, 2]
    vectors = np.array([item.embedding for item in response.data])
    np.testing.assert_allclose(vectors, expected(encoder, TEXTS), atol=1e-6)


def test_base64_decodes_to_the_same_floats(live: Served) -> None:
    as_floats = post(live, {"model": EMBEDDING_MODEL, "input": TEXTS}).json()
    as_base64 = post(
        live, {"model": EMBEDDING_MODEL, "input": TEXTS, "encoding_format": "base64"}
    ).json()
    for plain, packed in zip(as_floats["data"], as_base64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(packed["embedding"]), dtype="<f4")
        assert decoded.tolist() == np.array(plain["embedding"], dtype=np.float32).tolist()
    # The openai client asks for base64 by default and decodes it itself.
    client_default = embed(live, input=TEXTS)
    np.testing.assert_array_equal(
        np.array([d.embedding for d in client_default.data], dtype=np.float32),
        np.array([d["embedding"] for d in as_floats["data"]], dtype=np.float32),
    )


def test_usage_counts_the_tokens_the_model_read(live: Served, encoder: SentenceEncoder) -> None:
    response = embed(live, input=TEXTS)
    tokens = sum(len(ids) for ids in encoder.tokenize(TEXTS))  # [CLS] and [SEP] included
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (tokens, tokens)


def test_a_too_long_input_is_truncated_to_the_models_limit(
    live: Served, encoder: SentenceEncoder
) -> None:
    long_text = " ".join(f"word{i}" for i in range(1000))
    response = embed(live, input=[long_text], encoding_format="float")
    assert response.usage.prompt_tokens == 256
    np.testing.assert_allclose(
        response.data[0].embedding, expected(encoder, [long_text])[0], atol=1e-6
    )


def test_token_id_inputs_are_embedded_as_given(live: Served, encoder: SentenceEncoder) -> None:
    ids = encoder.tokenize(TEXTS[:2])
    response = embed(live, input=ids, encoding_format="float")
    np.testing.assert_allclose(
        [d.embedding for d in response.data], expected(encoder, TEXTS[:2]), atol=1e-6
    )
    single = embed(live, input=ids[0], encoding_format="float")
    assert single.usage.prompt_tokens == len(ids[0])
    np.testing.assert_allclose(single.data[0].embedding, response.data[0].embedding, atol=1e-6)


def test_model_may_be_omitted(live: Served) -> None:
    response = post(live, {"input": "hello"})
    assert response.status_code == 200 and response.json()["model"] == EMBEDDING_MODEL


def test_models_lists_the_embedding_model(live: Served) -> None:
    client = live.client()
    ids = [m.id for m in client.models.list().data]
    assert ids == [live.model, EMBEDDING_MODEL]
    card = client.models.retrieve(EMBEDDING_MODEL)
    assert card.id == EMBEDDING_MODEL and card.max_model_len == 256
    # The chat model says how it runs here: the path --dtype auto and its weights picked.
    runtime = client.models.retrieve(live.model).runtime
    assert runtime["device"] == "cpu" and runtime["dtype"] in ("float32", "bfloat16")
    assert "cores" in runtime["machine"] and runtime["weights"]
    # ... and which path its low-bit layers run, with why.
    assert (
        runtime["decode_path"].split(" ")[0] in ("fp16", "kernel") and "(" in runtime["decode_path"]
    )


def test_chat_runs_while_an_embeddings_request_is_encoding(
    live: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoder runs on its own thread: a chat request is answered while it is busy."""
    embed(live, input="warm up")  # loaded
    encoder = live.state.embeddings.encoder()
    started, release = threading.Event(), threading.Event()
    original = encoder.encode_ids

    def held(ids, *args, **kwargs):
        started.set()
        assert release.wait(60)
        return original(ids, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode_ids", held)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=embed(live, input=TEXTS)))
    worker.start()
    try:
        assert started.wait(60)
        reply = live.client().chat.completions.create(
            model=live.model,
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=4,
            temperature=0,
        )
        assert reply.choices[0].message.content
        assert worker.is_alive()  # the embeddings request is still waiting on its encoder
    finally:
        release.set()
        worker.join(60)
    assert len(result["r"].data) == 3


# ---- errors --------------------------------------------------------------------------------


def test_an_unknown_model_is_a_404(live: Served) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        embed(live, model="no-such-model", input="hi")
    assert "'no-such-model' does not exist" in excinfo.value.body["message"]
    assert EMBEDDING_MODEL in excinfo.value.body["message"]


def test_the_chat_model_makes_no_embeddings(live: Served) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        embed(live, model=live.model, input="hi")
    assert "is a chat model" in excinfo.value.body["message"]


def test_the_embedding_model_does_not_chat(live: Served) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        live.client().chat.completions.create(
            model=EMBEDDING_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert "is an embedding model" in excinfo.value.body["message"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"input": ""}, ["empty string"]),
        ({"input": []}, ["at least one item"]),
        ({"input": ["ok", ""]}, ["input[1] is an empty string"]),
        ({"input": [[101, 102], []]}, ["input[1] is an empty list"]),
        ({"input": ["x"] * 2049}, ["at most 2048 items, got 2049"]),
        ({"input": 5}, ["input is a string, a list of strings"]),
        ({"input": ["a", 1]}, ["input is a string, a list of strings"]),
    ],
    ids=["empty-string", "empty-list", "empty-item", "empty-ids", "too-many", "number", "mixed"],
)
def test_bad_inputs_are_400s_naming_input(live: Served, body: dict, words: list[str]) -> None:
    assert_error(post(live, {"model": EMBEDDING_MODEL, **body}), 400, "input", *words)


def test_missing_input_is_a_400(live: Served) -> None:
    assert_error(post(live, {"model": EMBEDDING_MODEL}), 400, "input", "missing")


def test_the_openai_client_raises_bad_request_for_an_empty_string(live: Served) -> None:
    with pytest.raises(openai.BadRequestError):
        embed(live, input="")


def test_dimensions_is_not_supported(live: Served) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        embed(live, input="hi", dimensions=128)
    assert excinfo.value.body["param"] == "dimensions"
    assert "384 dimensions" in excinfo.value.body["message"]
    # The model's own size is no change, and allowed.
    assert len(embed(live, input="hi", dimensions=384).data[0].embedding) == 384


def test_an_unknown_encoding_format_is_a_400(live: Served) -> None:
    body = {"model": EMBEDDING_MODEL, "input": "hi", "encoding_format": "int8"}
    assert_error(post(live, body), 400, "encoding_format")


def test_token_ids_outside_the_vocabulary_are_a_400(live: Served) -> None:
    body = {"model": EMBEDDING_MODEL, "input": [[101, 99999, 102]]}
    assert_error(post(live, body), 400, None, "token ids must be in [0, 30522), got 99999")


def test_embeddings_need_the_api_key(live: Served) -> None:
    assert_error(post(live, {"input": "hi"}, key=None), 401, None, "missing API key")
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="wrong").embeddings.create(model=EMBEDDING_MODEL, input="hi")


def test_a_server_without_an_embedding_model_answers_404(fake: Served) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        fake.client().embeddings.create(model=EMBEDDING_MODEL, input="hi")
    assert "serves no embedding model" in excinfo.value.body["message"]
    assert [m.id for m in fake.client().models.list().data] == ["fake-model", "fake-alias"]


# ---- loading -------------------------------------------------------------------------------


@pytest.fixture
def lazy(tokenizer, default_encoder_dir: Path) -> Iterator[Served]:
    """A fake chat engine next to the real embedding model, given by its path."""
    settings = ServerSettings(embedding_model=str(default_encoder_dir))
    thread = ServerThread(create_app(FakeEngine(tokenizer), settings)).start()
    yield Served(thread.server.config.app.state.sorai.engine, thread)
    thread.stop()


def test_the_embedding_model_loads_on_the_first_request(
    lazy: Served, default_encoder_dir: Path
) -> None:
    embeddings = lazy.state.embeddings
    assert not embeddings.loaded
    models = [m.id for m in lazy.client().models.list().data]
    assert models[-1] == str(default_encoder_dir) and not embeddings.loaded
    response = lazy.client().embeddings.create(model=str(default_encoder_dir), input="hello")
    assert embeddings.loaded and len(response.data[0].embedding) == 384


def test_a_model_that_cannot_load_is_a_503(tokenizer, tmp_path: Path) -> None:
    settings = ServerSettings(embedding_model=str(tmp_path))  # exists, but no model in it
    thread = ServerThread(create_app(FakeEngine(tokenizer), settings)).start()
    try:
        response = httpx2.post(thread.url + "/v1/embeddings", json={"input": "hi"}, timeout=60)
    finally:
        thread.stop()
    assert_error(response, 503, None, "could not be loaded", "modules.json")
    assert response.json()["error"]["type"] == "server_error"


def test_vectors_are_float32_values(live: Served) -> None:
    vector = embed(live, input="hi", encoding_format="float").data[0].embedding
    as_float32 = torch.tensor(vector, dtype=torch.float32).tolist()
    assert vector == as_float32
