"""EmbeddingEngine on the default embedding model: lazy loading, one worker thread, requests that
wait together encoded as one batch (their inputs sorted into length buckets together, each
answer in its own order), the dtype it runs in, and its errors. The fixtures pin float32, so
the exact comparisons hold on a machine whose default is bf16."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sorai import hub
from sorai.engine import EmbeddingEngine
from sorai.engine.embeddings import check_embedding_model
from sorai.errors import EngineDeadError, ModelFormatError, SoraiError
from sorai.model.bert import SentenceEncoder

TEXTS = ["The cat sits on the mat.", "How do I reset my password?", "Paris is in France."]


@pytest.fixture(scope="module")
def encoder(default_encoder_dir: Path) -> SentenceEncoder:
    return SentenceEncoder.from_dir(default_encoder_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(default_encoder_dir: Path) -> Iterator[EmbeddingEngine]:
    engine = EmbeddingEngine(str(default_encoder_dir), device="cpu", dtype="float32")
    yield engine
    engine.close()


class HeldEncoder:
    """Wraps the engine's encode_ids: records each call's sequences, and holds the first call
    until release is set (so that the next requests wait together)."""

    def __init__(self, engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        encoder = engine.encoder()
        self.calls: list[list[list[int]]] = []
        self.started, self.release = threading.Event(), threading.Event()
        original = encoder.encode_ids

        def held(ids, *args, **kwargs):
            self.calls.append([list(seq) for seq in ids])
            if len(self.calls) == 1:
                self.started.set()
                assert self.release.wait(60)
            return original(ids, *args, **kwargs)

        monkeypatch.setattr(encoder, "encode_ids", held)

    async def hold(self, engine: EmbeddingEngine) -> asyncio.Task:
        task = asyncio.create_task(engine.embed(["holds the worker"]))
        assert await asyncio.to_thread(self.started.wait, 60)
        return task


def test_texts_embed_as_the_encoder_does_in_process(
    engine: EmbeddingEngine, encoder: SentenceEncoder
) -> None:
    result = asyncio.run(engine.embed(TEXTS))
    np.testing.assert_allclose(result.vectors.numpy(), encoder.encode(TEXTS).numpy(), atol=1e-6)
    assert result.token_counts == [len(ids) for ids in encoder.tokenize(TEXTS)]
    assert result.total_tokens == sum(result.token_counts)


def test_token_ids_are_used_as_given_cut_to_the_models_limit(
    engine: EmbeddingEngine, encoder: SentenceEncoder
) -> None:
    ids = encoder.tokenize(TEXTS[:1])
    long = [101] + [2000] * 400 + [102]
    result = asyncio.run(engine.embed([ids[0], long]))
    assert result.token_counts == [len(ids[0]), 256]
    np.testing.assert_allclose(result.vectors[0].numpy(), encoder.encode(TEXTS[:1])[0], atol=1e-6)
    np.testing.assert_allclose(result.vectors[1].numpy(), encoder.encode_ids([long])[0], atol=1e-6)


def test_the_model_loads_on_first_use(default_encoder_dir: Path) -> None:
    engine = EmbeddingEngine(str(default_encoder_dir), device="cpu")
    try:
        assert not engine.loaded
        assert engine.max_seq_length == 256 and not engine.loaded  # read from its config
        asyncio.run(engine.load())
        assert engine.loaded
        asyncio.run(engine.load())  # loaded: nothing to do
    finally:
        engine.close()


def test_requests_that_wait_together_are_one_batch(
    engine: EmbeddingEngine, encoder: SentenceEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldEncoder(engine, monkeypatch)

    async def scenario() -> list:
        first = await held.hold(engine)
        waiting = [asyncio.create_task(engine.embed([text])) for text in TEXTS]
        waiting.append(asyncio.create_task(engine.embed(TEXTS[:2])))
        await asyncio.sleep(0.05)  # all submitted while the worker is busy
        held.release.set()
        await first
        return await asyncio.gather(*waiting)

    results = asyncio.run(scenario())
    assert len(held.calls) == 2  # the held request, then everything that waited behind it
    assert sorted(map(tuple, held.calls[1])) == sorted(map(tuple, encoder.tokenize(TEXTS * 2)[:5]))
    expected = encoder.encode(TEXTS).numpy()
    for i, result in enumerate(results[:3]):
        np.testing.assert_allclose(result.vectors.numpy(), expected[i : i + 1], atol=1e-6)
    np.testing.assert_allclose(results[3].vectors.numpy(), expected[:2], atol=1e-6)
    assert results[3].token_counts == [len(ids) for ids in encoder.tokenize(TEXTS[:2])]


def test_requests_of_mixed_lengths_in_one_batch_each_get_their_own_vectors_in_order(
    engine: EmbeddingEngine, encoder: SentenceEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldEncoder(engine, monkeypatch)
    long_ja = "東京は日本の首都です。" * 40  # cut to 256 tokens
    requests = [
        ["a", long_ja, TEXTS[1]],
        [" ".join(TEXTS * 4), "b"],
        [TEXTS[0], long_ja[:30], TEXTS[2], "c"],
    ]

    async def scenario() -> list:
        first = await held.hold(engine)
        waiting = [asyncio.create_task(engine.embed(inputs)) for inputs in requests]
        await asyncio.sleep(0.05)
        held.release.set()
        await first
        return await asyncio.gather(*waiting)

    results = asyncio.run(scenario())
    assert len(held.calls) == 2  # all three requests went in one call
    for inputs, result in zip(requests, results, strict=True):
        alone = torch.cat([encoder.encode([text]) for text in inputs])
        torch.testing.assert_close(result.vectors, alone, atol=1e-5, rtol=0)
        assert result.token_counts == [len(ids) for ids in encoder.tokenize(inputs)]
    assert results[0].token_counts[1] == 256


def test_the_engine_runs_in_the_dtype_it_is_given(default_encoder_dir: Path) -> None:
    engine = EmbeddingEngine(str(default_encoder_dir), device="cpu", dtype="bfloat16")
    try:
        assert engine.encoder().dtype == torch.bfloat16
        assert asyncio.run(engine.embed(TEXTS)).vectors.dtype == torch.float32
    finally:
        engine.close()


def test_a_bad_request_leaves_its_batchmates_alone(
    engine: EmbeddingEngine, encoder: SentenceEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldEncoder(engine, monkeypatch)

    async def scenario() -> tuple:
        first = await held.hold(engine)
        bad = asyncio.create_task(engine.embed([[101, 99999, 102]]))
        good = asyncio.create_task(engine.embed(TEXTS[:1]))
        await asyncio.sleep(0.05)
        held.release.set()
        await first
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(scenario())
    assert isinstance(bad, SoraiError) and bad.param is None
    assert "input[0]: token ids must be in [0, 30522), got 99999" in str(bad)
    np.testing.assert_allclose(good.vectors.numpy(), encoder.encode(TEXTS[:1]), atol=1e-6)
    assert held.calls[1] == encoder.tokenize(TEXTS[:1])


def test_a_cancelled_request_is_dropped_before_it_is_encoded(
    engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldEncoder(engine, monkeypatch)

    async def scenario() -> None:
        first = await held.hold(engine)
        dropped = asyncio.create_task(engine.embed(["nobody waits for this"]))
        await asyncio.sleep(0.05)
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dropped
        held.release.set()
        await first
        await engine.embed(["after"])

    asyncio.run(scenario())
    assert len(held.calls) == 2 and len(held.calls[1]) == 1  # only "after"


@pytest.mark.parametrize(
    ("inputs", "dimensions", "param", "words"),
    [
        (["hi"], 128, "dimensions", "its embeddings have 384 dimensions, got 128"),
        ([[101, 99999, 102]], None, None, "token ids must be in [0, 30522), got 99999"),
        ([[101, 102], []], None, None, "input[1] is an empty list"),
        (["hi", [101, 102]], None, None, "all texts or all token-id lists"),
        ([], None, None, "at least one"),
    ],
    ids=["dimensions", "vocabulary", "empty-ids", "mixed", "none"],
)
def test_bad_requests_are_sorai_errors(
    engine: EmbeddingEngine, inputs: list, dimensions: int | None, param: str | None, words: str
) -> None:
    with pytest.raises(SoraiError) as excinfo:
        asyncio.run(engine.embed(inputs, dimensions=dimensions))
    assert excinfo.value.param == param
    assert words in str(excinfo.value)


def test_the_models_own_dimensions_are_allowed(engine: EmbeddingEngine) -> None:
    assert asyncio.run(engine.embed(["hi"], dimensions=384)).vectors.shape == (1, 384)


def test_a_model_that_cannot_load_raises_and_is_tried_again(
    tmp_path: Path, default_encoder_dir: Path
) -> None:
    directory = tmp_path / "model"
    directory.mkdir()  # exists, but holds no model
    engine = EmbeddingEngine(str(directory), device="cpu")
    try:
        with pytest.raises(ModelFormatError, match="modules.json"):
            asyncio.run(engine.embed(["hi"]))
        assert not engine.loaded and engine.max_seq_length is None
        directory.rmdir()
        directory.symlink_to(default_encoder_dir)
        assert asyncio.run(engine.embed(["hi"])).vectors.shape == (1, 384)
    finally:
        engine.close()


def test_an_unreadable_model_is_a_model_format_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(hub, "resolve", unreadable)
    engine = EmbeddingEngine(str(tmp_path), device="cpu")
    try:
        with pytest.raises(ModelFormatError, match="Permission denied") as excinfo:
            asyncio.run(engine.load())
        assert isinstance(excinfo.value.__cause__, PermissionError)
    finally:
        engine.close()


def test_a_closed_engine_refuses_requests(default_encoder_dir: Path) -> None:
    engine = EmbeddingEngine(str(default_encoder_dir), device="cpu")
    engine.close()
    with pytest.raises(EngineDeadError, match="closed"):
        asyncio.run(engine.embed(["hi"]))


def test_a_mistyped_embedding_model_name_gets_a_did_you_mean() -> None:
    with pytest.raises(SoraiError, match="did you mean 'all-minilm-l6-v2'"):
        check_embedding_model("all-minilm-l6")


def test_check_embedding_model(tmp_path: Path) -> None:
    check_embedding_model(hub.DEFAULT_EMBEDDING_MODEL)  # known: nothing is read or pulled
    with pytest.raises(SoraiError, match="is a chat model, not an embedding model"):
        check_embedding_model(hub.DEFAULT_MODEL)
    with pytest.raises(SoraiError, match="neither a known embedding model nor a path"):
        check_embedding_model(str(tmp_path / "missing"))
    with pytest.raises(ModelFormatError, match="modules.json"):
        check_embedding_model(str(tmp_path))
