"""Everything the trainer does to a model from outside, in one place and in a fixed order.

The model code knows nothing of training. `parallelize` applies, in order: tensor parallelism
(the parallel issue), activation checkpointing, torch.compile, then data-parallel sharding (the
parallel issue). Each step keeps parameter names (`layers.0.self_attn.q_proj.weight`) so
checkpoints and exports see the same model whatever was applied.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from sorai.model.transformer import Transformer
from sorai.train.config import TrainSection


def checkpoint_blocks(model: Transformer) -> None:
    """Keep only each block's input for backward and recompute the block then: activation
    memory drops from every intermediate of every layer to one tensor per layer, for about a
    third more compute. The block's forward is wrapped in place (no wrapper module), so
    parameter names do not change."""
    for block in model.layers.values():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: Transformer) -> None:
    """torch.compile each block (all blocks share one compiled graph)."""
    for block in model.layers.values():
        block.compile()


def parallelize(model: Transformer, config: TrainSection) -> Transformer:
    if config.activation_checkpointing:
        checkpoint_blocks(model)
    if config.compile:
        compile_blocks(model)
    return model


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, None for plain float32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 only where it is fast; CPUs without AMX run bf16 matmuls far slower than fp32.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
