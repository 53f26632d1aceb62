"""Memory per rank: model states under each ZeRO stage, against the ZeRO paper's accounting and
by hand, and the `sorai train --estimate` command."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sorai.model.architectures import known_config
from sorai.train.config import ParallelConfig, resolve
from sorai.train.estimate import (
    Layout,
    LayoutError,
    MemoryEstimate,
    count_parameters,
    estimate_memory,
    format_bytes,
    lora_parameters,
    zero_stages,
)
from tests.train.estimate.models import BLOCK_8B, PSI_8B, ROOT_8B, TINY, B, T


def test_model_states() -> None:
    n = count_parameters(TINY)
    full = estimate_memory(TINY, method="full", micro_batch_size=B, seq_len=T)
    assert (full.weights, full.gradients, full.optimizer) == (4 * n, 4 * n, 8 * n)
    assert full.trainable_params == full.total_params == n
    half = estimate_memory(
        TINY, method="full", micro_batch_size=B, seq_len=T, param_dtype=torch.bfloat16
    )
    assert (half.weights, half.gradients, half.optimizer) == (2 * n, 2 * n, 4 * n)
    lora = estimate_memory(
        TINY, micro_batch_size=B, seq_len=T, param_dtype=torch.bfloat16, lora_r=4
    )
    k = lora_parameters(TINY, 4, "all-linear")
    assert (lora.trainable_params, lora.total_params) == (k, n + k)
    assert (lora.weights, lora.gradients, lora.optimizer) == (2 * n + 4 * k, 4 * k, 8 * k)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method"):
        estimate_memory(TINY, method="qlora", micro_batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        estimate_memory(TINY, micro_batch_size=1, seq_len=0)
    with pytest.raises(LayoutError, match="dp_shard must be a positive integer"):
        Layout(dp_shard=0)
    with pytest.raises(LayoutError, match="zero_stage"):
        Layout(zero_stage=4)
    with pytest.raises(LayoutError, match="pp_schedule"):
        Layout(pp=2, pp_schedule="zb")
    # A pipeline micro-batch needs a row.
    with pytest.raises(LayoutError, match="micro_batch_size 3 does not split into"):
        estimate_memory(TINY, micro_batch_size=3, seq_len=8, layout=Layout(pp=2))
    # As the trainer (ParallelDims.check): ZeRO-1 runs with data parallelism alone.
    for layout in (Layout(tp=2, dp_shard=2, zero_stage=1), Layout(pp=2, dp_shard=2, zero_stage=1)):
        with pytest.raises(LayoutError, match="zero_stage 1 .* with tp or pp use zero_stage 2"):
            estimate_memory(TINY, micro_batch_size=2, seq_len=8, layout=layout)


def test_the_trainers_layout_decisions_win() -> None:
    """The estimator used to refuse tp next to ZeRO-0 (and next to ZeRO-1 on a single
    data-parallel rank) and to count ZeRO-0 next to pp as DDP. The trainer runs them all:
    ZeRO-0 next to tp or pp replicates on FSDP2 (ParallelDims.fsdp), whose units stay gathered
    from forward to backward as under ZeRO-2."""
    kwargs = dict(method="full", micro_batch_size=2, seq_len=8)
    # ZeRO-1 on one data-parallel rank shards nothing: the plain tp layout.
    one = estimate_memory(TINY, layout=Layout(tp=2, zero_stage=1), **kwargs)
    assert one.total == estimate_memory(TINY, layout=Layout(tp=2), **kwargs).total
    for section in (ParallelConfig(zero_stage=0, tp=2), ParallelConfig(zero_stage=0, pp=2)):
        layout = Layout.from_config(section, 4)
        assert layout.fsdp and (layout.dp_replicate, layout.dp_shard) == (2, 1)
        estimate = estimate_memory(TINY, layout=layout, **kwargs)
        # Replicated (nothing divided: float32 weights, gradients, two AdamW states), and
        # every unit gathered.
        assert estimate.gradients == estimate.weights and estimate.optimizer == 2 * estimate.weights
        assert estimate.gathered == estimate.weights
        assert "data parallel: FSDP2 replication" in estimate.report()
        alone = estimate_memory(TINY, layout=dataclasses.replace(layout, dp_replicate=1), **kwargs)
        assert alone.gathered == 0  # no data parallelism, no FSDP2
        stages = zero_stages(TINY, layout, method="full").stages
        assert stages[0].gathered == stages[2].gathered > 0
    assert "0      nothing (FSDP2)" in zero_stages(TINY, Layout(tp=2, dp_shard=2)).table()
    # Data parallelism alone replicates with DDP, which gathers nothing.
    ddp = estimate_memory(
        TINY, layout=Layout.from_config(ParallelConfig(zero_stage=0), 2), **kwargs
    )
    assert ddp.gathered == 0 and "data parallel: DDP" in ddp.report()
    assert zero_stages(TINY, 2).stages[0].gathered == 0
    assert "0      nothing (DDP)" in zero_stages(TINY, 2).table()


def test_estimate_is_frozen() -> None:
    estimate = estimate_memory(TINY, micro_batch_size=1, seq_len=8)
    assert isinstance(estimate, MemoryEstimate)
    with pytest.raises(AttributeError):
        estimate.weights = 0  # type: ignore[misc]


# Per rank at N_d data-parallel ranks: (paper, sorai at rest, sorai's gathered transient).
def _zero_by_hand(n: int) -> list[tuple[int, int, int]]:
    psi = PSI_8B
    gathered_3 = 4 * (2 * BLOCK_8B + ROOT_8B)  # two blocks + the root unit, float32
    return [
        (16 * psi, 16 * psi, 0),
        (4 * psi + 12 * psi // n, 8 * psi + 8 * psi // n, 0),
        (2 * psi + 14 * psi // n, 16 * psi // n, 4 * psi),
        (16 * psi // n, 16 * psi // n, gathered_3),
    ]


@pytest.mark.parametrize("n", [2, 64])
def test_zero_stages_llama_3_8b(n: int) -> None:
    assert PSI_8B % 64 == 0  # so every division below is exact
    table = zero_stages(known_config("llama-3-8b"), n, method="full")
    assert (table.dp_shard, table.params, table.trainable) == (n, PSI_8B, PSI_8B)
    got = [(z.paper, z.sorai, z.gathered) for z in table.stages]
    assert got == _zero_by_hand(n)
    if n == 64:
        # The paper's headline: stage 3 over 64 ranks, 16Ψ / 64 = 1.87 GiB.
        assert format_bytes(table.stages[3].paper) == "1.87 GiB"
        assert got[1][0] == 33_626_718_976 and got[2][0] == 17_817_142_144
    text = table.table()
    assert f"dp_shard = {n}" in text and "paper 2Ψ+2Ψ+12Ψ" in text
    assert len([line for line in text.splitlines() if line[:1].isdigit()]) == 4


@pytest.mark.parametrize("n", [2, 64])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_estimate_memory_per_zero_stage(n: int, stage: int) -> None:
    config = known_config("llama-3-8b")
    layout = Layout(dp_shard=n, zero_stage=stage)
    kwargs = dict(method="full", micro_batch_size=1, seq_len=256)
    estimate = estimate_memory(config, layout=layout, **kwargs)
    psi = PSI_8B
    weights, gradients, optimizer = 4 * psi, 4 * psi, 8 * psi
    if stage >= 1:
        optimizer //= n
    if stage >= 2:
        weights //= n
        gradients //= n
    held = (estimate.weights, estimate.gradients, estimate.optimizer, estimate.gathered)
    assert held == (weights, gradients, optimizer, _zero_by_hand(n)[stage][2])
    # Data parallelism splits the batch, not a rank's micro-batch: activations as one device's.
    single = estimate_memory(config, **kwargs)
    assert estimate.activations == single.activations
    assert estimate.total == sum(held) + estimate.activations
    table = estimate.table()
    assert table.startswith(f"memory per rank (dp_shard {n}, ZeRO-{stage}: {n} ranks)")
    assert ("gathered weights (transient)" in table) == (stage >= 2)


def test_zero_stages_lora_and_replicas() -> None:
    config = known_config("llama-3-8b")
    k = lora_parameters(config, 16, "all-linear")
    table = zero_stages(config, 64, method="lora", lora_r=16)
    psi = PSI_8B + k
    assert (table.params, table.trainable) == (psi, k)
    paper = [z.paper for z in table.stages]
    assert paper == [
        2 * psi + 14 * k,
        2 * psi + 2 * k + -(-12 * k // 64),
        2 * psi + -(-14 * k // 64),
        -(-(2 * psi + 14 * k) // 64),
    ]
    # sorai at stage 1: float32 weights (frozen ones included) and gradients, optimizer / 64.
    assert table.stages[1].sorai == 4 * psi + 4 * k + 8 * k // 64
    # HSDP: replicas hold copies; only dp_shard divides, but FSDP2 still gathers.
    hsdp = estimate_memory(
        config,
        method="full",
        micro_batch_size=1,
        seq_len=64,
        layout=Layout(dp_replicate=4, dp_shard=2, zero_stage=3),
    )
    assert (hsdp.weights, hsdp.optimizer) == (4 * PSI_8B // 2, 8 * PSI_8B // 2)
    assert hsdp.gathered == 4 * (2 * BLOCK_8B + ROOT_8B)
    # One data-parallel rank: no stage shards or gathers anything.
    alone = estimate_memory(
        config, method="full", micro_batch_size=1, seq_len=64, layout=Layout(zero_stage=3)
    )
    assert (alone.weights, alone.gathered) == (4 * PSI_8B, 0)
    assert alone.table().startswith("memory per device (single device)")


def test_command_estimate_for_a_known_architecture(monkeypatch) -> None:
    """`sorai train --estimate --model llama-3-70b ...` reads no checkpoint."""
    from sorai import hub
    from sorai.train import command

    def no_download(name: str):
        raise AssertionError(f"resolved {name}")

    monkeypatch.setattr(hub, "resolve", no_download)
    overrides = {
        "model": "llama-3-70b",
        "method": "full",
        "parallel": {"tp": 8, "pp": 4},
        "data": {"train": "x.jsonl"},
    }
    config = resolve(None, overrides)
    text = command._estimate(config, 64)
    assert "memory per rank (pp 4 (1F1B, 4 micro-batches) x dp_shard 2 x tp 8" in text
    assert "ZeRO-3: 64 ranks" in text and "gathered weights (transient)" in text
    assert "by ZeRO stage over dp_shard = 2" in text
    assert "dp_shard 2" not in command._estimate(config, None)  # the layout's own 32 ranks
    with pytest.raises(LayoutError, match="but the world size is 48"):
        command._estimate(
            resolve(None, {**overrides, "parallel": {"dp_shard": 2, "tp": 8, "pp": 4}}), 48
        )
