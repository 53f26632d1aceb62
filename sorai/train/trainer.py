"""The training loop: LoRA or full fine-tuning of a sorai Transformer on one device.

Run directory (`output_dir`):
  config.yaml       the resolved configuration
  metrics.jsonl     one row per logged step (loss, lr, grad_norm, tokens/s ...) and per eval
  checkpoints/      step-NNNNNN/ DCP checkpoints, the last `checkpoint.keep` of them
  adapter/          LoRA: the adapter in PEFT format
  model/            full fine-tuning (or export.merged): an HF directory with tokenizer files
  loss.png          the loss curve
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from sorai import hub, openmp
from sorai.errors import SoraiError
from sorai.model.hardware import machine
from sorai.model.loader import load_model, read_config, resolve_device
from sorai.model.lora import LoRAConfig, apply_lora, merge_lora, save_adapter
from sorai.model.tokenizer import Tokenizer
from sorai.model.transformer import Transformer
from sorai.model.weights import save_hf_dir
from sorai.train import distributed
from sorai.train.checkpoint import (
    CheckpointError,
    DamagedCheckpointError,
    checkpoint_problem,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    local_optimizer,
    save_checkpoint,
)
from sorai.train.config import TrainConfig
from sorai.train.data import Batch, BatchLoader, Dataset, load_dataset, pack
from sorai.train.estimate import Layout
from sorai.train.fit import fit_memory, memory_limit
from sorai.train.host_memory import own_weights, tune_allocator
from sorai.train.interrupt import StopRequests
from sorai.train.loss import chunked_cross_entropy
from sorai.train.metrics import MetricsLog, Progress, plot_loss, read_metrics
from sorai.train.optim import build_optimizer, build_scheduler
from sorai.train.parallelize import choose_precision, lower_frozen_weights, parallelize
from sorai.train.pipeline import build_schedule, build_stage_models

log = logging.getLogger("sorai.train")

CONFIG_FILE = "config.yaml"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    loss: float
    val_loss: float | None
    export: Path | None
    tokens_per_s: float
    seconds: float = 0.0  # the training loop's wall time
    # Stopped early by this signal (SIGINT, SIGTERM) after saving `checkpoint`; 0: ran to the end.
    interrupted: int = 0
    checkpoint: Path | None = None


GIB = 1024**3


def local_bytes(tensor: Tensor) -> int:
    """Bytes this rank holds of `tensor` (its local shard of a DTensor)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def peak_memory(device: torch.device) -> int:
    """This process's peak memory so far: allocated CUDA memory on a GPU, else the peak
    resident set size (which includes the interpreter and torch themselves)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def batch_inputs(batch: Batch, device: torch.device, per_row: bool = False) -> dict[str, Tensor]:
    """The model's keyword inputs for `batch`: positions always (under sequence parallelism
    the model cannot infer them from its slice of the sequence), a document mask only when a
    row holds more than one document. per_row: positions as [B, T] (pipeline micro-batches
    split every input on its first dimension)."""
    # Rows holding one document each need neither per-row positions nor a mask: plain causal
    # attention is exact there (padding comes last and has no targets), and SDPA's causal
    # kernels are faster than a masked one.
    packed = bool((batch.document_ids > 0).any())
    if packed:
        return {
            "positions": batch.position_ids.to(device),
            "mask": batch.attention_mask().to(device),
        }
    positions = torch.arange(batch.input_ids.shape[1], device=device)
    if per_row:
        positions = positions.expand(batch.input_ids.shape[0], -1).contiguous()
    return {"positions": positions}


def head_loss(
    output: Tensor, labels: Tensor, head: torch.nn.Linear | None, loss_chunk: int
) -> Tensor:
    """The summed cross-entropy of a model's output: with `head`, `output` is the final norm's
    output and the head is applied chunk by chunk; without, `output` is the logits sharded on
    the vocabulary (loss parallel) and torch's loss_parallel computes it, inside the
    `loss_parallel()` context the caller holds through backward."""
    if head is None:
        logits = output.flatten(0, 1).float()
        return F.cross_entropy(logits, labels.flatten(), reduction="sum", ignore_index=-100)
    if isinstance(output, DTensor):  # sequence-parallel norm output: gather the sequence
        output = output.full_tensor()
    return chunked_cross_entropy(output, head.weight, labels, loss_chunk)


def forward_loss(
    model: Transformer,
    batch: Batch,
    autocast: torch.dtype | None,
    loss_chunk: int,
    caller: torch.nn.Module | None = None,
    loss_parallel: bool = False,
) -> Tensor:
    """The summed cross-entropy of one micro-batch (a sum: see chunked_cross_entropy).
    caller: the module to call (a DDP wrapper of `model`), default the model."""
    device = model.device
    tokens = batch.input_ids.to(device)
    context = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with context:
        output = (caller or model)(tokens, **batch_inputs(batch, device), head=loss_parallel)
        head = None if loss_parallel else model.lm_head
        return head_loss(output, batch.labels.to(device), head, loss_chunk)


class Trainer:
    """`Trainer(config).run()`; `resume` is True (the latest checkpoint in the run directory)
    or a checkpoint directory."""

    def __init__(
        self, config: TrainConfig, resume: bool | str | Path = False, fallback: bool = False
    ) -> None:
        """fallback: a damaged checkpoint to resume from is skipped (and set aside as
        `damaged-step-NNNNNN/`) for the newest whole one before it, instead of an error."""
        config.validate()
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.fallback = fallback
        self.damaged: list[Path] = []  # checkpoints skipped as damaged, newest first
        self._candidates: list[Path] = []
        self.resume_from = self._find_resume(resume)

    # -- setup --------------------------------------------------------------------------------

    def _find_resume(self, resume: bool | str | Path) -> Path | None:
        if resume is False or resume is None:
            existing = list_checkpoints(self.checkpoint_dir)
            if existing:
                raise SoraiError(
                    f"{self.run_dir} already holds a run (latest checkpoint {existing[-1].name}); "
                    "pass --resume to continue it, or choose another output_dir"
                )
            return None
        if resume is True:
            # Newest first: with fallback, the older ones are what a damaged one falls back to.
            candidates = list_checkpoints(self.checkpoint_dir)[::-1]
            if not candidates:
                raise CheckpointError(
                    f"--resume: {self.checkpoint_dir} holds no complete checkpoint to resume from"
                )
        else:
            path = Path(resume)
            if not (path / ".metadata").exists():
                raise CheckpointError(f"--resume {path}: not a complete checkpoint directory")
            step = checkpoint_step(path)
            older = []
            if step is not None:
                found = list_checkpoints(path.parent)[::-1]
                older = [p for p in found if (checkpoint_step(p) or 0) < step]
            candidates = [path, *older]
        self._candidates = candidates
        return self._next_whole()

    def _next_whole(self) -> Path:
        """The first candidate checkpoint whose files are whole; without fallback, the first
        candidate or a one-line error saying what is wrong with it (and what fallback would
        resume from)."""
        while self._candidates:
            path = self._candidates.pop(0)
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            self._skip(path, f"checkpoint {path} is damaged: {problem}")
        raise CheckpointError(
            "--resume: no whole checkpoint to resume from ("
            + ", ".join(p.name for p in self.damaged)
            + " damaged)"
        )

    def _skip(self, path: Path, message: str) -> None:
        """A damaged checkpoint: an error without fallback, else noted and passed over."""
        if not self.fallback:
            earlier = next((p for p in self._candidates if checkpoint_problem(p) is None), None)
            hint = (
                f"--resume-fallback continues from {earlier.name}, the newest whole one before it"
                if earlier is not None
                else "no earlier checkpoint is whole"
            )
            raise DamagedCheckpointError(f"{message}; {hint}")
        log.warning("%s; falling back to an earlier checkpoint", message)
        self.damaged.append(path)

    def _threads(self) -> None:
        # Processes on one machine share its cores.
        per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(self.config.train.threads or max(1, per_process))

    def _init_distributed(self) -> None:
        """Join the other processes (under torchrun) and build the mesh of the layout."""
        cfg = self.config
        world = distributed.world_size()
        self.dims = distributed.check_layout(cfg, world)
        self.mesh = None
        if world == 1:
            self.device = resolve_device(cfg.train.device)
            return
        self.device = distributed.device_for_rank(cfg.train.device)
        distributed.init(self.device)
        self.mesh = self.dims.build_mesh(self.device.type)

    def _local_rank(self, dim: str) -> int:
        return self.mesh[dim].get_local_rank() if self.mesh is not None else 0

    def setup(self) -> None:
        cfg = self.config
        self._init_distributed()
        self._threads()
        self.precision = choose_precision(cfg.train.precision, self.device)
        self.autocast = self.precision.autocast
        if self.device.type == "cpu":
            tune_allocator()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if self.mesh is not None:
            # One download per machine: its first process pulls the model, the others wait
            # (and reach the barrier even when it fails, so no rank hangs).
            failed: Exception | None = None
            if distributed.local_rank() == 0:
                try:
                    hub.resolve(cfg.model)
                except Exception as e:  # raised below, after the others are released
                    failed = e
            dist.barrier()
            if failed is not None:
                raise failed
        path = hub.resolve(cfg.model)
        self._fit_memory(path)
        # Weights stay float32 (the optimizer's master copy); bf16 comes from autocast.
        model, self.tokenizer = load_model(path, torch.float32, self.device, quantize="none")
        own_weights(model)
        model.train()
        if cfg.method == "lora":
            self.adapter = apply_lora(model, self.lora_config(), dtype=torch.float32)
        else:
            self.adapter = None
            model.requires_grad_(True)
        # On one device only: sharding and pipeline stages take one dtype per unit.
        self.lowered_weights = 0
        if self.autocast is not None and self.mesh is None:
            self.lowered_weights = lower_frozen_weights(model, self.autocast)
        dims = self.dims
        self.loss_parallel = dims.tp > 1 and cfg.parallel.loss_parallel
        self.schedule = None
        if dims.pp > 1:
            parts, stage_ids, num_stages = build_stage_models(
                model, cfg.parallel, self._local_rank("pp"), cfg.method == "full"
            )
            self.last_stage = stage_ids[-1] == num_stages - 1
        else:
            parts, self.last_stage = [model], True
        self.parts: list[Transformer] = parts
        self.model = parts[-1]
        self.callers = [
            parallelize(part, cfg.train, dims, self.mesh, cfg.parallel) for part in parts
        ]
        if dims.pp > 1:
            for part, caller in zip(parts, self.callers, strict=True):
                if part.lm_head is not None and not self.loss_parallel:
                    # The last stage returns the final norm's output; the loss applies the head.
                    caller.forward = functools.partial(caller.forward, head=False)
            self.schedule = build_schedule(
                self.callers,
                stage_ids,
                num_stages,
                self.mesh["pp"],
                self.device,
                cfg.parallel,
                cfg.parallel.microbatches or dims.pp,
                self._pipeline_loss,
            )
        self.params = [p for part in parts for p in part.parameters() if p.requires_grad]
        zero_group = None
        if dims.zero_stage == 1 and dims.dp_shard > 1:
            zero_group = self.mesh["dp_shard"].get_group()
        named = [item for part in parts for item in part.named_parameters()]
        self.optimizer = build_optimizer(named, cfg.optim, zero_group)
        self.data = self._data()
        self.loader = BatchLoader(
            self.data.train,
            seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.train.micro_batch_size,
            pack=cfg.data.pack,
            shuffle=cfg.data.shuffle,
            seed=cfg.seed,
            pad_id=self._pad_id(),
            rank=self._local_rank("dp"),
            world_size=dims.dp,
        )
        micro_steps = len(self.loader) * cfg.train.epochs
        self.total_steps = cfg.train.max_steps or math.ceil(micro_steps / cfg.train.grad_accum)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.schedule)
        self.step = 0
        self.tokens_seen = 0
        self._loss_scale = 1.0
        self.first_state_bytes: dict[str, int] | None = None

    def _fit_memory(self, path: Path) -> None:
        """Check the memory estimate against what a process may use, before anything is
        loaded: lower the batch settings to fit (train.fit_memory), or refuse in one line."""
        cfg = self.config
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        limit, source = memory_limit(cfg, self.device, processes)
        if self.mesh is not None:
            # Every rank reads the memory at its own moment: the least of them decides for
            # all, so all train with the same settings.
            tensor = torch.tensor([float(limit)], dtype=torch.float64, device=self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
            limit = int(tensor.item())
        layout = Layout.from_config(cfg.parallel, self.dims.world_size)
        autocast = self.autocast is not None
        note = fit_memory(cfg, read_config(path), layout, autocast, limit, source)
        if note is not None and distributed.is_main():
            log.info("%s", note)

    def lora_config(self) -> LoRAConfig:
        cfg = self.config.lora
        return LoRAConfig(
            r=cfg.r,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_rslora=cfg.use_rslora,
        )

    def _pad_id(self) -> int:
        tok: Tokenizer = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        return pad if isinstance(pad, int) else tok.eos_token_ids[0]

    def _data(self) -> Dataset:
        cfg = self.config.data
        return load_dataset(
            cfg.train,
            self.tokenizer,
            max_length=cfg.seq_len,
            format=cfg.format,
            overflow=cfg.overflow,
            train_on_prompt=cfg.train_on_prompt,
            val_path=cfg.val,
            val_split=cfg.val_split,
            seed=self.config.seed,
        )

    # -- state --------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self) -> Path:
        return save_checkpoint(
            self.checkpoint_dir,
            self.step,
            self.parts,
            self.optimizer,
            self.trainer_state(),
            keep=self.config.checkpoint.keep,
        )

    def restore(self, path: Path) -> None:
        while True:
            try:
                state = load_checkpoint(path, self.parts, self.optimizer, self.trainer_state())
                break
            except DamagedCheckpointError as e:
                # Bytes that do not decode although every file has its full length: found
                # only by loading. Every rank gets DCP's gathered error, so all fall back.
                self._skip(path, str(e))
                path = self.resume_from = self._next_whole()
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        self.scheduler.load_state_dict(state["scheduler"])
        # Checkpoints hold no hyperparameters (they come from the configuration); the lr of the
        # step to come is the schedule's.
        for group, lr in zip(
            self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def _set_aside_damaged(self) -> None:
        """Rename the damaged checkpoints skipped by fallback to `damaged-step-NNNNNN/`: kept
        for a look, but no longer the latest checkpoint nor counted by `checkpoint.keep`."""
        if distributed.is_main():
            for path in self.damaged:
                aside = path.with_name(f"damaged-{path.name}")
                if aside.exists():
                    shutil.rmtree(aside)
                path.rename(aside)
                log.warning("set the damaged %s aside as %s", path, aside.name)
        if self.mesh is not None:
            dist.barrier()

    # -- collectives --------------------------------------------------------------------------

    def _reporting(self) -> bool:
        """Whether this rank's loss sums count in the reported loss: per data-parallel rank,
        the one that computes the loss (the last pipeline stage), and of the tensor-parallel
        ranks, which all hold it, the first."""
        return self.last_stage and self._local_rank("tp") == 0

    def _sum(self, values: list[float], dim: str | None = None) -> list[float]:
        """`values` summed over the ranks of mesh dimension `dim` (all ranks when None)."""
        if self.mesh is None:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.mesh[dim].get_group() if dim else None)
        return tensor.tolist()

    def _grad_norm_sq(self) -> Tensor:
        """The squared global gradient norm: DTensor gradients (FSDP, TP) grouped by layout so
        each group costs one reduction; pipeline stages' norms summed over the pipeline."""
        groups: dict[object, list[Tensor]] = {}
        for param in self.params:
            if param.grad is None:
                continue
            grad = param.grad
            key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
            groups.setdefault(key, []).append(grad)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for grads in groups.values():
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            total += norm.float() ** 2
        if self.dims.pp > 1:
            dist.all_reduce(total, group=self.mesh["pp"].get_group())
        return total

    @torch.no_grad()
    def _clip(self) -> float:
        norm = float(self._grad_norm_sq().sqrt())
        max_norm = self.config.optim.max_grad_norm
        if max_norm > 0 and norm > max_norm:
            coef = max_norm / (norm + 1e-6)
            for param in self.params:
                if param.grad is not None:
                    param.grad.mul_(coef)
        return norm

    # -- loop ---------------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[Batch]:
        """Micro-batches across epoch boundaries, until the epochs (or max_steps) run out."""
        while self.config.train.max_steps or self.loader.epoch < self.config.train.epochs:
            yield from self.loader

    def _pipeline_loss(self, output: Tensor, labels: Tensor) -> Tensor:
        """The loss of one pipeline micro-batch, on the last stage."""
        head = None if self.loss_parallel else self.model.lm_head
        return head_loss(output, labels, head, self.config.train.loss_chunk) * self._loss_scale

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _loss_context(self) -> contextlib.AbstractContextManager:
        """loss_parallel() around forward and backward when the logits are vocab-sharded."""
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def _run_pipeline(self, batch: Batch, train: bool) -> float:
        """One micro-batch through the pipeline schedule (forward and backward, or forward
        only); returns this rank's loss sum (zero off the last stage)."""
        kwargs = batch_inputs(batch, self.device, per_row=True)
        args = (batch.input_ids.to(self.device),) if self._local_rank("pp") == 0 else ()
        losses: list[Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        with self._autocast():
            run(*args, target=batch.labels.to(self.device), losses=losses, **kwargs)
        # The schedule keeps each micro-batch's loss as the loss function returned it.
        return float(sum(t.item() for t in losses)) / self._loss_scale

    def _loss_sum(self, batch: Batch, train: bool) -> float:
        if self.schedule is not None:
            return self._run_pipeline(batch, train)
        loss_sum = forward_loss(
            self.model,
            batch,
            self.autocast,
            self.config.train.loss_chunk,
            self.callers[0],
            self.loss_parallel,
        )
        if train:
            (loss_sum * self._loss_scale).backward()
        return loss_sum.item()

    def train_step(self, batches: list[Batch]) -> dict[str, float]:
        """One optimizer step over `batches` (this rank's gradient-accumulation window)."""
        local_targets = sum(b.num_targets for b in batches)
        local_tokens = sum(int((b.document_ids >= 0).sum()) for b in batches)
        targets, tokens = self._sum([local_targets, local_tokens], "dp")
        # Every target of the step weighs the same, whatever rank and micro-batch it is in;
        # data-parallel gradients are averaged over the dp ranks, hence the factor dp.
        self._loss_scale = self.dims.dp / max(targets, 1)
        total = 0.0
        with self._loss_context():
            for batch in batches:
                total += self._loss_sum(batch, train=True)
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        if self.step == 0:
            # Gradients and optimizer states all exist only now, on the first step.
            self.first_state_bytes = self.state_bytes()
        self.optimizer.zero_grad(set_to_none=True)
        (total,) = self._sum([total if self._reporting() else 0.0])
        return {
            "loss": total / max(targets, 1),
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "targets": int(targets),
            "peak_memory_gib": round(self._max(peak_memory(self.device)) / GIB, 3),
        }

    def state_bytes(self) -> dict[str, int]:
        """Bytes of weights, gradients and optimizer states this rank holds (its shards under
        FSDP and TP, its owned states under ZeRO-1), as `sorai train --estimate` counts them."""
        params = {id(p): p for part in self.parts for p in part.parameters()}
        states = local_optimizer(self.optimizer).state.values()
        return {
            "weights": sum(local_bytes(p) for p in params.values()),
            "gradients": sum(local_bytes(p.grad) for p in params.values() if p.grad is not None),
            "optimizer": sum(
                local_bytes(v) for state in states for v in state.values() if torch.is_tensor(v)
            ),
        }

    def _max(self, value: float) -> float:
        """The largest of every rank's `value`."""
        if self.mesh is None:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def _val_batches(self) -> list[Batch]:
        """This data-parallel rank's share of the validation batches; ranks short of one get
        an all-padding batch, so every rank runs the same collectives."""
        cfg = self.config
        batches = pack(self.data.val, cfg.data.seq_len, cfg.train.micro_batch_size, self._pad_id())
        dp, rank = self.dims.dp, self._local_rank("dp")
        mine = batches[rank::dp]
        blank = dataclasses.replace(batches[0], labels=torch.full_like(batches[0].labels, -100))
        return mine + [blank] * (math.ceil(len(batches) / dp) - len(mine))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.data.val:
            return None
        for part in self.parts:
            part.eval()
        total, targets = 0.0, 0
        with self._loss_context():
            for batch in self._val_batches():
                total += self._loss_sum(batch, train=False)
                targets += batch.num_targets
        for part in self.parts:
            part.train()
        reporting = self._reporting()
        total, targets = self._sum([total if reporting else 0.0, targets if reporting else 0])
        return total / max(targets, 1)

    def run(self, catch_signals: bool = False) -> TrainResult:
        """Train to the end. catch_signals (what `sorai train` asks for): a SIGINT or SIGTERM
        stops at the next step boundary with a checkpoint, and the result says which
        (`interrupted`); off, they do what the calling program has them do."""
        try:
            self.setup()
            return self._run(catch_signals)
        finally:
            distributed.shutdown()

    def _run(self, catch_signals: bool) -> TrainResult:
        cfg = self.config
        main = distributed.is_main()
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            self.restore(self.resume_from)
            log.info("resumed from %s at step %d", self.resume_from, self.step)
            self._set_aside_damaged()
        if main:
            cfg.save(self.run_dir / CONFIG_FILE)
            log.info(
                "layout: %s (%d process%s)",
                self.dims.describe(),
                self.dims.world_size,
                "es" if self.dims.world_size > 1 else "",
            )
            log.info("machine: %s", machine().describe())
            log.info("OpenMP: %s", openmp.describe())
            lowered = ""
            if self.lowered_weights:
                dtype = str(self.autocast).removeprefix("torch.")
                lowered = f"; {self.lowered_weights} frozen Linear weights stored in {dtype}"
            log.info("precision: %s%s", self.precision.describe(), lowered)
            log.info("activation checkpointing: %s", cfg.train.activation_checkpointing)
        metrics = MetricsLog(
            self.run_dir,
            self.step if self.resume_from is not None else None,
            cfg.log.tensorboard,
            enabled=main,
        )
        progress = Progress(self.total_steps, self.step, cfg.log.progress and main)
        stream = self._micro_batches()
        steps_per_epoch = max(1, math.ceil(len(self.loader) / cfg.train.grad_accum))
        started = time.perf_counter()
        stop, interrupted, checkpoint = StopRequests(), 0, None
        try:
            with stop if catch_signals else contextlib.nullcontext():
                interrupted, saved_step, last_loss, val_loss, val_step, rate = self._loop(
                    stream, metrics, progress, steps_per_epoch, stop
                )
            if interrupted:
                # The step is done and counted: saved now, it is where --resume continues.
                checkpoint = self.checkpoint_dir / f"step-{self.step:06d}"
                if saved_step != self.step:
                    checkpoint = self.save()
            else:
                if self.data.val and val_step != self.step:
                    val_loss = self.evaluate()
                    metrics.write({"step": self.step, "val_loss": val_loss})
                self.save()
        finally:
            progress.close()
            metrics.close()
        if interrupted:
            seconds = time.perf_counter() - started
            return TrainResult(
                self.run_dir,
                self.step,
                last_loss,
                val_loss,
                None,
                rate,
                seconds,
                interrupted,
                checkpoint,
            )
        export = self.export()
        if main:
            plot_loss(read_metrics(metrics.path), self.run_dir / "loss.png", title=cfg.model)
        # No summary line here: the caller reports the result (`sorai train` prints it once).
        seconds = time.perf_counter() - started
        return TrainResult(self.run_dir, self.step, last_loss, val_loss, export, rate, seconds)

    def _stop_agreed(self, signum: int) -> int:
        """The stop signal any rank received (0: none), the same on every rank, so all stop
        at the same step boundary and save one checkpoint together."""
        if self.mesh is None:
            return signum
        return int(self._max(float(signum)))

    def _loop(
        self,
        stream: Iterator[Batch],
        metrics: MetricsLog,
        progress: Progress,
        steps_per_epoch: int,
        stop: StopRequests,
    ) -> tuple[int, int, float, float | None, int, float]:
        """Optimizer steps until the end or a stop request; returns (the stop signal or 0,
        the step last checkpointed, the last loss, the last val_loss and its step, tokens/s)."""
        cfg = self.config
        last_loss, val_loss, rate, val_step, saved_step = math.nan, None, 0.0, -1, -1
        while self.step < self.total_steps:
            epoch_before = self.loader.epoch
            batches = [b for _, b in zip(range(cfg.train.grad_accum), stream, strict=False)]
            if not batches:
                break
            t0 = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            row = self.train_step(batches)
            elapsed = time.perf_counter() - t0
            self.step += 1
            self.tokens_seen += row["tokens"]
            rate = row["tokens"] / elapsed
            last_loss = row["loss"]
            if self.step % cfg.log.every == 0 or self.step == self.total_steps:
                extra = {}
                if self.first_state_bytes is not None:
                    # Once, in the first row written: rank 0's model states after step 1.
                    extra = {"state_bytes_rank0": self.first_state_bytes}
                    self.first_state_bytes = None
                metrics.write(
                    {
                        "step": self.step,
                        "epoch": round(self.step / steps_per_epoch, 4),
                        **row,
                        "lr": lr,
                        "step_time": round(elapsed, 4),
                        "tokens_per_s": round(rate, 1),
                        "tokens_seen": self.tokens_seen,
                        **extra,
                    }
                )
            progress.update(self.step, last_loss, rate)
            epoch_done = self.loader.epoch != epoch_before
            due = cfg.log.eval_every and self.step % cfg.log.eval_every == 0
            if (due or (not cfg.log.eval_every and epoch_done)) and self.data.val:
                val_loss, val_step = self.evaluate(), self.step
                metrics.write({"step": self.step, "val_loss": val_loss})
                progress.note(f"step {self.step}: val_loss {val_loss:.4f}")
            every = cfg.checkpoint.every
            if every and self.step % every == 0 and self.step < self.total_steps:
                path = self.save()
                saved_step = self.step
                progress.note(f"step {self.step}: checkpoint {path}")
            signum = self._stop_agreed(stop.signum)
            if signum and self.step < self.total_steps:
                return signum, saved_step, last_loss, val_loss, val_step, rate
        return 0, saved_step, last_loss, val_loss, val_step, rate

    # -- exports ------------------------------------------------------------------------------

    def export(self) -> Path | None:
        """Write the exports; returns the adapter directory when one was written, else the
        model directory (None when nothing was asked for). A parallel run exports from its
        final checkpoint on the first rank: DCP gathers it from whatever layout wrote it."""
        cfg = self.config
        adapter = model_dir = None
        if self.adapter is not None and cfg.export.adapter:
            adapter = self.run_dir / "adapter"
        if self.adapter is None or cfg.export.merged:
            model_dir = self.run_dir / "model"
        if distributed.is_main():
            if self.mesh is None and not self.lowered_weights:
                model = self.model
            else:
                # Frozen weights stored in bf16 would merge at bf16's precision: the export
                # starts again from the float32 base.
                model = self.single_device_model(latest_checkpoint(self.checkpoint_dir))
            if adapter is not None:
                save_adapter(model, adapter, base_model_name=cfg.model)
            if model_dir is not None:
                if self.adapter is not None:
                    merge_lora(model)
                save_hf_dir(model, model_dir)
                self.tokenizer.save(model_dir)
        if self.mesh is not None:
            dist.barrier()
        return adapter or model_dir

    def single_device_model(self, checkpoint: Path | None) -> Transformer:
        """The trained model on the CPU, in one piece, from a checkpoint of any layout."""
        if checkpoint is None:
            raise CheckpointError(f"{self.checkpoint_dir} holds no checkpoint to export from")
        model, _ = load_model(
            hub.resolve(self.config.model), torch.float32, torch.device("cpu"), quantize="none"
        )
        if self.adapter is not None:
            apply_lora(model, self.lora_config(), dtype=torch.float32)
        else:
            model.requires_grad_(True)  # the checkpoint holds the trainable weights only
        load_weights(checkpoint, model)
        return model
