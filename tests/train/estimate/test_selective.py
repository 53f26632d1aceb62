"""The estimate under activation checkpointing against what the checkpointed blocks really keep:
selective keeps the outputs its policy marks (counted as the policy marks them, by storage), full
only each block's input."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from sorai.model.architectures import known_config
from sorai.model.lora import LoRAConfig, apply_lora
from sorai.model.transformer import Transformer
from sorai.train import parallelize
from sorai.train.estimate import estimate_memory
from tests.train.estimate.models import TINY, B, T


def _kept_by_the_policy(method: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """Bytes the selective policy keeps over one forward of TINY's blocks (storages counted
    once; outputs that alias a kept storage, the in-place LoRA add, add nothing)."""
    kept: dict[int, int] = {}

    class Counting(parallelize.KeepMatmuls):
        def __call__(self, ctx, func, *args, **kwargs):
            policy = super().__call__(ctx, func, *args, **kwargs)
            if policy == CheckpointPolicy.MUST_SAVE:
                outputs = ctx.op_output
                for out in outputs if isinstance(outputs, tuple) else (outputs,):
                    if isinstance(out, torch.Tensor):
                        storage = out.untyped_storage()
                        kept.setdefault(storage.data_ptr(), storage.nbytes())
            return policy

    monkeypatch.setattr(parallelize, "KeepMatmuls", Counting)
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.init_weights()
    if method == "lora":
        apply_lora(model, LoRAConfig(r=8, target_modules="all-linear"), dtype=torch.float32)
    else:
        model.requires_grad_(True)
    parallelize.checkpoint_blocks(model, "selective")
    model(torch.randint(0, TINY.vocab_size, (B, T)), head=False).sum().backward()
    return sum(kept.values())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_selective_estimate_counts_what_the_policy_keeps(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured = _kept_by_the_policy(method, monkeypatch)
    estimate = estimate_memory(
        TINY,
        method=method,
        micro_batch_size=B,
        seq_len=T,
        activation_checkpointing="selective",
    )
    assert estimate.activation_parts["matmul outputs (selective)"] == pytest.approx(
        measured, rel=0.02
    )


def test_checkpointing_modes_order_the_estimate() -> None:
    config = known_config("llama-3-8b")

    def activations(mode) -> int:
        return estimate_memory(
            config, micro_batch_size=4, seq_len=2048, activation_checkpointing=mode
        ).activations

    none, selective, full = activations("none"), activations("selective"), activations("full")
    assert full < selective < none
    assert selective < 0.8 * none
    # The older on/off form.
    assert activations(True) == full and activations(False) == none
    with pytest.raises(ValueError, match="none, selective or full"):
        activations("some")
