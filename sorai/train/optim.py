"""AdamW over the trainable parameters and the learning-rate schedule (warmup, then decay)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from sorai.train.config import OptimConfig, ScheduleConfig


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    config: OptimConfig,
    zero_group: dist.ProcessGroup | None = None,
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only: norms and biases are not decayed, as usual
    for transformers. Fused where torch has a fused kernel for the device.

    zero_group: ZeRO stage 1, the optimizer states sharded over this group's ranks by
    torch's ZeroRedundancyOptimizer (each rank updates the parameters it owns, then broadcasts
    them).
    """
    # Groups by decay, and by DTensor or not: a fused step takes one kind of tensor at a time
    # (tensor parallelism leaves some weights whole, e.g. a head that is not vocab-sharded).
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for _, param in named_params:
        if param.requires_grad:
            key = (param.dim() >= 2, isinstance(param, DTensor))
            groups.setdefault(key, []).append(param)
    param_groups = [
        {"params": params, "weight_decay": config.weight_decay if decay else 0.0}
        for (decay, _), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]
    device = param_groups[0]["params"][0].device
    kwargs = {
        "lr": config.lr,
        "betas": (config.beta1, config.beta2),
        "eps": config.eps,
        "fused": device.type in ("cpu", "cuda"),
    }
    if zero_group is not None:
        return ZeroRedundancyOptimizer(
            param_groups, optimizer_class=torch.optim.AdamW, process_group=zero_group, **kwargs
        )
    return torch.optim.AdamW(param_groups, **kwargs)


def lr_factor(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """The multiple of the peak lr for optimizer step `step` (0-based) of `total_steps`."""
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if config.kind == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, config: ScheduleConfig
) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
