"""The decode attention kernel: SDPA's numbers from keys read in place, each row's the same
alone and beside any other sequence, in every storage dtype, on the real model as the oracle."""

from __future__ import annotations

import pytest
import torch

from sorai.engine import EngineConfig, LLMEngine
from sorai.engine import decode_attention as da
from sorai.engine.llm import LLM
from sorai.engine.paged_cache import PagedKVCache, StepLayout
from sorai.engine.params import SamplingParams
from sorai.errors import SoraiError
from tests.engine.oracle import oracle_tokens

# Where no C compiler builds it, the engine runs SDPA and these have nothing to check.
pytestmark = pytest.mark.skipif(da.kernel() is None, reason="the decode kernel is not built here")


def _step(
    kv_heads: int, group: int, lengths: list[int], dtype: torch.dtype, seed: int = 0, dim: int = 64
):
    """A cache of random keys and values, sequences on shuffled blocks, one query each."""
    torch.manual_seed(seed)
    block = 16
    blocks = sum(-(-n // block) for n in lengths) + 2
    cache = PagedKVCache([0], blocks, block, kv_heads, dim, dtype, torch.device("cpu"))
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape))
    cache.values[0].copy_(torch.randn(cache.values[0].shape))
    order = torch.randperm(blocks).tolist()
    tables = []
    for n in lengths:
        tables.append([order.pop() for _ in range(-(-n // block))])
    slots = [cache.slots(t, 0, n) for t, n in zip(tables, lengths, strict=True)]
    q = torch.randn(kv_heads * group, len(lengths), dim)
    return cache, q, slots


def _sdpa(cache: PagedKVCache, q: torch.Tensor, slots: list[list[int]]) -> torch.Tensor:
    """Each sequence alone through PyTorch's attention, in float32."""
    outs = []
    for s, row in enumerate(slots):
        index = torch.tensor(row)
        keys = cache.keys[0].index_select(0, index).float().transpose(0, 1)[None]
        values = cache.values[0].index_select(0, index).float().transpose(0, 1)[None]
        out = torch.nn.functional.scaled_dot_product_attention(
            q[None, :, s : s + 1], keys, values, enable_gqa=True
        )
        outs.append(out[0])
    return torch.cat(outs, dim=1)


def _kernel(cache: PagedKVCache, q: torch.Tensor, slots: list[list[int]]) -> torch.Tensor:
    """The kernel over one step holding `slots` (padded to the longest, as the runner does)."""
    width = max(len(r) for r in slots)
    padded = torch.tensor([r + [0] * (width - len(r)) for r in slots])
    lengths = torch.tensor([len(r) for r in slots])
    return da.kernel()(q, cache.keys[0], cache.values[0], padded, lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("group", "dim"), [(1, 64), (1, 80), (2, 128), (3, 64), (4, 64), (7, 64)])
def test_the_kernel_computes_sdpa_over_each_sequences_own_slots(dtype, group, dim) -> None:
    """Groups of 1-4 query heads per KV head, and 7 (= 4 + 3), over keys stored as float32,
    float16 or bfloat16; a head size of 80 runs the value sums' narrower tail pass."""
    lengths = [1, 5, 16, 17, 130]
    cache, q, slots = _step(2, group, lengths, dtype, dim=dim)
    out = _kernel(cache, q, slots)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, _sdpa(cache, q, slots), atol=2e-6, rtol=1e-5)


def test_a_rows_numbers_are_the_same_alone_and_beside_any_lengths() -> None:
    """Batch invariance: a short sequence padded to a 300-token neighbour, or a long one beside
    one-token ones, gets bit for bit what it gets alone, in any order."""
    lengths = [300, 1, 7, 64, 65, 2]
    cache, q, slots = _step(3, 3, lengths, torch.float32, seed=1)
    together = _kernel(cache, q, slots)
    reverse = _kernel(cache, q.flip(1), slots[::-1]).flip(1)
    for s in range(len(lengths)):
        alone = _kernel(cache, q[:, s : s + 1], [slots[s]])
        assert torch.equal(alone[:, 0], together[:, s]), lengths[s]
        assert torch.equal(alone[:, 0], reverse[:, s]), lengths[s]


def test_a_long_step_is_split_over_threads_with_the_same_numbers(monkeypatch) -> None:
    """torch's thread count splits a step's sequences into parts of similar context; each
    sequence is computed alike in any part."""
    assert da.parts([240] * 16, 2) == [(0, 8), (8, 16)]
    assert da.parts([3000, 10, 10], 4) == [(0, 1), (1, 3)]  # 3020 tokens: 2 parts, not 3
    assert da.parts([100] * 5, 8) == [(0, 5)]  # too short to split
    monkeypatch.setattr(da, "TOKENS_PER_THREAD", 64)
    cache, q, slots = _step(3, 3, [300, 1, 7, 64, 65, 2, 130], torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(cache, q, slots)
        torch.set_num_threads(3)
        assert len(da.parts([len(r) for r in slots], 3)) == 3
        three = _kernel(cache, q, slots)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_the_paged_cache_decodes_through_the_kernel_with_lengths_from_the_mask() -> None:
    lengths = [40, 3]
    cache, q, slots = _step(3, 3, lengths, torch.float32, seed=2)
    assert "decode attention: C kernel" in cache.describe()
    width = max(lengths)
    padded = torch.tensor([r + [0] * (width - len(r)) for r in slots])
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None])[:, None, None]
    k = torch.randn(1, 3, 2, 64)  # this step's own keys and values, written first
    new_slots = torch.tensor([slots[0][-1], slots[1][-1]])
    cache.layout = StepLayout(new_slots, 2, padded, mask, [])
    out = cache.attend(0, q[None], k, k)
    assert cache.layout.decode_lengths.tolist() == lengths
    torch.testing.assert_close(out[0], _sdpa(cache, q, slots), atol=2e-6, rtol=1e-5)


def test_the_choice_is_checked_and_sdpa_can_be_forced(monkeypatch) -> None:
    try:
        monkeypatch.setenv(da.ENVIRONMENT, "flash")
        da.kernel.cache_clear()
        with pytest.raises(SoraiError, match="must be one of auto, kernel, sdpa, got 'flash'"):
            da.kernel()
        monkeypatch.setenv(da.ENVIRONMENT, "sdpa")
        da.kernel.cache_clear()
        assert da.kernel() is None
        cache = PagedKVCache([0], 4, 16, 1, 64, torch.float32, torch.device("cpu"))
        assert "decode attention: SDPA" in cache.describe()
        monkeypatch.setenv(da.ENVIRONMENT, "kernel")
        monkeypatch.setenv("CC", "/nonexistent/cc")
        da.kernel.cache_clear()
        with pytest.raises(SoraiError, match="kernel is unavailable"):
            da.kernel()
        monkeypatch.setenv(da.ENVIRONMENT, "auto")
        da.kernel.cache_clear()
        assert da.kernel() is None  # auto falls back to SDPA
    finally:
        monkeypatch.undo()
        da.kernel.cache_clear()
    assert da.kernel() is not None


def test_sequences_of_very_different_lengths_decode_as_the_oracle(default_llm: LLM) -> None:
    """A 300-token prompt and two short ones decode in the same steps, the short ones padded to
    the long one's context: each gives the tokens it gives alone in the oracle."""
    llm = default_llm
    greedy = SamplingParams(max_tokens=6, temperature=0)
    long_text = " ".join(f"Note {i}: the fox hid in the forest." for i in range(30))
    prompts = {
        "long": llm.tokenizer.encode_chat([{"role": "user", "content": long_text + " Why?"}]),
        "a": llm.tokenizer.encode_chat([{"role": "user", "content": "What is 2+2?"}]),
        "b": llm.tokenizer.encode_chat([{"role": "user", "content": "Name a color."}]),
    }
    assert len(prompts["long"]) > 300 and len(prompts["a"]) < 60
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=64), name="test")
    assert engine.cache.decode_kernel is not None
    for request_id, ids in prompts.items():
        engine.add_request(request_id, ids, greedy)
    tokens: dict[str, list[int]] = {r: [] for r in prompts}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.choices[0].token_ids
    for request_id, ids in prompts.items():
        expected = oracle_tokens(llm.model, ids, greedy, llm.tokenizer.eos_token_ids)
        assert tokens[request_id] == expected, request_id
