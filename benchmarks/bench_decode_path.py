"""Which low-bit decode path to run on this machine: the block matmuls of one decode step by path.

    python benchmarks/bench_decode_path.py [--rows 1,4,8,16] [--threads 1] [--rounds 7]

Paths, each over the default model's 30 blocks (q/k/v and gate/up fused, as the engine runs
them; the int8 head is the same in every path and left out):
  int4      Int4Linear's kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations) on the
            decode threads alone (the engine decodes on one core less than it has)
  int4/all  the same kernel on every core from 4 rows (SORAI_LOWBIT_DECODE=all-cores)
  fp32      the same int4 weights expanded once into a float32 copy, one GEMM per layer on the
            same bf16-rounded rows (SORAI_LOWBIT_DECODE=dense)
  fp32/8    the float32 copy in fixed 8-row tiles (the last one padded), an attempt at a batch-
            invariant GEMM (it is not on every CPU: MKL's edge tiles)
  int8      Int8Linear's kernel on the weights requantized per row (different values)
  fp16      fbgemm's float16 GEMM on a float16 copy of the int4 weights, rows padded to counts
            whose micro-kernels sum alike (SORAI_LOWBIT_DECODE=fp16, the default where it fits)
For each path the table says whether a row's output is bit-for-bit the same alone and within
16 rows (batch invariance, which the engine's tests check). Paths alternate within each round
(A, B, C, A, B, C ...) and medians are printed with ratios to int4, the CPU flags and the load
average. `--threads` defaults to the engine's decode threads (one less than the cores).

`--engine` then times whole engine decode steps of the default model (sampling, attention and
all) with M sequences decoding, switching step by step between the kernels on the decode
threads, on every core from 4 rows, the float32 copy and fbgemm's float16 GEMM, and says which
path a server picks.
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
from sorai.model.quant.linear import ALL_CORES_FROM_ROWS, on_all_cores

HIDDEN, KV, FFN, BLOCKS = 576, 192, 1536, 30
FUSED = [(HIDDEN, HIDDEN + 2 * KV), (HIDDEN, HIDDEN), (HIDDEN, 2 * FFN), (FFN, HIDDEN)]
PATHS = ("int4", "int4/all", "fp32", "fp32/8", "int8", "fp16")
TILE = 8


def tiled(rows: Tensor, weight: Tensor) -> Tensor:
    """rows @ weight.T in fixed TILE-row GEMMs, the last tile padded with zeros."""
    pad = -rows.shape[0] % TILE
    if pad:
        rows = torch.cat((rows, rows.new_zeros(pad, rows.shape[1])))
    out = torch.cat([F.linear(tile, weight) for tile in rows.split(TILE)])
    return out[: out.shape[0] - pad]


def make_layer(path: str, n_in: int, n_out: int) -> Callable[[Tensor], Tensor]:
    """One layer of `path` on a random weight: float32 rows in, float32 out."""
    weight = torch.randn(n_out, n_in) / n_in**0.5
    if path == "int8":
        layer8 = Int8Linear.quantize(weight)
        return lambda x: torch._weight_int8pack_mm(
            x.to(torch.bfloat16), layer8.q, layer8.scale_bf16
        ).float()
    layer = Int4Linear.quantize(weight)
    if path == "fp16":
        layer.fp16_decode = True
        return layer
    if path == "int4":
        return lambda x: layer._lowbit(x.to(torch.bfloat16)).float()
    if path == "int4/all":
        return lambda x: on_all_cores(
            layer._lowbit, x.to(torch.bfloat16), ALL_CORES_FROM_ROWS
        ).float()
    cache = layer.kernel_weight().t().contiguous().t()  # column-major, as the loader lays fp32
    if path == "fp32":
        return lambda x: F.linear(x.to(torch.bfloat16).float(), cache)
    return lambda x: tiled(x.to(torch.bfloat16).float(), cache)


def median_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, fn in fns.items():
                started = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def row_invariant(layer: Callable[[Tensor], Tensor], n_in: int) -> bool:
    x = torch.randn(16, n_in)
    together = layer(x)
    return all(torch.equal(together[i : i + 1], layer(x[i : i + 1])) for i in range(16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16", help="sequences per decode step")
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--engine", action="store_true", help="also time whole engine steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {machine().describe()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    stacks = {p: [make_layer(p, i, o) for _ in range(BLOCKS) for i, o in FUSED] for p in PATHS}
    shapes = FUSED * BLOCKS
    invariant = {p: row_invariant(stacks[p][2], HIDDEN) for p in PATHS}
    print(
        "row-invariant (a row alone == the same row among 16): "
        + ", ".join(f"{p} {'yes' if invariant[p] else 'NO'}" for p in PATHS)
    )
    print(f"\nms per decode step, {BLOCKS} blocks' matmuls (ratio to int4)")
    print(f"{'rows':>5}" + "".join(f"{p:>17}" for p in PATHS))
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {n: torch.randn(m, n) for n in (HIDDEN, FFN)}

        def step(path: str, xs=xs) -> None:
            for layer, (n_in, _) in zip(stacks[path], shapes, strict=True):
                layer(xs[n_in])

        ms = median_ms({p: (lambda p=p: step(p)) for p in PATHS}, args.rounds)
        print(f"{m:>5}" + "".join(f"{ms[p]:>9.1f} ({ms[p] / ms['int4']:4.2f})" for p in PATHS))
    if args.engine:
        engine_steps([int(r) for r in args.rows.split(",")], args.rounds)
    print("\nload average: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


def engine_steps(rows: list[int], rounds: int) -> None:
    """Median ms per engine decode step by path, switched step by step (interleaved)."""
    import sorai
    from sorai.engine import EngineConfig, LLMEngine
    from sorai.engine.params import SamplingParams
    from sorai.model.quant import decode_path

    llm = sorai.load()
    model, tokenizer = llm.model, llm.tokenizer
    chosen, why = llm.engine.decode_path
    print(f"\nthis server decodes on: {chosen} ({why})")
    variants = {"int4 decode threads": "kernel", "int4 all cores": "all-cores"}
    variants["fp32 copy"] = "dense"
    variants["fp16 GEMM"] = "fp16"
    print("ms per engine decode step, default model (ratio to int4 on the decode threads)")
    print(f"{'rows':>5}" + "".join(f"{v:>26}" for v in variants))
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Tell me a long story."}])
    for m in rows:
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=m), name="bench")
        params = SamplingParams(max_tokens=6 * rounds + 8, temperature=0, ignore_eos=True)
        for i in range(m):
            engine.add_request(f"r{i}", prompt, params)
        engine.step()  # the prompts
        samples: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for variant, path in variants.items():
                decode_path.use(model, path)
                engine.step()  # a first step on the path (its copy made), not timed
                started = time.perf_counter()
                engine.step()
                samples[variant].append((time.perf_counter() - started) * 1e3)
        ms = {v: statistics.median(s) for v, s in samples.items()}
        base = ms["int4 decode threads"]
        print(f"{m:>5}" + "".join(f"{ms[v]:>18.1f} ({ms[v] / base:4.2f})" for v in variants))
        for i in range(m):
            engine.abort(f"r{i}")
    decode_path.use(model, chosen)


if __name__ == "__main__":
    main()
