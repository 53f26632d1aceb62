"""Memory per rank: model states (weights, gradients, optimizer) under the layout's ZeRO stage,
tensor and pipeline split, plus the activations, for the pipeline rank that needs the most.

- weights: every parameter at `param_dtype`'s element size; LoRA's A and B in float32.
- gradients: trainable parameters only, in their own dtype (float32 for LoRA and for full
  fine-tuning of float32 weights, the "master" weights under bf16 autocast).
- optimizer: AdamW keeps two states (exp_avg, exp_avg_sq) per trainable parameter, each like
  the parameter (torch.optim.AdamW's zeros_like): 8 bytes per float32 parameter.
- Data parallel over dp_shard ranks (N_d; dp_replicate ranks hold copies and divide nothing),
  by zero_stage: 0 DDP, all replicated; 1 ZeroRedundancyOptimizer, optimizer states / N_d;
  2 FSDP2 without resharding after forward: weights, gradients and optimizer / N_d at rest, but
  every unit's weights are gathered whole from forward to its backward (a transient of all the
  rank's unsharded weights); 3 FSDP2 resharding after forward: the transient is the two largest
  blocks (the running one and the prefetched one) plus the root unit (embedding, final norm,
  head). Next to tp or pp, stage 0 replicates on FSDP2 over a shard dimension of 1 (DDP takes
  neither), which gathers as stage 2 does (`ParallelDims.fsdp` decides, as for the trainer).
  Frozen weights are sharded and gathered like the others. With one data-parallel rank the
  stage changes nothing. `_per_rank` is the one place that applies it. Not counted: DDP's
  gradient buckets, FSDP2's unsharded gradient of a unit before its reduce-scatter, collective
  buffers.

`zero_stages` sets this next to the ZeRO paper's accounting (Rajbhandari et al. 2020): per rank
2Ψ + 2Ψ + KΨ becomes 2Ψ + 2Ψ + KΨ/N_d, 2Ψ + (2Ψ + KΨ)/N_d, (4Ψ + KΨ)/N_d for stages 1-3, with
K = 12 for mixed-precision Adam; sorai's float32 master weights split the same 16Ψ as
4Ψ + 4Ψ + 8Ψ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from sorai.model.config import ModelConfig
from sorai.model.lora import ALL_LINEAR
from sorai.train.distributed import check_microbatches
from sorai.train.estimate import report
from sorai.train.estimate.activations import Precision, Workload
from sorai.train.estimate.layout import SINGLE_DEVICE, Layout, ceil_div
from sorai.train.estimate.parameters import (
    LORA_DTYPE,
    Method,
    RankParameters,
    count_parameters,
    lora_parameters,
    lora_target_names,
    rank_parameters,
)
from sorai.train.estimate.report import MemoryEstimate, ZeroStage, ZeroStages

Attention = Literal["fused", "math"]

ADAM_STATES = 2  # exp_avg, exp_avg_sq
ZERO_PAPER_K = 12  # the ZeRO paper's optimizer bytes per param: fp32 master, momentum, variance


@dataclass(frozen=True)
class _States:
    """Model-state bytes of one rank before ZeRO, and its FSDP units' unsharded sizes."""

    weights: int
    gradients: int
    optimizer: int
    blocks: tuple[int, ...]  # bytes of each block's parameters (one FSDP unit each)
    root: int  # bytes of the root unit: embedding, final norm, head


@dataclass(frozen=True)
class _RankStates:
    weights: int
    gradients: int
    optimizer: int
    gathered: int  # transient: unsharded weights FSDP2 gathers for compute


def _states(rank: RankParameters, param_bytes: int, grad_bytes: int) -> _States:
    adapter = LORA_DTYPE.itemsize
    return _States(
        weights=rank.base * param_bytes + rank.adapter * adapter,
        gradients=rank.trainable * grad_bytes,
        optimizer=ADAM_STATES * rank.trainable * grad_bytes,
        blocks=tuple(b * param_bytes + a * adapter for b, a in rank.blocks),
        root=rank.root * param_bytes,
    )


def _per_rank(states: _States, layout: Layout) -> _RankStates:
    """Model states one rank holds under `layout`'s ZeRO stage, over its dp_shard ranks
    (N_d; the replicas of HSDP divide nothing). Uneven splits round up: FSDP2 pads each
    parameter's shard, and ZeroRedundancyOptimizer's partition is at best even."""
    n = layout.dp_shard
    weights, gradients, optimizer = states.weights, states.gradients, states.optimizer
    gathered = 0
    if layout.zero_stage >= 1:
        optimizer = ceil_div(optimizer, n)  # ZeRO-1 (ZeroRedundancyOptimizer) and FSDP2
    if layout.zero_stage >= 2:
        weights, gradients = ceil_div(weights, n), ceil_div(gradients, n)
    if layout.fsdp:
        if layout.zero_stage == 3:
            # Resharded after forward: the running block, the prefetched one, and the root
            # unit, which FSDP2 never reshards between forward and backward.
            gathered = sum(sorted(states.blocks)[-2:]) + states.root
        else:
            # reshard_after_forward=False (stage 2, and stage 0's replication): each unit
            # stays gathered from its forward to its backward, so at the end of the forward
            # all of them are.
            gathered = states.weights
    return _RankStates(weights, gradients, optimizer, gathered)


def estimate_memory(
    config: ModelConfig,
    *,
    method: Method = "lora",
    lora_r: int = 8,
    lora_targets: str | Sequence[str] = ALL_LINEAR,
    micro_batch_size: int,
    seq_len: int,
    param_dtype: torch.dtype = torch.float32,
    autocast_bf16: bool = False,
    activation_checkpointing: bool | str = "none",
    chunked_loss: bool = True,
    loss_chunk_tokens: int = 1024,
    attention: Attention = "fused",
    document_mask: bool = False,
    layout: Layout = SINGLE_DEVICE,
) -> MemoryEstimate:
    """Per-device training memory for `config` (see the package's modules for the accounting).

    method: "lora" (only A and B train, in float32) or "full". param_dtype: the weights' dtype;
    autocast_bf16: bfloat16 autocast over them (the trainer's precision=bf16). attention:
    "fused" (flash / memory-efficient SDPA kernels, the default on CUDA and the CPU) or "math".
    activation_checkpointing: none, selective or full (sorai.train.parallelize; True and False
    mean full and none). document_mask: packed rows attend through a boolean [B, 1, T, T]
    mask. layout: the parallel
    layout; the figures are then one rank's, at the pipeline position that needs the most.
    micro_batch_size is per data-parallel rank (what train.micro_batch_size means).
    """
    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    if isinstance(activation_checkpointing, bool):
        activation_checkpointing = "full" if activation_checkpointing else "none"
    if activation_checkpointing not in ("none", "selective", "full"):
        raise ValueError(
            "activation_checkpointing must be none, selective or full, "
            f"got {activation_checkpointing!r}"
        )
    if attention not in ("fused", "math"):
        raise ValueError(f"attention must be 'fused' or 'math', got {attention!r}")
    if not param_dtype.is_floating_point:
        raise ValueError(f"param_dtype must be a floating-point dtype, got {param_dtype}")
    for name, value in (
        ("micro_batch_size", micro_batch_size),
        ("seq_len", seq_len),
        ("loss_chunk_tokens", loss_chunk_tokens),
        ("lora_r", lora_r),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    ranks = rank_parameters(config, layout, method=method, lora_r=lora_r, lora_targets=lora_targets)
    check_microbatches(micro_batch_size, layout.pipeline_microbatches)
    layout.check()  # a ZeRO stage the trainer refuses next to tp or pp

    param_bytes = param_dtype.itemsize
    autocast = autocast_bf16 and param_bytes > 2
    full = method == "full"
    # Model states, of the whole model for the notes.
    if full:
        adapted, total_params = [], count_parameters(config)
        trainable, grad_bytes = total_params, param_bytes
    else:
        adapted = lora_target_names(config, lora_targets)
        trainable, grad_bytes = lora_parameters(config, lora_r, lora_targets), LORA_DTYPE.itemsize
        total_params = count_parameters(config) + trainable
    work = Workload(
        config=config,
        layout=layout,
        method=method,
        adapted=frozenset(adapted),
        lora_r=lora_r,
        rows=micro_batch_size // layout.pipeline_microbatches,
        seq_len=seq_len,
        precision=Precision(
            stream=param_bytes, compute=2 if autocast else param_bytes, autocast=autocast
        ),
        activation_checkpointing=activation_checkpointing,
        chunked_loss=chunked_loss,
        loss_chunk_tokens=loss_chunk_tokens,
        attention=attention,
        document_mask=document_mask,
    )

    per_rank: list[tuple[_RankStates, dict[str, int], int]] = []
    for rank in ranks:
        states = _per_rank(_states(rank, param_bytes, grad_bytes), layout)
        parts, in_flight = work.rank(rank)
        per_rank.append((states, parts, in_flight))
    totals = [
        s.weights + s.gradients + s.optimizer + s.gathered + sum(parts.values())
        for s, parts, _ in per_rank
    ]
    worst = max(range(len(totals)), key=lambda r: (totals[r], -r))
    states, parts, in_flight = per_rank[worst]
    rank = ranks[worst]

    dtype_name = str(param_dtype).removeprefix("torch.")
    notes = report.state_notes(
        total_params, trainable, dtype_name, lora_r, len(adapted), grad_bytes, full
    )
    notes += report.activation_notes(work, micro_batch_size, dtype_name)
    details: dict[str, str] = {}
    if not layout.single_device:
        notes += report.layout_notes(layout, work.rows, in_flight, rank)
        details = report.layout_details(layout, rank, states.gathered, work, in_flight)
    notes.append(report.not_counted(layout))
    return MemoryEstimate(
        weights=states.weights,
        gradients=states.gradients,
        optimizer=states.optimizer,
        activations=sum(parts.values()),
        trainable_params=trainable,
        total_params=total_params,
        notes=notes,
        activation_parts=parts,
        layout=layout,
        gathered=states.gathered,
        pp_rank=worst,
        rank_totals=tuple(totals) if layout.pp > 1 else (),
        rank_contents=tuple(r.describe() for r in ranks) if layout.pp > 1 else (),
        details=details,
    )


def zero_stages(
    config: ModelConfig,
    layout: Layout | int,
    *,
    method: Method = "full",
    lora_r: int = 8,
    lora_targets: str | Sequence[str] = ALL_LINEAR,
    param_dtype: torch.dtype = torch.float32,
) -> ZeroStages:
    """Model states per rank at ZeRO stages 0-3 over `layout`'s dp_shard ranks (an int: that
    many data-parallel ranks, nothing else), by the ZeRO paper's mixed-precision accounting
    and by sorai's own. Under tp/pp, Ψ is the largest pipeline rank's tensor-parallel slice."""
    if isinstance(layout, int):
        layout = Layout(dp_shard=layout)
    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    ranks = rank_parameters(config, layout, method=method, lora_r=lora_r, lora_targets=lora_targets)
    rank = max(ranks, key=lambda r: (r.params, -r.pp_rank))
    grad_bytes = LORA_DTYPE.itemsize if method == "lora" else param_dtype.itemsize
    states = _states(rank, param_dtype.itemsize, grad_bytes)
    n, psi, psi_t = layout.dp_shard, rank.params, rank.trainable
    paper = [
        2 * psi + 2 * psi_t + ZERO_PAPER_K * psi_t,
        2 * psi + 2 * psi_t + ceil_div(ZERO_PAPER_K * psi_t, n),
        2 * psi + ceil_div((2 + ZERO_PAPER_K) * psi_t, n),
        ceil_div(2 * psi + (2 + ZERO_PAPER_K) * psi_t, n),
    ]
    stages = []
    for stage in range(4):
        # Stage by stage as the trainer would run it, refused stages included for comparison.
        held = _per_rank(states, replace(layout, zero_stage=stage))
        stages.append(
            ZeroStage(
                stage=stage,
                paper=paper[stage],
                sorai=held.weights + held.gradients + held.optimizer,
                gathered=held.gathered,
            )
        )
    model_parallel = " x ".join(
        f"{name} {size}" for name, size in (("tp", layout.tp), ("pp", layout.pp)) if size > 1
    )
    return ZeroStages(
        dp_shard=n,
        params=psi,
        trainable=psi_t,
        stages=tuple(stages),
        model_parallel=model_parallel,
    )
