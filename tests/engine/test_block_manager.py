"""Block pool: reference counts, LRU reuse of freed blocks (written ones before fresh ones), and
prefix-cache names."""

from __future__ import annotations

import pytest

from sorai.engine.block_manager import BlockPool, block_hashes
from sorai.engine.config import EngineConfig
from sorai.errors import SoraiError


def test_hash_chain_names_a_block_by_everything_before_it() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2  # the partial third block has no name
    assert a[1] != b[1]  # same tokens in block 1, different prefix
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, start=a[:1]) == a
    assert block_hashes([1, 2, 3, 4], 4, extra=b"adapter") != block_hashes([1, 2, 3, 4], 4)


def test_allocate_release_and_running_out() -> None:
    pool = BlockPool(4)
    first = pool.allocate(3)
    assert first == [0, 1, 2] and pool.num_free == 1
    assert pool.allocate(2) is None and pool.num_free == 1  # all or nothing
    pool.release(first)
    assert pool.num_free == 4 and pool.num_used == 0


def test_freed_named_blocks_are_found_again_until_evicted() -> None:
    pool = BlockPool(3)
    names = block_hashes(list(range(8)), 4)
    blocks = pool.allocate(2)
    for block, name in zip(blocks, names, strict=True):
        pool.register(block, name)
    pool.release(blocks)
    found = pool.lookup(names)
    assert found == blocks
    pool.claim(found)
    assert pool.num_used == 2
    pool.release(found)
    # Taking every block evicts the named ones: their names go too.
    assert len(pool.allocate(3)) == 3
    assert pool.lookup(names) == []


def test_shared_blocks_count_references() -> None:
    pool = BlockPool(2)
    names = block_hashes(list(range(4)), 4)
    (block,) = pool.allocate(1)
    pool.register(block, names[0])
    pool.claim(pool.lookup(names))  # a second sequence shares it
    pool.release([block])
    assert pool.num_used == 1  # still held by the other
    pool.release([block])
    assert pool.num_used == 0


def test_release_puts_tail_blocks_first_in_line_for_eviction() -> None:
    pool = BlockPool(3)
    names = block_hashes(list(range(12)), 4)
    blocks = pool.allocate(3)
    for block, name in zip(blocks, names, strict=True):
        pool.register(block, name)
    pool.release(blocks)
    (taken,) = pool.allocate(1)
    assert taken == blocks[-1]  # the prefix's head survives longest
    assert pool.lookup(names) == blocks[:2]


def test_written_blocks_are_reused_before_never_written_ones() -> None:
    # A never-written block costs memory when first written (the cache's pages are committed
    # lazily), so a pool serving one request at a time keeps reusing the same blocks.
    pool = BlockPool(8)
    first = pool.allocate(2)
    pool.release(first)
    assert sorted(pool.allocate(2)) == sorted(first) and pool.num_written == 2
    assert pool.num_free == 6
    assert pool.allocate(6) is not None and pool.num_written == 8 and pool.num_free == 0


def test_a_nameless_freed_block_goes_before_named_ones() -> None:
    pool = BlockPool(8)
    names = block_hashes(list(range(4)), 4)
    named, partial = pool.allocate(2)
    pool.register(named, names[0])
    pool.release([named, partial])
    assert pool.allocate(1) == [partial]
    assert pool.lookup(names) == [named]  # the prefix is still found
    assert pool.allocate(1) == [named] and pool.lookup(names) == []


def test_the_most_recently_freed_named_blocks_are_kept_over_fresh_ones() -> None:
    pool = BlockPool(8, keep_cached=1)
    names = block_hashes(list(range(8)), 4)
    old, recent = pool.allocate(1), pool.allocate(1)
    pool.register(old[0], names[0])
    pool.register(recent[0], names[1])
    pool.release(old)
    # One named block free, one kept: a never-written block is taken instead.
    taken = pool.allocate(1)
    assert taken not in (old, recent) and pool.lookup(names[:1]) == old
    pool.release(recent)
    # Two free, one kept: the least recently freed goes.
    assert pool.allocate(1) == old and pool.num_written == 3
    assert pool.lookup(names[1:]) == recent
    pool.reset_prefix_cache()
    assert pool.num_cached_free == 0 and pool.allocate(1) == recent


def test_prefix_cache_keep_tokens_is_checked() -> None:
    with pytest.raises(SoraiError, match="prefix_cache_keep_tokens must be an integer >= 0"):
        EngineConfig(prefix_cache_keep_tokens=-1)
