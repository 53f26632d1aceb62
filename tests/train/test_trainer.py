"""The training loop on a small random model: what trains, checkpoints, resume after kill -9,
exports, and the chunked loss against the plain one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sorai
from sorai.errors import SoraiError
from sorai.model.lora import LoRALinear
from sorai.train.config import resolve
from sorai.train.data import IGNORE_INDEX, block_causal_mask
from sorai.train.loss import chunked_cross_entropy
from sorai.train.metrics import read_metrics
from sorai.train.trainer import Trainer

from .conftest import write_chat


def config(model: Path, data_file: Path, out: Path, **sections):
    values = {
        "model": str(model),
        "output_dir": str(out),
        "data": {"train": str(data_file), "seq_len": 64},
        "train": {"micro_batch_size": 2, "max_steps": 6, "threads": 1},
        "optim": {"lr": 1e-3},
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return resolve(None, values)


# -- the loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_loss_equals_plain_cross_entropy_and_its_gradients(chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = IGNORE_INDEX
    ours = chunked_cross_entropy(hidden, weight, labels, chunk=chunk)
    ours.backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = (hidden @ weight.t()).reshape(-1, 50)
    theirs = F.cross_entropy(logits, labels.reshape(-1), reduction="sum")
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grads[0], hidden.grad)
    torch.testing.assert_close(ours_grads[1], weight.grad)
    # Ignored positions get no gradient at all.
    assert ours_grads[0][0, :3].abs().max() == 0


def test_loss_with_no_target_is_zero_and_still_backpropagates() -> None:
    """An all-padding micro-batch (a ragged epoch end on some data-parallel rank) still gives
    the head a (zero) gradient: FSDP and DDP reduce every parameter's gradient, and a rank
    that had none for the head would send a different collective than the others."""
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss = chunked_cross_entropy(hidden, weight, torch.full((1, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and hidden.grad is not None
    assert weight.grad is not None and weight.grad.abs().max() == 0


def test_packed_documents_do_not_see_each_other(tiny_model: Path) -> None:
    """Two documents packed in one row, with restarted positions and the block mask, give each
    document the logits it has alone."""
    llm = sorai.load(tiny_model)
    model = llm.model
    a, b = torch.randint(0, 1000, (1, 5)), torch.randint(0, 1000, (1, 7))
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    documents = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = model(row, positions=positions, mask=block_causal_mask(documents))
        alone = torch.cat([model(a), model(b)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


# -- the loop ----------------------------------------------------------------------------------


def test_lora_trains_only_the_adapter_and_exports_it(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    cfg = config(tiny_model, chat_file, tmp_path / "run")
    trainer = Trainer(cfg)
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # Two steps: at the first, B = 0 gives A no gradient.
    for _, batch in zip(range(2), trainer.loader, strict=False):
        trainer.train_step([batch])
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (".lora_" in name), name
        assert (param.grad is None) or ".lora_" in name
    assert any(isinstance(m, LoRALinear) for m in trainer.model.modules())


def test_a_run_writes_metrics_checkpoints_exports_and_a_plot(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = config(tiny_model, chat_file, out, data={"val_split": 0.25}, log={"eval_every": 3})
    result = Trainer(cfg).run()
    assert result.steps == 6 and result.val_loss is not None
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["targets"] > 0 and r["tokens_per_s"] > 0 for r in train)
    # keep: 2 -> only the newest two checkpoints remain, and no temporary directory.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = (out / "config.yaml").read_text()
    assert "val_split: 0.25" in saved and "eval_every: 3" in saved


def test_a_second_run_into_the_same_directory_is_refused(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    cfg = config(tiny_model, chat_file, tmp_path / "run", train={"max_steps": 2})
    Trainer(cfg).run()
    with pytest.raises(SoraiError, match="already holds a run.*--resume"):
        Trainer(cfg)


def test_sorai_train_prints_its_summary_once(
    tiny_model: Path, chat_file: Path, tmp_path: Path, capsys, caplog
) -> None:
    from sorai.cli import main

    out = tmp_path / "run"
    cfg = config(tiny_model, chat_file, out, train={"max_steps": 1}, checkpoint={"every": 0})
    cfg.save(tmp_path / "config.yaml")
    with caplog.at_level("INFO", logger="sorai.train"):
        assert main(["train", str(tmp_path / "config.yaml")]) == 0
    stdout, stderr = capsys.readouterr()
    everything = stdout + stderr + caplog.text
    assert everything.count("trained ") == 1, everything
    assert stdout.startswith("trained 1 step in ")  # and not "1 steps"
    assert f"run directory: {out}" in stdout
    # Registered by the run's name (in the session's registry, tests/conftest.py), with the
    # exact command that serves the LoRA export unmerged, as `sorai serve` parses it.
    serve = f"sorai serve -m {tiny_model} --adapter run={out / 'adapter'}"
    assert f"registered as run; serve it with: {serve}" in stdout.splitlines()


def test_full_fine_tuning_exports_a_model_that_loads_back(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = config(tiny_model, chat_file, out, method="full", train={"max_steps": 3})
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.export == out / "model"
    reloaded = sorai.load(out / "model")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        trainer.model.eval()
        torch.testing.assert_close(reloaded.model(ids), trainer.model(ids))
        base = sorai.load(tiny_model).model(ids)
    assert not torch.allclose(base, reloaded.model(ids))


# -- resume ------------------------------------------------------------------------------------


def _train_cli(cfg_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sorai.cli", "train", str(cfg_path), "-q", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


@pytest.mark.slow  # ~25 s; the default tier resumes after SIGINT (tests/train/test_faults.py)
def test_kill_9_and_resume_follows_the_uninterrupted_loss_curve(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = write_chat(tmp_path / "data.jsonl")
    common = {
        "model": str(tiny_model),
        "data": {"train": str(data), "seq_len": 64},
        # Dropout makes the RNG state part of what must be restored.
        "lora": {"dropout": 0.1},
        "train": {"micro_batch_size": 2, "max_steps": 40, "threads": 1},
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_steps": 3},
        "checkpoint": {"every": 4, "keep": 2},
        "log": {"tensorboard": False},
    }
    import yaml

    def write(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**common, "output_dir": str(tmp_path / name)}))
        return path

    whole = _train_cli(write("whole"))
    assert whole.wait(timeout=600) == 0, whole.stdout.read()

    killed = _train_cli(write("killed"))
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "step-000008").exists():
        assert killed.poll() is None, killed.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    rows = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert rows and rows[-1]["step"] < 40, "the run finished before it was killed"

    resumed = _train_cli(write("killed"), "--resume")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")}
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])


def test_resume_without_a_checkpoint_says_so(tiny_model: Path, chat_file: Path, tmp_path: Path):
    cfg = config(tiny_model, chat_file, tmp_path / "empty")
    with pytest.raises(SoraiError, match="no complete checkpoint"):
        Trainer(cfg, resume=True)
