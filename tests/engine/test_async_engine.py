"""AsyncEngine on the real default model: streams, the queue limit, aborts and shutdown."""

from __future__ import annotations

import asyncio

import pytest

from sorai.engine import AsyncEngine, EngineConfig, LLMEngine
from sorai.engine.llm import LLM
from sorai.engine.params import SamplingParams
from sorai.errors import EngineDeadError, QueueFullError
from tests.engine.test_engine import chat_ids


@pytest.fixture(scope="module")
def llm(default_llm: LLM) -> LLM:
    """The session's default model (tests/conftest.py): nothing here changes its weights."""
    return default_llm


def make(llm: LLM, **config: object) -> AsyncEngine:
    return AsyncEngine(LLMEngine(llm.model, llm.tokenizer, EngineConfig(**config)))


def test_stream_queue_limit_abort_and_stop(llm: LLM) -> None:
    engine = make(llm, num_blocks=64, max_num_seqs=1, max_waiting=0)
    ids = chat_ids(llm, "Tell me a long story.")
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def scenario() -> None:
        await engine.start()
        stream = engine.generate(ids, long, "a")
        first = await anext(stream)
        assert first.request_id == "a" and not first.finished
        with pytest.raises(QueueFullError):
            await anext(engine.generate(ids, long, "b"))
        await stream.aclose()  # the consumer leaves: the request is aborted
        for _ in range(200):
            await asyncio.sleep(0.02)
            if engine.stats().kv_blocks_used == 0 and engine.stats().running == 0:
                break
        assert engine.stats().kv_blocks_used == 0
        texts = [
            out.choices[0].text
            async for out in engine.generate(ids, SamplingParams(max_tokens=4), "c")
            if out.choices
        ]
        assert texts
        await engine.stop(timeout=1)
        with pytest.raises(EngineDeadError, match="shutting down"):
            await anext(engine.generate(ids, long, "d"))

    asyncio.run(scenario())
