"""Parameter counts from the ModelConfig alone: the whole model's, a LoRA adapter's, and what one
rank holds under a tensor- and pipeline-parallel layout.

Counts follow `sorai.model.transformer` (Llama family: RMSNorm, GQA attention q/k/v/o_proj,
SwiGLU MLP gate/up/down_proj, biases per config flags, optionally tied embeddings). Under tensor
parallelism (tp) every block Linear is split (q/k/v/gate/up column-parallel: output features and
bias split; o/down row-parallel: input features split, bias replicated), norms are replicated,
the embedding is split on the vocabulary (unless it is tied to a head that is not), the head
only under loss_parallel. LoRA follows its base: A replicated and B split for a column-parallel
base, A split and B replicated for a row-parallel one. Under pipeline parallelism a tied
embedding is a copy on the first and on the last stage (LoRA only: full fine-tuning would train
two copies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from sorai.model.config import ModelConfig
from sorai.model.lora import ALL_LINEAR, LoRAConfig, LoRAError
from sorai.train import pipeline
from sorai.train.estimate.layout import SINGLE_DEVICE, Layout, ceil_div

Method = Literal["lora", "full"]

LORA_DTYPE = torch.float32  # A and B are trained in float32 whatever the base weights are

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def linear_shapes(config: ModelConfig, tp: int = 1) -> dict[str, tuple[int, int, bool]]:
    """A block's Linears in model order: short name -> (in_features, out_features, bias), as
    one of `tp` tensor-parallel ranks holds them (Layout.check_model: the sizes divide). Column-
    parallel q/k/v/gate/up keep 1/tp of the outputs (and of the bias), row-parallel o/down
    1/tp of the inputs (the bias whole). A LoRA adapter's A is then r x in, B out x r on
    every base alike: A replicated and B split for a column base, the reverse for a row one."""
    h, i = config.hidden_size, config.intermediate_size // tp
    q = config.num_attention_heads * config.head_dim // tp
    kv = config.num_key_value_heads * config.head_dim // tp
    return {
        "q_proj": (h, q, config.qkv_bias),
        "k_proj": (h, kv, config.qkv_bias),
        "v_proj": (h, kv, config.qkv_bias),
        "o_proj": (q, h, config.o_proj_bias),
        "gate_proj": (h, i, config.mlp_bias),
        "up_proj": (h, i, config.mlp_bias),
        "down_proj": (i, h, config.mlp_bias),
    }


def module_name(layer: int, short: str) -> str:
    return f"layers.{layer}.{'self_attn' if short in _ATTN else 'mlp'}.{short}"


def count_parameters(config: ModelConfig) -> int:
    """Parameters of sorai's Transformer(config), tied embeddings counted once."""
    h, v = config.hidden_size, config.vocab_size
    linears = sum(i * o + (o if b else 0) for i, o, b in linear_shapes(config).values())
    block = linears + 2 * h  # + two RMSNorm weights
    head = 0 if config.tie_word_embeddings else v * h
    return v * h + config.num_hidden_layers * block + h + head


def lora_target_names(config: ModelConfig, target_modules: str | Sequence[str]) -> list[str]:
    """The block Linears (sorai names, model order) that target_modules picks, as
    `sorai.model.lora.select_targets` picks them on a model of this config."""
    targets = LoRAConfig(target_modules=target_modules).target_modules  # validates as apply_lora
    names = [
        module_name(layer, short)
        for layer in range(config.num_hidden_layers)
        for short in linear_shapes(config)
    ]
    if targets == ALL_LINEAR:
        return names
    chosen: set[str] = set()
    for target in targets:
        hits = [name for name in names if name == target or name.endswith("." + target)]
        if not hits:
            known = ", ".join(sorted(linear_shapes(config)))
            raise LoRAError(
                f"target module {target!r} matches no Linear layer in the blocks; known: {known}"
            )
        chosen.update(hits)
    return [name for name in names if name in chosen]


def lora_parameters(config: ModelConfig, r: int, target_modules: str | Sequence[str]) -> int:
    """Parameters of the LoRA adapter apply_lora(model, LoRAConfig(r, ...)) would add:
    r x (in + out) per targeted Linear."""
    LoRAConfig(r=r)  # the same validation of r
    shapes = linear_shapes(config)
    total = 0
    for name in lora_target_names(config, target_modules):
        in_f, out_f, _ = shapes[name.rsplit(".", 1)[-1]]
        total += r * (in_f + out_f)
    return total


@dataclass(frozen=True)
class RankParameters:
    """The parameters one rank at pipeline position `pp_rank` holds before ZeRO sharding: its
    stages' layers (this tensor-parallel rank's slices), and the embedding / final norm and
    head when it runs the first / last stage."""

    pp_rank: int
    stages: tuple[int, ...]
    layers: tuple[range, ...]  # per stage
    embedding: bool
    head: bool
    base: int  # the model's own parameters (frozen under LoRA)
    adapter: int  # LoRA A and B
    trainable: int
    blocks: tuple[tuple[int, int], ...]  # (base, adapter) params of each block, for FSDP units
    root: int  # embedding, final norm and head params: FSDP's root unit

    @property
    def params(self) -> int:
        return self.base + self.adapter

    def describe(self) -> str:
        spans = [f"{r.start}-{r.stop - 1}" if len(r) > 1 else f"{r.start}" for r in self.layers]
        text = f"layer{'s' if sum(map(len, self.layers)) > 1 else ''} {', '.join(spans)}"
        if self.embedding:
            text += " + embedding"
        if self.head:
            text += " + head, loss"
        return text


def rank_parameters(
    config: ModelConfig,
    layout: Layout = SINGLE_DEVICE,
    *,
    method: Method = "lora",
    lora_r: int = 8,
    lora_targets: str | Sequence[str] = ALL_LINEAR,
) -> list[RankParameters]:
    """Per pipeline position, the parameters each of its ranks holds under `layout`'s tensor
    and pipeline split (before ZeRO sharding over dp_shard)."""
    layout.check_model(config)
    tied = config.tie_word_embeddings
    if layout.num_stages > 1:
        pipeline.check_tied_embeddings(tied, method == "full")
    adapted: set[str] = set()
    if method == "lora":
        LoRAConfig(r=lora_r)  # the same validation of r as apply_lora
        adapted = set(lora_target_names(config, lora_targets))
    h, vocab = config.hidden_size, config.vocab_size
    shapes = linear_shapes(config, layout.tp)
    vocab_split = ceil_div(vocab, layout.tp)  # DTensor's Shard(0): the first ranks round up
    ranges = layout.stage_layers(config.num_hidden_layers)
    last_stage = layout.num_stages - 1
    result = []
    for pp_rank in range(layout.pp):
        ids = layout.stage_ids(pp_rank)
        blocks: list[tuple[int, int]] = []
        root = 0
        for stage in ids:
            first, last = stage == 0, stage == last_stage
            for layer in ranges[stage]:
                base = 2 * h  # the two RMSNorm weights, replicated
                adapter = 0
                for short, (in_f, out_f, bias) in shapes.items():
                    base += in_f * out_f + (out_f if bias else 0)
                    if module_name(layer, short) in adapted:
                        adapter += lora_r * (in_f + out_f)
                blocks.append((base, adapter))
            # A stage holding both ends shares one tied weight; otherwise each end has its
            # own (a copy on another stage). The head splits on the vocabulary only under
            # loss_parallel, and a tied embedding must be split like it.
            shares = tied and first and last
            if first:
                root += (vocab_split if layout.loss_parallel or not shares else vocab) * h
            if last:
                root += h  # final norm
                if not shares:
                    root += (vocab_split if layout.loss_parallel else vocab) * h
        base = sum(b for b, _ in blocks) + root
        adapter = sum(a for _, a in blocks)
        result.append(
            RankParameters(
                pp_rank=pp_rank,
                stages=tuple(ids),
                layers=tuple(ranges[s] for s in ids),
                embedding=0 in ids,
                head=last_stage in ids,
                base=base,
                adapter=adapter,
                trainable=base + adapter if method == "full" else adapter,
                blocks=tuple(blocks),
                root=root,
            )
        )
    return result
