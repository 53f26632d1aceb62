"""`sorai train`: the command line over TrainConfig and Trainer."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from sorai import openmp
from sorai.model.config import ModelConfig
from sorai.train.config import ConfigError, TrainConfig, add_flags, flag_values, resolve
from sorai.train.interrupt import SIGNALS, exit_code, signal_name

SHUTDOWN_TIMEOUT_S = 600
# Set by `--nproc` for the processes it starts: it passes signals on to them itself.
RELAYED = "SORAI_TRAIN_SIGNALS_RELAYED"

DESCRIPTION = """\
Fine-tune a model with LoRA or full fine-tuning.

Settings come from a YAML file (CONFIG) and/or flags; flags win. Every YAML field has a flag:
`lora: {r: 16}` in the file is `--lora.r 16` on the command line. Flag values are read as YAML
(16, 1e-4, true, [q_proj, v_proj], null).

The run directory (output_dir) receives config.yaml (the resolved settings), metrics.jsonl,
checkpoints/, adapter/ (LoRA, in PEFT format) or model/ (full fine-tuning, an HF directory),
and loss.png.

examples:
  sorai train examples/finetune-intent/config.yaml
  sorai train --data.train data.jsonl --data.val val.jsonl --lora.r 16 --output-dir runs/a
  sorai train config.yaml --estimate              # memory per device, then exit
  sorai train config.yaml --resume                # continue from the latest checkpoint
  sorai train config.yaml --resume-fallback       # ... or the newest whole one before it

The training process runs OpenMP with OMP_WAIT_POLICY=ACTIVE and GOMP_SPINCOUNT=10000 (idle
threads spin briefly, then sleep) unless you set them; a value you set wins.

Ctrl-C or SIGTERM saves a checkpoint at the end of the step under way, then exits 130 or 143;
--resume continues from it. A second Ctrl-C stops at once.
  sorai chat --adapter runs/a/adapter             # use the result
  sorai serve --adapter a=runs/a/adapter          # serve it as MODEL+a (printed at the end)
"""


def add_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        "train",
        help="fine-tune a model (LoRA or full) on your data",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="a YAML file of settings (optional)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue the run in output_dir from its latest checkpoint, or from CHECKPOINT; "
        "with no CONFIG, the run's own config.yaml is used",
    )
    parser.add_argument(
        "--resume-fallback",
        action="store_true",
        help="resume (implies --resume) and, when the checkpoint is damaged (a truncated or "
        "missing shard, an unreadable .metadata), continue from the newest whole one before it, "
        "setting the damaged one aside as damaged-step-NNNNNN/; without it a damaged checkpoint "
        "is a one-line error",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print the memory per device (weights, gradients, optimizer, activations), exit",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="run N processes on this machine with torchrun (one per GPU, or N CPU processes "
        "on gloo) in the layout of the parallel section; with --estimate, the world size",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_flags(parser)
    return parser


def _config(args: argparse.Namespace) -> TrainConfig:
    overrides = flag_values(args)
    file = args.config
    if file is None and args.resume:
        # Resuming by run directory alone: its saved config is the run's config.
        out = overrides.get("output_dir") or TrainConfig().output_dir
        if args.resume is not True:
            out = str(Path(args.resume).parent.parent)
        saved = Path(out) / "config.yaml"
        if saved.exists():
            file = saved
    if args.quiet:
        overrides.setdefault("log", {})["progress"] = False
    return resolve(file, overrides)


def _model_config(config: TrainConfig) -> ModelConfig:
    from sorai import hub
    from sorai.model.architectures import KNOWN_CONFIGS, known_config
    from sorai.model.loader import read_config

    if config.model in KNOWN_CONFIGS:
        return known_config(config.model)  # an architecture alone: nothing to read
    return read_config(hub.resolve(config.model))


def _fit_memory(config: TrainConfig, nproc: int) -> None:
    """The memory check each process makes, made once before any starts: a configuration
    that cannot fit fails here in one line; one that fits once lowered is lowered here."""
    from sorai.model.loader import resolve_device
    from sorai.train import estimate as est
    from sorai.train.fit import fit_memory, memory_limit
    from sorai.train.parallelize import autocast_dtype

    device = resolve_device(config.train.device)
    limit, source = memory_limit(config, device, 1 if device.type == "cuda" else nproc)
    layout = est.Layout.from_config(config.parallel, nproc)
    autocast = autocast_dtype(config.train.precision, device) is not None
    note = fit_memory(config, _model_config(config), layout, autocast, limit, source)
    if note is not None:
        print(note, file=sys.stderr)


def _estimate(config: TrainConfig, world_size: int | None) -> str:
    """The per-rank memory table for config.parallel over `world_size` ranks (None: the
    layout's own product, dp_shard -1 read as 1), then its ZeRO stages side by side."""
    from sorai.model.loader import resolve_device
    from sorai.train import estimate as est
    from sorai.train.parallelize import autocast_dtype

    device = resolve_device(config.train.device)
    model = _model_config(config)
    layout = est.Layout.from_config(config.parallel, world_size)
    lora = {"lora_r": config.lora.r, "lora_targets": config.lora.target_modules}
    estimate = est.estimate_memory(
        model,
        method=config.method,
        **lora,
        micro_batch_size=config.train.micro_batch_size,
        seq_len=config.data.seq_len,
        autocast_bf16=autocast_dtype(config.train.precision, device) is not None,
        activation_checkpointing=config.train.activation_checkpointing,
        loss_chunk_tokens=config.train.loss_chunk,
        layout=layout,
    )
    zero = est.zero_stages(model, layout, method=config.method, **lora)
    return f"{estimate.report()}\n\n{zero.table()}"


def launch(
    config: TrainConfig, nproc: int, resume: bool | str, quiet: bool, fallback: bool = False
) -> int:
    """`sorai train` in `nproc` processes under torchrun on this machine, all reading the
    resolved configuration from one file. On several machines run torchrun yourself (see the
    docs/parallel-training.md): `torchrun --nnodes ... -m sorai.cli train config.yaml`."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    from sorai.train.distributed import check_layout

    config.validate()
    check_layout(config, nproc)  # a layout that cannot run fails here, in one line
    from sorai import hub

    hub.resolve(config.model)  # a missing model too; a download happens once, here
    _fit_memory(config, nproc)
    with tempfile.TemporaryDirectory(prefix="sorai-train-") as tmp:
        resolved = Path(tmp) / "config.yaml"
        config.save(resolved)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "sorai.cli",
            "train",
            str(resolved),
        ]
        if resume is True:
            command.append("--resume")
        elif resume:
            command += ["--resume", str(resume)]
        if fallback:
            command.append("--resume-fallback")
        if quiet:
            command.append("-q")
        # torchrun would give each process one thread; they share the machine's cores.
        threads = str(max(1, (os.cpu_count() or 1) // nproc))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
            # When torchrun itself is signalled (not through this process), how long it lets
            # the processes save a checkpoint before it kills them (its default is 30 s).
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get(
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S)
            ),
        }
        return _relay_signals(command, env)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc (empty where there is none)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The fields after the command name, which is in parentheses and may hold spaces.
            fields = entry.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry.parent.name))
    return found


def _relay_signals(command: list[str], env: dict[str, str]) -> int:
    """Run torchrun in a session of its own and pass each SIGINT/SIGTERM this process gets to
    its training processes (in sessions of their own too, so a terminal's Ctrl-C reaches them
    only this way, once). They save a checkpoint and stop, one of them saying so; torchrun is
    not signalled, so it neither prints its own traceback nor cuts the save short. Returns
    torchrun's status, or 128 + the signal when one stopped the run."""
    process = subprocess.Popen(command, env={**env, RELAYED: "1"}, start_new_session=True)
    received: list[int] = []

    def relay(signum: int, frame: object) -> None:
        received.append(signum)
        for pid in _children(process.pid) or [process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, relay) for sig in SIGNALS}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code(received[0]) if received else code


def _launches(args: argparse.Namespace) -> bool:
    """Whether this process starts torchrun (`--nproc`) rather than training itself."""
    return args.nproc is not None and "TORCHELASTIC_RUN_ID" not in os.environ


def run(args: argparse.Namespace) -> int:
    if args.resume_fallback and not args.resume:
        args.resume = True
    if not args.estimate and not _launches(args):
        # This process trains: OpenMP's idle threads spin between the step's parallel regions
        # (unless the user chose), decided before anything here loads torch.
        openmp.choose(openmp.TRAIN)
    config = _config(args)
    if args.estimate:
        print(_estimate(config, args.nproc))
        return 0
    if _launches(args):
        return launch(config, args.nproc, args.resume, args.quiet, args.resume_fallback)
    from sorai.train.trainer import Trainer

    # Under torchrun every rank runs this; the first speaks for them.
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    trainer = Trainer(config, resume=args.resume, fallback=args.resume_fallback)
    result = trainer.run(catch_signals=True)
    if result.interrupted:
        if rank == 0:
            print(
                f"sorai: {signal_name(result.interrupted)} at step {result.steps}: saved "
                f"checkpoint {result.checkpoint}; continue with --resume",
                file=sys.stderr,
            )
        # Under `--nproc` the launcher reports the signal in its status: a process stopped
        # as asked that exited non-zero would have torchrun report a failure.
        return 0 if os.environ.get(RELAYED) else exit_code(result.interrupted)
    if rank != 0:
        return 0
    steps = f"{result.steps} step{'s' if result.steps != 1 else ''}"
    print(f"trained {steps} in {result.seconds:.1f} s: loss {result.loss:.4f}", end="")
    if result.val_loss is not None:
        print(f", val_loss {result.val_loss:.4f}", end="")
    print(f"\nrun directory: {result.run_dir}")
    if result.export is not None:
        print(f"exported: {result.export}")
        from sorai import hub

        entry = hub.register_export(result.export, result.run_dir, config.model)
        # The explicit NAME=PATH form serves the LoRA export unmerged from any directory.
        serve = serve_command(config.model, result.export) or hub.serve_command(entry)
        print(f"registered as {entry.name}; serve it with: {serve}")
    return 0


def serve_command(model: str, export: Path) -> str | None:
    """The `sorai serve` line that serves a LoRA export unmerged (None for a full model)."""
    from sorai.model.lora import CONFIG_FILE, adapter_name

    if not (export / CONFIG_FILE).is_file():
        return None
    adapter = f"{adapter_name(export)}={export}"
    return f"sorai serve -m {shlex.quote(model)} --adapter {shlex.quote(adapter)}"
