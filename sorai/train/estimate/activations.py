"""Activation bytes: the tensors autograd keeps from the forward pass to the backward pass, per
block, per pipeline stage and per rank (measured with `torch.autograd.graph.saved_tensors_hooks`;
see tests/train/estimate/test_activations.py).

For one pipeline micro-batch of rows x seq_len tokens, per layer:

- each RMSNorm (2 per layer): its input upcast to float32 and the 1/rms per token, plus the
  normalised input when the norm's weight is trained;
- the input of every Linear that needs it: a trained weight needs its input, a frozen one only
  its weight. q/k/v share one input, gate/up another; o_proj's input is the attention output
  itself. A LoRA layer's A needs the input too (shared when the dtypes match, else a cast copy
  per layer), B needs A's r-wide output;
- attention: q, k, v, the output and a float32 log-sum-exp per head and token, as the fused
  kernels keep (flash / memory-efficient on CUDA, the flash kernel torch also uses on the CPU);
  no T x T matrix. attention="math" models the unfused path instead, which keeps two float32
  [heads, T, T] probability tensors and head-expanded k and v. document_mask=True adds the
  [B, 1, T, T] additive mask SDPA builds from a boolean mask and keeps, per layer;
- the MLP: gate output (silu's input), silu output and up output (the product's inputs), and
  the product when down_proj needs its input;
- under bf16 autocast, every Linear casts its input (a bf16 copy per Linear) and its weight (a
  bf16 copy of each weight matrix, frozen ones included) and keeps both. The copies of trained
  weights are cached for the step and counted once; frozen weights are cast, and kept, per
  micro-batch.

Multiplied by the tokens, summed over the layers. With full activation checkpointing only each
block's input is kept, plus one block's activations while it is recomputed; selective
checkpointing keeps the matmul outputs, LoRA A's outputs and the attention output besides.
The loss adds, with chunked_loss (sorai.train.loss): the gradient of the final hidden
states made in the forward pass, a float32 gradient of the head weight when it is trained, and
one chunk's float32 logits (plus a low-precision copy under bf16); without it (a plain loop:
full logits, then cross_entropy) three float32 [tokens, vocab] tensors at the peak of the
loss's backward: the log-softmax output, its gradient and the logits' gradient.

Under tensor parallelism activations of width heads x head_dim or intermediate divide by tp; the
[tokens, hidden] input of q/k/v and gate/up is all-gathered and kept whole; the norms (and the
residual stream kept under checkpointing) divide by tp only with sequence_parallel. Logits
divide by tp under loss_parallel.

Not counted: the transient gradients of activations during backward (a few [tokens, hidden] and
[tokens, intermediate] tensors at a time), kernel workspaces, and the data batch itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sorai.model.config import ModelConfig
from sorai.train.estimate.layout import Layout, ceil_div
from sorai.train.estimate.parameters import LORA_DTYPE, RankParameters, linear_shapes, module_name

FLOAT32 = 4  # bytes
_INDEX = 8  # int64 token ids / indices

# The activation rows of the table, in its order.
PARTS = (
    "block inputs (checkpointed)",
    "matmul outputs (selective)",
    "one block recomputed",
    "blocks",
    "loss (chunked)",
    "loss (full logits)",
    "head, norms, ids, rope",
    "autocast bf16 weight copies",
)


@dataclass(frozen=True)
class Precision:
    stream: int  # bytes per element of the residual stream and norm outputs (the weights' dtype)
    compute: int  # bytes per element of matmul inputs/outputs (bf16 under autocast)
    autocast: bool
    adapter: int = LORA_DTYPE.itemsize


def _norm(h: int, p: Precision, grad_in: bool, trained: bool) -> int:
    """RMSNorm: F.rms_norm keeps its float32 input and 1/rms; weight * normed keeps normed."""
    saved = 0
    if grad_in or trained:
        saved += h * FLOAT32 + FLOAT32
    if trained:
        saved += h * p.stream
    return saved


def _linear_inputs(
    in_features: int,
    r: int,
    input_bytes: int,
    p: Precision,
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
    kept_per_token: int  # bytes per token selective checkpointing keeps (matmul, attention out)


@dataclass(frozen=True)
class Workload:
    """What one pipeline micro-batch runs through a rank: the model, the layout, what trains,
    the micro-batch's shape and the options that change what autograd keeps."""

    config: ModelConfig
    layout: Layout
    method: str
    adapted: frozenset[str]  # LoRA's targeted Linears (module names)
    lora_r: int
    rows: int  # rows of one pipeline micro-batch
    seq_len: int
    precision: Precision
    activation_checkpointing: str  # none, selective or full (sorai.train.parallelize)
    chunked_loss: bool
    loss_chunk_tokens: int
    attention: str
    document_mask: bool

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def local_tokens(self) -> int:
        # Under sequence parallelism the norms and the residual stream hold a slice of each row.
        if self.layout.sequence_parallel:
            return self.rows * ceil_div(self.seq_len, self.layout.tp)
        return self.tokens

    @property
    def logits_vocab(self) -> int:
        # Logits are split on the vocabulary only when the loss runs on the sharded head.
        vocab = self.config.vocab_size
        return ceil_div(vocab, self.layout.tp) if self.layout.loss_parallel else vocab

    def block(self, layer: int, grad_in: bool) -> _Block:
        """Bytes autograd keeps for one block, per token (and per token x seq_len for T^2
        terms), on one tensor-parallel rank: its heads and its slice of the MLP."""
        config, p, r, tp = self.config, self.precision, self.lora_r, self.layout.tp
        h = config.hidden_size
        heads = config.num_attention_heads // tp
        shapes = linear_shapes(config, tp)
        q_dim, kv_dim = shapes["q_proj"][1], shapes["k_proj"][1]
        inter = shapes["gate_proj"][1]
        full = self.method == "full"
        lora = {s: module_name(layer, s) in self.adapted for s in shapes}

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
        out_shared = False
        if grad_qkv:
            if self.attention == "fused":
                # q, k, v, output, float32 log-sum-exp per head.
                per_token += (2 * q_dim + 2 * kv_dim) * p.compute + heads * FLOAT32
                if self.document_mask:
                    per_token_position += p.compute  # [B, 1, T, T] additive mask, every rank
                out_shared = True
            else:
                # Unfused math: scaled q, head-expanded k and v, and two float32 [H, T, T].
                per_token += 3 * q_dim * FLOAT32
                per_token_position += 2 * heads * FLOAT32
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
        # Selective checkpointing keeps every matmul's output (the LoRA B matmul's is redone),
        # LoRA A's r-wide outputs and the attention output with its log-sum-exp.
        kept_per_token = (2 * q_dim + 2 * kv_dim + 2 * h + 2 * inter) * p.compute
        kept_per_token += sum(lora.values()) * r * p.compute + heads * FLOAT32
        return _Block(
            per_token,
            per_local_token,
            per_token_position,
            copies,
            frozen_copies,
            grad_out,
            kept_per_token,
        )

    def stage(
        self, layers: range, first: bool, last: bool
    ) -> tuple[dict[str, int], dict[str, int]]:
        """One stage's activations: (kept per micro-batch in flight, kept once)."""
        p, h, full = self.precision, self.config.hidden_size, self.method == "full"
        tokens, local_tokens, seq_len = self.tokens, self.local_tokens, self.seq_len
        logits_vocab = self.logits_vocab
        head_params = logits_vocab * h  # the head (a tied one too) splits only under loss_parallel
        grad = full if first else True  # a later stage's input always comes with a gradient
        blocks = []
        for layer in layers:
            block = self.block(layer, grad)
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
        if self.activation_checkpointing in ("full", "selective"):
            each["block inputs (checkpointed)"] = len(layers) * local_tokens * h * p.stream
            once["one block recomputed"] = max(per_block, default=0) + max(
                (b.weight_copies + b.frozen_copies for b in blocks), default=0
            )
            copies = frozen_copies = 0
            if self.activation_checkpointing == "selective":
                kept = sum(b.kept_per_token for b in blocks) * tokens
                each["matmul outputs (selective)"] = kept
        else:
            each["blocks"] = sum(per_block)

        other = 2 * tokens * self.config.head_dim * p.stream  # rope cos/sin (per-row positions)
        if first and full:
            other += tokens * _INDEX  # the embedding keeps the token ids
        if last:
            other += _norm(h, p, grad, full) * local_tokens
            if self.chunked_loss:
                chunk = min(self.loss_chunk_tokens, tokens)
                grad_hidden = tokens * h * p.stream  # all-gathered rows under SP
                grad_head = head_params * FLOAT32 if full else 0
                each["loss (chunked)"] = grad_hidden + grad_head + tokens * _INDEX
                low_precision_copy = p.compute if p.compute < FLOAT32 else 0
                once["loss (chunked)"] = chunk * logits_vocab * (FLOAT32 + low_precision_copy)
            else:
                if full:
                    other += tokens * h * (2 if p.autocast else p.stream)  # lm_head's input
                if p.autocast:
                    if full:
                        copies += head_params * 2  # lm_head's bf16 weight
                    else:
                        frozen_copies += head_params * 2
                # The log-softmax output is kept per micro-batch; its gradient and the
                # logits' gradient join it at the loss's backward, one micro-batch at a time.
                each["loss (full logits)"] = tokens * logits_vocab * FLOAT32
                once["loss (full logits)"] = 2 * tokens * logits_vocab * FLOAT32
        each["head, norms, ids, rope"] = other
        # Autocast caches the cast of a trained weight for the whole autocast region (one
        # step); a frozen weight is cast again, and kept again, by every micro-batch.
        each["autocast bf16 weight copies"] = frozen_copies
        once["autocast bf16 weight copies"] = copies
        return each, once

    def rank(self, rank: RankParameters) -> tuple[dict[str, int], int]:
        """The activations a rank keeps at its peak, by table row (in PARTS order), and the
        number of pipeline micro-batches it keeps them for."""
        ranges = self.layout.stage_layers(self.config.num_hidden_layers)
        last_stage = self.layout.num_stages - 1
        stages = [self.stage(ranges[s], s == 0, s == last_stage) for s in rank.stages]
        counts = _in_flight_by_stage(
            [sum(each.values()) for each, _ in stages],
            self.layout.in_flight(rank.pp_rank),
            self.layout.pipeline_microbatches,
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
        return {name: parts[name] for name in PARTS if name in parts}, sum(counts)


def _in_flight_by_stage(
    per_microbatch: Sequence[int], in_flight: int, microbatches: int
) -> list[int]:
    """How many micro-batches each of a rank's stages keeps: `in_flight` forwards in all, at
    most `microbatches` per stage, counted on the heavier stage first (an upper bound when a
    rank runs two stages)."""
    counts = [0] * len(per_microbatch)
    left = in_flight
    for i in sorted(range(len(per_microbatch)), key=lambda i: -per_microbatch[i]):
        counts[i] = min(left, microbatches)
        left -= counts[i]
    return counts
