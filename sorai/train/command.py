"""`sorai train`: the command line over TrainConfig and Trainer."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sorai.train.config import TrainConfig, add_flags, flag_values, resolve

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
  sorai chat --adapter runs/a/adapter             # use the result
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
        "--estimate",
        action="store_true",
        help="print the memory per device (weights, gradients, optimizer, activations), exit",
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


def _estimate(config: TrainConfig) -> str:
    from sorai import hub
    from sorai.model.loader import read_config, resolve_device
    from sorai.train.estimate import estimate_memory
    from sorai.train.parallelize import autocast_dtype

    device = resolve_device(config.train.device)
    model = read_config(hub.resolve(config.model))
    estimate = estimate_memory(
        model,
        method=config.method,
        lora_r=config.lora.r,
        lora_targets=config.lora.target_modules,
        micro_batch_size=config.train.micro_batch_size,
        seq_len=config.data.seq_len,
        autocast_bf16=autocast_dtype(config.train.precision, device) is not None,
        activation_checkpointing=config.train.activation_checkpointing,
        loss_chunk_tokens=config.train.loss_chunk,
    )
    return estimate.report()


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.estimate:
        print(_estimate(config))
        return 0
    from sorai.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    result = Trainer(config, resume=args.resume).run()
    print(f"trained {result.steps} steps: loss {result.loss:.4f}", end="")
    if result.val_loss is not None:
        print(f", val_loss {result.val_loss:.4f}", end="")
    print(f"\nrun directory: {result.run_dir}")
    if result.export is not None:
        print(f"exported: {result.export}")
    return 0
