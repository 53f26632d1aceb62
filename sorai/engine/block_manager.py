"""KV blocks: allocation with reference counts, and automatic prefix caching.

A full block is named by a hash chain over its tokens (and anything else that changes its keys
and values, such as an adapter id), so two sequences that start alike share blocks. A block
whose last user leaves goes to the back of an LRU free queue but keeps its contents and its
name: a later request with the same prefix takes it back instead of recomputing it. Allocation
takes the least recently freed block and forgets its name.

Blocks never written are taken only when no written block may be reused: on the CPU the cache's
pages are committed as blocks are first written (sorai/engine/paged_cache.py), so the memory a
server holds follows the most blocks its traffic has had in use at once plus the prefix cache's
keep, not the whole cache. A freed block with no name (a sequence's partial last block) is
reused first; a named one once more than `keep_cached` named blocks are free (the least recently
freed first), so the most recent prefixes stay findable while old ones make room.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def block_hashes(
    tokens: Sequence[int], block_size: int, extra: bytes = b"", start: list[bytes] | None = None
) -> list[bytes]:
    """Hash chain of every full block of `tokens`; `start` holds hashes already computed."""
    hashes = list(start or [])
    full = len(tokens) // block_size
    parent = hashes[-1] if hashes else extra
    for i in range(len(hashes), full):
        chunk = np.asarray(tokens[i * block_size : (i + 1) * block_size], dtype=np.int64)
        parent = hashlib.blake2b(parent + chunk.tobytes(), digest_size=16).digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    """`num_blocks` KV blocks; block 0 upwards are the rows of the paged cache."""

    def __init__(
        self, num_blocks: int, enable_prefix_caching: bool = True, keep_cached: int = 0
    ) -> None:
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.keep_cached = keep_cached
        self.num_cached_free = 0  # free blocks that still hold a name
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Unused blocks once written, next to reuse first (nameless, then least recently
        # freed); cached ones may still be claimed back.
        self.free: OrderedDict[int, None] = OrderedDict()
        # Blocks never written, lowest last (popped first).
        self.fresh = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.fresh)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_written(self) -> int:
        """Blocks ever handed out: those whose memory the cache has committed."""
        return self.num_blocks - len(self.fresh)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The longest run of leading blocks already cached (not yet claimed)."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def claim(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks found by lookup()."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
                self.num_cached_free -= 1
            self.ref_counts[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, or None (and nothing taken) when fewer than n are free."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if not self._reuse():
                block = self.fresh.pop()
                self.ref_counts[block] = 1
                out.append(block)
                continue
            block, _ = self.free.popitem(last=False)
            name = self.block_hash[block]
            if name is not None:
                # Evicted: its contents are about to be overwritten.
                self.num_cached_free -= 1
                if self.cached.get(name) == block:
                    del self.cached[name]
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def _reuse(self) -> bool:
        """Whether the next block comes from `free` rather than from the never-written ones."""
        if not self.free:
            return False
        if not self.fresh:
            return True
        first = next(iter(self.free))
        return self.block_hash[first] is None or self.num_cached_free > self.keep_cached

    def release(self, blocks: Sequence[int]) -> None:
        """Drop a reference on each block; tail blocks first, so they are evicted first."""
        for b in reversed(blocks):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
                if self.block_hash[b] is None:
                    # Holds nothing a later request could find: the first to reuse.
                    self.free.move_to_end(b, last=False)
                else:
                    self.num_cached_free += 1

    def register(self, block: int, name: bytes) -> None:
        """Name a block whose tokens are now all written (or about to be, in this step)."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None:
            return
        # A block with the same contents may exist already (two requests computed the same
        # prefix at once); keep the first and leave this one anonymous.
        if name not in self.cached:
            self.cached[name] = block
            self.block_hash[block] = name

    def reset_prefix_cache(self) -> None:
        for name, block in list(self.cached.items()):
            if self.ref_counts[block] == 0:
                del self.cached[name]
                self.block_hash[block] = None
                self.num_cached_free -= 1
                self.free.move_to_end(block, last=False)
