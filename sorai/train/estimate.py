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

Layout: the figures are for one device holding the whole model. `Layout` is where data /
tensor / pipeline parallelism and ZeRO stages will divide them per rank (ZeRO-1 shards the
optimizer states, ZeRO-2 also the gradients, ZeRO-3 also the weights, over the data-parallel
ranks: per rank 2Ψ + 2Ψ + KΨ becomes 2Ψ + 2Ψ + KΨ/N_d, 2Ψ + (2Ψ + KΨ)/N_d, (4Ψ + KΨ)/N_d with
K = 12 for mixed-precision Adam); `_per_rank` is the one place that will do it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from sorai.model.config import ModelConfig
from sorai.model.lora import ALL_LINEAR, LoRAConfig, LoRAError

Method = Literal["lora", "full"]
Attention = Literal["fused", "math"]

GIB = 1024**3
MIB = 1024**2
LORA_DTYPE = torch.float32  # A and B are trained in float32 whatever the base weights are
ADAM_STATES = 2  # exp_avg, exp_avg_sq
_FLOAT32 = 4  # bytes
_INDEX = 8  # int64 token ids / indices


@dataclass(frozen=True)
class Layout:
    """How one model is spread over devices. The default, and all that is implemented so far,
    is a single device holding everything.

    Data parallelism replicates the states (ZeRO stages 1-3 shard optimizer states, then
    gradients, then weights over the data-parallel ranks) and splits the global batch; tensor
    parallelism splits the Linears (and their activations) across ranks; pipeline parallelism
    gives each rank a run of layers (and micro-batches in flight).
    """

    data_parallel: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int = 0

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.tensor_parallel * self.pipeline_parallel

    @property
    def single_device(self) -> bool:
        return self.world_size == 1 and self.zero_stage == 0

    def describe(self) -> str:
        if self.single_device:
            return "single device"
        return (
            f"dp={self.data_parallel} tp={self.tensor_parallel} pp={self.pipeline_parallel} "
            f"zero={self.zero_stage}"
        )


SINGLE_DEVICE = Layout()


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device needs for training, by kind, and the assumptions behind them."""

    weights: int  # bytes
    gradients: int
    optimizer: int
    activations: int
    trainable_params: int
    total_params: int
    notes: list[str]  # assumptions, e.g. "activations: micro-batch 8 x 256 tokens, ..."
    activation_parts: dict[str, int] = field(default_factory=dict)  # sums to activations
    layout: Layout = SINGLE_DEVICE

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def table(self) -> str:
        """An aligned text table: one row per kind (activations broken down), then the total."""
        rows: list[tuple[str, int, str]] = [
            ("weights", self.weights, f"{self.total_params:,} params"),
            ("gradients", self.gradients, f"{self.trainable_params:,} trainable params"),
            ("optimizer", self.optimizer, "AdamW, 2 states per trainable param"),
            ("activations", self.activations, ""),
        ]
        rows += [(f"  {name}", size, "") for name, size in self.activation_parts.items()]
        rows.append(("total", self.total, ""))
        name_w = max(len(name) for name, _, _ in rows)
        size_w = max(len(format_bytes(size)) for _, size, _ in rows)
        header = f"memory per device ({self.layout.describe()})"
        lines = [header]
        for name, size, detail in rows:
            if name == "total":
                lines.append("-" * (name_w + 2 + size_w))
            line = f"{name:<{name_w}}  {format_bytes(size):>{size_w}}"
            lines.append(f"{line}  {detail}".rstrip())
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


def _linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    """A block's Linears in model order: short name -> (in_features, out_features, bias)."""
    h, i = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
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
    per_token: int  # bytes kept per token by one block
    per_token_position: int  # bytes kept per token per position of its row (T x T terms)
    weight_copies: int  # autocast's bf16 weight copies kept by this block (bytes, not per token)
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
) -> _Block:
    """Bytes autograd keeps for one block, per token (and per token x seq_len for T^2 terms)."""
    h, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    q_dim = heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    shapes = _linear_shapes(config)
    full = method == "full"
    lora = {s: _module_name(layer, s) in adapted_names for s in shapes}

    per_token = 0
    per_token_position = 0
    copies = 0

    def weight_copies(names: Sequence[str], grad_input: bool) -> int:
        # Under autocast, a matmul whose input needs a gradient keeps its bf16 weight.
        if not p.autocast:
            return 0
        total = 0
        for s in names:
            in_f, out_f, _ = shapes[s]
            if grad_input:
                total += in_f * out_f * 2
            if lora[s]:
                total += r * (in_f + out_f) * 2
        return total

    # Attention half.
    per_token += _norm(h, p, grad_in, full)
    grad_normed = grad_in or full
    qkv = ("q_proj", "k_proj", "v_proj")
    per_token += _linear_inputs(h, r, p.stream, p, [full] * 3, [lora[s] for s in qkv])
    copies += weight_copies(qkv, grad_normed)
    grad_qkv = grad_normed or full or any(lora[s] for s in qkv)
    if grad_qkv:
        if attention == "fused":
            # q, k, v, output, float32 log-sum-exp per head.
            per_token += (2 * q_dim + 2 * kv_dim) * p.compute + heads * _FLOAT32
            if document_mask:
                per_token_position += p.compute  # [B, 1, T, T] additive mask
            out_shared = True
        else:
            # Unfused math: scaled q, head-expanded k and v, and two float32 [H, T, T] tensors.
            per_token += 3 * q_dim * _FLOAT32
            per_token_position += 2 * heads * _FLOAT32
            out_shared = False
    else:
        out_shared = False
    per_token += _linear_inputs(q_dim, r, p.compute, p, [full], [lora["o_proj"]], out_shared)
    copies += weight_copies(("o_proj",), grad_qkv)
    grad_mid = grad_qkv or full or lora["o_proj"]

    # MLP half.
    per_token += _norm(h, p, grad_mid, full)
    grad_normed = grad_mid or full
    gate_up = ("gate_proj", "up_proj")
    per_token += _linear_inputs(h, r, p.stream, p, [full] * 2, [lora[s] for s in gate_up])
    copies += weight_copies(gate_up, grad_normed)
    grad_gate = grad_normed or full or any(lora[s] for s in gate_up)
    if grad_gate:
        per_token += 3 * inter * p.compute  # silu's input, silu's output, up's output
    per_token += _linear_inputs(inter, r, p.compute, p, [full], [lora["down_proj"]])
    copies += weight_copies(("down_proj",), grad_gate)
    grad_out = grad_gate or full or lora["down_proj"]
    return _Block(per_token, per_token_position, copies, grad_out)


def _per_rank(weights: int, gradients: int, optimizer: int, layout: Layout) -> tuple[int, int, int]:
    """Model states held by one rank. ZeRO / tensor / pipeline division goes here."""
    if not layout.single_device:
        raise NotImplementedError(
            f"per-rank estimates for {layout.describe()} are not implemented yet; "
            "only a single device is"
        )
    return weights, gradients, optimizer


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
    document_mask: packed rows attend through a boolean [B, 1, T, T] mask.
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

    h, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    tokens = micro_batch_size * seq_len
    param_bytes = param_dtype.itemsize
    autocast = autocast_bf16 and param_bytes > 2
    p = _Precision(stream=param_bytes, compute=2 if autocast else param_bytes, autocast=autocast)
    dtype_name = str(param_dtype).removeprefix("torch.")
    notes: list[str] = []

    # Model states.
    total_params = count_parameters(config)
    if method == "lora":
        adapted = lora_target_names(config, lora_targets)
        trainable = lora_parameters(config, lora_r, lora_targets)
        weights = total_params * param_bytes + trainable * LORA_DTYPE.itemsize
        total_params += trainable
        grad_bytes = LORA_DTYPE.itemsize
        notes.append(
            f"weights: {total_params - trainable:,} base params in {dtype_name} + {trainable:,} "
            f"LoRA params (r={lora_r}, {len(adapted)} Linears) in float32"
        )
    else:
        adapted = []
        trainable = total_params
        weights = total_params * param_bytes
        grad_bytes = param_bytes
        notes.append(f"weights: {total_params:,} params in {dtype_name}")
    gradients = trainable * grad_bytes
    optimizer = ADAM_STATES * trainable * grad_bytes
    state_dtype = "float32" if grad_bytes == 4 else dtype_name
    notes.append(f"gradients: the {trainable:,} trainable params, in {state_dtype}")
    notes.append(f"optimizer: AdamW, exp_avg and exp_avg_sq in {state_dtype} (like the params)")
    weights, gradients, optimizer = _per_rank(weights, gradients, optimizer, layout)

    # Activations of the blocks.
    adapted_names = set(adapted)
    grad = method == "full"  # the embedding's output needs a gradient only when it trains
    blocks = []
    for layer in range(layers):
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
        )
        blocks.append(block)
        grad = block.grad_out
    per_block = [b.per_token * tokens + b.per_token_position * tokens * seq_len for b in blocks]
    copies = sum(b.weight_copies for b in blocks)
    parts: dict[str, int] = {}
    if activation_checkpointing:
        inputs = layers * tokens * h * p.stream
        parts["block inputs (checkpointed)"] = inputs
        parts["one block recomputed"] = max(per_block) + max(b.weight_copies for b in blocks)
        copies = 0
    else:
        parts["blocks"] = sum(per_block)

    # The head and the loss.
    full = method == "full"
    head_params = vocab * h
    other = _norm(h, p, grad, full) * tokens
    if full:
        other += tokens * _INDEX  # the embedding keeps the token ids
    other += 2 * tokens * config.head_dim * p.stream  # rope cos/sin (per-row positions)
    if chunked_loss:
        chunk = min(loss_chunk_tokens, tokens)
        grad_hidden = tokens * h * p.stream
        grad_head = head_params * _FLOAT32 if full else 0
        logits = chunk * vocab * (_FLOAT32 + (p.compute if p.compute < _FLOAT32 else 0))
        parts["loss (chunked)"] = grad_hidden + grad_head + logits + tokens * _INDEX
        loss_note = (
            f"loss: chunked, {chunk} positions' float32 logits at a time, the hidden states' "
            "gradient made in forward"
            + (" and a float32 head-weight gradient" if full else "")
            + "; every position assumed to have a target"
        )
    else:
        if full:
            other += tokens * h * (2 if autocast else p.stream)  # lm_head's input
        if autocast:
            copies += head_params * 2  # lm_head's bf16 weight
        parts["loss (full logits)"] = 3 * tokens * vocab * _FLOAT32
        loss_note = (
            "loss: full float32 logits; at the loss's backward the log-softmax output, its "
            "gradient and the logits' gradient coexist (3 x tokens x vocab x 4 bytes)"
        )
    parts["head, norms, ids, rope"] = other
    if copies:
        parts["autocast bf16 weight copies"] = copies
    activations = sum(parts.values())

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
    notes.append(loss_note)
    if autocast:
        notes.append(
            "autocast keeps a bf16 copy of each Linear's input and weight for backward "
            "(frozen weights included)"
        )
    notes.append(
        "not counted: CUDA context, allocator fragmentation, transient gradients in "
        "backward, the batch itself (an approximation: expect the real peak somewhat higher)"
    )
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        trainable_params=trainable,
        total_params=total_params,
        notes=notes,
        activation_parts=parts,
        layout=layout,
    )
