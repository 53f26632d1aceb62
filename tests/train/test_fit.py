"""Training that fits the machine: the default configuration (micro-batch 8 x 1024 tokens, about
10 GiB on a CPU) is lowered to fit, or refused in one line with the numbers and the flags that
fit, before anything is loaded.

The memory figures here are faked (train.memory_limit, or the host's available memory patched):
the machine running the tests has whatever it has, and the decision depends on the figure alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sorai.model.loader import read_config
from sorai.train import estimate as est
from sorai.train import fit
from sorai.train.config import ConfigError, resolve
from sorai.train.metrics import read_metrics
from sorai.train.trainer import Trainer

GIB = 1 << 30


def default_config(**train):
    """`sorai train --data.train data.jsonl`: every other setting at its default."""
    return resolve(overrides={"data": {"train": "data.jsonl"}, "train": train})


def test_the_default_configuration_is_lowered_to_fit_a_small_machine(default_gguf: Path) -> None:
    config = default_config()
    model = read_config(default_gguf)
    need = fit.estimate(config, model, est.SINGLE_DEVICE, False).total
    assert need > 9 * GIB  # what the defaults take: the reason for this check
    note = fit.fit_memory(config, model, est.SINGLE_DEVICE, False, 4 * GIB, "faked")
    train = config.train
    assert (train.micro_batch_size, train.grad_accum) == (2, 4)  # 8 rows per step still
    assert train.activation_checkpointing == "none"
    assert fit.estimate(config, model, est.SINGLE_DEVICE, False).total <= 0.85 * 4 * GIB
    assert note.startswith("memory: the estimate, 9.95 GiB per process at micro-batch 8 x 1024")
    assert "training with micro_batch_size 2, grad_accum 4" in note
    # A configuration that fits is left alone.
    assert fit.fit_memory(config, model, est.SINGLE_DEVICE, False, 4 * GIB, "faked") is None


def test_too_little_memory_even_for_the_smallest_settings_is_refused(default_gguf) -> None:
    config = default_config()
    model = read_config(default_gguf)
    with pytest.raises(ConfigError) as error:
        fit.fit_memory(config, model, est.SINGLE_DEVICE, False, 500 << 20, "faked")
    message = str(error.value)
    assert "training needs about 9.95 GiB per process" in message
    assert "more than 425.0 MiB, 0.85 of 500.0 MiB (faked)" in message
    assert "even micro_batch_size 1 with full activation checkpointing needs" in message
    assert "\n" not in message
    assert config.train.micro_batch_size == 8  # nothing changed


def test_sorai_train_refuses_before_loading_with_the_flags_that_fit(
    default_gguf: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """fit_memory off: one line with the numbers and the flags that fit, exit 2. The host's
    available memory is faked to 4 GiB (a small laptop's), the figure sorai reads by default."""
    from sorai.cli import main

    monkeypatch.setattr(fit, "available_bytes", lambda: 4 * GIB)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    out = tmp_path / "run"
    flags = ["--data.train", str(data), "--output-dir", str(out), "--train.fit_memory", "false"]
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sorai: error: training needs about 9.95 GiB per process")
    assert "0.85 of 4.00 GiB (available on this machine)" in err[0]
    assert err[0].endswith(
        "--train.micro_batch_size 2 --train.grad_accum 4 --train.activation_checkpointing none "
        "(or set train.fit_memory true to have them chosen)"
    )
    assert not out.exists()


def test_a_bad_memory_limit_is_one_line() -> None:
    with pytest.raises(ConfigError, match="train.memory_limit: expected a memory size such as"):
        default_config(memory_limit="lots")
    assert default_config(memory_limit="1.5GiB").train.memory_limit == "1.5GiB"


def test_lowered_settings_train_the_same_steps(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    """A limit between the estimates of micro-batch 2 and 1: the trainer runs 1 x 2 (saved in
    config.yaml) and its losses are those of the 2 x 1 run it replaces."""
    values = {
        "model": str(tiny_model),
        "data": {"train": str(chat_file), "seq_len": 64},
        "train": {"micro_batch_size": 2, "max_steps": 3, "threads": 1, "precision": "fp32"},
        "checkpoint": {"every": 0},
        "log": {"progress": False, "tensorboard": False},
    }
    model = read_config(tiny_model)
    sizes = {}
    for rows in (1, 2):
        config = resolve(
            overrides={**values, "train": {**values["train"], "micro_batch_size": rows}}
        )
        sizes[rows] = fit.estimate(config, model, est.SINGLE_DEVICE, False).total
    assert sizes[1] < sizes[2]
    limit = int((sizes[1] + sizes[2]) / 2 / fit.HEADROOM)

    plain = tmp_path / "plain"
    Trainer(resolve(overrides={**values, "output_dir": str(plain)})).run()
    lowered = tmp_path / "lowered"
    train = {**values["train"], "memory_limit": str(limit)}
    Trainer(resolve(overrides={**values, "train": train, "output_dir": str(lowered)})).run()
    saved = (lowered / "config.yaml").read_text()
    assert "micro_batch_size: 1" in saved and "grad_accum: 2" in saved
    a = [r["loss"] for r in read_metrics(plain / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_metrics(lowered / "metrics.jsonl") if "loss" in r]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (x, y)
