"""How much memory fine-tuning takes per device, worked out from the ModelConfig alone.

`sorai train --estimate` prints `estimate_memory(...).table()` before training starts. Nothing is
instantiated: parameter counts follow `sorai.model.transformer` (Llama family: RMSNorm, GQA
attention q/k/v/o_proj, SwiGLU MLP gate/up/down_proj, biases per config flags, optionally tied
embeddings) and activations follow what autograd saves for backward in that code, tensor by
tensor (measured with `torch.autograd.graph.saved_tensors_hooks`; see tests/train/test_estimate.py).

Accounting, in bytes (each also stated in `MemoryEstimate.notes`):

- weights: every parameter at `param_dtype`'s element size; LoRA's A and B in float32.
- gradients: trainable parameters only, in their own dtype (float32 for LoRA and for full
  fine-tuning of float32 weights, the "master" weights under bf16 autocast).
- optimizer: AdamW keeps two states (exp_avg, exp_avg_sq) per trainable parameter, each like
  the parameter (torch.optim.AdamW's zeros_like): 8 bytes per float32 parameter.
- activations: tensors autograd keeps from the forward pass to the backward pass, for one
  micro-batch of micro_batch_size x seq_len tokens, per layer:
    * each RMSNorm (2 per layer): its input upcast to float32 and the 1/rms per token, plus the
      normalised input when the norm's weight is trained;
    * the input of every Linear that needs it: a trained weight needs its input, a frozen one
      only its weight. q/k/v share one input, gate/up another; o_proj's input is the attention
      output itself. A LoRA layer's A needs the input too (shared when the dtypes match, else a
      cast copy per layer), B needs A's r-wide output;
    * attention: q, k, v, the output and a float32 log-sum-exp per head and token, as the fused
      kernels keep (flash / memory-efficient on CUDA, the flash kernel torch also uses on the
      CPU); no T x T matrix. attention="math" models the unfused path instead, which keeps two
      float32 [heads, T, T] probability tensors and head-expanded k and v. document_mask=True
      adds the [B, 1, T, T] additive mask SDPA builds from a boolean mask and keeps, per layer;
    * the MLP: gate output (silu's input), silu output and up output (the product's inputs),
      and the product when down_proj needs its input;
    * under bf16 autocast, every Linear casts its input (a bf16 copy per Linear) and its
      weight (a bf16 copy of each weight matrix, frozen ones included) and keeps both.
  Multiplied by the tokens of the micro-batch, summed over the layers. With activation
  checkpointing only each block's input is kept, plus one block's activations while it is
  recomputed. The loss adds, with chunked_loss (sorai.train.loss): the gradient of the final
  hidden states made in the forward pass, a float32 gradient of the head weight when it is
  trained, and one chunk's float32 logits (plus a low-precision copy under bf16); without it
  (a plain loop: full logits, then cross_entropy) three float32 [tokens, vocab] tensors at
  the peak of the loss's backward: the log-softmax output, its gradient and the logits'
  gradient.

What is not counted: the CUDA context, the allocator's caching and fragmentation,
the transient gradients of activations during backward (a few [tokens, hidden]
and [tokens, intermediate] tensors at a time), kernel workspaces, and the data batch itself.

Layout: `Layout` spreads the model over ranks as sorai's trainer does (the mesh pp x
dp_replicate x dp_shard x tp), and the figures are per rank, for the pipeline rank that needs
the most. micro_batch_size stays per data-parallel rank.

- Tensor parallel (tp): every block Linear is split (q/k/v/gate/up column-parallel: output
  features and bias split; o/down row-parallel: input features split, bias replicated), norms
  are replicated, the embedding is split on the vocabulary (unless it is tied to a head that
  is not), the head only under loss_parallel. LoRA follows its base: A replicated and B split
  for a column-parallel base, A split and B replicated for a row-parallel one. Attention heads,
  kv heads and the MLP width must divide by tp. Activations of width heads x head_dim or
  intermediate divide by tp; the [tokens, hidden] input of q/k/v and gate/up is all-gathered
  and kept whole; the norms (and the residual stream kept under checkpointing) divide by tp
  only with sequence_parallel. Logits divide by tp under loss_parallel.
- Pipeline parallel (pp): the layers split into stages (balanced by count, the first stages
  taking the extra layers, or `pp_layers`); interleaved 1F1B gives each rank two stages, r and
  r + pp. The first stage holds the embedding, the last the final norm, head and loss; a tied
  embedding is a copy on each (LoRA only: full fine-tuning would train two copies). The
  micro-batch's rows split evenly into `microbatches` pipeline micro-batches (default pp), of
  which a rank keeps the activations of: all (GPipe), pp - rank (1F1B), torch's warm-up count
  + 1 (interleaved). Autocast's bf16 copies of trained weights are
  cached for the step and counted once; frozen weights are cast, and kept, per micro-batch.
- Data parallel over dp_shard ranks (N_d; dp_replicate ranks hold copies and divide nothing),
  by zero_stage: 0 DDP, all replicated; 1 ZeroRedundancyOptimizer, optimizer states / N_d;
  2 FSDP2 without resharding after forward: weights, gradients and optimizer / N_d at rest,
  but every unit's weights are gathered whole from forward to its backward (a transient of all
  the rank's unsharded weights); 3 FSDP2 resharding after forward: the transient is the two
  largest blocks (the running one and the prefetched one) plus the root unit (embedding, final
  norm, head). Frozen weights are sharded and gathered like the others. With one
  data-parallel rank the stage changes nothing. `_per_rank` is the one place that applies it.
  Not counted: DDP's gradient buckets, FSDP2's unsharded gradient of a unit before its
  reduce-scatter, collective buffers.

`zero_stages` sets this next to the ZeRO paper's accounting (Rajbhandari et al. 2020): per rank
2Ψ + 2Ψ + KΨ becomes 2Ψ + 2Ψ + KΨ/N_d, 2Ψ + (2Ψ + KΨ)/N_d, (4Ψ + KΨ)/N_d for stages 1-3, with
K = 12 for mixed-precision Adam; sorai's float32 master weights split the same 16Ψ as
4Ψ + 4Ψ + 8Ψ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from sorai.errors import SoraiError
from sorai.model.config import ModelConfig
from sorai.model.lora import ALL_LINEAR, LoRAConfig, LoRAError
from sorai.train.config import ConfigError
from sorai.train.distributed import ParallelDims

if TYPE_CHECKING:
    from sorai.train.config import ParallelConfig

Method = Literal["lora", "full"]
Attention = Literal["fused", "math"]

GIB = 1024**3
MIB = 1024**2
LORA_DTYPE = torch.float32  # A and B are trained in float32 whatever the base weights are
ADAM_STATES = 2  # exp_avg, exp_avg_sq
_FLOAT32 = 4  # bytes
_INDEX = 8  # int64 token ids / indices
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
ZERO_PAPER_K = 12  # the ZeRO paper's optimizer bytes per param: fp32 master, momentum, variance


class LayoutError(SoraiError, ValueError):
    """A parallel layout that cannot run: sizes that do not make the world size, heads or
    layers that do not split over the ranks. A SoraiError, so the CLI prints one line."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Layout:
    """How one model is spread over ranks, as sorai's trainer spreads it (see the module
    docstring): dp_replicate x dp_shard x tp x pp ranks, ZeRO `zero_stage` over dp_shard.

    The default is a single device holding everything. `from_config` builds one from the
    training config's `parallel:` section and a world size.
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = True
    loss_parallel: bool = True
    pp_schedule: str = "1f1b"
    microbatches: int | None = None  # pipeline micro-batches; None: pp, as the trainer
    pp_layers: tuple[int, ...] | None = None  # layers per pipeline stage

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise LayoutError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.pp_schedule not in PP_SCHEDULES:
            raise LayoutError(
                f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, "
                f"got {self.pp_schedule!r}"
            )
        m = self.microbatches
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise LayoutError(f"parallel.microbatches must be a positive integer, got {m!r}")
        if self.pp_layers is not None:
            object.__setattr__(self, "pp_layers", tuple(self.pp_layers))  # hashable, frozen
            if len(self.pp_layers) != self.num_stages or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.pp_layers
            ):
                raise LayoutError(
                    f"parallel.pp_layers {list(self.pp_layers)}: needs {self.num_stages} "
                    "positive layer counts (one per pipeline stage)"
                )
        if self.interleaved:
            # torch's ScheduleInterleaved1F1B runs the micro-batches in rounds of equal size.
            m, rounds = self.pipeline_microbatches, max(1, self.pipeline_microbatches // self.pp)
            if m % rounds:
                raise LayoutError(
                    f"parallel.microbatches {m}: interleaved 1F1B over pp={self.pp} needs a "
                    f"multiple of {rounds} (its rounds of micro-batches)"
                )

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int | None = None) -> Layout:
        """The layout of a `parallel:` section for `world_size` ranks. dp_shard -1 takes what
        dp_replicate x tp x pp leave of the world size (1 when world_size is None)."""
        if world_size is None:
            shard = parallel.dp_shard if parallel.dp_shard != -1 else 1
            world_size = max(1, parallel.dp_replicate * shard * parallel.tp * parallel.pp)
        elif world_size < 1:
            raise LayoutError(f"the world size must be at least 1, got {world_size}")
        try:  # the trainer's own resolution and checks of the layout
            dims = ParallelDims.from_config(parallel, world_size)
        except ConfigError as e:
            raise LayoutError(str(e)) from None
        return cls(
            dp_replicate=dims.dp_replicate,
            dp_shard=dims.dp_shard,
            tp=dims.tp,
            pp=dims.pp,
            zero_stage=dims.zero_stage,
            sequence_parallel=parallel.sequence_parallel,
            loss_parallel=parallel.loss_parallel,
            pp_schedule=parallel.pp_schedule,
            microbatches=parallel.microbatches,
            pp_layers=None if parallel.pp_layers is None else tuple(parallel.pp_layers),
        )

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different rows."""
        return self.dp_replicate * self.dp_shard

    @property
    def single_device(self) -> bool:
        # One rank: no ZeRO stage divides or gathers anything.
        return self.world_size == 1

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 holds the states (ZeRO-2/3); as the trainer decides, on the whole
        data-parallel degree (HSDP with dp_shard 1 still gathers)."""
        return self.zero_stage >= 2 and self.dp > 1

    @property
    def interleaved(self) -> bool:
        return self.pp_schedule == "interleaved_1f1b" and self.pp > 1

    @property
    def stages_per_rank(self) -> int:
        # pp = 1 runs no pipeline at all, whatever the schedule.
        return 2 if self.interleaved else 1

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def pipeline_microbatches(self) -> int:
        """Pipeline micro-batches per micro_batch_size rows (1 without a pipeline)."""
        if self.pp == 1:
            return 1
        return self.microbatches or self.pp

    def stage_ids(self, pp_rank: int) -> list[int]:
        """The stages pipeline rank `pp_rank` runs: its own, and rank + pp interleaved."""
        return [pp_rank + k * self.pp for k in range(self.stages_per_rank)]

    def stage_layers(self, num_layers: int) -> list[range]:
        """Each stage's layers: `pp_layers`, else balanced by count, the first stages taking
        one more layer when they do not divide (as sorai.train.pipeline.split_layers)."""
        if self.pp_layers is not None:
            if sum(self.pp_layers) != num_layers:
                raise LayoutError(
                    f"parallel.pp_layers {list(self.pp_layers)} sums to {sum(self.pp_layers)}; "
                    f"the model has {num_layers} layers"
                )
            counts = list(self.pp_layers)
        else:
            if num_layers < self.num_stages:
                raise LayoutError(
                    f"the model has {num_layers} layers, too few for {self.num_stages} "
                    "pipeline stages"
                )
            base, extra = divmod(num_layers, self.num_stages)
            counts = [base + (1 if s < extra else 0) for s in range(self.num_stages)]
        ranges, start = [], 0
        for n in counts:
            ranges.append(range(start, start + n))
            start += n
        return ranges

    def in_flight(self, pp_rank: int) -> int:
        """Pipeline micro-batch forwards whose activations `pp_rank` keeps at its peak (over
        both its stages when interleaved), as torch.distributed.pipelining schedules them."""
        m = self.pipeline_microbatches
        if self.pp == 1:
            return 1
        if self.pp_schedule == "gpipe":
            return m  # every forward before any backward
        if not self.interleaved:
            return min(m, self.pp - pp_rank)  # 1F1B: pp - rank warm-up forwards, then 1B1F
        # Interleaved 1F1B: torch's _get_warmup_ops forwards, then one forward before the
        # first backward.
        v = self.stages_per_rank
        per_round = m // max(1, m // self.pp)
        warmup = (v - 1) * per_round + 2 * (self.pp - 1 - pp_rank)
        return min(warmup + 1, v * m)

    def check(self, config: ModelConfig) -> None:
        """Heads, kv heads and the MLP width must split over tp (as the trainer requires)."""
        if self.tp == 1:
            return
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            size = getattr(config, name)
            if size % self.tp:
                raise LayoutError(
                    f"parallel.tp {self.tp}: the model's {name} ({size}) is not divisible by it"
                    + ("; GQA needs whole kv heads on every rank" if "key_value" in name else "")
                )

    def global_ranks(self, pp_rank: int) -> range:
        """The global ranks at pipeline position `pp_rank` (sorai's mesh: pp outermost)."""
        per_stage = self.world_size // self.pp
        return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)

    def describe(self) -> str:
        if self.single_device:
            return "single device"
        parts = []
        if self.pp > 1:
            schedule = self.pp_schedule.replace("interleaved_1f1b", "interleaved 1F1B")
            schedule = schedule.replace("1f1b", "1F1B").replace("gpipe", "GPipe")
            parts.append(f"pp {self.pp} ({schedule}, {self.pipeline_microbatches} micro-batches)")
        if self.dp_replicate > 1:
            parts.append(f"dp_replicate {self.dp_replicate}")
        if self.dp_shard > 1:
            parts.append(f"dp_shard {self.dp_shard}")
        if self.tp > 1:
            parts.append(
                f"tp {self.tp}" + (" (sequence parallel)" if self.sequence_parallel else "")
            )
        text = " x ".join(parts)
        if self.dp > 1:
            text += f", ZeRO-{self.zero_stage}"
        return f"{text}: {self.world_size} ranks"


SINGLE_DEVICE = Layout()


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device needs for training, by kind, and the assumptions behind them.

    Under a parallel `layout`, the figures are those of one rank at the largest pipeline
    position (`pp_rank`); `rank_totals` has every pipeline position's total."""

    weights: int  # bytes
    gradients: int
    optimizer: int
    activations: int
    trainable_params: int  # of the whole model
    total_params: int
    notes: list[str]  # assumptions, e.g. "activations: micro-batch 8 x 256 tokens, ..."
    activation_parts: dict[str, int] = field(default_factory=dict)  # sums to activations
    layout: Layout = SINGLE_DEVICE
    gathered: int = 0  # ZeRO-2/3: unsharded weights FSDP2 gathers for compute (transient)
    pp_rank: int = 0  # the pipeline position these figures are for
    rank_totals: tuple[int, ...] = ()  # total per pipeline position (parallel layouts)
    rank_contents: tuple[str, ...] = ()  # what each pipeline position holds
    details: dict[str, str] = field(default_factory=dict)  # table row -> its detail text

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations

    def table(self) -> str:
        """An aligned text table: one row per kind (activations broken down), then the total,
        and under pipeline parallelism every pipeline position's total."""
        rows: list[tuple[str, int, str]] = [
            ("weights", self.weights, f"{self.total_params:,} params"),
            ("gradients", self.gradients, f"{self.trainable_params:,} trainable params"),
            ("optimizer", self.optimizer, "AdamW, 2 states per trainable param"),
        ]
        if self.gathered:
            rows.append(("gathered weights (transient)", self.gathered, ""))
        rows.append(("activations", self.activations, ""))
        rows = [(name, size, self.details.get(name, detail)) for name, size, detail in rows]
        rows += [(f"  {name}", size, "") for name, size in self.activation_parts.items()]
        rows.append(("total", self.total, ""))
        name_w = max(len(name) for name, _, _ in rows)
        size_w = max(len(format_bytes(size)) for _, size, _ in rows)
        if self.layout.single_device:
            header = "memory per device (single device)"
        else:
            header = f"memory per rank ({self.layout.describe()})"
            if self.layout.pp > 1:
                ranks = self.layout.global_ranks(self.pp_rank)
                where = (
                    f"global ranks {ranks.start}-{ranks.stop - 1}"
                    if len(ranks) > 1
                    else f"global rank {ranks.start}"
                )
                header += (
                    f"\npipeline rank {self.pp_rank} of {self.layout.pp}, the largest ({where})"
                )
        lines = [header]
        for name, size, detail in rows:
            if name == "total":
                lines.append("-" * (name_w + 2 + size_w))
            line = f"{name:<{name_w}}  {format_bytes(size):>{size_w}}"
            lines.append(f"{line}  {detail}".rstrip())
        if len(self.rank_totals) > 1:
            lines += ["", "per pipeline rank:"]
            width = max(len(format_bytes(t)) for t in self.rank_totals)
            for r, (total, what) in enumerate(
                zip(self.rank_totals, self.rank_contents, strict=True)
            ):
                mark = "  <- largest" if r == self.pp_rank else ""
                lines.append(f"  {r:>2}  {format_bytes(total):>{width}}  {what}{mark}")
        return "\n".join(lines)

    def report(self) -> str:
        """The table followed by the notes, as `sorai train --estimate` prints it."""
        return "\n".join([self.table(), "", *(f"- {note}" for note in self.notes)])


def format_bytes(size: int) -> str:
    """GiB from 1 GiB up, MiB below."""
    if size >= GIB:
        return f"{size / GIB:.2f} GiB"
    return f"{size / MIB:.1f} MiB"


# Architecture numbers of well-known models, for estimates without a checkpoint at hand.
KNOWN_CONFIGS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "llama-3-70b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}


def known_config(name: str) -> ModelConfig:
    """A fresh copy of a KNOWN_CONFIGS entry (ModelConfig is mutable)."""
    try:
        config = KNOWN_CONFIGS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_CONFIGS))
        raise ValueError(f"unknown architecture {name!r}; known: {known}") from None
    return ModelConfig(**{f: getattr(config, f) for f in ModelConfig.__dataclass_fields__})


# --- parameters -----------------------------------------------------------------------------

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _linear_shapes(config: ModelConfig, tp: int = 1) -> dict[str, tuple[int, int, bool]]:
    """A block's Linears in model order: short name -> (in_features, out_features, bias), as
    one of `tp` tensor-parallel ranks holds them (Layout.check: the sizes divide). Column-
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


def _module_name(layer: int, short: str) -> str:
    return f"layers.{layer}.{'self_attn' if short in _ATTN else 'mlp'}.{short}"


def _block_linear_params(config: ModelConfig) -> int:
    return sum(i * o + (o if b else 0) for i, o, b in _linear_shapes(config).values())


def count_parameters(config: ModelConfig) -> int:
    """Parameters of sorai's Transformer(config), tied embeddings counted once."""
    h, v = config.hidden_size, config.vocab_size
    block = _block_linear_params(config) + 2 * h  # + two RMSNorm weights
    head = 0 if config.tie_word_embeddings else v * h
    return v * h + config.num_hidden_layers * block + h + head


def lora_target_names(config: ModelConfig, target_modules: str | Sequence[str]) -> list[str]:
    """The block Linears (sorai names, model order) that target_modules picks, as
    `sorai.model.lora.select_targets` picks them on a model of this config."""
    targets = LoRAConfig(target_modules=target_modules).target_modules  # validates as apply_lora
    names = [
        _module_name(layer, short)
        for layer in range(config.num_hidden_layers)
        for short in _linear_shapes(config)
    ]
    if targets == ALL_LINEAR:
        return names
    chosen: set[str] = set()
    for target in targets:
        hits = [name for name in names if name == target or name.endswith("." + target)]
        if not hits:
            known = ", ".join(sorted(_linear_shapes(config)))
            raise LoRAError(
                f"target module {target!r} matches no Linear layer in the blocks; known: {known}"
            )
        chosen.update(hits)
    return [name for name in names if name in chosen]


def lora_parameters(config: ModelConfig, r: int, target_modules: str | Sequence[str]) -> int:
    """Parameters of the LoRA adapter apply_lora(model, LoRAConfig(r, ...)) would add:
    r x (in + out) per targeted Linear."""
    LoRAConfig(r=r)  # the same validation of r
    shapes = _linear_shapes(config)
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
    layout.check(config)
    tied = config.tie_word_embeddings
    if method == "full" and tied and layout.num_stages > 1:
        # The trainer refuses it too: the two stages would train diverging copies.
        raise LayoutError(
            "pipeline parallelism with tied embeddings (tie_word_embeddings) needs the "
            "embedding and the head on one stage; full fine-tuning would train two diverging "
            "copies. Use LoRA (the embedding is frozen), or tp/dp without pp"
        )
    adapted: set[str] = set()
    if method == "lora":
        LoRAConfig(r=lora_r)  # the same validation of r as apply_lora
        adapted = set(lora_target_names(config, lora_targets))
    h, vocab = config.hidden_size, config.vocab_size
    shapes = _linear_shapes(config, layout.tp)
    vocab_split = _ceil_div(vocab, layout.tp)  # DTensor's Shard(0): the first ranks round up
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
                    if _module_name(layer, short) in adapted:
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


# --- activations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Precision:
    stream: int  # bytes per element of the residual stream and norm outputs (the weights' dtype)
    compute: int  # bytes per element of matmul inputs/outputs (bf16 under autocast)
    autocast: bool
    adapter: int = LORA_DTYPE.itemsize


def _norm(h: int, p: _Precision, grad_in: bool, trained: bool) -> int:
    """RMSNorm: F.rms_norm keeps its float32 input and 1/rms; weight * normed keeps normed."""
    saved = 0
    if grad_in or trained:
        saved += h * _FLOAT32 + _FLOAT32
    if trained:
        saved += h * p.stream
    return saved


def _linear_inputs(
    in_features: int,
    r: int,
    input_bytes: int,
    p: _Precision,
    trained: Sequence[bool],
    adapted: Sequence[bool],
    shared: bool = False,
) -> int:
    """Bytes per token kept for the inputs of the Linears that read one tensor (q/k/v, gate/up,
    o, down). shared: the tensor is already kept by someone else (o_proj's input is the
    attention output SDPA keeps)."""
    saved = 0
    for weight_trained, lora in zip(trained, adapted, strict=True):
        if weight_trained:
            if p.autocast and input_bytes != 2:
                saved += in_features * 2  # autocast's bf16 copy, one per Linear
            elif not shared:
                saved += in_features * input_bytes
                shared = True
        if lora:
            if p.autocast:
                saved += in_features * 2  # x.to(float32), then autocast's bf16 copy for A
            elif input_bytes != p.adapter:
                saved += in_features * p.adapter  # x.to(float32) for A, one per Linear
            elif not shared:
                saved += in_features * input_bytes
                shared = True
            saved += r * (2 if p.autocast else p.adapter)  # A's output, B's input
    return saved


@dataclass(frozen=True)
class _Block:
    per_token: int  # bytes kept per token of the whole sequence by one block
    per_local_token: int  # bytes kept per token of this rank's sequence shard (norms under SP)
    per_token_position: int  # bytes kept per token per position of its row (T x T terms)
    weight_copies: int  # autocast's bf16 copies of trained weights (bytes, not per token)
    frozen_copies: int  # autocast's bf16 copies of frozen weights
    grad_out: bool  # whether the block's output needs a gradient


def _block(
    config: ModelConfig,
    layer: int,
    p: _Precision,
    method: str,
    adapted_names: set[str],
    r: int,
    grad_in: bool,
    attention: str,
    seq_len: int,
    document_mask: bool,
    tp: int = 1,
) -> _Block:
    """Bytes autograd keeps for one block, per token (and per token x seq_len for T^2 terms),
    on one of `tp` tensor-parallel ranks: its heads and its slice of the MLP."""
    h = config.hidden_size
    heads = config.num_attention_heads // tp
    shapes = _linear_shapes(config, tp)
    q_dim, kv_dim = shapes["q_proj"][1], shapes["k_proj"][1]
    inter = shapes["gate_proj"][1]
    full = method == "full"
    lora = {s: _module_name(layer, s) in adapted_names for s in shapes}

    per_token = 0
    per_local_token = 0
    per_token_position = 0
    copies = 0
    frozen_copies = 0

    def weight_copies(names: Sequence[str], grad_input: bool) -> tuple[int, int]:
        # Under autocast, a matmul whose input needs a gradient keeps its bf16 weight.
        if not p.autocast:
            return 0, 0
        trained = frozen = 0
        for s in names:
            in_f, out_f, _ = shapes[s]
            if grad_input:
                if full:
                    trained += in_f * out_f * 2
                else:
                    frozen += in_f * out_f * 2
            if lora[s]:
                trained += r * (in_f + out_f) * 2
        return trained, frozen

    # Attention half. The norms run on this rank's sequence shard (all of it without SP);
    # q/k/v (and gate/up) read the whole [tokens, hidden] input, all-gathered under SP.
    per_local_token += _norm(h, p, grad_in, full)
    grad_normed = grad_in or full
    qkv = ("q_proj", "k_proj", "v_proj")
    per_token += _linear_inputs(h, r, p.stream, p, [full] * 3, [lora[s] for s in qkv])
    trained, frozen = weight_copies(qkv, grad_normed)
    copies, frozen_copies = copies + trained, frozen_copies + frozen
    grad_qkv = grad_normed or full or any(lora[s] for s in qkv)
    if grad_qkv:
        if attention == "fused":
            # q, k, v, output, float32 log-sum-exp per head.
            per_token += (2 * q_dim + 2 * kv_dim) * p.compute + heads * _FLOAT32
            if document_mask:
                per_token_position += p.compute  # [B, 1, T, T] additive mask, on every rank
            out_shared = True
        else:
            # Unfused math: scaled q, head-expanded k and v, and two float32 [H, T, T] tensors.
            per_token += 3 * q_dim * _FLOAT32
            per_token_position += 2 * heads * _FLOAT32
            out_shared = False
    else:
        out_shared = False
    per_token += _linear_inputs(q_dim, r, p.compute, p, [full], [lora["o_proj"]], out_shared)
    trained, frozen = weight_copies(("o_proj",), grad_qkv)
    copies, frozen_copies = copies + trained, frozen_copies + frozen
    grad_mid = grad_qkv or full or lora["o_proj"]

    # MLP half.
    per_local_token += _norm(h, p, grad_mid, full)
    grad_normed = grad_mid or full
    gate_up = ("gate_proj", "up_proj")
    per_token += _linear_inputs(h, r, p.stream, p, [full] * 2, [lora[s] for s in gate_up])
    trained, frozen = weight_copies(gate_up, grad_normed)
    copies, frozen_copies = copies + trained, frozen_copies + frozen
    grad_gate = grad_normed or full or any(lora[s] for s in gate_up)
    if grad_gate:
        per_token += 3 * inter * p.compute  # silu's input, silu's output, up's output
    per_token += _linear_inputs(inter, r, p.compute, p, [full], [lora["down_proj"]])
    trained, frozen = weight_copies(("down_proj",), grad_gate)
    copies, frozen_copies = copies + trained, frozen_copies + frozen
    grad_out = grad_gate or full or lora["down_proj"]
    return _Block(per_token, per_local_token, per_token_position, copies, frozen_copies, grad_out)


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
    weights, gradients, optimizer, gathered = (
        states.weights,
        states.gradients,
        states.optimizer,
        0,
    )
    if layout.zero_stage >= 1:
        optimizer = _ceil_div(optimizer, n)  # ZeRO-1 (ZeroRedundancyOptimizer) and FSDP2
    if layout.fsdp:
        weights, gradients = _ceil_div(weights, n), _ceil_div(gradients, n)
        if layout.zero_stage == 2:
            # reshard_after_forward=False: each unit stays gathered from its forward to its
            # backward, so at the end of the forward all of them are.
            gathered = states.weights
        else:
            # Resharded after forward: the running block, the prefetched one, and the root
            # unit, which FSDP2 never reshards between forward and backward.
            gathered = sum(sorted(states.blocks)[-2:]) + states.root
    return _RankStates(weights, gradients, optimizer, gathered)


def _in_flight_by_stage(per_microbatch: Sequence[int], in_flight: int, microbatches: int):
    """How many micro-batches each of a rank's stages keeps: `in_flight` forwards in all, at
    most `microbatches` per stage, counted on the heavier stage first (an upper bound when a
    rank runs two stages)."""
    counts = [0] * len(per_microbatch)
    left = in_flight
    for i in sorted(range(len(per_microbatch)), key=lambda i: -per_microbatch[i]):
        counts[i] = min(left, microbatches)
        left -= counts[i]
    return counts


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
    activation_checkpointing: bool = False,
    chunked_loss: bool = True,
    loss_chunk_tokens: int = 1024,
    attention: Attention = "fused",
    document_mask: bool = False,
    layout: Layout = SINGLE_DEVICE,
) -> MemoryEstimate:
    """Per-device training memory for `config` (see the module docstring for the accounting).

    method: "lora" (only A and B train, in float32) or "full". param_dtype: the weights' dtype;
    autocast_bf16: bfloat16 autocast over them (the trainer's precision=bf16). attention:
    "fused" (flash / memory-efficient SDPA kernels, the default on CUDA and the CPU) or "math".
    document_mask: packed rows attend through a boolean [B, 1, T, T] mask. layout: the parallel
    layout; the figures are then one rank's, at the pipeline position that needs the most.
    micro_batch_size is per data-parallel rank (what train.micro_batch_size means).
    """
    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
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
    microbatches = layout.pipeline_microbatches
    if micro_batch_size % microbatches:
        raise LayoutError(
            f"train.micro_batch_size {micro_batch_size} does not split into "
            f"parallel.microbatches {microbatches} pipeline micro-batches"
        )
    if layout.tp > 1 and (layout.zero_stage == 1 or (layout.zero_stage == 0 and layout.dp > 1)):
        # As the trainer: DDP, and ZeroRedundancyOptimizer over it, take no DTensors.
        raise LayoutError(
            f"zero_stage {layout.zero_stage} replicates with DDP, which does not take "
            "tensor-parallel (DTensor) weights; use zero_stage 2 or 3 with tp"
        )

    h, vocab = config.hidden_size, config.vocab_size
    tp = layout.tp
    rows = micro_batch_size // microbatches
    tokens = rows * seq_len
    # Under sequence parallelism the norms and the residual stream hold a slice of each row.
    local_tokens = rows * _ceil_div(seq_len, tp) if layout.sequence_parallel else tokens
    param_bytes = param_dtype.itemsize
    autocast = autocast_bf16 and param_bytes > 2
    p = _Precision(stream=param_bytes, compute=2 if autocast else param_bytes, autocast=autocast)
    dtype_name = str(param_dtype).removeprefix("torch.")
    notes: list[str] = []
    full = method == "full"

    # Model states, of the whole model for the notes.
    total_params = count_parameters(config)
    if method == "lora":
        adapted = lora_target_names(config, lora_targets)
        trainable = lora_parameters(config, lora_r, lora_targets)
        total_params += trainable
        grad_bytes = LORA_DTYPE.itemsize
        notes.append(
            f"weights: {total_params - trainable:,} base params in {dtype_name} + {trainable:,} "
            f"LoRA params (r={lora_r}, {len(adapted)} Linears) in float32"
        )
    else:
        adapted = []
        trainable = total_params
        grad_bytes = param_bytes
        notes.append(f"weights: {total_params:,} params in {dtype_name}")
    state_dtype = "float32" if grad_bytes == 4 else dtype_name
    notes.append(f"gradients: the {trainable:,} trainable params, in {state_dtype}")
    notes.append(f"optimizer: AdamW, exp_avg and exp_avg_sq in {state_dtype} (like the params)")
    adapted_names = set(adapted)

    # Logits are split on the vocabulary only when the loss runs on the sharded head.
    logits_vocab = _ceil_div(vocab, tp) if layout.loss_parallel else vocab

    def stage_parts(stage: int, layers: range, first: bool, last: bool, head_params: int):
        """One stage's activations: (kept per micro-batch in flight, kept once)."""
        grad = full if first else True  # a later stage's input always comes with a gradient
        blocks = []
        for layer in layers:
            block = _block(
                config,
                layer,
                p,
                method,
                adapted_names,
                lora_r,
                grad,
                attention,
                seq_len,
                document_mask,
                tp,
            )
            blocks.append(block)
            grad = block.grad_out
        per_block = [
            b.per_token * tokens
            + b.per_local_token * local_tokens
            + b.per_token_position * tokens * seq_len
            for b in blocks
        ]
        each: dict[str, int] = {}
        once: dict[str, int] = {}
        copies = sum(b.weight_copies for b in blocks)
        frozen_copies = sum(b.frozen_copies for b in blocks)
        if activation_checkpointing:
            each["block inputs (checkpointed)"] = len(layers) * local_tokens * h * p.stream
            once["one block recomputed"] = max(per_block, default=0) + max(
                (b.weight_copies + b.frozen_copies for b in blocks), default=0
            )
            copies = frozen_copies = 0
        else:
            each["blocks"] = sum(per_block)

        other = 2 * tokens * config.head_dim * p.stream  # rope cos/sin (per-row positions)
        if first and full:
            other += tokens * _INDEX  # the embedding keeps the token ids
        if last:
            other += _norm(h, p, grad, full) * local_tokens
            if chunked_loss:
                chunk = min(loss_chunk_tokens, tokens)
                grad_hidden = tokens * h * p.stream  # all-gathered rows under SP
                grad_head = head_params * _FLOAT32 if full else 0
                each["loss (chunked)"] = grad_hidden + grad_head + tokens * _INDEX
                once["loss (chunked)"] = (
                    chunk * logits_vocab * (_FLOAT32 + (p.compute if p.compute < _FLOAT32 else 0))
                )
            else:
                if full:
                    other += tokens * h * (2 if autocast else p.stream)  # lm_head's input
                if autocast:
                    if full:
                        copies += head_params * 2  # lm_head's bf16 weight
                    else:
                        frozen_copies += head_params * 2
                # The log-softmax output is kept per micro-batch; its gradient and the
                # logits' gradient join it at the loss's backward, one micro-batch at a time.
                each["loss (full logits)"] = tokens * logits_vocab * _FLOAT32
                once["loss (full logits)"] = 2 * tokens * logits_vocab * _FLOAT32
        each["head, norms, ids, rope"] = other
        # Autocast caches the cast of a trained weight for the whole autocast region (one
        # step); a frozen weight is cast again, and kept again, by every micro-batch.
        each["autocast bf16 weight copies"] = frozen_copies
        once["autocast bf16 weight copies"] = copies
        return each, once

    # The head (a tied one too) splits on the vocabulary only under loss_parallel.
    head_params = logits_vocab * h
    ranges = layout.stage_layers(config.num_hidden_layers)
    last_stage = layout.num_stages - 1
    per_rank: list[tuple[_RankStates, dict[str, int], int]] = []
    for rank in ranks:
        states = _per_rank(_states(rank, param_bytes, grad_bytes), layout)
        stages = [
            stage_parts(s, ranges[s], s == 0, s == last_stage, head_params) for s in rank.stages
        ]
        counts = _in_flight_by_stage(
            [sum(each.values()) for each, _ in stages],
            layout.in_flight(rank.pp_rank),
            microbatches,
        )
        parts: dict[str, int] = {}
        for (each, once), count in zip(stages, counts, strict=True):
            for name, size in each.items():
                parts[name] = parts.get(name, 0) + size * count
            for name, size in once.items():
                if name == "one block recomputed":  # one at a time, whichever stage
                    parts[name] = max(parts.get(name, 0), size)
                else:
                    parts[name] = parts.get(name, 0) + size
        if not parts["autocast bf16 weight copies"]:
            del parts["autocast bf16 weight copies"]
        # The same order as a single device's table: blocks, loss, head, copies.
        order = [
            "block inputs (checkpointed)",
            "one block recomputed",
            "blocks",
            "loss (chunked)",
            "loss (full logits)",
            "head, norms, ids, rope",
            "autocast bf16 weight copies",
        ]
        parts = {name: parts[name] for name in order if name in parts}
        per_rank.append((states, parts, sum(counts)))

    totals = [
        s.weights + s.gradients + s.optimizer + s.gathered + sum(parts.values())
        for s, parts, _ in per_rank
    ]
    worst = max(range(len(totals)), key=lambda r: (totals[r], -r))
    states, parts, in_flight = per_rank[worst]
    rank = ranks[worst]

    precision = f"{dtype_name} weights" + (", bf16 autocast" if autocast else "")
    kernel = (
        "fused SDPA (O(T) log-sum-exp, no T x T)"
        if attention == "fused"
        else "math SDPA (float32 T x T probabilities per head)"
    )
    notes.append(
        f"activations: micro-batch {micro_batch_size} x {seq_len} tokens, {precision}, "
        f"checkpointing {'on' if activation_checkpointing else 'off'}, {kernel}"
        + (", packed-document mask" if document_mask else "")
    )
    if method == "lora":
        notes.append(
            "activations (LoRA): frozen Linears keep only their weights, adapted ones their "
            "input for A's gradient; nothing before the first adapter is kept (approximation "
            "of autograd's bookkeeping, within a few % on a measured tiny model)"
        )
    if chunked_loss:
        chunk = min(loss_chunk_tokens, tokens)
        notes.append(
            f"loss: chunked, {chunk} positions' float32 logits at a time, the hidden states' "
            "gradient made in forward"
            + (" and a float32 head-weight gradient" if full else "")
            + "; every position assumed to have a target"
        )
    else:
        notes.append(
            "loss: full float32 logits; at the loss's backward the log-softmax output, its "
            "gradient and the logits' gradient coexist (3 x tokens x vocab x 4 bytes)"
        )
    if autocast:
        notes.append(
            "autocast keeps a bf16 copy of each Linear's input and weight for backward "
            "(frozen weights included)"
        )
    details: dict[str, str] = {}
    if not layout.single_device:
        notes += _layout_notes(layout, rows, in_flight, rank)
        held = f"{rank.params:,} params on this rank"
        details["weights"] = held + (
            f", 1/{layout.dp_shard} of them at rest (ZeRO-{layout.zero_stage})"
            if layout.fsdp and layout.dp_shard > 1
            else ""
        )
        details["gradients"] = f"{rank.trainable:,} trainable params on this rank" + (
            f", 1/{layout.dp_shard} of them" if layout.fsdp and layout.dp_shard > 1 else ""
        )
        if layout.zero_stage >= 1 and layout.dp_shard > 1:
            details["optimizer"] = f"AdamW, 2 states per trainable param, 1/{layout.dp_shard}"
        if states.gathered:
            details["gathered weights (transient)"] = (
                "all this rank's weights, unsharded (ZeRO-2 keeps them from forward to backward)"
                if layout.zero_stage == 2
                else "2 blocks (running + prefetched) + root unit, unsharded"
            )
        if layout.pp > 1:
            details["activations"] = (
                f"{in_flight} pipeline micro-batch{'es' if in_flight > 1 else ''} of "
                f"{rows} x {seq_len} tokens in flight"
            )
    notes.append(
        "not counted: CUDA context, allocator fragmentation, transient gradients in "
        "backward, the batch itself (an approximation: expect the real peak somewhat higher)"
        + (
            "; DDP's gradient buckets, FSDP2's unsharded gradient of a unit before its "
            "reduce-scatter, collective buffers"
            if not layout.single_device
            else ""
        )
    )
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


def _layout_notes(layout: Layout, rows: int, in_flight: int, rank: RankParameters) -> list[str]:
    """What the per-rank figures assume about the layout (one note per dimension in use)."""
    notes = []
    if layout.dp > 1:
        stage = {
            0: "DDP: weights, gradients and optimizer states replicated",
            1: "ZeRO-1 (ZeroRedundancyOptimizer): optimizer states / dp_shard",
            2: "ZeRO-2 (FSDP2, no reshard after forward): weights, gradients and optimizer "
            "states / dp_shard at rest; every unit gathered from its forward to its backward",
            3: "ZeRO-3 (FSDP2): weights, gradients and optimizer states / dp_shard at rest; "
            "2 blocks and the root unit gathered at a time",
        }[layout.zero_stage]
        replicas = (
            f", {layout.dp_replicate} replicas (HSDP) dividing nothing"
            if layout.dp_replicate > 1
            else ""
        )
        notes.append(f"data parallel: {stage}{replicas}; gathered weights in their own dtype")
    if layout.tp > 1:
        notes.append(
            f"tensor parallel {layout.tp}: block Linears, heads and the MLP split; norms "
            "replicated; embedding split on the vocabulary"
            + (", head and logits too (loss_parallel)" if layout.loss_parallel else "")
            + "; the all-gathered [tokens, hidden] inputs of q/k/v and gate/up kept whole"
            + (
                "; norms split on the sequence (sequence_parallel)"
                if layout.sequence_parallel
                else "; norms' activations replicated (no sequence_parallel)"
            )
        )
    if layout.pp > 1:
        notes.append(
            f"pipeline parallel {layout.pp} ({layout.pp_schedule}): the figures are pipeline "
            f"rank {rank.pp_rank}'s ({rank.describe()}), the largest; micro_batch_size rows "
            f"split into {layout.pipeline_microbatches} micro-batches of {rows} rows, "
            f"{in_flight} in flight on this rank"
        )
    return notes


# --- ZeRO stages side by side -----------------------------------------------------------------


@dataclass(frozen=True)
class ZeroStage:
    """Model-state bytes per rank at one ZeRO stage."""

    stage: int
    paper: int  # the ZeRO paper: fp16 weights and gradients, K = 12 bytes of optimizer state
    sorai: int  # sorai: float32 weights, gradients and two AdamW states, at rest
    gathered: int  # sorai under FSDP2 (stages 2-3): unsharded weights gathered for compute


@dataclass(frozen=True)
class ZeroStages:
    """Per-rank model states (no activations) at ZeRO stages 0-3 over `dp_shard` ranks, for
    the model slice of one tensor/pipeline rank (the largest): `params` (Ψ), `trainable`."""

    dp_shard: int
    params: int
    trainable: int
    stages: tuple[ZeroStage, ...]
    model_parallel: str = ""  # e.g. "tp 8 x pp 4": Ψ is one such rank's slice

    def table(self) -> str:
        lora = self.trainable != self.params
        paper = "paper 2Ψ+2Ψt+12Ψt" if lora else "paper 2Ψ+2Ψ+12Ψ"
        sorai = "sorai 4Ψ+4Ψt+8Ψt" if lora else "sorai 4Ψ+4Ψ+8Ψ"
        peak = "sorai + gathered"
        what = ["nothing (DDP)", "optimizer", "+ gradients", "+ weights"]
        slice_ = f" on the largest {self.model_parallel} rank" if self.model_parallel else ""
        trained = f", Ψt = {self.trainable:,} trainable" if lora else ", all trainable"
        lines = [
            f"model states per rank by ZeRO stage over dp_shard = {self.dp_shard} "
            f"(Ψ = {self.params:,} params{slice_}{trained})",
        ]
        header = ("stage", "sharded", paper, sorai, peak)
        body = [
            (
                str(z.stage),
                what[z.stage],
                format_bytes(z.paper),
                format_bytes(z.sorai),
                format_bytes(z.sorai + z.gathered),
            )
            for z in self.stages
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        for row in [header, *body]:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
            lines.append("  ".join(cells))
        lines.append(
            "- paper: fp16 weights and gradients, fp32 master weights, momentum and variance "
            "(K = 12); stage 1 shards the optimizer states, 2 also the gradients, 3 also the "
            "weights"
        )
        if "tp" in self.model_parallel:
            lines.append(
                "- stage 1 with tp is for comparison only: sorai refuses it (DDP and "
                "ZeroRedundancyOptimizer take no tensor-parallel weights)"
            )
        lines.append(
            "- sorai: float32 weights (bf16 only under autocast), float32 gradients and AdamW "
            "states; stages 2-3 are FSDP2, whose gathered weights add a transient (stage 2: "
            "every unit until its backward; stage 3: two blocks and the root unit)"
        )
        return "\n".join(lines)


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
        2 * psi + 2 * psi_t + _ceil_div(ZERO_PAPER_K * psi_t, n),
        2 * psi + _ceil_div((2 + ZERO_PAPER_K) * psi_t, n),
        _ceil_div(2 * psi + (2 + ZERO_PAPER_K) * psi_t, n),
    ]
    stages = []
    for stage in range(4):
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
