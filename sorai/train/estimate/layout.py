"""The parallel layout the estimate is for: the trainer's ParallelDims plus the options of the
`parallel:` section that shape memory, with the pipeline's stages as sorai.train.pipeline cuts them.

The mesh is pp x dp_replicate x dp_shard x tp, and micro_batch_size stays per data-parallel
rank. Pipeline parallel (pp): the layers split into stages by `pipeline.split_layers` (balanced
by count, the first stages taking the extra layers, or `pp_layers`); interleaved 1F1B gives each
rank two stages, r and r + pp. The first stage holds the embedding, the last the final norm,
head and loss. The micro-batch's rows split evenly into `microbatches` pipeline micro-batches
(default pp), of which a rank keeps the activations of: all (GPipe), pp - rank (1F1B), torch's
warm-up count + 1 (interleaved).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from sorai.model.config import ModelConfig
from sorai.train import pipeline
from sorai.train.distributed import LayoutError, ParallelDims

if TYPE_CHECKING:
    from sorai.train.config import ParallelConfig


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Layout(ParallelDims):
    """How one model is spread over ranks: the trainer's ParallelDims (dp_replicate x dp_shard
    x tp x pp ranks, ZeRO `zero_stage` over dp_shard, `fsdp` as the trainer decides it) and the
    tensor- and pipeline-parallel options.

    The default is a single device holding everything. `from_config` builds one from the
    training config's `parallel:` section and a world size, as the trainer resolves it.
    """

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
        if self.pp_schedule not in pipeline.SCHEDULES:
            raise LayoutError(
                f"parallel.pp_schedule must be one of {', '.join(pipeline.SCHEDULES)}, "
                f"got {self.pp_schedule!r}"
            )
        m = self.microbatches
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise LayoutError(f"parallel.microbatches must be a positive integer, got {m!r}")
        if self.pp_layers is not None:
            object.__setattr__(self, "pp_layers", tuple(self.pp_layers))  # hashable, frozen
            pipeline.check_pp_layers(list(self.pp_layers), self.num_stages)
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
        dims = ParallelDims.from_config(parallel, world_size)  # the trainer's own resolution
        return cls(
            **{f.name: getattr(dims, f.name) for f in fields(ParallelDims)},
            sequence_parallel=parallel.sequence_parallel,
            loss_parallel=parallel.loss_parallel,
            pp_schedule=parallel.pp_schedule,
            microbatches=parallel.microbatches,
            pp_layers=None if parallel.pp_layers is None else tuple(parallel.pp_layers),
        )

    @property
    def single_device(self) -> bool:
        # One rank: no ZeRO stage divides or gathers anything.
        return self.world_size == 1

    @property
    def stages_per_rank(self) -> int:
        return pipeline.stages_per_rank(self.pp, self.pp_schedule)

    @property
    def interleaved(self) -> bool:
        return self.stages_per_rank > 1

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
        return pipeline.stage_ids(pp_rank, self.pp, self.pp_schedule)

    def stage_layers(self, num_layers: int) -> list[range]:
        """Each stage's layers, as the trainer's pipeline splits them."""
        pp_layers = None if self.pp_layers is None else list(self.pp_layers)
        return pipeline.split_layers(num_layers, self.num_stages, pp_layers)

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

    def check_model(self, config: ModelConfig) -> None:
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


SINGLE_DEVICE = Layout()
