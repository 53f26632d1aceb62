"""LoRA on the real default model: it overfits 8 examples, reproduces them greedily, and its
exports give the same logits in HF peft (the adapter) and transformers (the merged model).

The overfitting run (16 steps over the 8 examples, the suite's longest setup) is in the slow
tier (`make test-all`). The default tier trains the real model for a few steps on one packed row
here, the training loop on a small random model (test_trainer.py, test_parallel.py), and checks
a LoRA adapter over the real model against peft (tests/model/test_lora.py) and through load,
generate and serve (tests/test_adapter_cli.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sorai
from sorai.model.loader import load_model
from sorai.model.lora import load_adapter
from sorai.model.weights import save_hf_dir
from sorai.train.config import resolve
from sorai.train.metrics import read_metrics
from sorai.train.trainer import Trainer

from ..model.reference import load_reference
from .conftest import CHAT, write_chat


def test_a_few_lora_steps_on_the_default_model_lower_its_loss_and_export(
    default_gguf: Path, tmp_path: Path
) -> None:
    """Two examples packed in one row, the same row every step: the loss falls, and the adapter
    written from the GGUF base loads back over it."""
    data = write_chat(tmp_path / "two.jsonl", CHAT[:2])
    cfg = resolve(
        None,
        {
            "model": str(default_gguf),
            "output_dir": str(tmp_path / "few"),
            "data": {"train": str(data), "seq_len": 128},
            "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
            "optim": {"lr": 2e-3},
            "schedule": {"kind": "constant"},
            "train": {"micro_batch_size": 1, "max_steps": 3},
            "checkpoint": {"every": 0, "keep": 1},
            "log": {"progress": False, "tensorboard": False},
        },
    )
    Trainer(cfg).run()
    rows = [r for r in read_metrics(tmp_path / "few" / "metrics.jsonl") if "loss" in r]
    assert [r["targets"] for r in rows] == [rows[0]["targets"]] * 3  # the same row each step
    assert rows[-1]["loss"] < rows[0]["loss"], rows
    llm = sorai.load(default_gguf, adapter=tmp_path / "few" / "adapter")
    assert llm.name == f"{default_gguf}+few"


@pytest.fixture(scope="module")
def run(default_gguf: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("overfit")
    data = write_chat(tmp / "eight.jsonl")
    cfg = resolve(
        None,
        {
            "model": str(default_gguf),
            "output_dir": str(tmp / "run"),
            "data": {"train": str(data), "seq_len": 128},
            "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
            "optim": {"lr": 2e-3},
            "schedule": {"kind": "constant"},
            "train": {"micro_batch_size": 4, "max_steps": 16},
            "checkpoint": {"every": 0, "keep": 1},
            "log": {"progress": False, "tensorboard": False},
            "export": {"merged": True},
        },
    )
    Trainer(cfg).run()
    return tmp / "run"


@pytest.mark.slow
def test_lora_overfits_eight_examples(run: Path) -> None:
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert losses[0] > 1.0
    assert losses[-1] < 0.1, losses


@pytest.mark.slow
def test_the_adapter_reproduces_the_examples_greedily(default_gguf: Path, run: Path) -> None:
    llm = sorai.load(default_gguf, adapter=run / "adapter")
    for question, answer in CHAT:
        reply = llm.chat([{"role": "user", "content": question}], max_tokens=12, temperature=0)
        assert reply.text.strip() == answer, question


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.slow
def test_exports_match_peft_and_transformers(default_gguf: Path, run: Path, tmp_path: Path):
    from peft import PeftModel

    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(3))
    model, _ = load_model(default_gguf, "float32", "cpu", quantize="none")
    save_hf_dir(model, tmp_path / "base")
    load_adapter(model, run / "adapter")  # unmerged: base + (alpha/r) B A x
    ours = _logits(model.eval(), ids)

    reference = load_reference(tmp_path / "base")
    with_adapter = PeftModel.from_pretrained(reference, run / "adapter").eval()
    assert (_logits(with_adapter, ids) - ours).abs().max() < 1e-4

    # The merged export: transformers and sorai read the same weights, so the same logits.
    # (Merged against unmerged differs by float32 rounding of W + s·B·A, ~1e-4 on logits ~30.)
    merged = _logits(load_reference(run / "model"), ids)
    assert (merged - _logits(sorai.load(run / "model").model, ids)).abs().max() < 1e-4
    assert (merged - ours).abs().max() < 1e-3
    assert (run / "model" / "tokenizer.json").exists()
