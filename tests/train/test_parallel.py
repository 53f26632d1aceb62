"""The parity matrix: every parallel layout trains like one process.

Each case launches `sorai train --nproc N` (real torchrun, gloo processes on this CPU) on a small
random model and fixed data, and compares with a single-process run of the same global batch:
the 5 per-step losses within 1e-4 relative, and the exported weights (gathered from the
layout's final checkpoint) within 1e-4. Data-parallel layouts give each rank
micro_batch_size / dp rows, so every layout sees the same rows per step.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sorai.model.loader import load_model, read_config
from sorai.model.scratch import write_random_model
from sorai.train import estimate as est
from sorai.train.config import ConfigError, ParallelConfig, resolve
from sorai.train.distributed import ParallelDims, check_layout
from sorai.train.pipeline import build_stage_models, split_layers, stage_ids
from sorai.train.tensor_parallel import check_divisible
from sorai.train.trainer import Trainer

from .conftest import CHAT, write_chat

STEPS = 5
ROWS = 4  # rows per step, over all data-parallel ranks
REL = 1e-4


@pytest.fixture(scope="session")
def model4(default_gguf: Path, tmp_path_factory) -> Path:
    """4 layers (two pipeline stages of two, or four of one), 4 heads and 2 kv heads (tp 2),
    an untied head (full fine-tuning under pp)."""
    return write_random_model(
        default_gguf,
        tmp_path_factory.mktemp("model4"),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def data4(tmp_path_factory) -> Path:
    return write_chat(tmp_path_factory.mktemp("data4") / "chat.jsonl", CHAT * 4)


@pytest.fixture(scope="session")
def val4(tmp_path_factory) -> Path:
    return write_chat(tmp_path_factory.mktemp("val4") / "val.jsonl", CHAT[:6])


def base_config(model: Path, data: Path, method: str, val: Path | None = None) -> dict:
    return {
        "model": str(model),
        "method": method,
        "seed": 0,
        "data": {
            "train": str(data),
            "val": str(val) if val else None,
            "seq_len": 64,
            "shuffle": False,
        },
        "lora": {"r": 4, "alpha": 8.0},
        "optim": {"lr": 1e-2 if method == "lora" else 1e-3},
        "train": {"micro_batch_size": ROWS, "max_steps": STEPS, "precision": "fp32"},
        "checkpoint": {"every": 0},
        "log": {"tensorboard": False, "progress": False, "eval_every": 2},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def train_parallel(config: dict, nproc: int, out: Path, *flags: str) -> subprocess.CompletedProcess:
    config_file = write_config(out.parent / f"{out.name}.yaml", {**config, "output_dir": str(out)})
    command = [sys.executable, "-m", "sorai.cli", "train", str(config_file), "--nproc", str(nproc)]
    return subprocess.run(
        [*command, "-q", *flags], capture_output=True, text=True, timeout=600, check=False
    )


def losses(run: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def exported(run: Path, method: str) -> dict[str, torch.Tensor]:
    if method == "lora":
        return load_file(run / "adapter" / "adapter_model.safetensors")
    return load_file(run / "model" / "model.safetensors")


@pytest.fixture(scope="session")
def reference(model4: Path, data4: Path, val4: Path, tmp_path_factory):
    """Single-process runs, one per method, made in this process."""
    runs = {}

    def get(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(f"single-{method}") / "run"
            config = base_config(model4, data4, method, val4)
            config = resolve(overrides={**config, "output_dir": str(out)})
            Trainer(config).run()
            runs[method] = out
        return runs[method]

    return get


def assert_parity(reference: Path, run: Path, method: str) -> None:
    expected, got = losses(reference), losses(run)
    assert len(got) == STEPS
    for step, (a, b) in enumerate(zip(expected, got, strict=True), start=1):
        assert abs(a - b) <= REL * abs(a), f"step {step}: loss {b} vs one process {a}"
    expected, got = losses(reference, "val_loss"), losses(run, "val_loss")
    assert len(got) == len(expected)
    for a, b in zip(expected, got, strict=True):
        assert abs(a - b) <= REL * abs(a), f"val_loss {b} vs one process {a}"
    ref_weights, weights = exported(reference, method), exported(run, method)
    assert ref_weights.keys() == weights.keys()
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=REL, atol=REL, msg=name)


# (name, method, processes, flags); data-parallel ranks split the ROWS rows of a step.
# Each case is a real torchrun job (10-20 s on 2 cores), so the default tier keeps one of each
# kind: ZeRO-3 (its ragged-epoch case, below), tensor parallelism with sequence parallelism and a
# 1F1B pipeline (a 4-process composition takes a minute on 2 cores); `make test-all` runs them
# all, and the resume across layouts and the tied embeddings over pipeline stages below.
DP2 = ["--train.micro_batch_size", "2"]
SLOW = pytest.mark.slow


def layout(name: str, method: str, nproc: int, flags: list[str], *marks) -> object:
    return pytest.param(name, method, nproc, flags, marks=marks, id=name)


LAYOUTS = [
    layout("zero0-dp2", "full", 2, ["--parallel.zero_stage", "0", *DP2], SLOW),
    layout("zero1-dp2", "full", 2, ["--parallel.zero_stage", "1", *DP2], SLOW),
    layout("zero2-dp2", "full", 2, ["--parallel.zero_stage", "2", *DP2], SLOW),
    # ZeRO-3 stays in the default tier through its ragged-epoch case below.
    layout("zero3-dp2", "full", 2, ["--parallel.zero_stage", "3", *DP2], SLOW),
    layout("tp2", "full", 2, ["--parallel.tp", "2", "--parallel.sequence_parallel", "false"], SLOW),
    layout("tp2-sp", "full", 2, ["--parallel.tp", "2", "--parallel.sequence_parallel", "true"]),
    layout("pp2-gpipe", "full", 2, ["--parallel.pp", "2", "--parallel.pp_schedule", "gpipe"], SLOW),
    layout("pp2-1f1b", "full", 2, ["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b"]),
    layout("lora-zero3-dp2", "lora", 2, DP2, SLOW),
    layout("lora-tp2", "lora", 2, ["--parallel.tp", "2"], SLOW),
    layout(
        "lora-pp2-interleaved",
        "lora",
        2,
        ["--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b"],
        SLOW,
    ),
    # 4 processes on 2 cores: about 15-25 s each here.
    layout("dp2-tp2", "full", 4, ["--parallel.tp", "2", *DP2], SLOW),
    layout(
        "pp2-dp2-zero2", "full", 4, ["--parallel.pp", "2", "--parallel.zero_stage", "2", *DP2], SLOW
    ),
    layout("pp2-tp2", "full", 4, ["--parallel.pp", "2", "--parallel.tp", "2"], SLOW),
    layout(
        "pp2-dp2-zero0", "full", 4, ["--parallel.pp", "2", "--parallel.zero_stage", "0", *DP2], SLOW
    ),
]

# The pure data-parallel ZeRO layouts whose rank-0 model states are also checked against the
# memory estimator (their runs are the estimator's inputs: full, fp32, 2 rows per rank, dp2).
ZERO_STAGE = {"zero1-dp2": 1, "zero2-dp2": 2, "zero3-dp2": 3}


@pytest.mark.parametrize(("name", "method", "nproc", "flags"), LAYOUTS)
def test_layout_trains_like_one_process(
    name, method, nproc, flags, reference, model4, data4, val4, tmp_path
) -> None:
    run = tmp_path / name
    result = train_parallel(base_config(model4, data4, method, val4), nproc, run, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_parity(reference(method), run, method)
    # The workers spin between parallel regions, as one process does (the launcher waits).
    assert "OpenMP: OMP_WAIT_POLICY=ACTIVE (sorai's choice for training" in result.stderr
    if name in ZERO_STAGE:
        assert_state_bytes_match_the_estimate(run, model4, ZERO_STAGE[name])


def assert_state_bytes_match_the_estimate(run: Path, model: Path, stage: int) -> None:
    """Measured bytes of weights, gradients and optimizer states on rank 0 at dp2 (after the
    first step) are the estimator's, within 10%."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = next(row["state_bytes_rank0"] for row in rows if "state_bytes_rank0" in row)
    estimate = est.estimate_memory(
        read_config(model),
        method="full",
        micro_batch_size=2,
        seq_len=64,
        layout=est.Layout(dp_shard=2, zero_stage=stage),
    )
    for kind in ("weights", "gradients", "optimizer"):
        want = getattr(estimate, kind)
        assert abs(measured[kind] - want) <= 0.1 * want, (kind, measured[kind], want)


@pytest.mark.slow
def test_resume_across_layouts(model4, data4, tmp_path) -> None:
    """Written under tp2 at step 3, resumed under dp2 x ZeRO-3: the same 5 losses and
    weights as one uninterrupted process (a constant lr, so stopping at 3 is no other run)."""
    config = base_config(model4, data4, "full")
    config["schedule"] = {"kind": "constant"}
    single = tmp_path / "single"
    Trainer(resolve(overrides={**config, "output_dir": str(single)})).run()
    run = tmp_path / "run"
    first = train_parallel(
        {**config, "train": {**config["train"], "max_steps": 3}}, 2, run, "--parallel.tp", "2"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run / "checkpoints" / "step-000003").is_dir()
    second = train_parallel(config, 2, run, "--resume", *DP2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    assert_parity(single, run, "full")


def test_layout_errors_name_the_numbers() -> None:
    with pytest.raises(ConfigError, match=r"1 x 3 x 2 x 1 = 6 processes, but the world size is 4"):
        ParallelDims.from_config(ParallelConfig(dp_shard=3, tp=2), 4)
    with pytest.raises(ConfigError, match="world size 6 is not divisible by .* = 4"):
        ParallelDims.from_config(ParallelConfig(tp=2, pp=2), 6)
    with pytest.raises(ConfigError, match="zero_stage 1 .* with tp or pp use zero_stage 2"):
        ParallelDims.from_config(ParallelConfig(tp=2, zero_stage=1), 4)
    with pytest.raises(ConfigError, match="parallel.tp must be at least 1"):
        ParallelDims.from_config(ParallelConfig(tp=0), 2)
    dims = ParallelDims.from_config(ParallelConfig(pp=2), 8)
    assert (dims.dp_shard, dims.dp, dims.fsdp, dims.describe()) == (
        4,
        4,
        True,
        "pp2 x dp_shard4 x zero3",
    )
    # Stage 0 shards nothing: every data-parallel rank is a replica.
    dims = ParallelDims.from_config(ParallelConfig(zero_stage=0, tp=2), 8)
    assert (dims.dp_replicate, dims.dp_shard, dims.fsdp) == (4, 1, True)
    assert not ParallelDims.from_config(ParallelConfig(zero_stage=0), 2).fsdp  # DDP
    config = resolve(overrides={"data": {"train": "x.jsonl"}, "parallel": {"pp": 2}})
    config.train.micro_batch_size = 3
    with pytest.raises(ConfigError, match="micro_batch_size 3 does not split into .* 2 pipeline"):
        check_layout(config, 2)


def test_pipeline_split() -> None:
    assert split_layers(5, 2, None) == [range(0, 3), range(3, 5)]
    assert split_layers(4, 2, [1, 3]) == [range(0, 1), range(1, 4)]
    with pytest.raises(ConfigError, match="sums to 3; the model has 4"):
        split_layers(4, 2, [1, 2])
    with pytest.raises(ConfigError, match="too few for 4 pipeline stages"):
        split_layers(2, 4, None)
    assert stage_ids(1, 2, "interleaved_1f1b") == [1, 3]


def test_gqa_must_split_over_tp(model4: Path) -> None:
    model, _ = load_model(model4, torch.float32, torch.device("cpu"))
    check_divisible(model, 2)
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(2\) is not divisible.*GQA"):
        check_divisible(model, 4)


def test_launcher_checks_the_layout_first(model4, data4, tmp_path) -> None:
    """A layout that cannot fill --nproc fails in one line, before any process starts."""
    config = base_config(model4, data4, "full")
    result = train_parallel(config, 2, tmp_path / "r", "--parallel.tp", "4")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sorai: error: the world size 2 is not divisible by dp_replicate x tp x pp = 1 x 4 x 1 = 4"
    ]


@pytest.mark.slow
def test_tied_embeddings_across_pipeline_stages(tiny_model: Path, data4: Path, tmp_path) -> None:
    """SmolLM2 ties its head to the embedding. LoRA over two stages (each holds a frozen copy)
    trains like one process; full fine-tuning would train two diverging copies: refused."""
    config = base_config(tiny_model, data4, "lora")
    single = tmp_path / "single"
    Trainer(resolve(overrides={**config, "output_dir": str(single)})).run()
    run = tmp_path / "pp2"
    result = train_parallel(config, 2, run, "--parallel.pp", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_parity(single, run, "lora")
    full = train_parallel(config, 2, tmp_path / "full", "--method", "full", "--parallel.pp", "2")
    assert full.returncode != 0
    assert "tied embeddings" in full.stderr and "Use LoRA" in full.stderr


def test_tied_embeddings_are_not_split_over_pipeline_stages_for_full_fine_tuning(
    tiny_model: Path,
) -> None:
    """What each rank checks before cutting the model into stages (the torchrun case above is
    in the slow tier): a trainable tied head cannot go to another stage than the embedding."""
    model, _ = load_model(tiny_model, torch.float32, torch.device("cpu"))
    assert model.config.tie_word_embeddings
    model.requires_grad_(True)  # as the trainer has it for full fine-tuning
    with pytest.raises(ConfigError, match="tied embeddings .* Use LoRA"):
        build_stage_models(model, ParallelConfig(pp=2), 0, full_finetune=True)


# -- ragged epoch ends ---------------------------------------------------------------------------

RAGGED = 9  # records: one per row (no packing), so a step of 2 ranks x 2 rows leaves 1 over


@pytest.fixture(scope="session")
def data9(tmp_path_factory) -> Path:
    pairs = [(f"What is {i} plus {i}?", str(2 * i)) for i in range(RAGGED)]
    return write_chat(tmp_path_factory.mktemp("data9") / "chat.jsonl", pairs)


def ragged_config(model: Path, data: Path) -> dict:
    """One epoch of RAGGED rows, ROWS per step: the last step holds one row, so under dp2 one
    rank's micro-batch is all padding (no targets at all)."""
    config = base_config(model, data, "full")
    config["data"] = {**config["data"], "pack": False}
    config["train"] = {"micro_batch_size": ROWS, "epochs": 1, "precision": "fp32"}
    config["log"] = {**config["log"], "eval_every": 0}
    return config


@pytest.fixture(scope="session")
def ragged_reference(model4: Path, data9: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ragged-single") / "run"
    Trainer(resolve(overrides={**ragged_config(model4, data9), "output_dir": str(out)})).run()
    return out


RAGGED_LAYOUTS = [
    layout("zero3-dp2", "full", 2, ["--parallel.zero_stage", "3"]),
    layout("zero2-dp2", "full", 2, ["--parallel.zero_stage", "2"], SLOW),
    layout("zero1-dp2", "full", 2, ["--parallel.zero_stage", "1"], SLOW),
    layout("zero0-dp2", "full", 2, ["--parallel.zero_stage", "0"], SLOW),
    # HSDP: replicas over dp_replicate, each sharding over dp_shard (1 here: 2 processes).
    layout(
        "hsdp-rep2", "full", 2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"], SLOW
    ),
    layout(
        "hsdp-rep2-shard2",
        "full",
        4,
        ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"],
        SLOW,
    ),
]


@pytest.mark.parametrize(("name", "method", "nproc", "flags"), RAGGED_LAYOUTS)
def test_ragged_epoch_end_trains_like_one_process(
    name, method, nproc, flags, ragged_reference, model4, data9, tmp_path
) -> None:
    """9 records, 4 rows a step: the last step leaves a data-parallel rank nothing but padding.
    Every layout finishes the epoch (ZeRO-3 crashed in gloo: "Received data size doesn't match
    expected size", the padding rank's head had no gradient) with one process's losses and
    weights."""
    config = ragged_config(model4, data9)
    dp = 4 if nproc == 4 else 2
    run = tmp_path / name
    flags = [*flags, "--train.micro_batch_size", str(ROWS // dp)]
    result = train_parallel(config, nproc, run, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = losses(ragged_reference), losses(run)
    assert len(got) == len(expected) == math.ceil(RAGGED / ROWS)
    for step, (a, b) in enumerate(zip(expected, got, strict=True), start=1):
        assert abs(a - b) <= REL * abs(a), f"step {step}: loss {b} vs one process {a}"
    ref_weights, weights = exported(ragged_reference, method), exported(run, method)
    for name_, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name_], tensor, rtol=REL, atol=REL, msg=name_)


@pytest.mark.slow
def test_sigterm_under_zero3_saves_and_resume_trains_like_one_process(
    model4, data4, tmp_path
) -> None:
    """SIGTERM to `sorai train --nproc 2` (passed on to both ranks, which agree on the step to
    stop at): one checkpoint of that step, one line, exit 143; `--resume` then ends where one
    uninterrupted process does."""
    steps = 12
    config = base_config(model4, data4, "full")
    config["train"] = {**config["train"], "max_steps": steps}
    config["log"] = {**config["log"], "eval_every": 0}
    single = tmp_path / "single"
    Trainer(resolve(overrides={**config, "output_dir": str(single)})).run()
    run = tmp_path / "run"
    config_file = write_config(tmp_path / "run.yaml", {**config, "output_dir": str(run)})
    command = [sys.executable, "-m", "sorai.cli", "train", str(config_file), "-q"]
    command += ["--nproc", "2", *DP2]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]
    (checkpoint,) = (run / "checkpoints").iterdir()
    stopped = int(checkpoint.name.removeprefix("step-"))
    assert 2 <= stopped < steps
    assert err.strip().splitlines()[-1] == (
        f"sorai: SIGTERM at step {stopped}: saved checkpoint {checkpoint}; continue with --resume"
    )
    resumed = train_parallel(config, 2, run, "--resume", *DP2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = losses(single), losses(run)
    assert len(got) == steps
    for step, (a, b) in enumerate(zip(expected, got, strict=True), start=1):
        assert abs(a - b) <= REL * abs(a), f"step {step}: loss {b} vs one process {a}"
    weights = exported(run, "full")
    for name, tensor in exported(single, "full").items():
        torch.testing.assert_close(weights[name], tensor, rtol=REL, atol=REL, msg=name)
