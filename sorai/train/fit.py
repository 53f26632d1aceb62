"""Training that fits the machine: a configuration's memory estimate (sorai.train.estimate)
against what one process may use, and the batch settings that fit when it does not."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sorai.model.config import ModelConfig
from sorai.train import estimate as est
from sorai.train.config import ConfigError, TrainConfig, parse_bytes
from sorai.train.host_memory import available_bytes

# The estimate leaves out the interpreter, torch itself and the allocator's slack ("expect
# the real peak somewhat higher"): it must stay under this share of the memory.
HEADROOM = 0.85
CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class Settings:
    """The batch settings that decide the activations' memory."""

    micro_batch_size: int
    grad_accum: int
    activation_checkpointing: str

    @classmethod
    def of(cls, config: TrainConfig) -> Settings:
        train = config.train
        return cls(train.micro_batch_size, train.grad_accum, str(train.activation_checkpointing))

    def flags(self) -> str:
        return (
            f"--train.micro_batch_size {self.micro_batch_size} "
            f"--train.grad_accum {self.grad_accum} "
            f"--train.activation_checkpointing {self.activation_checkpointing}"
        )

    def apply(self, config: TrainConfig) -> None:
        config.train.micro_batch_size = self.micro_batch_size
        config.train.grad_accum = self.grad_accum
        config.train.activation_checkpointing = self.activation_checkpointing


def memory_limit(config: TrainConfig, device: torch.device, processes: int) -> tuple[int, str]:
    """The bytes one process may use and where the figure comes from: train.memory_limit, a
    GPU's free memory, or the host's available memory shared by this machine's `processes`."""
    if config.train.memory_limit is not None:
        return parse_bytes(config.train.memory_limit, "train.memory_limit"), "train.memory_limit"
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    available = available_bytes()
    if available is None:
        return 0, ""
    shared = f", shared by {processes} processes" if processes > 1 else ""
    return available // processes, f"available on this machine{shared}"


def estimate(
    config: TrainConfig,
    model: ModelConfig,
    layout: est.Layout,
    autocast_bf16: bool,
    settings: Settings | None = None,
) -> est.MemoryEstimate:
    """The memory estimate of `config` per rank (under other batch `settings` if given)."""
    settings = settings or Settings.of(config)
    return est.estimate_memory(
        model,
        method=config.method,
        lora_r=config.lora.r,
        lora_targets=config.lora.target_modules,
        micro_batch_size=settings.micro_batch_size,
        seq_len=config.data.seq_len,
        autocast_bf16=autocast_bf16,
        activation_checkpointing=settings.activation_checkpointing,
        loss_chunk_tokens=config.train.loss_chunk,
        layout=layout,
    )


def _smaller(settings: Settings, pp_microbatches: int) -> Iterator[Settings]:
    """Settings with the same rows per step and less memory, least costly first: smaller
    micro-batches (divisors of the configured one; no extra compute), then each of them again
    with selective, then full activation checkpointing (recompute in backward)."""
    rows = settings.micro_batch_size
    sizes = [m for m in range(rows, 0, -1) if rows % m == 0 and m % pp_microbatches == 0]
    start = CHECKPOINTING.index(settings.activation_checkpointing)
    for checkpointing in CHECKPOINTING[start:]:
        for size in sizes:
            yield Settings(size, settings.grad_accum * rows // size, checkpointing)


def fit_memory(
    config: TrainConfig,
    model: ModelConfig,
    layout: est.Layout,
    autocast_bf16: bool,
    limit: int,
    source: str,
) -> str | None:
    """None when `config` fits in `limit` bytes per process as it is; else, with
    train.fit_memory on, the settings that fit are applied to `config` and a line saying so is
    returned; off (or when nothing fits), a one-line ConfigError with the numbers and the flags
    that fit (or what to change when nothing does)."""
    if limit <= 0:
        return None  # nothing known about the machine: nothing to check against
    budget = int(limit * HEADROOM)
    current = Settings.of(config)
    need = estimate(config, model, layout, autocast_bf16)
    if need.total <= budget:
        return None
    fmt = est.format_bytes
    microbatches = (layout.microbatches or layout.pp) if layout.pp > 1 else 1
    fits = last = None
    for settings in _smaller(current, microbatches):
        last = settings, estimate(config, model, layout, autocast_bf16, settings)
        if last[1].total <= budget:
            fits = last
            break
    over = (
        f"{fmt(need.total)} per process at micro-batch {current.micro_batch_size} x "
        f"{config.data.seq_len} tokens (activations {fmt(need.activations)}, activation "
        f"checkpointing {current.activation_checkpointing}; weights, gradients and optimizer "
        f"{fmt(need.total - need.activations)})"
    )
    room = f"{fmt(budget)}, {HEADROOM:.2f} of {fmt(limit)} ({source})"
    if fits is not None and config.train.fit_memory:
        settings, fitted = fits
        settings.apply(config)
        return (
            f"memory: the estimate, {over}, is more than {room}: training with "
            "micro_batch_size "
            f"{settings.micro_batch_size}, grad_accum {settings.grad_accum}, activation "
            f"checkpointing {settings.activation_checkpointing} ({fmt(fitted.total)}; the same "
            "rows per step)"
        )
    if fits is not None:
        settings, fitted = fits
        raise ConfigError(
            f"training needs about {over}, more than {room}; these fit "
            f"({fmt(fitted.total)}, the same rows per step): {settings.flags()} "
            "(or set train.fit_memory true to have them chosen)"
        )
    least = ""
    if last is not None:
        least = (
            f"; even micro_batch_size {last[0].micro_batch_size} with full activation "
            f"checkpointing needs {fmt(last[1].total)}"
        )
    raise ConfigError(
        f"training needs about {over}, more than {room}{least}: use a shorter "
        "data.seq_len, method lora, more processes (parallel layouts shard the states) or a "
        "machine with more memory"
    )
