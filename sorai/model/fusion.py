"""Inference fusion: each block's q/k/v and gate/up projections run as one matmul each.

Three small matmuls on the same input cost three dispatches, three reads of the activations
and, for low-bit layers, three casts; one matmul over the concatenated weight does the work
once. The fused module is hidden from nn.Module's bookkeeping (no new parameter names, nothing
new in state_dict), and the original projections stay in place as views of its rows, so saving,
naming and memory are as before. A block whose projections are replaced later (e.g. wrapped
by LoRA) stops using its fused module: forward checks that the parts are still the ones fused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FUSED_ATTRIBUTE = "_fused"


@dataclass(frozen=True)
class Fused:
    module: nn.Module
    parts: tuple[nn.Module, ...]  # the projections it stands for, in order
    sizes: tuple[int, ...]  # their output widths

    def applies_to(self, parts: Sequence[nn.Module]) -> bool:
        return len(parts) == len(self.parts) and all(
            a is b for a, b in zip(parts, self.parts, strict=True)
        )

    def still_used_by(self, owner: nn.Module) -> bool:
        """Whether the parts are still the owner's own (a part since wrapped, e.g. by LoRA,
        runs by itself and the fused module not at all)."""
        children = {id(child) for child in owner.children()}
        return all(id(p) in children for p in self.parts)

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.module(x).split(self.sizes, dim=-1)


def fusions(model: nn.Module) -> Iterator[tuple[nn.Module, Fused]]:
    """(owner, its fused module) for every module of `model` that has one."""
    for owner in model.modules():
        found = owner.__dict__.get(FUSED_ATTRIBUTE)
        if found is not None:
            yield owner, found


def fused(owner: nn.Module, parts: Sequence[nn.Module]) -> Fused | None:
    """The owner's fused module for `parts`, if it has one that still applies."""
    found = owner.__dict__.get(FUSED_ATTRIBUTE)
    return found if found is not None and found.applies_to(parts) else None


def concat_linears(parts: Sequence[nn.Module]) -> nn.Module | None:
    """One module computing every part's output side by side, or None where they cannot be
    joined (mixed types, dtypes or bias, trainable weights, wrapped layers).

    Plain nn.Linear parts are rebound to views of the joined weight, so no memory is added.
    Other layer types join when their class has `concat(parts)` (low-bit layers do).
    """
    kinds = {type(p) for p in parts}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is not nn.Linear:
        concat = getattr(kind, "concat", None)
        return concat(parts) if concat is not None else None
    weights = [p.weight for p in parts]
    if any(w.requires_grad for w in weights) or len({(w.dtype, w.device) for w in weights}) != 1:
        return None
    biases = [p.bias for p in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    if weights[0].device.type == "cpu" and weights[0].dtype == torch.float32:
        # MKL's float32 GEMMs for a few rows are layout- and shape-sensitive: measured on a
        # 2-core AVX2 CPU, a joined q/k/v weight ran one row ~10% faster and 16 rows ~2x
        # slower (column-major) or level (row-major) than the three parts. Not worth it.
        return None
    joined = torch.cat([w.detach() for w in weights])
    module = nn.Linear(joined.shape[1], joined.shape[0], bias=biases[0] is not None)
    module.weight = nn.Parameter(joined, requires_grad=False)
    if biases[0] is not None:
        module.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    start = 0
    for part in parts:
        end = start + part.weight.shape[0]
        part.weight = nn.Parameter(module.weight[start:end], requires_grad=False)
        if part.bias is not None:
            part.bias = nn.Parameter(module.bias[start:end], requires_grad=False)
        start = end
    return module.eval()


def fuse(owner: nn.Module, names: Sequence[str]) -> bool:
    """Fuse owner's projections `names` (e.g. q_proj, k_proj, v_proj); False if they cannot."""
    parts = tuple(getattr(owner, name) for name in names)
    if fused(owner, parts) is not None:
        # Already fused (a second engine over the same model): joining again would make a
        # new module without the settings the first engine gave the old one (its decode path).
        return True
    module = concat_linears(parts)
    if module is None:
        return False
    sizes = tuple(int(p.out_features) for p in parts)
    object.__setattr__(owner, FUSED_ATTRIBUTE, Fused(module, parts, sizes))
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up in every block of a Transformer; returns how many were fused."""
    count = 0
    for block in model.layers.values():
        count += fuse(block.self_attn, ("q_proj", "k_proj", "v_proj"))
        count += fuse(block.mlp, ("gate_proj", "up_proj"))
    return count
