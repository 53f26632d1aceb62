"""ContiguousKVCache: every way of filling it gives the logits of one full forward."""

from __future__ import annotations

import pytest
import torch

from sorai.model.config import ModelConfig
from sorai.model.kv_cache import ContiguousKVCache
from sorai.model.transformer import Transformer

CONFIG = ModelConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
IDS = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    model.init_weights(std=0.2)
    return model.eval()


def cached_logits(model: Transformer, cache: ContiguousKVCache, steps: list[int]) -> torch.Tensor:
    """Feed IDS in pieces of the given sizes; return the logits of every position."""
    out, start = [], 0
    with torch.inference_mode():
        for size in steps:
            positions = torch.arange(start, start + size)
            out.append(model(IDS[:, start : start + size], positions, cache))
            start += size
    return torch.cat(out, dim=1)


def full_logits(model: Transformer) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS)


def test_prefill_then_decode_equals_full_forward(model: Transformer) -> None:
    cache = ContiguousKVCache.for_model(model, max_len=24)
    logits = cached_logits(model, cache, [10] + [1] * 14)
    assert torch.allclose(logits, full_logits(model), atol=1e-5)


def test_chunked_prefill_equals_full_forward(model: Transformer) -> None:
    cache = ContiguousKVCache.for_model(model, max_len=24)
    assert torch.allclose(cached_logits(model, cache, [7, 7, 7, 3]), full_logits(model), atol=1e-5)


def test_cache_grows_from_a_small_start_without_changing_results(model: Transformer) -> None:
    cache = ContiguousKVCache.for_model(model, max_len=24, initial_len=2)
    logits = cached_logits(model, cache, [3] + [1] * 21)
    assert next(iter(cache.keys.values())).shape[2] == 24
    assert torch.allclose(logits, full_logits(model), atol=1e-5)


def test_truncate_rolls_back_and_recomputes_identically(model: Transformer) -> None:
    cache = ContiguousKVCache.for_model(model, max_len=24)
    cached_logits(model, cache, [20])
    cache.truncate(12)
    assert cache.length == 12
    with torch.inference_mode():
        rest = model(IDS[:, 12:], torch.arange(12, 24), cache)
    assert torch.allclose(rest, full_logits(model)[:, 12:], atol=1e-5)


def test_a_step_that_skips_positions_is_refused(model: Transformer) -> None:
    cache = ContiguousKVCache.for_model(model, max_len=24)
    cached_logits(model, cache, [3])
    with pytest.raises(ValueError, match="starts at position 5 but the cache holds 3"):
        model(IDS[:, 5:6], torch.tensor([5]), cache)


def test_a_step_past_max_len_is_refused(model: Transformer) -> None:
    cache = ContiguousKVCache.for_model(model, max_len=4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        model(IDS[:, :5], torch.arange(5), cache)


def test_pipeline_stage_caches_only_its_own_layers(model: Transformer) -> None:
    stage = Transformer(CONFIG)
    del stage.layers["0"]
    stage.embed_tokens = None
    cache = ContiguousKVCache.for_model(stage, max_len=8)
    assert sorted(cache.keys) == [1, 2]


def test_cache_heads_follow_the_weights_of_a_sharded_model() -> None:
    shard = Transformer(CONFIG)
    for block in shard.layers.values():
        # a tensor-parallel rank's k_proj holds half the KV heads
        block.self_attn.k_proj = torch.nn.Linear(64, 16 * 1, bias=False)
    cache = ContiguousKVCache.for_model(shard, max_len=8)
    assert cache.keys[0].shape == (1, 1, 8, 16)
