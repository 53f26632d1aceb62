"""AdamW over the trainable parameters and the learning-rate schedule (warmup, then decay)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
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
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    device = (decay or no_decay)[0].device
    kwargs = {
        "lr": config.lr,
        "betas": (config.beta1, config.beta2),
        "eps": config.eps,
        "fused": device.type in ("cpu", "cuda"),
    }
    if zero_group is not None:
        return ZeroRedundancyOptimizer(
            groups, optimizer_class=torch.optim.AdamW, process_group=zero_group, **kwargs
        )
    return torch.optim.AdamW(groups, **kwargs)


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
