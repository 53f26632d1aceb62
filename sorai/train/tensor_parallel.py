"""Tensor parallelism: Megatron-style column/row plans for sorai's Transformer, on DTensor.

Per block (plans keyed by module name, as `parallelize_module` takes them):

    q_proj, k_proj, v_proj, gate_proj, up_proj   column-parallel: output features split, so
                                                 each rank computes its own attention heads
                                                 and its slice of the MLP's intermediate
    o_proj, down_proj                            row-parallel: input features split, partial
                                                 outputs summed (all-reduce, or reduce-scatter
                                                 onto the sequence under sequence parallel)

One all-reduce per attention and per MLP in forward, one each in backward. Attention itself
needs nothing: the model reads head counts from the (local) projections' widths.

Sequence parallel (optional): the residual stream and the norms are split along the sequence
instead of replicated, so their activations divide by tp too; the all-reduces become a
reduce-scatter plus an all-gather of the same total volume.

Loss parallel (optional): the head is column-parallel on the vocabulary and the cross-entropy
runs on the sharded logits (torch's loss_parallel: all-reduced max and sum-exp), so no rank
holds full-vocabulary logits. The embedding is row-parallel on the vocabulary.

LoRA (`LoRALinear`: base_layer, lora_A, lora_B): for a column-parallel base, A is replicated and
B column-parallel (its rows follow the base's output split); for a row-parallel base, A is
row-parallel (its columns follow the base's input split, its r-wide output summed) and B
replicated. A·B then equals the base's own split, and an adapter trained under TP gathers to
the single-device adapter.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from sorai.model.lora import LoRALinear
from sorai.model.transformer import Transformer
from sorai.train.config import ConfigError

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def check_divisible(model: Transformer, tp: int) -> None:
    """Heads, kv heads, and the MLP width must split evenly; one clear error otherwise."""
    config = model.config
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
    }
    for name, size in sizes.items():
        if size % tp:
            raise ConfigError(
                f"parallel.tp {tp}: the model's {name} ({size}) is not divisible by it"
                + ("; GQA needs whole kv heads on every rank" if "key_value" in name else "")
            )


def _linear_plans(name: str, module: nn.Module, style: str, sp: bool) -> dict[str, ParallelStyle]:
    """Plans for one Linear (or LoRALinear) of a block; `style` is "column" or "row"."""
    row_output = Shard(1) if sp else Replicate()
    if not isinstance(module, LoRALinear):
        if style == "column":
            return {name: ColwiseParallel()}
        return {name: RowwiseParallel(output_layouts=row_output)}
    if style == "column":
        # A sees the whole (replicated) input and is replicated; B's rows follow the base's.
        return {
            f"{name}.base_layer": ColwiseParallel(),
            f"{name}.lora_B": ColwiseParallel(),
        }
    # The base's input is split on features: A takes the same split and its partial r-wide
    # outputs are summed (and, under SP, scattered on the sequence like the base's output).
    plans: dict[str, ParallelStyle] = {
        f"{name}.base_layer": RowwiseParallel(output_layouts=row_output),
        f"{name}.lora_A": RowwiseParallel(output_layouts=row_output),
    }
    if sp:
        # B then sees only this rank's part of the sequence: a replicated DTensor, so that its
        # gradient is summed over the ranks.
        plans[f"{name}.lora_B"] = SequenceParallel(use_local_output=True)
    return plans


def block_plan(block: nn.Module, sp: bool) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {}
    if sp:
        plan["input_layernorm"] = SequenceParallel()
        plan["post_attention_layernorm"] = SequenceParallel()
        # Attention and the MLP need the whole sequence: all-gather their input.
        # Local tensors out: a LoRA layer's replicated A works on plain tensors.
        plan["self_attn"] = PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        )
        plan["mlp"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    for parent, names in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    ):
        for short in names:
            module = block.get_submodule(f"{parent}.{short}")
            style = "column" if short in COLUMN else "row"
            plan.update(_linear_plans(f"{parent}.{short}", module, style, sp))
    return plan


def apply_tensor_parallel(
    model: Transformer, mesh: DeviceMesh, sequence_parallel: bool, loss_parallel: bool
) -> None:
    """Shard `model` over the 1-D tensor-parallel `mesh` in place (names unchanged)."""
    tp = mesh.size()
    check_divisible(model, tp)
    sp = sequence_parallel
    tied = model.config.tie_word_embeddings and model.embed_tokens is not None
    tied = tied and model.lm_head is not None
    root: dict[str, ParallelStyle] = {}
    # A tied embedding must be sharded like the head (both on the vocabulary) or not at all.
    shard_vocab = loss_parallel or not tied
    if model.embed_tokens is not None:
        if shard_vocab:
            root["embed_tokens"] = RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate()
            )
        elif sp:
            # A replicated embedding's output is split onto the sequence for the blocks.
            root["embed_tokens"] = PrepareModuleOutputShard()
    if model.norm is not None and sp:
        root["norm"] = SequenceParallel()
    if model.lm_head is not None and loss_parallel:
        root["lm_head"] = ColwiseParallel(
            input_layouts=Shard(1) if sp else Replicate(),
            output_layouts=Shard(-1),
            use_local_output=False,
        )
    elif model.lm_head is not None and sp:
        # A whole head takes the whole sequence.
        root["lm_head"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for block in model.layers.values():
        parallelize_module(block, mesh, block_plan(block, sp))
    parallelize_module(model, mesh, root)
    if tied and shard_vocab:
        model.lm_head.weight = model.embed_tokens.weight
    # The styles make new Parameters, trainable by default: frozen weights (LoRA's base,
    # norms included) stay frozen.
    for name, param in model.named_parameters():
        param.requires_grad_(trainable[name])


class PrepareModuleOutputShard(ParallelStyle):
    """Turns a replicated module output into this rank's sequence shard (no communication)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from torch.distributed.tensor import DTensor

        def hook(_module: nn.Module, _inputs: object, output):
            full = DTensor.from_local(output, device_mesh, (Replicate(),), run_check=False)
            return full.redistribute(device_mesh, (Shard(1),)).to_local()

        module.register_forward_hook(hook)
        return module
