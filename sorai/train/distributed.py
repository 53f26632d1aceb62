"""The process group and the device mesh: who this process is in a parallel run.

torchrun (or `sorai train --nproc N`, which runs it) starts one process per device and sets
RANK, LOCAL_RANK and WORLD_SIZE. `init()` joins them with NCCL on CUDA and gloo on the CPU, and
`ParallelDims` names the mesh's dimensions, outermost first:

    pp            pipeline stages (each rank holds a run of layers)
    dp_replicate  data-parallel copies (HSDP replication, DDP)
    dp_shard      data-parallel ranks sharing out the states (ZeRO stage 1-3)
    tp            tensor-parallel ranks (each Linear split across them)

tp is innermost so that it maps to the fastest links (NVLink within a node), pp outermost so
its point-to-point sends cross the slowest. A single process is the mesh 1 x 1 x 1 x 1 and
needs no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sorai.train.config import ConfigError, ParallelConfig, TrainConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


class LayoutError(ConfigError, ValueError):
    """A parallel layout that cannot run: sizes that do not make the world size, heads or
    layers that do not split over the ranks, a ZeRO stage the other dimensions exclude."""


def world_size() -> int:
    """The number of processes this run was started with (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def device_for_rank(requested: str | None) -> torch.device:
    """One device per process: cuda:LOCAL_RANK on a GPU machine, else the CPU."""
    if requested not in (None, "cuda") and not requested.startswith("cpu"):
        raise ConfigError(
            f"train.device {requested!r}: a parallel run takes one GPU per process "
            "(cuda:LOCAL_RANK); leave train.device unset, or set cuda or cpu"
        )
    if requested != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        return device
    if requested == "cuda":
        raise ConfigError("train.device cuda: no CUDA device is available")
    return torch.device("cpu")


def init(device: torch.device, timeout_s: float = 1800) -> None:
    """Join the process group: NCCL for CUDA devices, gloo for the CPU."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelDims:
    """The layout: how many ranks along each mesh dimension, and the ZeRO stage over dp_shard.

    dp_replicate x dp_shard is the data-parallel degree: that many ranks see different rows of
    each global batch. Their product with tp and pp is the world size.
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0

    @classmethod
    def from_config(cls, config: ParallelConfig, world: int) -> ParallelDims:
        """The layout for `world` processes; dp_shard -1 takes what the other sizes leave."""
        named = {"dp_replicate": config.dp_replicate, "tp": config.tp, "pp": config.pp}
        for name, size in named.items():
            if size < 1:
                raise LayoutError(f"parallel.{name} must be at least 1, got {size}")
        dp_shard = config.dp_shard
        fixed = config.dp_replicate * config.tp * config.pp
        if dp_shard == -1:
            if world % fixed:
                raise LayoutError(
                    f"the world size {world} is not divisible by dp_replicate x tp x pp = "
                    f"{config.dp_replicate} x {config.tp} x {config.pp} = {fixed}"
                )
            dp_shard = world // fixed
        elif dp_shard < 1:
            raise LayoutError(f"parallel.dp_shard must be at least 1 (or -1), got {dp_shard}")
        if fixed * dp_shard != world:
            raise LayoutError(
                f"the layout needs dp_replicate x dp_shard x tp x pp = {config.dp_replicate} x "
                f"{dp_shard} x {config.tp} x {config.pp} = {fixed * dp_shard} processes, but "
                f"the world size is {world}; change the layout or --nproc"
            )
        dims = cls(config.dp_replicate, dp_shard, config.tp, config.pp, config.zero_stage)
        dims.check()
        if dims.zero_stage == 0:
            # Nothing is sharded: every data-parallel rank is a replica.
            dims = cls(dims.dp, 1, dims.tp, dims.pp, 0)
        return dims

    def check(self) -> None:
        """Refuse a ZeRO stage the other dimensions exclude (sizes aside)."""
        if self.zero_stage == 1 and self.dp > 1 and (self.tp > 1 or self.pp > 1):
            raise LayoutError(
                "zero_stage 1 (DDP + ZeroRedundancyOptimizer) runs with data parallelism alone; "
                "with tp or pp use zero_stage 2, which also shards the gradients"
            )

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different rows."""
        return self.dp_replicate * self.dp_shard

    @property
    def sizes(self) -> dict[str, int]:
        return {
            "pp": self.pp,
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "tp": self.tp,
        }

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 runs the data parallelism: ZeRO-2/3, and ZeRO-0 next to tp or pp
        (replication only, over a shard dimension of 1), where DDP cannot run."""
        if self.dp == 1:
            return False
        return self.zero_stage >= 2 or (self.zero_stage == 0 and (self.tp > 1 or self.pp > 1))

    def describe(self) -> str:
        parts = [f"{name}{size}" for name, size in self.sizes.items() if size > 1]
        if self.dp > 1:
            parts.append(f"zero{self.zero_stage}")
        return " x ".join(parts) or "single process"

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The 4-D mesh (sizes 1 included, so every name always exists) with "dp" flattened
        from dp_replicate x dp_shard for data-parallel collectives."""
        mesh = init_device_mesh(device_type, tuple(self.sizes.values()), mesh_dim_names=MESH_DIMS)
        # The flattened view is what DDP, ZeRO-1 and the loss's all-reduce need; DeviceMesh
        # has no public flatten yet (torchtitan uses this too).
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return mesh


def check_layout(config: TrainConfig, world: int) -> ParallelDims:
    """The layout of `config` over `world` processes, or a one-line ConfigError; checked by
    the launcher before any process starts, and by each process."""
    dims = ParallelDims.from_config(config.parallel, world)
    if dims.pp > 1:
        check_microbatches(config.train.micro_batch_size, config.parallel.microbatches or dims.pp)
    return dims


def check_microbatches(micro_batch_size: int, microbatches: int) -> None:
    """A pipeline micro-batch is a whole number of the micro-batch's rows."""
    if microbatches < 1 or micro_batch_size % microbatches:
        raise LayoutError(
            f"train.micro_batch_size {micro_batch_size} does not split into "
            f"parallel.microbatches {microbatches} pipeline micro-batches"
        )
