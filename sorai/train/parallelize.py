"""Everything the trainer does to a model from outside, in one place and in a fixed order.

The model code knows nothing of training. `parallelize` applies, in order: tensor parallelism,
activation checkpointing, torch.compile, then data parallelism. Each step keeps parameter names
(`layers.0.self_attn.q_proj.weight`) so checkpoints and exports see the same model whatever was
applied.

Data parallelism by ZeRO stage (over the dp_shard ranks; dp_replicate ranks hold copies):

    0  DDP: weights, gradients and optimizer states replicated; gradients all-reduced.
    1  DDP + torch's ZeroRedundancyOptimizer: gradients all-reduced, each rank keeps the
       optimizer states of the parameters it owns, updates them and broadcasts them.
    2  FSDP2 fully_shard(reshard_after_forward=False): weights, gradients and optimizer
       states sharded; the weights are all-gathered once per step and kept until backward,
       gradients reduce-scattered.
    3  FSDP2 fully_shard(reshard_after_forward=True): as 2, but each block's weights are freed
       after its forward and all-gathered again in backward (one more all-gather per step).

With tensor parallelism the states are DTensors on the 2-D (dp_shard, tp) mesh, which FSDP2
shards further. DDP takes neither DTensors nor a pipeline's several backward passes per step,
so next to tp or pp stage 0 runs on FSDP2 over a shard dimension of 1 (replication, gradients
all-reduced: DDP's semantics) and stage 1 is refused (stage 2 shards the optimizer states too).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from sorai.model.transformer import Transformer
from sorai.train.config import ParallelConfig, TrainSection
from sorai.train.distributed import ParallelDims
from sorai.train.tensor_parallel import apply_tensor_parallel


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


@torch.no_grad()
def make_contiguous(model: nn.Module) -> None:
    """Row-major weights: the loader may keep Linear weights column-major (faster CPU
    matmuls in inference), which FSDP and DTensor sharding on dim 0 do not take."""
    for param in model.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()


def data_parallel_mesh(dims: ParallelDims, mesh: DeviceMesh) -> DeviceMesh:
    """FSDP's mesh: dp_shard, or (dp_replicate, dp_shard) for HSDP."""
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def shard_model(model: Transformer, dims: ParallelDims, mesh: DeviceMesh) -> None:
    """ZeRO-2/3 with FSDP2: each block one unit (one all-gather, one reduce-scatter), the
    embedding, final norm and head the root unit."""
    dp_mesh = data_parallel_mesh(dims, mesh)
    per_block = dims.zero_stage == 3
    if dims.zero_stage == 0:
        # Replication only: a 2-D (dp_replicate, dp_shard = 1) mesh, gradients all-reduced.
        dp_mesh = mesh["dp_replicate", "dp_shard"]
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=per_block)
    # The root's weights are needed again as soon as backward starts: never resharded.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)


def replicate_model(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh) -> nn.Module:
    """ZeRO-0/1 with data parallelism alone: DDP over all data-parallel ranks; returns the
    module to call."""
    device_ids = [model.device] if model.device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, process_group=mesh["dp"].get_group()
    )


def parallelize(
    model: Transformer,
    config: TrainSection,
    dims: ParallelDims | None = None,
    mesh: DeviceMesh | None = None,
    parallel: ParallelConfig | None = None,
) -> nn.Module:
    """Apply the layout to `model` in place; returns the module to call for forward (a DDP
    wrapper under ZeRO-0/1, else the model itself)."""
    if dims is not None and dims.world_size > 1:
        make_contiguous(model)
    if dims is not None and dims.tp > 1:
        assert mesh is not None and parallel is not None
        apply_tensor_parallel(model, mesh["tp"], parallel.sequence_parallel, parallel.loss_parallel)
    if config.activation_checkpointing:
        checkpoint_blocks(model)
    if config.compile:
        compile_blocks(model)
    if dims is None or dims.dp == 1:
        return model
    assert mesh is not None
    if dims.fsdp:
        shard_model(model, dims, mesh)
        return model
    return replicate_model(model, dims, mesh)


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
