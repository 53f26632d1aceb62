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
from dataclasses import dataclass
from typing import get_args

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from sorai.model.hardware import cpu_has_fast_bf16, machine
from sorai.model.lora import LoRALinear
from sorai.model.transformer import Transformer
from sorai.train.config import CheckpointMode, ConfigError, ParallelConfig, TrainSection
from sorai.train.distributed import ParallelDims
from sorai.train.tensor_parallel import apply_tensor_parallel

CHECKPOINT_MODES = get_args(CheckpointMode)


_aten = torch.ops.aten
# The ops whose outputs selective checkpointing keeps: the matmuls and the fused attention
# kernels, where a block's compute is. What lies between them (norms, RoPE, SiLU and the gating
# product, casts, residual adds) is recomputed from these in backward, for a few percent of the
# step: the pointwise ops are most of a block's saved bytes and little of its FLOPs.
KEPT_OPS = frozenset(
    op
    for name in (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if (op := getattr(getattr(_aten, name, None), "default", None)) is not None
)


class KeepMatmuls:
    """The selective checkpointing policy (see KEPT_OPS) for one checkpointed call of a block;
    `create_selective_checkpoint_contexts` asks it op by op during the forward pass.

    A matmul whose inner dimension is a LoRA rank (B applied to A's r-wide output) is redone
    instead of kept: it costs r / hidden of the base matmul, and its output is as large as the
    layer's. An in-place op on a kept matmul output is kept too: LoRA adds its update into the
    base layer's output in place, and replaying that add on the kept, already updated output
    would count the update twice. Any other in-place op is replayed on its recomputed input.
    """

    def __init__(self, lora_ranks: frozenset[int]) -> None:
        self.lora_ranks = lora_ranks
        self.kept: set[int] = set()  # storages of the matmul outputs kept so far in this call

    def __call__(
        self, ctx: SelectiveCheckpointContext, func: torch._ops.OpOverload, *args, **kwargs
    ) -> CheckpointPolicy:
        if func in KEPT_OPS:
            if func is _aten.mm.default and args[0].shape[-1] in self.lora_ranks:
                return CheckpointPolicy.PREFER_RECOMPUTE
            if isinstance(ctx.op_output, Tensor):
                self.kept.add(ctx.op_output.untyped_storage().data_ptr())
            return CheckpointPolicy.MUST_SAVE
        if (
            func._schema.is_mutable
            and args
            and isinstance(args[0], Tensor)
            and args[0].untyped_storage().data_ptr() in self.kept
        ):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts(lora_ranks: frozenset[int]) -> tuple:
    """The forward and recompute contexts of one selectively checkpointed call: a fresh policy
    each time, so a storage address seen in an earlier step cannot match."""
    # Kept outputs are mutated on purpose: the in-place LoRA add (see KeepMatmuls).
    return create_selective_checkpoint_contexts(
        KeepMatmuls(lora_ranks), allow_cache_entry_mutation=True
    )


def checkpoint_blocks(model: Transformer, mode: str = "full") -> None:
    """Recompute parts of each block in backward instead of keeping them from forward.

    full: keep only each block's input and recompute the whole block then; activation memory
    drops from every intermediate of every layer to one tensor per layer, for about a third
    more compute. selective: keep the matmul and attention outputs and recompute the rest
    (KEPT_OPS); about a third less activation memory for a few percent more compute. The
    block's forward is wrapped in place (no wrapper module), so parameter names do not change.
    """
    if mode not in CHECKPOINT_MODES:
        modes = ", ".join(CHECKPOINT_MODES)
        raise ConfigError(f"train.activation_checkpointing must be one of {modes}, got {mode!r}")
    if mode == "none":
        return
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        ranks = frozenset(m.r for m in model.modules() if isinstance(m, LoRALinear))
        kwargs["context_fn"] = functools.partial(selective_contexts, ranks)
    for block in model.layers.values():
        block.forward = functools.partial(checkpoint, block.forward, **kwargs)


@torch.no_grad()
def lower_frozen_weights(model: Transformer, dtype: torch.dtype) -> int:
    """Store the blocks' frozen Linear weights in `dtype` (row-major), once; returns how many.

    Under autocast every matmul casts its float32 weight to the autocast dtype, on every
    forward, and keeps the cast for backward; a frozen weight has no master copy to protect, so
    casting it once gives the very same products without the per-step casts, their copies kept
    for backward, or the float32 originals (half the base weights' memory under LoRA). The
    embedding, norms and head keep their dtype: the embedding's output and the norms stay
    float32, as autocast leaves them."""
    lowered = 0
    for module in model.layers.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and not weight.requires_grad and weight.dtype != dtype:
            module.weight.data = weight.data.to(dtype, memory_format=torch.contiguous_format)
            lowered += 1
    return lowered


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
    checkpoint_blocks(model, config.activation_checkpointing)
    if config.compile:
        compile_blocks(model)
    if dims is None or dims.dp == 1:
        return model
    assert mesh is not None
    if dims.fsdp:
        shard_model(model, dims, mesh)
        return model
    return replicate_model(model, dims, mesh)


@dataclass(frozen=True)
class Precision:
    """What `train.precision` resolved to on this device, and why (for the banner)."""

    autocast: torch.dtype | None  # None: plain float32
    reason: str

    def describe(self) -> str:
        kind = "bf16 autocast over float32 master weights" if self.autocast else "float32"
        return f"{kind} ({self.reason})"


def choose_precision(precision: str, device: torch.device) -> Precision:
    """Resolve `train.precision` (auto, fp32, bf16) for `device`.

    auto takes bf16 only where bf16 matmuls are fast: a GPU that supports bf16, or a CPU with
    AVX-512 BF16 or AMX (read at run time). Elsewhere, e.g. an AVX2-only CPU, bf16 matmuls run
    far slower than float32 (each element is converted in software), so auto stays float32.
    """
    if precision == "fp32":
        return Precision(None, "train.precision: fp32")
    if precision == "bf16":
        return Precision(torch.bfloat16, "train.precision: bf16")
    if precision != "auto":
        raise ConfigError(f"train.precision must be one of auto, fp32, bf16, got {precision!r}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, f"auto: {name} has bf16")
        return Precision(None, f"auto: {name} has no bf16")
    if device.type == "cpu":
        if cpu_has_fast_bf16():
            flags = [f for f in machine().flags if "bf16" in f or f.startswith("amx")]
            has = " ".join(flags) or "bf16 dot products"
            return Precision(torch.bfloat16, f"auto: the CPU has {has}")
        return Precision(
            None,
            "auto: the CPU has neither avx512_bf16 nor amx_bf16, so bf16 matmuls would be "
            "slower than float32",
        )
    return Precision(None, f"auto: float32 on {device.type}")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, None for plain float32."""
    return choose_precision(precision, device).autocast
