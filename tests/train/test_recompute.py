"""Activation checkpointing changes what is kept for backward, never the result: the same loss
curve and the same weights as without it, bit for bit, for LoRA and full fine-tuning, on packed
rows (document mask) and plain ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sorai.train.config import ConfigError, resolve
from sorai.train.parallelize import checkpoint_blocks
from sorai.train.trainer import Trainer

STEPS = 3


def _run(model: Path, data: Path, out: Path, method: str, mode: str, pack: bool):
    cfg = resolve(
        None,
        {
            "model": str(model),
            "output_dir": str(out / f"{method}-{mode}"),
            "method": method,
            "data": {"train": str(data), "seq_len": 64, "pack": pack},
            "train": {
                "micro_batch_size": 2,
                "max_steps": STEPS,
                "threads": 1,
                "precision": "fp32",
                "activation_checkpointing": mode,
            },
            # A large lr, so that any difference in a gradient shows in the next loss.
            "optim": {"lr": 1e-2},
            "checkpoint": {"every": 0},
            "log": {"progress": False, "tensorboard": False},
        },
    )
    trainer = Trainer(cfg)
    trainer.setup()
    batches = trainer._micro_batches()
    losses = [trainer.train_step([next(batches)])["loss"] for _ in range(STEPS)]
    return losses, [p.detach().clone() for p in trainer.params]


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "one-per-row"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_recompute_gives_the_same_losses_and_weights(
    tiny_model: Path, chat_file: Path, tmp_path: Path, method: str, pack: bool
) -> None:
    losses, weights = _run(tiny_model, chat_file, tmp_path, method, "none", pack)
    for mode in ("selective", "full"):
        got_losses, got_weights = _run(tiny_model, chat_file, tmp_path, method, mode, pack)
        assert got_losses == losses, mode
        for ours, theirs in zip(got_weights, weights, strict=True):
            assert torch.equal(ours, theirs), mode


def test_the_older_on_off_form_and_a_bad_mode(tiny_model: Path, chat_file: Path) -> None:
    base = {"model": str(tiny_model), "data": {"train": str(chat_file)}}
    on = resolve(None, {**base, "train": {"activation_checkpointing": True}})
    off = resolve(None, {**base, "train": {"activation_checkpointing": False}})
    assert on.train.activation_checkpointing == "full"
    assert off.train.activation_checkpointing == "none"
    with pytest.raises(ConfigError, match=r"none\|selective\|full or bool, got .some."):
        resolve(None, {**base, "train": {"activation_checkpointing": "some"}})
    with pytest.raises(ConfigError, match="none, selective, full.*'some'"):
        checkpoint_blocks(None, "some")
