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
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sorai import hub
from sorai.errors import SoraiError
from sorai.model.loader import load_model, resolve_device
from sorai.model.lora import LoRAConfig, apply_lora, merge_lora, save_adapter
from sorai.model.tokenizer import Tokenizer
from sorai.model.transformer import Transformer
from sorai.model.weights import save_hf_dir
from sorai.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sorai.train.config import TrainConfig
from sorai.train.data import Batch, BatchLoader, Dataset, load_dataset, pack
from sorai.train.loss import chunked_cross_entropy
from sorai.train.metrics import MetricsLog, Progress, plot_loss, read_metrics
from sorai.train.optim import build_optimizer, build_scheduler
from sorai.train.parallelize import autocast_dtype, parallelize

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


def forward_loss(
    model: Transformer, batch: Batch, autocast: torch.dtype | None, loss_chunk: int
) -> Tensor:
    """The summed cross-entropy of one micro-batch (a sum: see chunked_cross_entropy)."""
    device = model.device
    tokens = batch.input_ids.to(device)
    # Rows holding one document each need neither per-row positions nor a mask: plain causal
    # attention is exact there (padding comes last and has no targets), and SDPA's causal
    # kernels are faster than a masked one.
    packed = bool((batch.document_ids > 0).any())
    positions = batch.position_ids.to(device) if packed else None
    mask = batch.attention_mask().to(device) if packed else None
    context = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with context:
        hidden = model(tokens, positions=positions, mask=mask, head=False)
        return chunked_cross_entropy(
            hidden, model.lm_head.weight, batch.labels.to(device), loss_chunk
        )


class Trainer:
    """`Trainer(config).run()`; `resume` is True (the latest checkpoint in the run directory)
    or a checkpoint directory."""

    def __init__(self, config: TrainConfig, resume: bool | str | Path = False) -> None:
        config.validate()
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
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
            found = latest_checkpoint(self.checkpoint_dir)
            if found is None:
                raise CheckpointError(
                    f"--resume: {self.checkpoint_dir} holds no complete checkpoint to resume from"
                )
            return found
        path = Path(resume)
        if not (path / ".metadata").exists():
            raise CheckpointError(f"--resume {path}: not a complete checkpoint directory")
        return path

    def _threads(self) -> None:
        threads = self.config.train.threads or os.cpu_count() or 1
        torch.set_num_threads(threads)

    def setup(self) -> None:
        cfg = self.config
        self._threads()
        self.device = resolve_device(cfg.train.device)
        self.autocast = autocast_dtype(cfg.train.precision, self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        path = hub.resolve(cfg.model)
        # Weights stay float32 (the optimizer's master copy); bf16 comes from autocast.
        self.model, self.tokenizer = load_model(path, torch.float32, self.device)
        self.model.train()
        if cfg.method == "lora":
            lora = LoRAConfig(
                r=cfg.lora.r,
                alpha=cfg.lora.alpha,
                dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                use_rslora=cfg.lora.use_rslora,
            )
            self.adapter = apply_lora(self.model, lora, dtype=torch.float32)
        else:
            self.adapter = None
            self.model.requires_grad_(True)
        parallelize(self.model, cfg.train)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.data = self._data()
        self.loader = BatchLoader(
            self.data.train,
            seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.train.micro_batch_size,
            pack=cfg.data.pack,
            shuffle=cfg.data.shuffle,
            seed=cfg.seed,
            pad_id=self._pad_id(),
        )
        micro_steps = len(self.loader) * cfg.train.epochs
        self.total_steps = cfg.train.max_steps or math.ceil(micro_steps / cfg.train.grad_accum)
        self.optimizer = build_optimizer(self.model.named_parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.schedule)
        self.step = 0
        self.tokens_seen = 0

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
            self.model,
            self.optimizer,
            self.trainer_state(),
            keep=self.config.checkpoint.keep,
        )

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path, self.model, self.optimizer, self.trainer_state())
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    # -- loop ---------------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[Batch]:
        """Micro-batches across epoch boundaries, until the epochs (or max_steps) run out."""
        while self.config.train.max_steps or self.loader.epoch < self.config.train.epochs:
            yield from self.loader

    def train_step(self, batches: list[Batch]) -> dict[str, float]:
        """One optimizer step over `batches` (the gradient-accumulation window)."""
        targets = sum(b.num_targets for b in batches)
        total = 0.0
        for batch in batches:
            loss_sum = forward_loss(self.model, batch, self.autocast, self.config.train.loss_chunk)
            # Normalised by the window's targets, so every target weighs the same.
            (loss_sum / max(targets, 1)).backward()
            total += loss_sum.item()
        max_norm = self.config.optim.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, max_norm if max_norm > 0 else math.inf
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(int((b.document_ids >= 0).sum()) for b in batches)
        return {
            "loss": total / max(targets, 1),
            "grad_norm": float(grad_norm),
            "tokens": tokens,
            "targets": targets,
        }

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.data.val:
            return None
        was_training = self.model.training
        self.model.eval()
        cfg = self.config
        total, targets = 0.0, 0
        for batch in pack(
            self.data.val, cfg.data.seq_len, cfg.train.micro_batch_size, self._pad_id()
        ):
            total += forward_loss(self.model, batch, self.autocast, cfg.train.loss_chunk).item()
            targets += batch.num_targets
        self.model.train(was_training)
        return total / max(targets, 1)

    def run(self) -> TrainResult:
        cfg = self.config
        self.setup()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            self.restore(self.resume_from)
            log.info("resumed from %s at step %d", self.resume_from, self.step)
        cfg.save(self.run_dir / CONFIG_FILE)
        metrics = MetricsLog(
            self.run_dir,
            self.step if self.resume_from is not None else None,
            cfg.log.tensorboard,
        )
        progress = Progress(self.total_steps, self.step, cfg.log.progress)
        stream = self._micro_batches()
        steps_per_epoch = max(1, math.ceil(len(self.loader) / cfg.train.grad_accum))
        last_loss, val_loss, rate, val_step = math.nan, None, 0.0, -1
        started = time.perf_counter()
        try:
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
                    metrics.write(
                        {
                            "step": self.step,
                            "epoch": round(self.step / steps_per_epoch, 4),
                            **row,
                            "lr": lr,
                            "step_time": round(elapsed, 4),
                            "tokens_per_s": round(rate, 1),
                            "tokens_seen": self.tokens_seen,
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
                    progress.note(f"step {self.step}: checkpoint {path}")
            if self.data.val and val_step != self.step:
                val_loss = self.evaluate()
                metrics.write({"step": self.step, "val_loss": val_loss})
            self.save()
        finally:
            progress.close()
            metrics.close()
        export = self.export()
        plot_loss(read_metrics(metrics.path), self.run_dir / "loss.png", title=cfg.model)
        log.info(
            "trained %d steps in %.1f s, final loss %.4f",
            self.step,
            time.perf_counter() - started,
            last_loss,
        )
        return TrainResult(self.run_dir, self.step, last_loss, val_loss, export, rate)

    # -- exports ------------------------------------------------------------------------------

    def export(self) -> Path | None:
        """Write the exports; returns the adapter directory when one was written, else the
        model directory (None when nothing was asked for)."""
        cfg = self.config
        adapter = model = None
        if self.adapter is not None and cfg.export.adapter:
            adapter = self.run_dir / "adapter"
            save_adapter(self.model, adapter, base_model_name=cfg.model)
        if self.adapter is None or cfg.export.merged:
            model = self.run_dir / "model"
            if self.adapter is not None:
                merge_lora(self.model)
            save_hf_dir(self.model, model)
            self.tokenizer.save(model)
        return adapter or model
