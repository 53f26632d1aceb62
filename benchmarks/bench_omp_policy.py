"""The OpenMP wait policy's gain and cost: training and decode steps under each policy.

    python benchmarks/bench_omp_policy.py [--rounds 2] [--spincounts 10000,100000]
        [--train-steps 4] [--decode-steps 20] [--no-train] [--no-decode]

Variants, the environment each process starts with (libgomp reads it once, as torch loads it):
  PASSIVE       idle OpenMP threads sleep at once (what `sorai serve` and the Python engine run)
  ACTIVE        they spin until the next parallel region (what `sorai train` runs)
  spin N        OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=N: spin N iterations, then sleep (the
                spin count overrides either policy's; libgomp's own default is 300000)
Each round runs every variant once, in a rotated order, each in a fresh process:
  train   bench_train.py's sorai LoRA worker (the step `sorai train` runs): tokens/s, the median
          over the timed steps, and the float32 matmul peak measured after them
  decode  bench_decode_step.py --threads 1,2 --no-profile: ms per engine decode step at batch
          1 and 16, 1 and 2 threads alternating step by step
Medians over the rounds and ratios to PASSIVE are printed with the CPU flags and load averages.
The parent process imports neither torch nor sorai.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_train  # benchmarks/bench_train.py: the script's folder is on sys.path
from common import cpu_flags

HERE = Path(__file__).resolve().parent
POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# bench_decode_step.wall_line(): "wall, kv auto, 1 thread(s): step 41.0 ms = ...".
DECODE_LINE = re.compile(r"wall, (?:kv [^,]+, )?(\d+) thread\(s\): step ([\d.]+) ms")
BATCH_LINE = re.compile(r"^batch (\d+):")


def variants(spincounts: list[int]) -> dict[str, dict[str, str]]:
    found = {"PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"}}
    for n in spincounts:
        found[f"spin {n}"] = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(n)}
    return found


def environment(variant: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES}
    return {**env, **variant}


def train_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench_train.py's settings for its sorai LoRA worker (its defaults, these steps)."""
    return argparse.Namespace(
        model="smollm2-135m-instruct",
        seq_len=256,
        micro_batch=8,
        steps=args.train_steps,
        warmup=1,
        threads=os.cpu_count() or 1,
        seed=0,
        hf_dir=None,
        bf16_note=False,
        sorai_set=[],
        method="lora",
    )


def run_train(settings: argparse.Namespace, work: Path, label: str, env: dict[str, str]) -> dict:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # run_worker starts its process with os.environ
    try:
        run = bench_train.run_worker(settings, "sorai", work, label)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    tokens = settings.micro_batch * settings.seq_len
    return {
        "tokens_per_s": statistics.median(tokens / t for t in run["step_times"]),
        "matmul_gflops": run["matmul_fp32_gflops"],
    }


def run_decode(steps: int, env: dict[str, str]) -> dict[tuple[int, int], float]:
    """{(batch, threads): ms per decode step} from one bench_decode_step.py process."""
    command = [sys.executable, str(HERE / "bench_decode_step.py"), "--no-profile"]
    command += ["--threads", "1,2", "--batch", "1,16", "--steps", str(steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_decode_step.py failed:\n{done.stderr[-3000:]}")
    return parse_decode(done.stdout)


def parse_decode(stdout: str) -> dict[tuple[int, int], float]:
    """{(batch, threads): ms per step} from bench_decode_step.py's printed lines."""
    found, batch = {}, 0
    for line in stdout.splitlines():
        if m := BATCH_LINE.match(line):
            batch = int(m.group(1))
        elif m := DECODE_LINE.search(line):
            found[(batch, int(m.group(1)))] = float(m.group(2))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--spincounts", default="10000,100000", help="GOMP_SPINCOUNT values")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--no-decode", dest="decode", action="store_false")
    args = parser.parse_args()
    spins = [int(n) for n in args.spincounts.split(",") if n.strip()]
    chosen = variants(spins)
    names = list(chosen)
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} CPUs")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"variants: {', '.join(f'{k} ({chosen[k]})' for k in names)}; {args.rounds} round(s)")
    train: dict[str, list[dict]] = {k: [] for k in names}
    decode: dict[str, list[dict]] = {k: [] for k in names}
    settings = train_args(args)
    with tempfile.TemporaryDirectory(prefix="sorai-bench-omp-") as tmp:
        work = Path(tmp)
        if args.train:
            print("preparing bench_train's corpus", flush=True)
            prep = bench_train.run_worker(settings, "prepare", work, "prepare")
            (work / "prepare.json").write_text(bench_train.json.dumps(prep))
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                env = environment(chosen[name])
                started = time.perf_counter()
                if args.train:
                    run = run_train(settings, work, f"{name.replace(' ', '-')}-{round_}", env)
                    train[name].append(run)
                    print(
                        f"  round {round_ + 1} {name}: train {run['tokens_per_s']:.1f} tok/s, "
                        f"matmul {run['matmul_gflops']:.1f} GFLOP/s",
                        flush=True,
                    )
                if args.decode:
                    steps = run_decode(args.decode_steps, env)
                    decode[name].append(steps)
                    print(
                        f"  round {round_ + 1} {name}: decode ms/step "
                        + ", ".join(f"b{b} t{t} {ms:.1f}" for (b, t), ms in sorted(steps.items())),
                        flush=True,
                    )
                print(f"    ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.train:
        base = statistics.median(r["tokens_per_s"] for r in train["PASSIVE"])
        print(f"\ntrain (sorai LoRA, {args.train_steps} steps; medians of {args.rounds} rounds)")
        print(f"  {'variant':<14}{'tok/s':>8}{'vs PASSIVE':>12}{'matmul GFLOP/s':>16}")
        for name in names:
            rate = statistics.median(r["tokens_per_s"] for r in train[name])
            peak = statistics.median(r["matmul_gflops"] for r in train[name])
            print(f"  {name:<14}{rate:8.1f}{rate / base:11.2f}x{peak:16.1f}")
    if args.decode:
        keys = sorted({k for runs in decode.values() for r in runs for k in r})
        print(f"\ndecode ms/step (medians of {args.rounds} rounds; ratio to PASSIVE)")
        print(f"  {'variant':<14}" + "".join(f"{f'b{b} t{t}':>16}" for b, t in keys))
        for name in names:
            cells = []
            for key in keys:
                ms = statistics.median(r[key] for r in decode[name])
                base = statistics.median(r[key] for r in decode["PASSIVE"])
                cells.append(f"{ms:8.1f} ({ms / base:4.2f}x)")
            print(f"  {name:<14}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
