"""The layout: the trainer's ParallelDims and pipeline split, resolved from a `parallel:`
section as the trainer resolves it."""

from __future__ import annotations

import pytest

from sorai.model.architectures import known_config
from sorai.train import pipeline
from sorai.train.config import ConfigError, ParallelConfig
from sorai.train.distributed import ParallelDims
from sorai.train.estimate import Layout, LayoutError, rank_parameters
from tests.train.estimate.models import BLOCK_8B, TINY_QWEN


def test_world_size_and_dp_shard_resolution() -> None:
    section = ParallelConfig(tp=8, pp=4)  # dp_shard -1
    layout = Layout.from_config(section, 64)
    assert (layout.dp_shard, layout.world_size, layout.zero_stage) == (2, 64, 3)
    assert Layout.from_config(section).dp_shard == 1  # no world size: -1 read as 1
    assert Layout.from_config(section).world_size == 32
    assert Layout.from_config(ParallelConfig(dp_replicate=2, tp=2), 8).dp_shard == 2
    with pytest.raises(
        LayoutError,
        match=r"dp_replicate x dp_shard x tp x pp = 1 x 3 x 8 x 4 = 96 processes, but the "
        r"world size is 64",
    ):
        Layout.from_config(ParallelConfig(dp_shard=3, tp=8, pp=4), 64)
    with pytest.raises(LayoutError, match=r"world size 60 is not divisible by .* = 32"):
        Layout.from_config(section, 60)
    with pytest.raises(LayoutError, match="dp_shard must be at least 1"):
        Layout.from_config(ParallelConfig(dp_shard=0), 8)


def test_pipeline_stage_split() -> None:
    config = known_config("llama-3-8b")  # 32 layers
    layout = Layout(pp=3)
    assert [len(r) for r in layout.stage_layers(32)] == [11, 11, 10]
    ranks = rank_parameters(config, layout, method="full")
    embed = head = 128256 * 4096
    assert [r.base for r in ranks] == [
        11 * BLOCK_8B + embed,
        11 * BLOCK_8B,
        10 * BLOCK_8B + 4096 + head,
    ]
    assert [r.describe() for r in ranks] == [
        "layers 0-10 + embedding",
        "layers 11-21",
        "layers 22-31 + head, loss",
    ]
    # pp_layers overrides the balance, and must add up.
    ranks = rank_parameters(config, Layout(pp=3, pp_layers=(8, 14, 10)), method="full")
    assert [r.base for r in ranks] == [8 * BLOCK_8B + embed, 14 * BLOCK_8B, ranks[2].base]
    with pytest.raises(LayoutError, match=r"sums to 31; the model has 32 layers"):
        rank_parameters(config, Layout(pp=3, pp_layers=(8, 13, 10)))
    with pytest.raises(LayoutError, match="needs 3 positive layer counts"):
        Layout(pp=3, pp_layers=(16, 16))
    with pytest.raises(LayoutError, match="too few for 4 pipeline stages"):
        rank_parameters(TINY_QWEN, Layout(pp=4))
    # Interleaved: two stages per rank, rank r running stages r and r + pp.
    ranks = rank_parameters(config, Layout(pp=2, pp_schedule="interleaved_1f1b"), method="full")
    assert [r.stages for r in ranks] == [(0, 2), (1, 3)]
    assert [r.layers for r in ranks] == [
        (range(0, 8), range(16, 24)),
        (range(8, 16), range(24, 32)),
    ]


def test_layout_is_the_trainers_parallel_dims() -> None:
    """One layout: Layout is the trainer's ParallelDims (sizes, world size, fsdp decided there)
    and cuts stages with sorai.train.pipeline's own functions; its errors are ConfigErrors."""
    section = ParallelConfig(
        dp_replicate=2, tp=2, pp=2, zero_stage=0, pp_schedule="interleaved_1f1b"
    )
    layout, dims = Layout.from_config(section, 16), ParallelDims.from_config(section, 16)
    assert isinstance(layout, ParallelDims)
    assert (layout.sizes, layout.fsdp, layout.world_size) == (dims.sizes, dims.fsdp, 16)
    assert layout.num_stages == 4
    assert layout.stage_layers(7) == pipeline.split_layers(7, 4, None)
    assert [layout.stage_ids(r) for r in (0, 1)] == [[0, 2], [1, 3]]
    # Without a pipeline no schedule runs: one stage, whatever pp_schedule says.
    assert Layout(pp_schedule="interleaved_1f1b").stage_ids(0) == [0]
    with pytest.raises(ConfigError, match="too few for 4 pipeline stages"):
        Layout(pp=4).stage_layers(2)
