"""Matmul time by weight format for the default model's shapes: per layer and per decode step.

    python benchmarks/bench_kernels.py [--rows 1,4,16,64] [--threads N] [--rounds 7]

Formats, each as the model runs it on this CPU:
  fp32       float32 weight in the column-major layout loader.use_column_major_weights makes
  bf16       bfloat16 weight and activations (a bf16 model's path)
  int8       Int8Linear's kernel (per-channel int8, activations cast to bfloat16 and back)
  int4       Int4Linear's kernel (group-32 int4, activations cast to bfloat16 and back)
The low-bit layers' dense fallback for large batches is switched off here, so every row count
shows the kernel itself. A decode step multiplies by every block's projections (30 blocks of
distinct weights, so they stream from memory as in the model, not from cache) and the head; the
step table gives both the separate projections and q/k/v and gate/up fused, as the engine runs
them. Variants alternate within each round (A, B, C, A, B, C ...) and medians are printed, so a
shared machine's noise hits all alike. CPU flags, load average and ratios to fp32 are printed
for picking a path per machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sorai.model.hardware import machine
from sorai.model.quant import Int4Linear, Int8Linear

HIDDEN, KV, FFN, VOCAB, BLOCKS = 576, 192, 1536, 49152, 30
SHAPES = {  # (in, out)
    "q/o 576->576": (HIDDEN, HIDDEN),
    "k/v 576->192": (HIDDEN, KV),
    "gate/up 576->1536": (HIDDEN, FFN),
    "down 1536->576": (FFN, HIDDEN),
    "head 576->49152": (HIDDEN, VOCAB),
}
BLOCK_SEPARATE = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN)]
BLOCK_SEPARATE += [(HIDDEN, FFN), (HIDDEN, FFN), (FFN, HIDDEN)]
BLOCK_FUSED = [(HIDDEN, HIDDEN + 2 * KV), (HIDDEN, HIDDEN), (HIDDEN, 2 * FFN), (FFN, HIDDEN)]
FORMATS = ("fp32", "bf16", "int8", "int4")


def make_layer(fmt: str, n_in: int, n_out: int) -> Callable[[Tensor], Tensor]:
    """A matmul of `fmt` on a random weight; it takes float32 rows (bf16 rows for bf16)."""
    weight = torch.randn(n_out, n_in) / n_in**0.5
    if fmt == "fp32":
        column_major = weight.t().contiguous().t()
        return lambda x: F.linear(x, column_major)
    if fmt == "bf16":
        w16 = weight.to(torch.bfloat16)
        return lambda x: F.linear(x, w16)
    layer = Int8Linear.quantize(weight) if fmt == "int8" else Int4Linear.quantize(weight)
    layer.dense_from_rows = 1 << 30  # the kernel at every row count
    return layer


def rows_for(fmt: str, m: int, n_in: int) -> Tensor:
    x = torch.randn(m, n_in)
    return x.to(torch.bfloat16) if fmt == "bf16" else x


def median_ms(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float) -> dict:
    """Median ms per call of each function, alternating between them within every round."""
    for fn in fns.values():  # warm-up, and a call count that fills ~budget_s per round
        fn()
    calls = {}
    for name, fn in fns.items():
        started = time.perf_counter()
        fn()
        one = max(time.perf_counter() - started, 1e-6)
        calls[name] = max(1, min(200, int(budget_s / len(fns) / one)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, fn in fns.items():
                started = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                samples[name].append((time.perf_counter() - started) / calls[name] * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def per_layer(rows: list[int], rounds: int) -> None:
    print("\nms per call, one layer (ratio to fp32 in brackets)")
    print(f"{'shape':<20}{'rows':>5}" + "".join(f"{f:>16}" for f in FORMATS))
    for label, (n_in, n_out) in SHAPES.items():
        layers = {fmt: make_layer(fmt, n_in, n_out) for fmt in FORMATS}
        for m in rows:
            xs = {fmt: rows_for(fmt, m, n_in) for fmt in FORMATS}
            fns = {fmt: (lambda f=fmt, xs=xs: layers[f](xs[f])) for fmt in FORMATS}  # noqa: B023
            ms = median_ms(fns, rounds, budget_s=0.3)
            cells = "".join(f"{ms[f]:>8.3f} ({ms[f] / ms['fp32']:4.2f})" for f in FORMATS)
            print(f"{label:<20}{m:>5}{cells}", flush=True)


def decode_step(rows: list[int], rounds: int) -> None:
    """Every block's projections (distinct weights) plus the head, per format."""
    print(f"\nms per decode step: {BLOCKS} blocks + head (576->49152)")
    for layout, shapes in (("separate q/k/v, gate/up", BLOCK_SEPARATE), ("fused", BLOCK_FUSED)):
        stacks = {
            fmt: [make_layer(fmt, i, o) for _ in range(BLOCKS) for i, o in shapes]
            for fmt in FORMATS
        }
        heads = {fmt: make_layer(fmt, HIDDEN, VOCAB) for fmt in FORMATS}
        print(f"  {layout}")
        print(f"  {'rows':>6}{'blocks':>8}" + "".join(f"{f:>16}" for f in FORMATS))
        for m in rows:
            xs = {fmt: {n: rows_for(fmt, m, n) for n in (HIDDEN, FFN)} for fmt in FORMATS}

            def blocks(fmt: str, stacks=stacks, shapes=shapes, xs=xs) -> None:
                for layer, (n_in, _) in zip(stacks[fmt], shapes * BLOCKS, strict=True):
                    layer(xs[fmt][n_in])

            fns = {f"{fmt} blocks": (lambda f=fmt: blocks(f)) for fmt in FORMATS}
            fns |= {
                f"{fmt} head": (lambda f=fmt, xs=xs, heads=heads: heads[f](xs[f][HIDDEN]))
                for fmt in FORMATS
            }
            ms = median_ms(fns, rounds, budget_s=1.0)
            base = ms["fp32 blocks"]
            cells = "".join(
                f"{ms[f'{f} blocks']:>8.2f} ({ms[f'{f} blocks'] / base:4.2f})" for f in FORMATS
            )
            print(f"  {m:>6}{'':>8}{cells}")
            head = ms["fp32 head"]
            cells = "".join(
                f"{ms[f'{f} head']:>8.2f} ({ms[f'{f} head'] / head:4.2f})" for f in FORMATS
            )
            print(f"  {'':>6}{'head':>8}{cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,64", help="rows per call (batch x tokens)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: its)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per cell")
    parser.add_argument("--no-layers", action="store_true", help="decode-step totals only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"machine: {machine().describe()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    torch.manual_seed(0)
    if not args.no_layers:
        per_layer(rows, args.rounds)
    decode_step(rows, args.rounds)
    print("\nload average: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
