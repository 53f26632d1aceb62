"""Training checkpoints with torch.distributed.checkpoint (DCP): atomic, last K kept.

A checkpoint is a directory `step-000120/` holding DCP's `.metadata` and shards: the trainable
parameters (all of them for full fine-tuning, the adapters for LoRA), the optimizer state keyed
by parameter name (`state.layers.0.mlp.up_proj.weight.exp_avg`), and the trainer's own state
(step, scheduler, data position, RNG). DCP writes
one shard per rank and reshards on load, which is what lets the parallel trainer save and load
the same checkpoints under any layout.

Atomic: a checkpoint is written to `.tmp-step-000120/` and renamed into place only once it is
complete, so a run killed mid-save leaves the previous checkpoint as the latest whole one and a
stray temporary directory that the next save clears away. A checkpoint damaged afterwards (a
disk that filled, a copy cut short) is found by `checkpoint_problem` before anything is loaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from sorai.errors import SoraiError

_NAME = re.compile(r"^step-(\d+)$")
# What DCP's planner raises for a checkpoint of another run (a key or a shape this run does
# not have); any other failure to load files whose lengths are right is damaged bytes (a
# shard's pickle, torch's zip reader).
_MISMATCH = re.compile(r"missing key|unexpected key|size mismatch|shape", re.IGNORECASE)
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Frozen parameters are not in a checkpoint; the trainable ones are all checked by dcp.load,
# whose template holds exactly them.
_SET_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointError(SoraiError):
    """A checkpoint that cannot be found or loaded into this run."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are cut short, missing or unreadable: an earlier one may do."""


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


def checkpoint_step(path: Path) -> int | None:
    """The step of checkpoint directory `path` by its name (step-000120), else None."""
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where directories can be opened: POSIX)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(error: BaseException) -> str:
    """One line for `error`: the first failure DCP gathered from the ranks, else the error."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    text = str(error).strip().splitlines()
    if not text:
        return type(error).__name__
    first = text[0] if len(text[0]) <= 160 else text[0][:157] + "..."
    return f"{type(error).__name__}: {first}"


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with checkpoint `path` on disk, or None when it looks whole: its .metadata
    reads and every shard it indexes is there, at least as long as the index says. Cheap (file
    sizes, no tensor is read), so a resume can check before it loads anything."""
    if not (path / ".metadata").is_file():
        return "it has no .metadata (its save did not finish)"
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # a truncated or overwritten pickle: any unpickling error
        return f"its .metadata cannot be read ({_reason(e)})"
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"its shard {name} is missing"
        size = shard.stat().st_size
        if size < end:
            return f"its shard {name} is truncated ({size} bytes; the index needs {end})"
    return None


def trainable_state(model: nn.Module) -> dict[str, Any]:
    """The state-dict entries of the trainable weights. A frozen tied weight is left out under
    both its names (DCP's ignore_frozen_params drops only the first name of a shared weight, so
    a stage holding the head alone and a whole model would disagree about `lm_head.weight`)."""
    trainable = {
        name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad
    }
    state = get_model_state_dict(model, options=_OPTIONS)
    return {name: value for name, value in state.items() if name in trainable}


def _parts(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


def _model_state(parts: list[nn.Module]) -> dict[str, Any]:
    """The trainable weights of every part (pipeline stages of one rank), by full name."""
    state: dict[str, Any] = {}
    for part in parts:
        state.update(trainable_state(part))
    return state


def _param_names(parts: list[nn.Module]) -> dict[nn.Parameter, str]:
    names = {}
    for part in parts:
        for name, param in part.named_parameters():
            names.setdefault(param, name)
    return names


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer holding this rank's states (ZeroRedundancyOptimizer keeps them in .optim,
    for the parameters this rank owns)."""
    return getattr(optimizer, "optim", optimizer)


def _optimizer_state(parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`state.<param name>.<key>` for every state this rank holds: one flat key per tensor, so
    the same key names the same tensor under every layout (DTensor shards under FSDP and TP,
    whole tensors of the owned parameters under ZeRO-1, plain tensors on one device) and DCP
    can reshard between them; the hyperparameters come from the configuration."""
    names = _param_names(parts)
    out = {}
    for param, state in local_optimizer(optimizer).state.items():
        for key, value in state.items():
            out[f"state.{names[param]}.{key}"] = value
    return out


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's (lazily made) states, so a checkpoint can be loaded into them:
    one step on zero gradients at lr 0 (AdamW leaves the weights as they are)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module | Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`. `model` may be
    several parts (a rank's pipeline stages)."""
    final = directory / f"step-{step:06d}"
    tmp = directory / f".tmp-step-{step:06d}"
    if _is_main():
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    parts = _parts(model)
    state = {
        "model": _model_state(parts),
        "optim": _optimizer_state(parts, optimizer),
        "trainer": trainer_state,
    }
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    _barrier()
    if _is_main():
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. at the end): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _load(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    """dcp.load, its failures as one-line CheckpointErrors. DCP raises CheckpointException,
    which is a BaseException (an `except Exception` lets it through), gathering every rank's
    failure; bytes that do not decode are damage, anything else (DCP's missing key or size
    mismatch) a checkpoint of another run."""
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    except (Exception, CheckpointException) as e:
        reason = _reason(e)
        if not _MISMATCH.search(reason):
            raise DamagedCheckpointError(f"checkpoint {path} is damaged: {reason}") from None
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded into this run ({reason}); was it written "
            "with another model, method (lora/full) or LoRA configuration?"
        ) from None


def load_checkpoint(
    path: Path,
    model: nn.Module | Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
) -> dict[str, Any]:
    """Load `path` into the model and optimizer (in place, whatever layout wrote it); returns
    the trainer state, whose keys and types are those of the `trainer_state` template."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {problem}")
    parts = _parts(model)
    init_optimizer_state(optimizer)
    state = {
        "model": _model_state(parts),
        "optim": _optimizer_state(parts, optimizer),
        "trainer": trainer_state,
    }
    _load(state, path, no_dist=not dist.is_initialized())
    for part in parts:
        set_model_state_dict(part, state["model"], options=_SET_OPTIONS)
    # The optimizer's tensors were loaded in place.
    return state["trainer"]


def load_weights(path: Path, model: nn.Module) -> None:
    """Load only the trained weights of checkpoint `path` into `model`, in this process alone
    (an export: one model in one piece, whatever layout wrote the checkpoint)."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {problem}")
    state = {"model": trainable_state(model)}
    _load(state, path, no_dist=True)
    set_model_state_dict(model, state["model"], options=_SET_OPTIONS)
