"""Training checkpoints with torch.distributed.checkpoint (DCP): atomic, last K kept.

A checkpoint is a directory `step-000120/` holding DCP's `.metadata` and shards: the trainable
parameters (all of them for full fine-tuning, the adapters for LoRA), the optimizer state keyed
by parameter name, and the trainer's own state (step, scheduler, data position, RNG). DCP writes
one shard per rank and reshards on load, which is what lets the parallel trainer save and load
the same checkpoints under any layout.

Atomic: a checkpoint is written to `.tmp-step-000120/` and renamed into place only once it is
complete, so a run killed mid-save leaves the previous checkpoint as the latest whole one and a
stray temporary directory that the next save clears away.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from sorai.errors import SoraiError

_NAME = re.compile(r"^step-(\d+)$")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Frozen parameters are not in a checkpoint; the trainable ones are all checked by dcp.load,
# whose template holds exactly them.
_SET_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointError(SoraiError):
    """A checkpoint that cannot be found or loaded into this run."""


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save and load; one process is a supported layout."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and (path / ".metadata").exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`."""
    final = directory / f"step-{step:06d}"
    tmp = directory / f".tmp-step-{step:06d}"
    if _is_main():
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_state, "optim": optim_state, "trainer": trainer_state}
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    _barrier()
    if _is_main():
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. at the end): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
) -> dict[str, Any]:
    """Load `path` into the model and optimizer (in place); returns the trainer state, whose
    keys and types are those of the `trainer_state` template."""
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path}: not a complete checkpoint (no .metadata)")
    model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_state, "optim": optim_state, "trainer": trainer_state}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    except Exception as e:  # DCP raises CheckpointException wrapping per-rank failures
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot be loaded into this run ({first}); was it written with another "
            "model, method (lora/full) or LoRA configuration?"
        ) from None
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_SET_OPTIONS,
    )
    return state["trainer"]
