"""The Python API (`sorai.load(...)` -> LLM) on the real default model, SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch

from sorai.engine import EngineConfig, LLMEngine
from sorai.engine.llm import LLM, Completion
from sorai.engine.params import SamplingParams
from sorai.errors import ContextLengthError, SamplingError, SoraiError
from tests.engine.oracle import oracle_tokens

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 20}


@pytest.fixture(scope="module")
def llm(default_llm: LLM) -> LLM:
    """The session's default model (tests/conftest.py): nothing here changes its weights."""
    return default_llm


@pytest.fixture(scope="module")
def france(llm: LLM) -> Completion:
    return llm.chat(FRANCE, **GREEDY)


# ---- chat ----------------------------------------------------------------------------------


def test_chat_greedy_answers_paris(france: Completion) -> None:
    assert "Paris" in france.text


def test_chat_ends_at_the_end_of_turn_with_finish_reason_stop(llm: LLM, france: Completion) -> None:
    assert france.finish_reason == "stop"
    assert france.completion_tokens < GREEDY["max_tokens"]
    # The end-of-turn token stops the answer and is neither returned nor shown.
    assert not set(france.token_ids) & set(llm.tokenizer.eos_token_ids)
    assert "<|im_end|>" not in france.text


def test_chat_counts_the_prompt_tokens(llm: LLM, france: Completion) -> None:
    assert france.prompt_tokens == len(llm.tokenizer.encode_chat(FRANCE))


def test_chat_text_decodes_its_token_ids(llm: LLM, france: Completion) -> None:
    assert france.text == llm.tokenizer.decode(france.token_ids, skip_special_tokens=True)


def test_chat_stream_pieces_join_to_the_chat_text(llm: LLM, france: Completion) -> None:
    pieces = list(llm.chat_stream(FRANCE, **GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == france.text


def test_generate_stream_pieces_join_to_the_generate_text(llm: LLM) -> None:
    options = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
    pieces = list(llm.generate_stream("The three primary colors are", **options))
    assert "".join(pieces) == llm.generate("The three primary colors are", **options).text


# ---- length, stop, seeds -------------------------------------------------------------------


def test_max_tokens_gives_exactly_that_many_tokens_with_finish_reason_length(llm: LLM) -> None:
    completion = llm.generate("Once upon a time", max_tokens=5, ignore_eos=True)
    assert len(completion.token_ids) == completion.completion_tokens == 5
    assert completion.finish_reason == "length"


def test_ignore_eos_generates_past_the_end_of_turn(llm: LLM, france: Completion) -> None:
    ids = llm.tokenizer.encode_chat(FRANCE)
    completion = llm.generate(
        ids, temperature=0, max_tokens=france.completion_tokens + 3, ignore_eos=True
    )
    assert completion.token_ids[: france.completion_tokens] == france.token_ids
    assert completion.token_ids[france.completion_tokens] in llm.tokenizer.eos_token_ids
    assert completion.completion_tokens == france.completion_tokens + 3
    assert completion.finish_reason == "length"


def test_stop_string_cuts_the_text_before_it(llm: LLM, france: Completion) -> None:
    completion = llm.chat(FRANCE, **GREEDY, stop=["Paris"])
    assert completion.text == france.text[: france.text.index("Paris")]
    assert completion.finish_reason == "stop"


def test_stop_string_is_reported_as_the_stop_reason(llm: LLM) -> None:
    completion = llm.chat(FRANCE, **GREEDY, stop=["Paris"])
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "Paris")


def test_greedy_generate_matches_the_oracle(llm: LLM) -> None:
    ids = llm.tokenizer.encode_chat(FRANCE)
    params = SamplingParams(temperature=0, max_tokens=20)
    expected = oracle_tokens(llm.model, ids, params, llm.tokenizer.eos_token_ids)
    assert llm.generate(ids, sampling=params).token_ids == expected


def test_generate_batch_gives_each_prompt_its_own_completion(llm: LLM) -> None:
    # Longer than two KV blocks (16 tokens each), so a full block can be shared.
    story = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
    prompts = [story, "One, two, three,", story]
    batch = llm.generate_batch(prompts, temperature=0, max_tokens=6, ignore_eos=True)
    alone = [llm.generate(p, temperature=0, max_tokens=6, ignore_eos=True) for p in prompts]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert batch[0].text == batch[2].text != batch[1].text
    # The repeated prompt found its blocks in the prefix cache.
    assert alone[2].cached_tokens >= 16


def test_a_stream_left_early_frees_its_kv_blocks(llm: LLM) -> None:
    stream = llm.generate_stream("Once upon a time", max_tokens=50, ignore_eos=True)
    next(stream)
    assert llm.engine.pool.num_used > 0 or llm.engine.has_work()
    stream.close()
    assert not llm.engine.has_work()
    assert llm.engine.scheduler.running == [] and not llm.engine.scheduler.waiting


def test_two_open_streams_interleave_without_mixing(llm: LLM) -> None:
    options = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
    a = llm.generate_stream("The capital of France is", **options)
    b = llm.generate_stream("One, two, three,", **options)
    pieces_a, pieces_b = [], []
    for x, y in zip(a, b, strict=False):
        pieces_a.append(x)
        pieces_b.append(y)
    pieces_a += list(a)
    pieces_b += list(b)
    assert "".join(pieces_a) == llm.generate("The capital of France is", **options).text
    assert "".join(pieces_b) == llm.generate("One, two, three,", **options).text


def test_n_above_one_is_refused_with_the_way_out(llm: LLM) -> None:
    with pytest.raises(SamplingError, match="generate_batch|list of prompts|sorai serve"):
        llm.generate("Hi", n=2, max_tokens=2)


def test_same_seed_gives_the_same_text(llm: LLM) -> None:
    options = {"temperature": 1.0, "max_tokens": 8, "ignore_eos": True, "seed": 1234}
    first = llm.generate("Once upon a time", **options)
    second = llm.generate("Once upon a time", **options)
    assert first.token_ids == second.token_ids
    assert first.text == second.text


def test_different_seeds_give_different_text(llm: LLM) -> None:
    # Shows temperature > 0 really samples (the same-seed test would pass under greedy too).
    options = {"temperature": 1.0, "max_tokens": 8, "ignore_eos": True}
    first = llm.generate("Once upon a time", **options, seed=1)
    second = llm.generate("Once upon a time", **options, seed=2)
    assert first.text != second.text


# ---- Japanese streaming --------------------------------------------------------------------

JAPANESE_PROMPT = "東京は日本の首都です。"


def test_japanese_stream_pieces_are_whole_characters(llm: LLM) -> None:
    options = {"temperature": 0, "max_tokens": 40, "stop": ["。"]}
    # Both runs start from the same prefix-cache state: a prompt computed whole and one whose
    # first block comes from the cache may break a near-tie differently (sorai.model.quant.linear).
    llm.generate(JAPANESE_PROMPT, **options)
    pieces = list(llm.generate_stream(JAPANESE_PROMPT, **options))
    completion = llm.generate(JAPANESE_PROMPT, **options)
    assert completion.finish_reason == "stop"
    # The characters really are split over byte-level tokens: more tokens than characters.
    assert len(completion.token_ids) > len(completion.text) > 0
    assert any(ord(ch) > 0x3000 for ch in completion.text)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == completion.text


def test_token_deltas_never_hold_half_a_character(llm: LLM) -> None:
    # max_tokens may cut the last character in two; only the final flush may hold those bytes.
    ids = llm.encode_prompt(JAPANESE_PROMPT + "東京")
    deltas = list(llm.stream_deltas(ids, SamplingParams(temperature=0, max_tokens=30)))
    assert sum(len(d.token_ids) for d in deltas) == 30
    assert any(ord(ch) > 0x3000 for d in deltas for ch in d.text)
    assert all("\ufffd" not in d.text for d in deltas[:-1])
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]


# ---- errors --------------------------------------------------------------------------------


def test_prompt_longer_than_the_context_raises_context_length_error(llm: LLM) -> None:
    assert llm.context_length == 8192
    prompt = "hello " * 9000
    with pytest.raises(ContextLengthError, match="maximum context length is 8192 tokens"):
        llm.generate(prompt, max_tokens=1)


def test_prompt_filling_the_whole_context_raises_context_length_error(llm: LLM) -> None:
    # No room is left for even one new token.
    ids = llm.tokenizer.encode("hello") * llm.context_length
    with pytest.raises(ContextLengthError, match=f"{llm.context_length} in the prompt \\+ 1"):
        llm.generate(ids[: llm.context_length], max_tokens=1)


def test_max_tokens_past_the_context_is_refused_not_capped(llm: LLM) -> None:
    # The engine's contract, now the Python API's too: a clear error, never a silent cap.
    ids = llm.tokenizer.encode("hello") * (llm.context_length - 10)
    with pytest.raises(ContextLengthError, match="shorten the prompt or lower max_tokens"):
        llm.generate(ids[: llm.context_length - 10], max_tokens=11)


def test_empty_prompt_raises_context_length_error(llm: LLM) -> None:
    with pytest.raises(ContextLengthError, match="empty"):
        llm.generate([], max_tokens=1)


def test_unknown_sampling_option_raises_sampling_error_listing_valid_ones(llm: LLM) -> None:
    with pytest.raises(SamplingError) as excinfo:
        llm.generate("hi", temprature=0.5)
    message = str(excinfo.value)
    assert "'temprature'" in message
    for valid in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop"):
        assert valid in message


def test_bad_sampling_value_raises_sampling_error(llm: LLM) -> None:
    with pytest.raises(SamplingError, match="temperature"):
        llm.chat(FRANCE, temperature=-1)


# ---- chunked prefill -----------------------------------------------------------------------

LONG_GREEDY = {"temperature": 0, "max_tokens": 3, "ignore_eos": True}


@pytest.fixture(scope="module")
def long_prompt(llm: LLM) -> list[int]:
    """A little more than one prefill chunk of tokens, so the prefill runs in two chunks."""
    text = " ".join(f"Entry {i}: the box holds {i * 7 % 13} stones." for i in range(45))
    ids = llm.encode_prompt(text + " Entry 45: the")
    budget = llm.engine.config.max_num_batched_tokens
    assert budget < len(ids) < 2 * budget
    return ids


@pytest.fixture(scope="module")
def long_greedy(llm: LLM, long_prompt: list[int]) -> Completion:
    """Greedy continuation with the default chunk size."""
    return llm.generate(long_prompt, **LONG_GREEDY)


def test_long_prompt_first_token_matches_a_plain_forward(
    llm: LLM, long_prompt: list[int], long_greedy: Completion
) -> None:
    # One forward over the whole prompt, no cache and no chunks: the reference.
    with torch.inference_mode():
        expected = int(llm.model(torch.tensor([long_prompt]))[0, -1].argmax())
    assert long_greedy.token_ids[0] == expected


# tests/engine/test_engine.py's chunked-prefill case covers this in the fast tier.
@pytest.mark.slow
def test_prefill_chunk_size_does_not_change_the_output(
    llm: LLM, long_prompt: list[int], long_greedy: Completion
) -> None:
    # 31 does not divide the prompt length: 18 chunks, the last one partial.
    small = LLM(LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_batched_tokens=31)))
    small_chunks = small.generate(long_prompt, **LONG_GREEDY)
    assert small_chunks.token_ids == long_greedy.token_ids


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": 5}],
        [{"role": "user"}],
        "What is the capital of France?",
        [["user", "hello"]],
    ],
    ids=["non-string-content", "missing-content", "a-bare-string", "not-dicts"],
)
def test_malformed_messages_raise_sorai_error(llm: LLM, messages) -> None:
    with pytest.raises(SoraiError, match="render|messages"):
        llm.chat(messages, max_tokens=2)


@pytest.mark.parametrize("prompt", [[10**6], [-1], ["a"], [True], None, b"hi"], ids=repr)
def test_malformed_token_id_prompts_raise_sorai_error(llm: LLM, prompt) -> None:
    with pytest.raises(SoraiError, match="prompt"):
        llm.generate(prompt, max_tokens=2)


def test_infinite_temperature_is_refused(llm: LLM) -> None:
    with pytest.raises(SamplingError, match="temperature must be a finite number"):
        llm.generate("Hi", temperature=float("inf"), max_tokens=2)
