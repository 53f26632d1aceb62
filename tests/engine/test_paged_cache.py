"""The paged KV cache's storage: zeros, committed only as blocks are written."""

from pathlib import Path

import pytest
import torch

from sorai.engine.paged_cache import PagedKVCache, zeroed


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
