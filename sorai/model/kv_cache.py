"""The KV-cache interface attention talks to, and the contiguous cache used by `generate`.

The serving engine brings a paged cache behind the same interface, so one model serves both.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class KVCache(Protocol):
    """What attention needs from a cache for one forward step."""

    def begin(self, positions: Tensor) -> None:
        """Called once per forward with the absolute positions ([T]) of the step's tokens."""
        ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store this step's keys and values ([B, n_kv_heads, T, head_dim]) for `layer`.

        Returns every key and value the step's queries may attend to, and a boolean attention
        mask ([T, S] or broadcastable, True = attend); None means every query sees every key.
        """
        ...


class ContiguousKVCache:
    """One preallocated [B, n_kv_heads, max_len, head_dim] buffer per layer.

    Call `begin(positions)` before each forward; `positions` are the absolute positions of the
    step's tokens, shared across the batch (single-stream generation and equal-length batches).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self._positions = torch.zeros(0, dtype=torch.long, device=device)
        self._start = 0
        self._end = 0
        self._mask: Tensor | None = None

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, max_len: int, batch_size: int = 1
    ) -> ContiguousKVCache:
        """A cache shaped for `model` (a Transformer), in its dtype and on its device."""
        config = model.config
        return cls(
            config.num_hidden_layers,
            batch_size,
            config.num_key_value_heads,
            config.head_dim,
            max_len,
            dtype=model.dtype,
            device=model.device,
        )

    def begin(self, positions: Tensor) -> None:
        """Prepare for a step whose tokens sit at `positions` (1-D, increasing, contiguous)."""
        start, end = int(positions[0]), int(positions[-1]) + 1
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, step needs {end}")
        self._positions, self._start, self._end = positions, start, end
        if end - start == 1:
            self._mask = None  # one query at the newest position sees the whole prefix
        else:
            keys = torch.arange(end, device=positions.device)
            self._mask = keys[None, :] <= positions[:, None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        self.keys[layer][:, :, self._start : self._end] = k
        self.values[layer][:, :, self._start : self._end] = v
        return (
            self.keys[layer][:, :, : self._end],
            self.values[layer][:, :, : self._end],
            self._mask,
        )

    @property
    def length(self) -> int:
        """How many positions hold valid keys and values."""
        return self._end

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (reuse a shared prefix, or roll back)."""
        self._end = min(self._end, length)
