"""Scheduling priorities: interactive requests (priority 0) join, run and wait ahead of batch
jobs (priority 1), on the real default model's engine."""

from __future__ import annotations

from sorai.engine.config import EngineConfig
from sorai.engine.llm import LLM
from sorai.engine.llm_engine import LLMEngine
from sorai.engine.params import SamplingParams


def test_an_interactive_request_joins_ahead_of_queued_batch_jobs(default_llm: LLM) -> None:
    engine = LLMEngine(
        default_llm.model, default_llm.tokenizer, EngineConfig(max_num_seqs=2), name="test"
    )
    prompt = default_llm.tokenizer.encode("Once upon a time")
    batch = SamplingParams(max_tokens=4, temperature=0, priority=1)
    for i in range(3):
        engine.add_request(f"batch-{i}", prompt, batch)
    engine.add_request("chat", prompt, SamplingParams(max_tokens=4, temperature=0))
    engine.step()  # the chat prompt, alone (see the next test)
    assert [seq.request.request_id for seq in engine.scheduler.running] == ["chat"]
    engine.step()  # then the one free slot goes to the first batch job
    running = [seq.request.request_id for seq in engine.scheduler.running]
    assert sorted(running) == ["batch-0", "chat"]  # chat went ahead of all three
    waiting = [seq.request.request_id for seq in engine.scheduler.waiting]
    assert waiting == ["batch-1", "batch-2"]
    finished: list[str] = []
    while engine.has_work():
        finished += [out.request_id for out in engine.step() if out.finished]
    assert finished.index("chat") < finished.index("batch-1")


def test_priority_must_be_a_non_negative_integer() -> None:
    import pytest

    from sorai.errors import SamplingError

    with pytest.raises(SamplingError, match="priority"):
        SamplingParams(priority=-1)


def test_an_interactive_prompt_runs_without_batch_jobs_beside_it(default_llm: LLM) -> None:
    engine = LLMEngine(default_llm.model, default_llm.tokenizer, name="test")
    prompt = default_llm.tokenizer.encode("Once upon a time")
    engine.add_request("batch", prompt, SamplingParams(max_tokens=8, temperature=0, priority=1))
    engine.step()  # the batch job's prompt, then it decodes
    engine.add_request("chat", prompt, SamplingParams(max_tokens=2, temperature=0))
    scheduled = engine.scheduler.schedule()
    assert [seq.request.request_id for seq, _ in scheduled.scheduled] == ["chat"]
    engine.scheduler.after_step(scheduled)
    # Once the chat prompt is computed, both decode together again.
    both = engine.scheduler.schedule()
    assert sorted(seq.request.request_id for seq, _ in both.scheduled) == ["batch", "chat"]


def test_a_batch_prompt_goes_in_small_chunks_an_interactive_one_whole(default_llm: LLM) -> None:
    config = EngineConfig()
    config.batch_prefill_chunk = 64  # set after construction: an older engine ignores it
    engine = LLMEngine(default_llm.model, default_llm.tokenizer, config, name="test")
    tokenizer = default_llm.tokenizer
    batch_prompt = tokenizer.encode("one two three four " * 100)[:300]
    chat_prompt = tokenizer.encode("five six seven eight " * 100)[:300]
    engine.add_request("batch", batch_prompt, SamplingParams(max_tokens=2, priority=1))
    chunks = []
    for _ in range(5):  # scheduling only: chunk sizes need no forward
        out = engine.scheduler.schedule()
        chunks += [n for _, n in out.scheduled]
        engine.scheduler.after_step(out)
    assert chunks == [64, 64, 64, 64, 44]
    engine.add_request("chat", chat_prompt, SamplingParams(max_tokens=2))
    out = engine.scheduler.schedule()
    assert [(seq.request.request_id, n) for seq, n in out.scheduled] == [("chat", 300)]


def test_batch_prompts_share_one_chunk_a_step(default_llm: LLM) -> None:
    config = EngineConfig()
    config.batch_prefill_chunk = 64
    engine = LLMEngine(default_llm.model, default_llm.tokenizer, config, name="test")
    words = ("one two three", "four five six", "seven eight nine")
    for i, text in enumerate(words):
        prompt = default_llm.tokenizer.encode(f"{text} " * 40)[:100]
        engine.add_request(f"batch-{i}", prompt, SamplingParams(max_tokens=2, priority=1))
    steps = []
    for _ in range(5):
        out = engine.scheduler.schedule()
        steps.append(sum(n for _, n in out.scheduled))
        engine.scheduler.after_step(out)
    assert steps == [64, 64, 64, 64, 44]  # 300 prompt tokens, 64 a step whoever they are
