"""Where one engine decode step's time goes: matmuls, attention, norms/RoPE, sampling, Python.

    python benchmarks/bench_decode_step.py [--batch 1,16] [--steps 20] [--threads 1,2]
        [--kv-cache-dtype auto,float16] [--decode-attention kernel,sdpa] [--context 200]

Runs the default model through the real engine (LLM facade): B requests, one prefill step,
then decode steps. Two views per batch size and thread count:
  wall    perf_counter around the engine step's parts: the model forward, the sampler, and
          everything else (scheduling, the runner's step layout, outputs, detokenizing)
  ops     torch.profiler self CPU time of the step's ATen ops, grouped (matmul kernels,
          attention incl. the paged KV writes and gathers, norms/RoPE/elementwise, casts and
          copies, sampler ops, other); "outside ops" is the step's wall time the profiler did
          not attribute to any op (Python, dispatch, bookkeeping)
Thread counts, KV-cache storage dtypes and decode attention paths (one engine each, sharing the
model) alternate step by step in one process (A, B, A, B ...), medians printed, with the CPU
flags and the load average so that numbers from a shared machine can be judged.

`--budget` adds a third view, by removal: steps alternate between the real step, the step with
the low-bit layers' forwards (the matmuls, their padding and casts) answering zeros at once, the
step with the paged attention (KV writes, gathers, SDPA) answering its queries back, and both.
The differences are what those parts cost in a real step, free of the profiler's own overhead;
what is left is the rest (norms, RoPE, residuals, the embedding, sampling, scheduling, Python).
A fifth kind of step runs RMSNorm on PyTorch's op instead of its C kernel, for that kernel's gain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from typing import Any

# As `import sorai` does, before torch loads OpenMP (sorai.model.hardware.decode_threads); run
# with OMP_WAIT_POLICY=ACTIVE to see libgomp's spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from common import cpu_flags  # noqa: E402  (benchmarks/common.py: the script's folder is on sys.path)

CATEGORIES = {
    "matmul": (
        "int4pack",
        "int8pack",
        "linear_dynamic",
        "aten::mm",
        "aten::addmm",
        "aten::linear",
        "einsum",
        "bmm",
    ),
    "attention": ("attention", "index_copy", "index_select", "_softmax", "baddbmm"),
    "norm/rope/elementwise": (
        "rms_norm",
        "aten::mul",
        "aten::add",
        "aten::sub",
        "aten::roll",
        "aten::cat",
        "silu",
        "aten::neg",
        "aten::cos",
        "aten::sin",
        "rsqrt",
        "aten::pow",
        "aten::mean",
    ),
    "cast/copy/view": (
        "aten::to",
        "_to_copy",
        "aten::copy_",
        "aten::clone",
        "contiguous",
        "aten::view",
        "reshape",
        "transpose",
        "permute",
        "aten::slice",
        "aten::split",
        "narrow",
        "aten::select",
        "as_strided",
        "unsqueeze",
        "aten::empty",
        "aten::t",
        "expand",
        "aten::detach",
        "_unsafe_view",
        "aten::alias",
    ),
    "sampler": ("argmax", "topk", "exponential", "log_softmax", "aten::sort", "aten::gather"),
}


def category(name: str) -> str:
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "other ops"


class Timed:
    """Wraps a callable, summing its perf_counter time into `total`."""

    def __init__(self, fn) -> None:
        self.fn, self.total = fn, 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - started


def start_batch(
    engine, tokenizer, batch: int, max_tokens: int, tag: str, context: int = 0
) -> list[str]:
    from sorai.engine.params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = []
    for i in range(batch):
        # Distinct prompts, so that the prefix cache does not fold them into one; lengthened
        # with filler to `context` tokens, so that attention reads contexts of that size.
        text = f"Story {tag} {i}: tell me a long tale about a fox."
        while len(tokenizer.encode(text)) < context:
            text += " The fox ran through the quiet forest at night."
        prompt = tokenizer.encode_chat([{"role": "user", "content": text}])
        engine.add_request(f"{tag}-{i}", prompt, params)
        ids.append(f"{tag}-{i}")
    while any(not r.sequences[0].num_computed >= r.sequences[0].num_prompt for r in _reqs(engine)):
        engine.step()
    engine.step()
    return ids


def _reqs(engine):
    return list(engine.requests.values())


def set_threads(engine, n: int) -> None:
    engine.threads = (n, max(n, engine.threads[1] if engine.threads else n))
    torch.set_num_threads(n)


def measure(
    engines: dict[str, Any],
    tokenizer,
    batch: int,
    steps: int,
    threads: list[int],
    ops: bool = True,
    context: int = 0,
) -> None:
    """Every (engine, thread count) variant in turn, step by step; `engines` by KV dtype and
    decode attention path."""
    variants = [(kv, engine, t) for kv, engine in engines.items() for t in threads]
    timers = {}
    ids = {}
    for kv, engine in engines.items():
        timers[kv] = Timed(engine.model.forward), Timed(engine._sample)
        engine._sample = timers[kv][1]
        max_tokens = 2 * steps * len(variants) + 16
        ids[kv] = start_batch(engine, tokenizer, batch, max_tokens, f"b{batch}{kv}", context)
    walls: dict[tuple[str, int], dict[str, list[float]]] = {
        (kv, t): defaultdict(list) for kv, _, t in variants
    }
    try:
        for _ in range(steps):
            for kv, engine, t in variants:
                forward, sampler = timers[kv]
                engine.model.forward = forward  # the model is shared: time this engine's use
                set_threads(engine, t)
                forward.total = sampler.total = 0.0
                started = time.perf_counter()
                engine.step()
                wall = time.perf_counter() - started
                w = walls[kv, t]
                w["step"].append(wall * 1e3)
                w["forward"].append(forward.total * 1e3)
                w["sampler"].append(sampler.total * 1e3)
                w["rest"].append((wall - forward.total - sampler.total) * 1e3)
        first = None
        for kv, _, t in variants:
            w = {k: statistics.median(v) for k, v in walls[kv, t].items()}
            first = first or w["step"]
            print(wall_line(kv, t, w, batch, first))
        if ops:
            for kv, engine in engines.items():
                engine.model.__dict__.pop("forward", None)
                set_threads(engine, threads[0])
                print(f"  kv {kv}:")
                profile_ops(engine, batch, min(steps, 10))
    finally:
        for kv, engine in engines.items():
            engine.model.__dict__.pop("forward", None)
            engine.__dict__.pop("_sample", None)
            for request_id in ids[kv]:
                engine.abort(request_id)
            engine.step()


def wall_line(kv: str, threads: int, w: dict[str, float], batch: int, first: float) -> str:
    """One variant's wall-clock line (bench_omp_policy.py reads it: keep them in step)."""
    return (
        f"  wall, kv {kv}, {threads} thread(s): step {w['step']:.1f} ms = forward "
        f"{w['forward']:.1f} + sampler {w['sampler']:.1f} + engine/scheduler/runner/output "
        f"{w['rest']:.1f}  ({batch * 1e3 / w['step']:.1f} tok/s; "
        f"{w['step'] / first:.3f}x the first)"
    )


def budget(engine, tokenizer, batch: int, steps: int) -> None:
    """The step's cost by part, by removing parts (module docstring, --budget)."""
    from sorai.engine.paged_cache import PagedKVCache
    from sorai.model import rms_norm
    from sorai.model.quant.linear import LowBitLinear
    from sorai.model.quant.table import Int8Head

    zeros: dict[tuple[int, ...], torch.Tensor] = {}

    def no_matmul(self, x):
        shape = (*x.shape[:-1], self.out_features)
        found = zeros.get(shape)
        if found is None:
            found = zeros[shape] = torch.zeros(shape, dtype=x.dtype)
        return found

    def no_attention(self, layer, q, k, v):
        return q

    real = {
        LowBitLinear: LowBitLinear.forward,
        Int8Head: Int8Head.forward,
        PagedKVCache: PagedKVCache.attend,
        rms_norm: rms_norm.normalize,
    }
    # "pytorch norm": RMSNorm on PyTorch's op instead of its C kernel (sorai/model/rms_norm.py).
    modes = ("real", "no matmul", "no attention", "neither", "pytorch norm")
    times: dict[str, list[float]] = {m: [] for m in modes}
    ids = start_batch(engine, tokenizer, batch, len(modes) * steps + 16, f"budget{batch}")
    try:
        for i in range(len(modes) * steps):
            mode = modes[i % len(modes)]
            skip_mm = mode in ("no matmul", "neither")
            skip_attn = mode in ("no attention", "neither")
            LowBitLinear.forward = no_matmul if skip_mm else real[LowBitLinear]
            Int8Head.forward = no_matmul if skip_mm else real[Int8Head]
            PagedKVCache.attend = no_attention if skip_attn else real[PagedKVCache]
            rms_norm.normalize = (lambda *_: None) if mode == "pytorch norm" else real[rms_norm]
            started = time.perf_counter()
            engine.step()
            times[mode].append((time.perf_counter() - started) * 1e3)
    finally:
        LowBitLinear.forward = real[LowBitLinear]
        Int8Head.forward = real[Int8Head]
        PagedKVCache.attend = real[PagedKVCache]
        rms_norm.normalize = real[rms_norm]
        for request_id in ids:
            engine.abort(request_id)
        engine.step()
    m = {k: statistics.median(v) for k, v in times.items()}
    step = m["real"]
    parts = {
        "low-bit matmuls": step - m["no matmul"],
        "paged attention": step - m["no attention"],
        "the rest": m["neither"],
    }
    print(f"  budget by removal, {torch.get_num_threads()} thread(s): step {step:.1f} ms =")
    for name, ms in parts.items():
        print(f"    {name:<18}{ms:7.1f} ms  {100 * ms / step:4.0f}%")
    interplay = step - sum(parts.values())
    print(f"    {'(interplay)':<18}{interplay:7.1f} ms  (parts do not add up exactly)")
    print(
        f"  RMSNorm on PyTorch's op instead of the C kernel: step {m['pytorch norm']:.1f} ms "
        f"({m['pytorch norm'] / step:.3f}x)"
    )


def profile_ops(engine, batch: int, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - started) * 1e3 / steps
    groups: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        cat = category(event.key)
        groups[cat] += event.self_cpu_time_total / 1e3 / steps
        counts[cat] += event.count // steps
    ops = sum(groups.values())
    print(f"  ops, {torch.get_num_threads()} thread(s), per step (profiled: {wall:.1f} ms wall):")
    for cat in (*CATEGORIES, "other ops"):
        print(f"    {cat:<24}{groups[cat]:7.2f} ms  {counts[cat]:5d} op calls")
    print(f"    {'outside ops (Python)':<24}{wall - ops:7.2f} ms")
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print(
        "    top ops: "
        + ", ".join(
            f"{e.key} {e.self_cpu_time_total / 1e3 / steps:.2f}ms/{e.count // steps}" for e in top
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="KV storage dtypes to alternate, e.g. float32,float16",
    )
    parser.add_argument(
        "--decode-attention",
        default="auto",
        help="decode attention paths to alternate: auto, kernel (the C kernel), sdpa",
    )
    parser.add_argument(
        "--context", type=int, default=0, help="prompt tokens per sequence (filler added)"
    )
    parser.add_argument("--no-profile", action="store_true", help="wall-clock parts only")
    parser.add_argument(
        "--budget", action="store_true", help="also the step's cost by part, by removal"
    )
    args = parser.parse_args()

    import sorai

    cores = len(os.sched_getaffinity(0))
    print(f"CPU flags: {cpu_flags()}; cores {cores}; torch {torch.__version__}")
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    from sorai.engine import EngineConfig, LLMEngine

    llm = sorai.load()
    engine = llm.engine
    print(f"decode path: {engine.decode_path[0]}; engine threads {engine.threads}")
    engines = {}
    for kv in args.kv_cache_dtype.split(","):
        for attention in args.decode_attention.split(","):
            config = EngineConfig(kv_cache_dtype=kv)
            name = kv if attention == "auto" else f"{kv}/{attention}"
            engines[name] = LLMEngine(llm.model, llm.tokenizer, config, name=engine.model_name)
            if attention == "sdpa":
                engines[name].cache.decode_kernel = None  # the gather-and-SDPA path
            elif attention == "kernel" and engines[name].cache.decode_kernel is None:
                raise SystemExit("the decode attention kernel is unavailable here")
            print(f"kv {name}: {engines[name].cache.describe()}")
    threads = [int(t) for t in args.threads.split(",")]
    for batch in (int(b) for b in args.batch.split(",")):
        print(f"\nbatch {batch}:")
        measure(
            engines, llm.tokenizer, batch, args.steps, threads, not args.no_profile, args.context
        )
        if args.budget:
            set_threads(engine, threads[0])
            budget(engine, llm.tokenizer, batch, args.steps)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
