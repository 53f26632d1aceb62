"""Parameter counts equal the real model's, whole and per rank under the trainer's own tensor
and pipeline split."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from sorai.model.architectures import known_config
from sorai.model.config import ModelConfig
from sorai.model.gguf import GGUFFile
from sorai.model.lora import LoRAConfig, LoRAError, apply_lora
from sorai.model.transformer import Transformer
from sorai.train.config import ParallelConfig
from sorai.train.estimate import (
    Layout,
    LayoutError,
    count_parameters,
    estimate_memory,
    lora_parameters,
    rank_parameters,
)
from tests.train.estimate.models import (
    BLOCK_8B,
    PSI_8B,
    ROOT_8B,
    TINY,
    TINY_BIAS,
    TINY_QWEN,
    B,
    T,
    meta_model,
    numel,
)


@pytest.mark.parametrize("config", [TINY, TINY_QWEN, TINY_BIAS], ids=["llama", "qwen2", "bias"])
def test_count_parameters_is_the_models(config: ModelConfig) -> None:
    assert count_parameters(config) == numel(meta_model(config))


@pytest.mark.parametrize(
    "targets",
    [
        "all-linear",
        ["q_proj", "v_proj"],
        ["mlp.down_proj", "o_proj"],
        ["layers.1.self_attn.k_proj"],
    ],
)
@pytest.mark.parametrize("config", [TINY, TINY_QWEN], ids=["llama", "qwen2"])
def test_lora_parameters_are_apply_loras(config: ModelConfig, targets) -> None:
    adapter = apply_lora(meta_model(config), LoRAConfig(r=4, target_modules=targets))
    assert lora_parameters(config, 4, targets) == adapter.num_parameters()


def test_lora_targets_are_checked_as_apply_lora_checks_them() -> None:
    with pytest.raises(LoRAError, match="matches no Linear"):
        lora_parameters(TINY, 8, ["qkv_proj"])
    with pytest.raises(LoRAError, match="string"):
        lora_parameters(TINY, 8, "q_proj")
    with pytest.raises(LoRAError, match="rank"):
        lora_parameters(TINY, 0, "all-linear")


def test_default_model_counts(default_gguf: Path) -> None:
    config = GGUFFile(default_gguf).config()
    assert count_parameters(config) == numel(meta_model(config))
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        adapter = apply_lora(meta_model(config), LoRAConfig(r=8, target_modules=targets))
        assert lora_parameters(config, 8, targets) == adapter.num_parameters()


@pytest.mark.parametrize(("name", "expected"), [("llama-3-8b", 8.03e9), ("llama-3-70b", 70.6e9)])
def test_known_configs(name: str, expected: float) -> None:
    """The named architectures (tests/model/test_config.py checks the registry itself)."""
    config = known_config(name)
    assert count_parameters(config) == pytest.approx(expected, rel=0.005)
    assert count_parameters(config) == numel(meta_model(config))


def test_hand_numbers_are_the_models() -> None:
    config = known_config("llama-3-8b")
    assert count_parameters(config) == PSI_8B == 32 * BLOCK_8B + ROOT_8B
    (rank,) = rank_parameters(config, method="full")
    assert (rank.base, rank.adapter, rank.trainable) == (PSI_8B, 0, PSI_8B)
    assert rank.blocks == ((BLOCK_8B, 0),) * 32 and rank.root == ROOT_8B
    for config in (TINY, TINY_QWEN, TINY_BIAS):
        (rank,) = rank_parameters(config, lora_r=4)
        assert rank.base == count_parameters(config)
        assert rank.adapter == rank.trainable == lora_parameters(config, 4, "all-linear")


def test_tensor_parallel_shapes() -> None:
    """TINY over tp=2, from its shapes: h 64, MLP 176, 4 heads of 16, 2 kv heads, vocab 512."""
    block = (
        64 * 32  # q_proj: column-parallel, 2 of 4 heads
        + 2 * 64 * 16  # k_proj, v_proj: 1 of 2 kv heads each
        + 32 * 64  # o_proj: row-parallel, 32 of 64 inputs
        + 2 * 64 * 88  # gate_proj, up_proj: 88 of 176 outputs
        + 88 * 64  # down_proj: 88 of 176 inputs
        + 2 * 64  # the norms, replicated
    )
    vocab_half = 256 * 64
    (rank,) = rank_parameters(TINY, Layout(tp=2), method="full")
    assert rank.base == 2 * block + 2 * vocab_half + 64  # embedding and head split, final norm
    (rank,) = rank_parameters(TINY, Layout(tp=2, loss_parallel=False), method="full")
    # The head whole without loss_parallel.
    assert rank.base == 2 * block + vocab_half + 512 * 64 + 64
    # LoRA r=4: A (r x in) and B (out x r). Column bases: A whole, B split; row bases: A split,
    # B whole.
    adapter = (
        (4 * 64 + 32 * 4)  # q_proj
        + 2 * (4 * 64 + 16 * 4)  # k_proj, v_proj
        + (4 * 32 + 64 * 4)  # o_proj
        + 2 * (4 * 64 + 88 * 4)  # gate_proj, up_proj
        + (4 * 88 + 64 * 4)  # down_proj
    )
    (rank,) = rank_parameters(TINY, Layout(tp=2), lora_r=4)
    assert (rank.adapter, rank.trainable) == (2 * adapter, 2 * adapter)
    estimate = estimate_memory(TINY, lora_r=4, micro_batch_size=B, seq_len=T, layout=Layout(tp=2))
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (
        4 * rank.base + 4 * 2 * adapter,
        4 * 2 * adapter,
        8 * 2 * adapter,
    )
    # Biases: column-parallel ones split with their outputs, row-parallel ones whole.
    (rank,) = rank_parameters(TINY_BIAS, Layout(tp=2), method="full")
    h = 32  # 4 heads of 8 and 4 kv heads: 16 wide per rank; MLP 80: 40 per rank
    linears = 3 * (h * 16 + 16) + (16 * h + h) + 2 * (h * 40 + 40) + (40 * h + h)
    assert rank.base == 2 * (linears + 2 * h) + 2 * 100 * h + h


def test_gqa_and_head_divisibility() -> None:
    with pytest.raises(LayoutError, match=r"num_key_value_heads \(2\) is not divisible.*GQA"):
        estimate_memory(TINY, micro_batch_size=1, seq_len=8, layout=Layout(tp=4))
    with pytest.raises(LayoutError, match=r"num_attention_heads \(6\) is not divisible"):
        rank_parameters(TINY_QWEN, Layout(tp=4))
    with pytest.raises(LayoutError, match=r"intermediate_size \(171\)"):
        rank_parameters(dataclasses.replace(TINY, intermediate_size=171), Layout(tp=2))
    rank_parameters(known_config("llama-3-70b"), Layout(tp=8))  # 64 heads, 8 kv heads


def test_pipeline_tied_embeddings() -> None:
    """TINY_QWEN (tied, 3 layers) over pp=2: layers 0-1 + embedding, layer 2 + its own copy."""
    h, vocab = 96, 300
    block = count_parameters(TINY_QWEN) - vocab * h - h
    block //= 3
    ranks = rank_parameters(TINY_QWEN, Layout(pp=2), lora_r=4)
    assert [r.base for r in ranks] == [2 * block + vocab * h, block + h + vocab * h]
    assert sum(r.base for r in ranks) == count_parameters(TINY_QWEN) + vocab * h  # one copy more
    with pytest.raises(LayoutError, match="tied embeddings"):
        rank_parameters(TINY_QWEN, Layout(pp=2), method="full")
    # Without a pipeline the tie is one weight, split on the vocabulary by tp with the head.
    (rank,) = rank_parameters(TINY_QWEN, Layout(tp=2), method="full")
    assert rank.root == vocab // 2 * h + h


# --- against the trainer's own layouts ------------------------------------------------------


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "interleaved_1f1b"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_pipeline_split_is_the_trainers(method: str, schedule: str) -> None:
    """rank_parameters against the stage models sorai.train.pipeline builds (meta device)."""
    pipeline = pytest.importorskip("sorai.train.pipeline")
    config = dataclasses.replace(TINY, num_hidden_layers=7)
    targets = ["q_proj", "down_proj"]
    for pp, pp_layers in ((2, None), (3, None), (3, [1, 2, 4])):
        if schedule == "interleaved_1f1b" and pp_layers is not None:
            pp_layers = [1, 1, 1, 1, 1, 2]
        section = ParallelConfig(pp=pp, pp_schedule=schedule, pp_layers=pp_layers)
        layout = Layout.from_config(section)
        ranks = rank_parameters(config, layout, method=method, lora_r=4, lora_targets=targets)
        for rank in ranks:
            model = meta_model(config)
            if method == "lora":
                apply_lora(model, LoRAConfig(r=4, target_modules=targets))
            models, ids, _ = pipeline.build_stage_models(
                model, section, rank.pp_rank, method == "full"
            )
            names = [(n, p.numel()) for m in models for n, p in m.named_parameters()]
            base = sum(n for name, n in names if "lora_" not in name)
            adapter = sum(n for name, n in names if "lora_" in name)
            assert (base, adapter, tuple(ids)) == (rank.base, rank.adapter, rank.stages)


@pytest.fixture
def fake_tp_mesh():
    """A 2-rank tensor-parallel mesh on torch's fake process group: real DTensor shapes,
    no communication (this process plays rank 0)."""
    dist = pytest.importorskip("torch.distributed")
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("fake", rank=0, world_size=2, store=fake_pg.FakeStore())
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


def _kept_for_backward(model: Transformer, tokens: torch.Tensor, local) -> int:
    """Bytes autograd keeps over the forward to the final norm (storages of `local(t)`,
    parameters left out)."""
    params = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = local(t).untyped_storage()
        if storage.data_ptr() not in params:
            kept.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, head=False)
    return sum(kept.values())


@pytest.mark.parametrize("config", [TINY, TINY_QWEN, TINY_BIAS], ids=["llama", "qwen2", "bias"])
def test_tensor_parallel_is_the_trainers(fake_tp_mesh, config: ModelConfig) -> None:
    """Per-rank parameters against sorai.train.tensor_parallel's plan (DTensor local shards),
    with and without loss_parallel; and, for full fine-tuning, the activations against what
    autograd keeps on rank 0, with and without sequence parallelism."""
    tensor_parallel = pytest.importorskip("sorai.train.tensor_parallel")
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        t = t.to_local() if isinstance(t, DTensor) else t
        while type(t) is not torch.Tensor and hasattr(t, "elem"):  # async collective results
            t = t.elem
        return t

    targets = ["q_proj", "o_proj", "up_proj", "down_proj"]
    for method, loss_parallel, sp in itertools.product(
        ("full", "lora"), (True, False), (True, False)
    ):
        torch.manual_seed(0)
        model = Transformer(config)
        model.init_weights()
        if method == "lora":
            apply_lora(model, LoRAConfig(r=4, target_modules=targets))
        tensor_parallel.apply_tensor_parallel(model, fake_tp_mesh, sp, loss_parallel)
        names = [(n, local(p).numel()) for n, p in model.named_parameters()]
        layout = Layout(tp=2, sequence_parallel=sp, loss_parallel=loss_parallel)
        (rank,) = rank_parameters(config, layout, method=method, lora_r=4, lora_targets=targets)
        assert sum(n for name, n in names if "lora_" not in name) == rank.base
        assert sum(n for name, n in names if "lora_" in name) == rank.adapter
        if method == "lora" or config is not TINY:
            continue
        kept = _kept_for_backward(model, torch.randint(0, config.vocab_size, (B, T)), local)
        parts = estimate_memory(
            config, method="full", micro_batch_size=B, seq_len=T, layout=layout
        ).activation_parts
        # Everything but the loss (not run here); within 1.1 % on torch 2.13.
        assert parts["blocks"] + parts["head, norms, ids, rope"] == pytest.approx(kept, rel=0.02)
