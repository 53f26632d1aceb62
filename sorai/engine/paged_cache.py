"""The paged KV cache: fixed-size blocks in one slot array per layer, and attention over it.

Every sequence in a step is flattened into one row of tokens, decodes first, then prefill
chunks. Each layer writes the step's keys and values into their slots first and attends
second, so a sequence may read blocks another sequence writes in the same step (that is how
prefix-cache hits on blocks still being computed stay correct).

Attention runs in groups: all one-token queries together, then each multi-token chunk on its
own. The one-token queries read their slots in place through a C kernel where one is built
(sorai/engine/decode_attention.py), else they are gathered through the block tables, padded to
the longest context and masked for SDPA; the path is chosen once per cache, never per step.

Keys and values may be stored in a narrower dtype than the model computes in (float16 for a
float32 model halves the cache): they are rounded once as they are written, and every attention,
a prefill chunk's over its own fresh keys included, reads them as stored, cast back to the
model's dtype once per layer on the gathered rows (by the decode kernel, as it loads them). A
token's numbers then never depend on whether its prefix came from the prefix cache or was
computed in the same step.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch
from torch import Tensor

from sorai.engine import decode_attention
from sorai.model.kv_cache import causal_attention


@dataclass
class Chunk:
    """A prefill chunk: queries [start, start+length) of the flat row, at positions
    [context, context+length) of its sequence."""

    start: int
    length: int
    context: int  # tokens of this sequence already in the cache before the chunk
    slots: Tensor | None  # [context + length] slots to read (None: no cached prefix)


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero tensor whose memory, on the CPU, is committed only as it is first written.

    An anonymous mapping reads as zeros without the process owning the pages, so a server
    with a 1 GiB cache starts at the size of its model and grows with the blocks it uses
    (torch.zeros would touch, and so commit, every page at start). Masked slots are zero,
    never stale garbage that could turn a masked-out product into NaN.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = 1
    for size in shape:
        count *= size
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


@dataclass
class StepLayout:
    slot_mapping: Tensor  # [N] where each new token's keys and values go
    num_decodes: int  # the first num_decodes tokens are one-token queries
    decode_slots: Tensor | None  # [D, L] slots each decode reads (padded)
    decode_mask: Tensor | None  # [D, 1, 1, L] True where a slot is real
    chunks: list[Chunk]
    # [D] slots each decode reads; None: counted from decode_mask on the step's first layer.
    decode_lengths: Tensor | None = None


class PagedKVCache:
    """num_blocks * block_size slots of [n_kv_heads, head_dim] keys and values per layer,
    stored in `dtype` (attention computes in the queries' dtype)."""

    def __init__(
        self,
        layers: list[int],
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        storage = zeroed((2, len(layers), *shape), dtype, torch.device(device))
        self.keys = {layer: storage[0, i] for i, layer in enumerate(layers)}
        self.values = {layer: storage[1, i] for i, layer in enumerate(layers)}
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        self.nbytes, self.dtype = storage.nbytes, dtype
        self.layout: StepLayout | None = None
        cpu = torch.device(device).type == "cpu"
        self.decode_kernel = decode_attention.kernel() if cpu else None

    def describe(self) -> str:
        """Its size for a banner: tokens, blocks, MiB and dtype."""
        tokens, dtype = self.num_blocks * self.block_size, str(self.dtype).removeprefix("torch.")
        lazily = torch.device(self.device).type == "cpu"
        return (
            f"{tokens} tokens ({self.num_blocks} blocks of {self.block_size}), "
            f"{self.nbytes / 2**20:.0f} MiB {dtype}"
            + (", committed as blocks are first written" if lazily else "")
            + f"; decode attention: {'C kernel' if self.decode_kernel else 'SDPA'}"
        )

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    def slots(self, blocks: list[int], start: int, end: int) -> list[int]:
        """Slot ids of positions [start, end) of a sequence holding `blocks`."""
        bs = self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def begin(self, positions: Tensor) -> None:
        if self.layout is None:
            raise RuntimeError("PagedKVCache.prepare() must be called before each forward")

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        layout = self.layout
        assert layout is not None
        key_cache, value_cache = self.keys[layer], self.values[layer]
        if k.dtype != self.dtype:
            # Rounded as stored, and fresh keys are attended to as stored too (docstring).
            k, v = k.to(self.dtype), v.to(self.dtype)
        # [1, heads, N, d] -> [N, heads, d], the slot layout.
        new_k, new_v = k[0].transpose(0, 1), v[0].transpose(0, 1)
        key_cache.index_copy_(0, layout.slot_mapping, new_k)
        value_cache.index_copy_(0, layout.slot_mapping, new_v)

        pieces = []
        d = layout.num_decodes
        if d:
            pieces.append(self._decode(q[0, :, :d], key_cache, value_cache, layout))
        for chunk in layout.chunks:
            s, e = chunk.start, chunk.start + chunk.length
            if chunk.slots is None:
                keys, values = k[:, :, s:e].to(q.dtype), v[:, :, s:e].to(q.dtype)
                out = causal_attention(q[:, :, s:e], keys, values)
            else:
                keys = key_cache.index_select(0, chunk.slots).to(q.dtype).transpose(0, 1)[None]
                values = value_cache.index_select(0, chunk.slots).to(q.dtype)
                values = values.transpose(0, 1)[None]
                query_pos = torch.arange(chunk.context, chunk.context + chunk.length)
                key_pos = torch.arange(chunk.context + chunk.length)
                mask = (key_pos[None, :] <= query_pos[:, None]).to(q.device)
                out = causal_attention(q[:, :, s:e], keys, values, mask)
            pieces.append(out[0])
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return out[None]

    def _decode(
        self, q: Tensor, key_cache: Tensor, value_cache: Tensor, layout: StepLayout
    ) -> Tensor:
        """q [H, D, d] -> out [H, D, d]: each of D sequences' one query over its own blocks."""
        slots = layout.decode_slots
        assert slots is not None
        kernel = self.decode_kernel
        if kernel is not None and kernel.supports(q, key_cache):
            if layout.decode_lengths is None:
                mask = layout.decode_mask
                layout.decode_lengths = (
                    mask.view(slots.shape).sum(-1)
                    if mask is not None
                    else torch.full(slots.shape[:1], slots.shape[1])
                )
            return kernel(q, key_cache, value_cache, slots, layout.decode_lengths)
        heads, num, dim = q.shape
        # index_select on the flat slot list is a plain row gather, cheaper than indexing.
        # One cast per layer on the gathered rows (a no-op when stored in q's dtype).
        keys = key_cache.index_select(0, slots.view(-1)).to(q.dtype)
        keys = keys.view(*slots.shape, *key_cache.shape[1:])
        values = value_cache.index_select(0, slots.view(-1)).to(q.dtype).view(keys.shape)
        kv = keys.shape[2]
        # The heads sharing a KV head become that head's queries: SDPA then needs no
        # repeated keys (GQA for free) and a one-token query has no causal structure.
        q = q.permute(1, 0, 2).reshape(num, kv, heads // kv, dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=layout.decode_mask
        )
        return out.reshape(num, heads, dim).permute(1, 0, 2)
