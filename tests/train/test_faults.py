"""Training under faults: damaged checkpoints (one line, or fall back to a whole one), and
SIGINT/SIGTERM (a checkpoint saved, resumed as if never stopped), on a small random model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sorai.train.checkpoint import checkpoint_problem
from sorai.train.config import resolve
from sorai.train.interrupt import StopRequests
from sorai.train.metrics import read_metrics
from sorai.train.trainer import Trainer

from .conftest import write_chat


def settings(model: Path, data: Path, out: Path, **train) -> dict:
    return {
        "model": str(model),
        "output_dir": str(out),
        "data": {"train": str(data), "seq_len": 64},
        # Dropout makes the RNG state part of what a resume must restore.
        "lora": {"dropout": 0.1},
        "train": {"micro_batch_size": 2, "max_steps": 6, "threads": 1, **train},
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every": 2, "keep": 3},
        "log": {"progress": False, "tensorboard": False},
    }


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


# -- damaged checkpoints -----------------------------------------------------------------------


def damage(checkpoint: Path, how: str) -> None:
    shard = next(checkpoint.glob("*.distcp"))
    if how == "truncated shard":
        os.truncate(shard, 1000)
    elif how == "truncated metadata":
        os.truncate(checkpoint / ".metadata", 100)
    elif how == "missing shard":
        shard.unlink()
    else:  # overwritten bytes, every length as the index says: found only by loading
        with open(shard, "r+b") as f:
            f.write(b"\0" * 4096)


DAMAGE = {
    "truncated shard": "its shard __0_0.distcp is truncated (1000 bytes; the index needs",
    "truncated metadata": "its .metadata cannot be read (UnpicklingError",
    "missing shard": "its shard __0_0.distcp is missing",
    "overwritten shard": "UnpicklingError",
}


@pytest.fixture(scope="module")
def finished_run(tiny_model: Path, tmp_path_factory) -> Path:
    """6 steps, checkpoints at 2, 4 and 6."""
    base = tmp_path_factory.mktemp("finished")
    data = write_chat(base / "data.jsonl")
    run = base / "run"
    Trainer(resolve(overrides=settings(tiny_model, data, run))).run()
    assert [p.name for p in (run / "checkpoints").iterdir()] != []
    return run


def copy_run(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-r", str(run), str(to)], check=True)
    return to


@pytest.mark.parametrize("how", list(DAMAGE))
def test_resume_over_a_damaged_checkpoint_is_one_line(
    how: str, finished_run: Path, tmp_path: Path, capsys
) -> None:
    """`sorai train --resume` over a damaged latest checkpoint: one line naming it, what is
    wrong and what --resume-fallback would do, exit 2 (DCP's CheckpointException is no
    Exception: it escaped as a 60-line traceback)."""
    from sorai.cli import main

    run = copy_run(finished_run, tmp_path / "run")
    damage(run / "checkpoints" / "step-000006", how)
    config = write_yaml(tmp_path / "c.yaml", {**yaml.safe_load((run / "config.yaml").read_text())})
    flags = ["--output-dir", str(run), "--train.max_steps", "8", "-q"]
    assert main(["train", str(config), "--resume", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"sorai: error: checkpoint {run}/checkpoints/step-000006 is damaged:")
    assert DAMAGE[how] in err[-1]
    assert err[-1].endswith(
        "--resume-fallback continues from step-000004, the newest whole one before it"
    )
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("how", ["truncated shard", "overwritten shard"])
def test_resume_fallback_continues_from_the_newest_whole_checkpoint(
    how: str, finished_run: Path, tmp_path: Path
) -> None:
    """The damaged checkpoint is set aside; the run continues from step 4 and ends as one
    whose step 6 was never damaged: the same losses for steps 5 and 6."""
    run = copy_run(finished_run, tmp_path / "run")
    damage(run / "checkpoints" / "step-000006", how)
    config = resolve(run / "config.yaml", {"output_dir": str(run), "train": {"max_steps": 8}})
    trainer = Trainer(config, resume=True, fallback=True)
    result = trainer.run()
    assert trainer.resume_from == run / "checkpoints" / "step-000004"
    assert result.steps == 8
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["damaged-step-000006", "step-000004", "step-000006", "step-000008"]
    assert checkpoint_problem(run / "checkpoints" / "step-000006") is None
    before = {r["step"]: r["loss"] for r in read_metrics(finished_run / "metrics.jsonl")}
    after = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert sorted(after) == list(range(1, 9))
    for step in (5, 6):
        assert abs(after[step] - before[step]) <= 1e-6, (step, after[step], before[step])


def test_fallback_with_no_whole_checkpoint_says_so(finished_run: Path, tmp_path: Path) -> None:
    from sorai.errors import SoraiError

    run = copy_run(finished_run, tmp_path / "run")
    for step in (2, 4, 6):
        damage(run / "checkpoints" / f"step-{step:06d}", "truncated shard")
    config = resolve(run / "config.yaml", {"output_dir": str(run)})
    with pytest.raises(SoraiError, match=r"no whole checkpoint .*step-000006, step-000004, step-"):
        Trainer(config, resume=True, fallback=True)


def test_a_whole_checkpoint_has_no_problem(finished_run: Path) -> None:
    for checkpoint in (finished_run / "checkpoints").iterdir():
        assert checkpoint_problem(checkpoint) is None


# -- SIGINT and SIGTERM ------------------------------------------------------------------------


def test_a_second_signal_stops_at_once() -> None:
    """The first SIGINT is noted for the loop; a second one is Python's KeyboardInterrupt, as
    if no handler had been installed (the way out of a step that never ends)."""
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def start_cli(config: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sorai.cli", "train", str(config), "-q", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        text=True,
    )


def interrupt_after(process: subprocess.Popen, metrics: Path, steps: int, signum: int) -> None:
    """Send `signum` once the run has logged `steps` steps (so it is in its loop)."""
    deadline = time.monotonic() + 300
    while not metrics.exists() or len(metrics.read_text().splitlines()) < steps:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signum)


def test_sigint_saves_a_checkpoint_and_resume_finishes_like_an_uninterrupted_run(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Ctrl-C with no checkpoint due: the step under way ends, a checkpoint is saved, one line
    says so, exit 130; --resume then gives the uninterrupted run's losses and adapter."""
    data = write_chat(tmp_path / "data.jsonl")
    steps = 30
    whole = tmp_path / "whole"
    Trainer(
        resolve(
            overrides=settings(tiny_model, data, whole, max_steps=steps)
            | {"checkpoint": {"every": 0}}
        )
    ).run()
    run = tmp_path / "run"
    values = settings(tiny_model, data, run, max_steps=steps) | {"checkpoint": {"every": 0}}
    config = write_yaml(tmp_path / "run.yaml", values)
    process = start_cli(config)
    interrupt_after(process, run / "metrics.jsonl", 3, signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    (checkpoint,) = (run / "checkpoints").iterdir()
    stopped = int(checkpoint.name.removeprefix("step-"))
    assert 3 <= stopped < steps, "the run finished before it was interrupted"
    assert err.strip().splitlines()[-1] == (
        f"sorai: SIGINT at step {stopped}: saved checkpoint {checkpoint}; continue with --resume"
    )
    assert "Traceback" not in err

    resumed = start_cli(config, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    expected = {r["step"]: r["loss"] for r in read_metrics(whole / "metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
