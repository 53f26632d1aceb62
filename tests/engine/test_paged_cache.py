"""The paged KV cache's storage: zeros, committed only as blocks are written, in the dtype
configured, read back as stored."""

from pathlib import Path

import pytest
import torch

from sorai.engine.config import EngineConfig
from sorai.engine.paged_cache import Chunk, PagedKVCache, StepLayout, zeroed
from sorai.errors import SoraiError
from sorai.model.kv_cache import causal_attention


def _rss_mib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def test_storage_reads_as_zeros_and_keeps_writes() -> None:
    t = zeroed((2, 3, 1000, 4), torch.float32, torch.device("cpu"))
    assert t.shape == (2, 3, 1000, 4) and t.is_contiguous()
    assert not t.any()
    t[1, 2, 999] = 7.0
    assert t.sum().item() == 28.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RSS")
def test_a_large_cache_costs_memory_only_for_blocks_written() -> None:
    before = _rss_mib()
    # 1 GiB of keys and values for 30 layers.
    cache = PagedKVCache(list(range(30)), 2048, 16, 4, 64, torch.float32, torch.device("cpu"))
    assert _rss_mib() - before < 64
    for layer in range(30):
        cache.keys[layer][:16] = 1.0  # one block per layer
        cache.values[layer][:16] = 1.0
    assert _rss_mib() - before < 64
    assert cache.keys[29][:16].eq(1.0).all() and not cache.keys[29][16:32].any()


def test_kv_cache_dtype_auto_is_the_models_and_bad_names_are_refused() -> None:
    assert EngineConfig().kv_dtype(torch.float32) == torch.float32
    assert EngineConfig().kv_dtype(torch.bfloat16) == torch.bfloat16
    assert EngineConfig(kv_cache_dtype="float16").kv_dtype(torch.float32) == torch.float16
    with pytest.raises(SoraiError, match="kv_cache_dtype must be auto or one of float32, float16"):
        EngineConfig(kv_cache_dtype="fp8")
    f16 = PagedKVCache.bytes_per_block(30, 16, 3, 64, torch.float16)
    assert 2 * f16 == PagedKVCache.bytes_per_block(30, 16, 3, 64, torch.float32)


def test_float16_storage_is_read_back_as_stored_by_prefill_and_decode() -> None:
    """A float32 model over a float16 cache: every attention sees keys and values rounded to
    float16 (a fresh prefill chunk's own ones too) and computes in float32."""
    torch.manual_seed(0)
    heads, kv_heads, dim, n = 4, 2, 8, 6
    cache = PagedKVCache([0], 4, 4, kv_heads, dim, torch.float16, torch.device("cpu"))
    assert cache.keys[0].dtype == torch.float16 and "float16" in cache.describe()
    q, k, v = (torch.randn(1, h, n + 1, dim) for h in (heads, kv_heads, kv_heads))
    rounded_k, rounded_v = k.half().float(), v.half().float()
    expected = causal_attention(q, rounded_k, rounded_v)
    blocks = [2, 0]  # not in order: slots go through the block table

    cache.layout = StepLayout(
        slot_mapping=torch.tensor(cache.slots(blocks, 0, n)),
        num_decodes=0,
        decode_slots=None,
        decode_mask=None,
        chunks=[Chunk(0, n, 0, None)],
    )
    prefill = cache.attend(0, q[:, :, :n], k[:, :, :n], v[:, :, :n])
    assert prefill.dtype == torch.float32
    torch.testing.assert_close(prefill, expected[:, :, :n])
    assert not torch.equal(prefill, causal_attention(q, k, v)[:, :, :n]), "rounding is seen"

    cache.layout = StepLayout(
        slot_mapping=torch.tensor(cache.slots(blocks, n, n + 1)),
        num_decodes=1,
        decode_slots=torch.tensor([cache.slots(blocks, 0, n + 1)]),
        decode_mask=None,
        chunks=[],
    )
    decode = cache.attend(0, q[:, :, n:], k[:, :, n:], v[:, :, n:])
    torch.testing.assert_close(decode, expected[:, :, n:])
