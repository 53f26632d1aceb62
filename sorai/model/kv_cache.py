"""The KV-cache interface attention talks to, and the contiguous cache used by `generate`.

The serving engine brings a paged cache behind the same interface, so one model serves both.
A cache owns attention over what it stores: a contiguous cache runs one SDPA call, a paged one
gathers each sequence's blocks, and each picks the kernels that suit its layout and device.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class KVCache(Protocol):
    """What attention needs from a cache for one forward step."""

    def begin(self, positions: Tensor) -> None:
        """Called once per forward with the absolute positions ([T]) of the step's tokens."""
        ...

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store this step's keys and values ([B, n_kv_heads, T, head_dim]) for `layer` and
        return the attention of queries q ([B, n_heads, T, head_dim]) over everything each
        query may see, shaped like q."""
        ...


def causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA with grouped KV heads. mask None means causal with the last query seeing every
    key: for T == S that is SDPA's is_causal, for T == 1 no mask at all; both let SDPA pick
    its fused kernels."""
    causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
    )


class ContiguousKVCache:
    """One [B, n_kv_heads, length, head_dim] buffer per layer, grown on demand up to max_len.

    Call `begin(positions)` before each forward; `positions` are the absolute positions of the
    step's tokens, shared across the batch (single-stream generation and equal-length batches).
    Keys and values are stored in `dtype` and read back in the step's own dtype, so a narrower
    storage dtype rounds them exactly as the serving engine's paged cache does.
    """

    def __init__(
        self,
        layers: Iterable[int],
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        initial_len: int | None = None,
    ) -> None:
        # Start small and double: a model with a 128k context would otherwise zero-fill tens
        # of GB before its first token.
        capacity = min(max_len, initial_len or max_len)
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        # Keyed by layer index, so a pipeline stage holding some layers caches only those.
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.max_len = max_len
        self._start = 0
        self._end = 0
        self._valid = 0  # positions below this hold keys and values
        self._mask: Tensor | None = None

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        max_len: int,
        batch_size: int = 1,
        initial_len: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> ContiguousKVCache:
        """A cache shaped for `model` (a Transformer, whole or a tensor/pipeline shard), storing
        keys and values in `dtype` (None: the model's)."""
        blocks = model.layers
        attention = next(iter(blocks.values())).self_attn
        return cls(
            [int(i) for i in blocks],
            batch_size,
            attention.num_local_kv_heads,
            attention.head_dim,
            max_len,
            dtype=dtype or model.dtype,
            device=model.device,
            initial_len=initial_len,
        )

    def begin(self, positions: Tensor) -> None:
        """Prepare for a step whose tokens sit at `positions` (1-D, increasing, contiguous)."""
        start, end = int(positions[0]), int(positions[-1]) + 1
        if start > self._valid:
            raise ValueError(f"step starts at position {start} but the cache holds {self._valid}")
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, step needs {end}")
        self._grow(end)
        self._start, self._end, self._valid = start, end, end
        if end - start == 1 or start == 0:
            self._mask = None
        else:
            keys = torch.arange(end, device=positions.device)
            self._mask = keys[None, :] <= positions[:, None]

    def _grow(self, needed: int) -> None:
        capacity = next(iter(self.keys.values())).shape[2]
        if needed <= capacity:
            return
        capacity = min(self.max_len, max(needed, 2 * capacity))
        for buffers in (self.keys, self.values):
            for layer, old in buffers.items():
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : old.shape[2]] = old
                buffers[layer] = new

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return causal_attention(q, *self.update(layer, k, v))

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store k, v; return every key and value the step may see and the boolean mask
        (True = attend; None = plain causal, see causal_attention)."""
        self.keys[layer][:, :, self._start : self._end] = k
        self.values[layer][:, :, self._start : self._end] = v
        return (
            self.keys[layer][:, :, : self._end].to(k.dtype),
            self.values[layer][:, :, : self._end].to(v.dtype),
            self._mask,
        )

    @property
    def length(self) -> int:
        """How many positions hold valid keys and values."""
        return self._valid

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (reuse a shared prefix, or roll back)."""
        self._valid = min(self._valid, length)
