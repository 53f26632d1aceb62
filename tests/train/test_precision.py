"""train.precision: what `auto` picks on which machine and why, bf16 autocast against float32
(a few steps of a tiny model: bf16 matmuls are slow on CPUs without AVX-512 BF16 or AMX, but
these are small), and LoRA's frozen weights stored in bf16 once instead of cast every step."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from sorai.model.loader import load_model
from sorai.model.lora import LoRALinear, load_adapter
from sorai.model.weights import load_hf_dir
from sorai.train import parallelize
from sorai.train.config import ConfigError, resolve
from sorai.train.parallelize import choose_precision
from sorai.train.trainer import Trainer

CPU = torch.device("cpu")
STEPS = 4


def _config(model: Path, data: Path, out: Path, precision: str, method: str = "lora", **train):
    return resolve(
        None,
        {
            "model": str(model),
            "output_dir": str(out),
            "method": method,
            "data": {"train": str(data), "seq_len": 64},
            "train": {
                "micro_batch_size": 2,
                "max_steps": STEPS,
                "threads": 1,
                "precision": precision,
                **train,
            },
            "optim": {"lr": 1e-3},
            "checkpoint": {"every": 0},
            "log": {"progress": False, "tensorboard": False},
        },
    )


def _losses(trainer: Trainer) -> list[float]:
    trainer.setup()
    batches = trainer._micro_batches()
    return [trainer.train_step([next(batches)])["loss"] for _ in range(STEPS)]


# -- auto -------------------------------------------------------------------------------------


def test_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mocked: the choice depends on the CPU's flags alone, and this machine has one CPU; the
    # flag reading itself is sorai.model.hardware's (tested there).
    monkeypatch.setattr(parallelize, "cpu_has_fast_bf16", lambda: True)
    fast = choose_precision("auto", CPU)
    assert fast.autocast is torch.bfloat16
    assert fast.describe().startswith("bf16 autocast over float32 master weights (auto: the CPU")
    monkeypatch.setattr(parallelize, "cpu_has_fast_bf16", lambda: False)
    slow = choose_precision("auto", CPU)
    assert slow.autocast is None
    assert "neither avx512_bf16 nor amx_bf16" in slow.describe()


def test_explicit_precisions_are_kept_whatever_the_cpu() -> None:
    assert choose_precision("fp32", CPU).autocast is None
    assert choose_precision("bf16", CPU).autocast is torch.bfloat16
    assert "train.precision: bf16" in choose_precision("bf16", CPU).describe()
    with pytest.raises(ConfigError, match="auto, fp32, bf16, got 'fp16'"):
        choose_precision("fp16", CPU)


def test_the_banner_says_the_precision_and_why(
    tiny_model: Path, chat_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(tiny_model, chat_file, tmp_path / "run", "auto", max_steps=1)
    with caplog.at_level(logging.INFO, logger="sorai.train"):
        Trainer(cfg).run()
    expected = choose_precision("auto", CPU).describe()
    assert f"precision: {expected}" in caplog.text
    assert "machine: " in caplog.text and "activation checkpointing: none" in caplog.text


# -- bf16 against float32 ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_follows_the_float32_loss_curve(
    tiny_model: Path, chat_file: Path, tmp_path: Path, method: str
) -> None:
    fp32 = _losses(Trainer(_config(tiny_model, chat_file, tmp_path / "a", "fp32", method)))
    bf16 = _losses(Trainer(_config(tiny_model, chat_file, tmp_path / "b", "bf16", method)))
    # bf16 keeps 8 bits of mantissa: products within ~0.4 % each, the loss within 1 %.
    assert bf16 == pytest.approx(fp32, rel=1e-2)
    assert bf16 != fp32  # autocast really ran


def test_lora_frozen_weights_in_bf16_give_the_same_step_as_casting_each_time(
    tiny_model: Path, chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lowered = Trainer(_config(tiny_model, chat_file, tmp_path / "a", "bf16"))
    ours = _losses(lowered)
    assert lowered.lowered_weights == 14  # every Linear of the 2 blocks
    for module in lowered.model.modules():
        if isinstance(module, LoRALinear):
            assert module.base_layer.weight.dtype is torch.bfloat16
            assert module.lora_A.weight.dtype is torch.float32  # the trained master weights
    assert lowered.model.embed_tokens.weight.dtype is torch.float32
    monkeypatch.setattr("sorai.train.trainer.lower_frozen_weights", lambda model, dtype: 0)
    cast_each_time = _losses(Trainer(_config(tiny_model, chat_file, tmp_path / "b", "bf16")))
    # The same bf16 values either way; only the matmul kernels' summation order may differ.
    assert ours == pytest.approx(cast_each_time, rel=1e-4)


def test_merged_export_after_bf16_lora_merges_into_the_float32_base(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = _config(tiny_model, chat_file, out, "bf16", max_steps=2)
    cfg.export.merged = True
    Trainer(cfg).run()
    merged = load_hf_dir(out / "model", torch.float32)
    expected, _ = load_model(tiny_model, torch.float32, CPU)
    load_adapter(expected, out / "adapter")
    for module in expected.modules():
        if isinstance(module, LoRALinear):
            module.merge()
            module.base_layer.weight.data = module.base_layer.weight.data.contiguous()
    theirs = {
        name.replace(".base_layer", ""): p
        for name, p in expected.state_dict().items()
        if ".lora_" not in name
    }
    ours = merged.state_dict()
    assert ours.keys() == theirs.keys()
    for name, weight in ours.items():
        assert weight.dtype is torch.float32, name
        torch.testing.assert_close(weight, theirs[name], rtol=0, atol=0, msg=name)
    # Not rounded to bf16 on the way.
    q = ours["layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, q.to(torch.bfloat16).float())
