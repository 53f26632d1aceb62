"""Parallel training layouts against one process: tokens/s and per-rank peak memory.

    python benchmarks/bench_parallel.py [--method full|lora] [--steps 8] [--warmup 2]
        [--layouts single,zero1,zero2,zero3,tp2,tp2-sp,pp2-gpipe,pp2-1f1b] [--json out.json]

Every layout runs `sorai train` (one process, or `--nproc 2`: torchrun with gloo) on the same
work: a random-init Llama-style model (8 layers, hidden 512, 8 heads / 4 kv heads, MLP 1536,
the default model's 49,152-token vocabulary, untied head: ~76M parameters), float32, AdamW, the
same text rows of seq_len tokens, and the same global batch (ROWS rows per optimizer step,
split over the data-parallel ranks). The single process gets every core; two processes one
thread per core each, as `--nproc` gives them.

Reported per layout, from the run's metrics.jsonl:
- tokens/s: median over the steps after the warmup of (tokens in the step) / (step time), all
  ranks together, and its ratio to the single process;
- peak memory: the largest peak RSS of any rank (interpreter, torch and the data included);
- model states: rank 0's bytes of weights, gradients and optimizer states after the first step.

On a 2-core CPU the parallel layouts do not run faster than one process using both cores: the
collectives (gloo over loopback) come on top of the same arithmetic. What they buy is memory:
ZeRO-3 halves the model states per rank, tp and pp halve the weights. The figures measure what
the mechanisms cost, the same code that spreads a model over GPUs with NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS = 8
SEQ_LEN = 256
LAYOUTS: dict[str, tuple[int, list[str]]] = {  # name: (processes, flags)
    "single": (1, []),
    "zero1": (2, ["--parallel.zero_stage", "1"]),
    "zero2": (2, ["--parallel.zero_stage", "2"]),
    "zero3": (2, ["--parallel.zero_stage", "3"]),
    "tp2": (2, ["--parallel.tp", "2", "--parallel.sequence_parallel", "false"]),
    "tp2-sp": (2, ["--parallel.tp", "2"]),
    "pp2-gpipe": (2, ["--parallel.pp", "2", "--parallel.pp_schedule", "gpipe"]),
    "pp2-1f1b": (2, ["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b"]),
}
TEXT = (
    "the model trains on rows of tokens while the ranks exchange gradients shards and "
    "activations across a mesh of processes that hold parts of every layer"
)


def make_model(path: Path) -> None:
    from sorai import hub
    from sorai.model.scratch import write_random_model

    gguf = hub.resolve(hub.DEFAULT_MODEL, progress=print)
    write_random_model(
        gguf,
        path,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=False,
    )


def make_data(path: Path, documents: int) -> None:
    rng = random.Random(0)
    words = TEXT.split()
    with path.open("w") as f:
        for _ in range(documents):
            # ~1.3 tokens per word: each document fills most of a row.
            text = " ".join(rng.choice(words) for _ in range(SEQ_LEN * 2 // 3))
            f.write(json.dumps({"text": text}) + "\n")


def run_layout(
    name: str, args: argparse.Namespace, model: Path, data: Path, work: Path
) -> dict[str, Any]:
    nproc, flags = LAYOUTS[name]
    out = work / name
    dp = 1 if any(f in flags for f in ("--parallel.tp", "--parallel.pp")) or nproc == 1 else nproc
    command = [
        sys.executable,
        "-m",
        "sorai.cli",
        "train",
        "--model",
        str(model),
        "--method",
        args.method,
        "--data.train",
        str(data),
        "--data.seq_len",
        str(SEQ_LEN),
        "--data.format",
        "text",
        "--train.micro_batch_size",
        str(ROWS // dp),
        "--train.max_steps",
        str(args.steps),
        "--train.precision",
        "fp32",
        "--checkpoint.every",
        "0",
        "--export.adapter",
        "false",
        "--log.tensorboard",
        "false",
        "--output-dir",
        str(out),
        "-q",
        *flags,
    ]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"layout": name, "error": result.stderr.strip().splitlines()[-1:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r][args.warmup :]
    states = next((r["state_bytes_rank0"] for r in rows if "state_bytes_rank0" in r), {})
    return {
        "layout": name,
        "processes": nproc,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "peak_memory_gib": max(r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r),
        "state_mib": {k: round(v / 2**20, 1) for k, v in states.items()},
        "final_loss": rows[-1].get("loss", next(r["loss"] for r in reversed(rows) if "loss" in r)),
        "wall_s": round(wall, 1),
    }


def print_table(results: list[dict[str, Any]]) -> None:
    single = next((r for r in results if r["layout"] == "single" and "error" not in r), None)
    header = (
        f"{'layout':<10} {'procs':>5} {'tokens/s':>9} {'vs single':>9} {'peak RSS/rank':>13} "
        f"{'weights':>9} {'grads':>9} {'optim':>9}  (rank 0 model states, MiB)"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['layout']:<10} failed: {r['error']}")
            continue
        ratio = r["tokens_per_s"] / single["tokens_per_s"] if single else float("nan")
        s = r["state_mib"]
        print(
            f"{r['layout']:<10} {r['processes']:>5} {r['tokens_per_s']:>9.0f} {ratio:>8.2f}x "
            f"{r['peak_memory_gib']:>10.2f} GiB {s.get('weights', 0):>9.1f} "
            f"{s.get('gradients', 0):>9.1f} {s.get('optimizer', 0):>9.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=("full", "lora"), default="full")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    print(f"cpu cores: {os.cpu_count()}, load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="sorai-bench-parallel-") as tmp:
        work = Path(tmp)
        model, data = work / "model", work / "data.jsonl"
        make_model(model)
        make_data(data, ROWS * (args.steps + 1))
        results = []
        for name in names:
            results.append(run_layout(name, args, model, data, work))
            print(f"  {name}: {results[-1]}", file=sys.stderr)
    print(f"method {args.method}, {ROWS} rows x {SEQ_LEN} tokens per step, {args.steps} steps")
    print_table(results)
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
