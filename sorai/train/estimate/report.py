"""The estimate as `sorai train --estimate` prints it: the per-rank table and its notes, and the
ZeRO stages side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sorai.train.estimate.layout import SINGLE_DEVICE, Layout

if TYPE_CHECKING:
    from sorai.train.estimate.activations import Workload
    from sorai.train.estimate.parameters import RankParameters

GIB = 1024**3
MIB = 1024**2


def format_bytes(size: int) -> str:
    """GiB from 1 GiB up, MiB below."""
    if size >= GIB:
        return f"{size / GIB:.2f} GiB"
    return f"{size / MIB:.1f} MiB"


def layout_title(layout: Layout) -> str:
    """The layout in words, for the table's header: "dp_shard 2 x tp 8, ZeRO-3: 16 ranks"."""
    if layout.single_device:
        return "single device"
    parts = []
    if layout.pp > 1:
        schedule = layout.pp_schedule.replace("interleaved_1f1b", "interleaved 1F1B")
        schedule = schedule.replace("1f1b", "1F1B").replace("gpipe", "GPipe")
        parts.append(f"pp {layout.pp} ({schedule}, {layout.pipeline_microbatches} micro-batches)")
    if layout.dp_replicate > 1:
        parts.append(f"dp_replicate {layout.dp_replicate}")
    if layout.dp_shard > 1:
        parts.append(f"dp_shard {layout.dp_shard}")
    if layout.tp > 1:
        parts.append(
            f"tp {layout.tp}" + (" (sequence parallel)" if layout.sequence_parallel else "")
        )
    text = " x ".join(parts)
    if layout.dp > 1:
        text += f", ZeRO-{layout.zero_stage}"
    return f"{text}: {layout.world_size} ranks"


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
            header = f"memory per rank ({layout_title(self.layout)})"
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


def state_notes(
    total_params: int,
    trainable: int,
    dtype_name: str,
    lora_r: int,
    adapted: int,
    grad_bytes: int,
    full: bool,
) -> list[str]:
    """What the weights, gradients and optimizer rows count, for the whole model."""
    if full:
        notes = [f"weights: {total_params:,} params in {dtype_name}"]
    else:
        notes = [
            f"weights: {total_params - trainable:,} base params in {dtype_name} + {trainable:,} "
            f"LoRA params (r={lora_r}, {adapted} Linears) in float32"
        ]
    state_dtype = "float32" if grad_bytes == 4 else dtype_name
    notes.append(f"gradients: the {trainable:,} trainable params, in {state_dtype}")
    notes.append(f"optimizer: AdamW, exp_avg and exp_avg_sq in {state_dtype} (like the params)")
    return notes


def activation_notes(work: Workload, micro_batch_size: int, dtype_name: str) -> list[str]:
    """What the activation rows assume: the micro-batch, precision, kernels and the loss."""
    full, autocast = work.method == "full", work.precision.autocast
    precision = f"{dtype_name} weights" + (", bf16 autocast" if autocast else "")
    kernel = (
        "fused SDPA (O(T) log-sum-exp, no T x T)"
        if work.attention == "fused"
        else "math SDPA (float32 T x T probabilities per head)"
    )
    checkpointing = work.activation_checkpointing
    notes = [
        f"activations: micro-batch {micro_batch_size} x {work.seq_len} tokens, {precision}, "
        f"checkpointing {checkpointing}, {kernel}"
        + (", packed-document mask" if work.document_mask else "")
    ]
    if not full:
        notes.append(
            "activations (LoRA): frozen Linears keep only their weights, adapted ones their "
            "input for A's gradient; nothing before the first adapter is kept (approximation "
            "of autograd's bookkeeping, within a few % on a measured tiny model)"
        )
    if work.chunked_loss:
        chunk = min(work.loss_chunk_tokens, work.tokens)
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
    return notes


def layout_notes(layout: Layout, rows: int, in_flight: int, rank: RankParameters) -> list[str]:
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
        if layout.zero_stage == 0 and layout.fsdp:
            stage = (
                "FSDP2 replication (DDP takes neither tp nor pp): weights, gradients and "
                "optimizer states replicated; every unit gathered from its forward to its "
                "backward"
            )
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


def layout_details(
    layout: Layout, rank: RankParameters, gathered: int, work: Workload, in_flight: int
) -> dict[str, str]:
    """The detail column of a parallel layout's table: what each row holds on this rank."""
    sharded = layout.zero_stage >= 2 and layout.dp_shard > 1
    details = {
        "weights": f"{rank.params:,} params on this rank"
        + (f", 1/{layout.dp_shard} of them at rest (ZeRO-{layout.zero_stage})" if sharded else ""),
        "gradients": f"{rank.trainable:,} trainable params on this rank"
        + (f", 1/{layout.dp_shard} of them" if sharded else ""),
    }
    if layout.zero_stage >= 1 and layout.dp_shard > 1:
        details["optimizer"] = f"AdamW, 2 states per trainable param, 1/{layout.dp_shard}"
    if gathered:
        keeper = "FSDP2's replication" if layout.zero_stage == 0 else "ZeRO-2"
        details["gathered weights (transient)"] = (
            "2 blocks (running + prefetched) + root unit, unsharded"
            if layout.zero_stage == 3
            else f"all this rank's weights, unsharded ({keeper} keeps them from forward to "
            "backward)"
        )
    if layout.pp > 1:
        details["activations"] = (
            f"{in_flight} pipeline micro-batch{'es' if in_flight > 1 else ''} of "
            f"{work.rows} x {work.seq_len} tokens in flight"
        )
    return details


def not_counted(layout: Layout) -> str:
    return (
        "not counted: CUDA context, allocator fragmentation, transient gradients in "
        "backward, the batch itself (an approximation: expect the real peak somewhat higher)"
        + (
            "; DDP's gradient buckets, FSDP2's unsharded gradient of a unit before its "
            "reduce-scatter, collective buffers"
            if not layout.single_device
            else ""
        )
    )


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
        # Next to tp or pp stage 0 replicates on FSDP2 (which gathers), as the trainer runs it.
        replicate = "nothing (FSDP2)" if self.stages[0].gathered else "nothing (DDP)"
        what = [replicate, "optimizer", "+ gradients", "+ weights"]
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
        if self.model_parallel:
            lines.append(
                "- stage 1 with tp or pp is for comparison only: sorai refuses it "
                "(ZeroRedundancyOptimizer runs on DDP, which takes neither tensor-parallel "
                "weights nor a pipeline)"
                + (
                    "; stage 0 replicates on FSDP2 instead, and gathers as stage 2 does"
                    if self.stages[0].gathered
                    else ""
                )
            )
        lines.append(
            "- sorai: float32 weights (bf16 only under autocast), float32 gradients and AdamW "
            "states; stages 2-3 are FSDP2, whose gathered weights add a transient (stage 2: "
            "every unit until its backward; stage 3: two blocks and the root unit)"
        )
        return "\n".join(lines)
