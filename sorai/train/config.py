"""The training configuration: one YAML file and/or `--section.field` flags, flags winning.

Every field is declared once here, with its type, default and help; `sorai train --help`, the
YAML reader, the flag parser and the resolved `config.yaml` in the run directory all come from
these dataclasses, so they cannot disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from sorai.errors import SoraiError


class ConfigError(SoraiError):
    """A training configuration that cannot be used: unknown key, wrong type, bad value."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: default, metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class DataConfig:
    train: str | None = _f(
        None, "training data: a JSONL file (chat, prompt/completion, alpaca, text)"
    )
    val: str | None = _f(None, "validation JSONL file (or use val_split)")
    val_split: float = _f(0.0, "fraction of the training records held out for validation")
    format: Literal["chat", "prompt_completion", "alpaca", "text"] | None = _f(
        None, "record format; default: detected from each line's keys"
    )
    seq_len: int = _f(1024, "tokens per row; longer examples are truncated or dropped")
    overflow: Literal["truncate", "drop"] = _f("truncate", "what to do with a too-long example")
    train_on_prompt: bool = _f(False, "also train on prompt/user tokens (default: answers only)")
    pack: bool = _f(True, "pack several examples per row (else one per row, length-bucketed)")
    shuffle: bool = _f(True, "shuffle the examples every epoch (by seed and epoch)")


@dataclass
class LoRASection:
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    target_modules: list[str] | str = _f(
        "all-linear", "'all-linear' or module names, e.g. [q_proj, v_proj]"
    )
    use_rslora: bool = _f(False, "scale by alpha / sqrt(r) (rank-stabilised LoRA)")


@dataclass
class OptimConfig:
    lr: float = _f(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to norms and biases)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0 = off)")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "linear", "constant"] = _f("cosine", "decay after warmup")
    warmup_steps: int = _f(0, "steps of linear warmup from 0 to lr")
    min_lr_ratio: float = _f(0.0, "the decay ends at lr * min_lr_ratio")


CheckpointMode = Literal["none", "selective", "full"]


@dataclass
class TrainSection:
    micro_batch_size: int = _f(8, "rows per forward pass")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    epochs: int = _f(1, "passes over the training data")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides epochs)")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto",
        "bf16 = bfloat16 autocast over float32 master weights; auto: bf16 where matmuls run "
        "fast in it (a GPU with bf16, a CPU with AVX-512 BF16 or AMX), else fp32",
    )
    activation_checkpointing: CheckpointMode | bool = _f(
        "none",
        "recompute in backward instead of keeping: selective = the pointwise ops (norms, RoPE, "
        "SiLU; matmul and attention outputs kept), full = each whole block (least memory, "
        "about a third more compute); true/false mean full/none",
    )
    compile: bool = _f(False, "torch.compile each block")
    loss_chunk: int = _f(1024, "positions projected to logits at a time by the loss")
    device: str | None = _f(None, "cpu, cuda, cuda:N (default: a GPU when there is one)")
    threads: int | None = _f(None, "CPU threads for torch (default: all cores)")
    memory_limit: str | None = _f(
        None,
        "memory one process may use, e.g. 6GiB or 512MiB (default: what is free: the "
        "machine's available memory, or a container's limit, shared by its processes; a GPU's "
        "free memory); the memory estimate must stay under 0.85 of it",
    )
    fit_memory: bool = _f(
        True,
        "when the estimate exceeds memory_limit: lower micro_batch_size (raising grad_accum "
        "so a step keeps its rows), then turn on activation checkpointing, until it fits; "
        "false: refuse, naming the flags that fit",
    )


@dataclass
class ParallelConfig:
    dp_replicate: int = _f(1, "data-parallel replicas: ranks holding whole copies of the states")
    dp_shard: int = _f(
        -1, "data-parallel ranks sharing out the states per zero_stage; -1: what the world leaves"
    )
    tp: int = _f(1, "tensor-parallel ranks: each Linear (and attention head) split across them")
    pp: int = _f(1, "pipeline stages' ranks: each holds a run of layers")
    zero_stage: Literal[0, 1, 2, 3] = _f(
        3,
        "over dp_shard: 0 replicate (DDP), 1 shard optimizer states, 2 also gradients, "
        "3 also weights (FSDP2)",
    )
    sequence_parallel: bool = _f(True, "with tp: split the norms' activations on the sequence")
    loss_parallel: bool = _f(True, "with tp: shard the head on the vocabulary, loss without gather")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = _f(
        "1f1b", "pipeline schedule; interleaved_1f1b runs 2 stages per rank"
    )
    microbatches: int | None = _f(
        None, "pipeline micro-batches per micro_batch_size rows (default: pp, or 2 * pp)"
    )
    pp_layers: list[int] | None = _f(
        None, "layers per stage, e.g. [5, 7]; default: balanced by layer count"
    )

    @property
    def dp(self) -> int:
        return self.dp_replicate * max(self.dp_shard, 1)


@dataclass
class CheckpointConfig:
    every: int = _f(100, "save a checkpoint every N optimizer steps (0 = only at the end)")
    keep: int = _f(3, "keep the last K checkpoints")


@dataclass
class LogConfig:
    every: int = _f(1, "write metrics every N steps")
    eval_every: int = _f(0, "validation loss every N steps (0 = at the end of each epoch)")
    tensorboard: bool = _f(True, "also write TensorBoard events when tensorboard is installed")
    progress: bool = _f(True, "show a progress bar on a terminal")


@dataclass
class ExportConfig:
    adapter: bool = _f(True, "LoRA: write the adapter in PEFT format to <output_dir>/adapter")
    merged: bool = _f(False, "also write the merged model as an HF directory (<output_dir>/model)")


@dataclass
class TrainConfig:
    model: str = _f("smollm2-135m-instruct", "base model: a known name, an HF directory or .gguf")
    output_dir: str = _f("runs/train", "run directory: config, metrics, checkpoints, exports")
    method: Literal["lora", "full"] = _f("lora", "lora (adapters only) or full fine-tuning")
    seed: int = _f(0, "seed for initialisation, data order and dropout")
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        checkpointing = self.train.activation_checkpointing
        if isinstance(checkpointing, bool):  # the older on/off form
            self.train.activation_checkpointing = "full" if checkpointing else "none"
        if not self.data.train:
            raise ConfigError("data.train is required: the training JSONL file")
        positive = {
            "data.seq_len": self.data.seq_len,
            "train.micro_batch_size": self.train.micro_batch_size,
            "train.grad_accum": self.train.grad_accum,
            "train.epochs": self.train.epochs,
            "train.loss_chunk": self.train.loss_chunk,
            "checkpoint.keep": self.checkpoint.keep,
            "log.every": self.log.every,
            "lora.r": self.lora.r,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        non_negative = {
            "checkpoint.every": self.checkpoint.every,
            "log.eval_every": self.log.eval_every,
            "schedule.warmup_steps": self.schedule.warmup_steps,
            "optim.weight_decay": self.optim.weight_decay,
            "optim.max_grad_norm": self.optim.max_grad_norm,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{name} must not be negative, got {value}")
        if self.train.memory_limit is not None:
            parse_bytes(self.train.memory_limit, "train.memory_limit")
        if self.train.max_steps is not None and self.train.max_steps < 1:
            raise ConfigError(f"train.max_steps must be at least 1, got {self.train.max_steps}")
        if not self.optim.lr > 0:
            raise ConfigError(f"optim.lr must be positive, got {self.optim.lr}")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ConfigError(
                f"schedule.min_lr_ratio must be in [0, 1], got {self.schedule.min_lr_ratio}"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self.optim, name) < 1:
                raise ConfigError(
                    f"optim.{name} must be in [0, 1), got {getattr(self.optim, name)}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str, name: str) -> int:
    """A memory size: bytes, or a number with K/M/G/T (binary: 6GiB = 6G = 6 x 2^30)."""
    match = _SIZE.match(str(text))
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(
            f"{name}: expected a memory size such as 6GiB, 512MiB or 8000000000, got {text!r}"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: t for name, t in hints.items() if dataclasses.is_dataclass(t)}


def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}" if get_args(tp) else "list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """value checked against tp (YAML already typed it; flags arrive as YAML-parsed strings)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(str(a) for a in get_args(tp))
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        (item,) = get_args(tp) or (str,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; it is a number to anyone writing it.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover


def _apply(config: TrainConfig, values: dict[str, Any], source: str) -> None:
    sections = _sections()
    top = _fields(TrainConfig)
    for key, value in values.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be a mapping of its fields")
            section = getattr(config, key)
            fields = _fields(type(section))
            for name, sub in value.items():
                if name not in fields:
                    known = ", ".join(fields)
                    raise ConfigError(f"{source}: unknown field {key}.{name} (known: {known})")
                tp = fields[name][0]
                setattr(section, name, _coerce(sub, tp, f"{source}: {key}.{name}"))
        elif key in top:
            setattr(config, key, _coerce(value, top[key][0], f"{source}: {key}"))
        else:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(top)})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: not valid YAML ({problem})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path}: the config must be a mapping of keys, got {type(values).__name__}"
        )
    return values


def _metavar(tp: Any) -> str:
    if get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1:
            tp = options[0]
    name = _type_name(tp)
    return f"{{{name.replace('|', ',')}}}" if get_origin(tp) is Literal else name.upper()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One `--section.field` flag per config field (and `--model`, `--output-dir` ...), each
    documented with its type and default. Values are read as YAML: 3, 1e-4, true, [q_proj]."""
    for name, (tp, f) in _fields(TrainConfig).items():
        if name in _sections():
            section = f.default_factory()
            group = parser.add_argument_group(f"{name} (YAML section `{name}:`)")
            for sub, (stp, sf) in _fields(type(section)).items():
                default = getattr(section, sub)
                group.add_argument(
                    f"--{name}.{sub}",
                    dest=f"cfg:{name}.{sub}",
                    metavar=_metavar(stp),
                    default=argparse.SUPPRESS,
                    help=f"{sf.metadata['help']} ({_type_name(stp)}, default: {default})",
                )
        else:
            parser.add_argument(
                f"--{name.replace('_', '-')}",
                dest=f"cfg:{name}",
                metavar=_metavar(tp),
                default=argparse.SUPPRESS,
                help=f"{f.metadata['help']} (default: {f.default})",
            )


def _field_type(path: str) -> Any:
    section, _, name = path.rpartition(".")
    cls = _sections()[section] if section else TrainConfig
    return _fields(cls)[name][0]


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given as flags, nested as in the YAML file. Values are read as YAML
    (3, 1e-4, true, [q_proj, v_proj], null), except that a string field takes the text as
    given, so `--model 1.5` stays "1.5"."""
    values: dict[str, Any] = {}
    for key, raw in vars(args).items():
        if not key.startswith("cfg:"):
            continue
        path = key.removeprefix("cfg:")
        tp = _field_type(path)
        if raw in ("null", "none", "None", "~") and type(None) in get_args(tp):
            value = None
        elif tp is str or (
            get_origin(tp) in (typing.Union, types.UnionType)
            and str in get_args(tp)
            and list not in [get_origin(a) for a in get_args(tp)]
        ):
            value = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
        section, _, name = path.rpartition(".")
        if section:
            values.setdefault(section, {})[name] = value
        else:
            values[name] = value
    return values


def resolve(file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then the flags; validated."""
    config = TrainConfig()
    if file is not None:
        _apply(config, load_yaml(file), str(file))
    if overrides:
        _apply(config, overrides, "flag")
    config.validate()
    return config
