"""Pipeline parallelism: the model's blocks split into stages, run by torch.distributed.pipelining.

A stage is the Transformer with the other stages' parts deleted (the model is built for this:
blocks live in a ModuleDict keyed by layer number, and the embedding, final norm and head may be
None), so parameter names stay those of the whole model and checkpoints written by one layout
load in another. The first stage keeps the embedding, the last the final norm and the head; the
loss is computed on the last stage and all-reduced so that every rank reports it.

Schedules: GPipe (all forwards, then all backwards: activations of every micro-batch alive at
once), 1F1B (a backward as soon as possible: at most pp micro-batches in flight on the first
stage) and interleaved 1F1B (two stages per rank, a smaller bubble for more messages).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sorai.train.config import ParallelConfig
from sorai.train.distributed import LayoutError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from sorai.model.transformer import Transformer

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def stages_per_rank(pp: int, schedule: str) -> int:
    """Stages each pipeline rank runs: 2 under interleaved 1F1B, else 1 (and 1 without a
    pipeline, pp 1, which runs no schedule at all)."""
    return 2 if schedule == "interleaved_1f1b" and pp > 1 else 1


def check_pp_layers(pp_layers: list[int], num_stages: int) -> None:
    """`pp_layers` must give each of the `num_stages` stages a positive number of layers."""
    if len(pp_layers) != num_stages or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in pp_layers
    ):
        raise LayoutError(
            f"parallel.pp_layers {pp_layers}: needs {num_stages} positive layer counts "
            "(one per stage)"
        )


def split_layers(num_layers: int, num_stages: int, pp_layers: list[int] | None) -> list[range]:
    """Layer ranges of each stage: `pp_layers` when given, else balanced by count (the first
    stages take one more layer when they do not divide evenly)."""
    if pp_layers is not None:
        check_pp_layers(pp_layers, num_stages)
        if sum(pp_layers) != num_layers:
            raise LayoutError(
                f"parallel.pp_layers {pp_layers} sums to {sum(pp_layers)}; the model has "
                f"{num_layers} layers"
            )
        counts = list(pp_layers)
    else:
        if num_layers < num_stages:
            raise LayoutError(
                f"the model has {num_layers} layers, too few for {num_stages} pipeline stages"
            )
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (1 if s < extra else 0) for s in range(num_stages)]
    ranges, start = [], 0
    for n in counts:
        ranges.append(range(start, start + n))
        start += n
    return ranges


def stage_ids(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """The stages this pipeline rank runs: its own, plus rank + pp, ... when interleaved
    (a loop over the ranks, so consecutive stages always live on neighbouring ranks)."""
    return [pp_rank + k * pp for k in range(stages_per_rank(pp, schedule))]


def check_tied_embeddings(tied: bool, trained: bool) -> None:
    """A tied embedding and head on two stages are two copies: fine frozen, refused trained."""
    if tied and trained:
        raise LayoutError(
            "pipeline parallelism with tied embeddings (tie_word_embeddings) needs the embedding "
            "and the head on one stage; full fine-tuning would train two diverging copies. Use "
            "LoRA (the embedding is frozen), or tp/dp without pp"
        )


def cut(model: Transformer, layers: range, first: bool, last: bool) -> Transformer:
    """`model` with only `layers` (and the embedding if first, the norm and head if last)."""
    for name in list(model.layers.keys()):
        if int(name) not in layers:
            del model.layers[name]
    if not first:
        model.embed_tokens = None
    if not last:
        model.norm = None
        model.lm_head = None
    return model


def build_stage_models(
    model: Transformer, config: ParallelConfig, pp_rank: int, full_finetune: bool
) -> tuple[list[Transformer], list[int], int]:
    """This rank's stage models, their stage indices, and the number of stages."""
    check_tied_embeddings(
        model.config.tie_word_embeddings,
        full_finetune and model.lm_head is not None and model.lm_head.weight.requires_grad,
    )
    num_stages = config.pp * stages_per_rank(config.pp, config.pp_schedule)
    ranges = split_layers(model.config.num_hidden_layers, num_stages, config.pp_layers)
    ids = stage_ids(pp_rank, config.pp, config.pp_schedule)
    models = []
    for i, stage in enumerate(ids):
        # The last of this rank's stages takes the model itself; the others a copy.
        part = model if i == len(ids) - 1 else copy.deepcopy(model)
        models.append(cut(part, ranges[stage], stage == 0, stage == num_stages - 1))
    return models, ids, num_stages


def build_schedule(
    stage_models: list[torch.nn.Module],
    ids: list[int],
    num_stages: int,
    mesh: DeviceMesh,
    device: torch.device,
    config: ParallelConfig,
    microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """The pipeline schedule over this rank's stages; the loss is already normalised by the
    step's targets, so the schedule must not scale gradients by the micro-batch count."""
    # Imported here: the layout functions above serve the memory estimate too, which should
    # not pay the seconds torch.distributed.pipelining takes to import.
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    group = mesh.get_group()
    stages = [
        PipelineStage(module, stage, num_stages, device, group=group)
        for module, stage in zip(stage_models, ids, strict=True)
    ]
    if config.pp_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[config.pp_schedule]
    return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
