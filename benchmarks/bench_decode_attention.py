"""Decode attention alone, on one real engine step's inputs: the C kernel against gather + SDPA.

    python benchmarks/bench_decode_attention.py [--batch 1,16] [--context 200] [--reps 30]
        [--threads 1]

Runs the default model through the engine (B requests of about `context` prompt tokens, a few
decode steps), captures every layer's decode attention inputs of one step (queries, the layer's
paged keys and values, slots, mask), then times both paths over the 30 layers, interleaved
(kernel, SDPA, kernel, SDPA ...) in this process, on --threads threads, and prints the medians per
step, their ratio, the largest difference between the two outputs, the CPU flags and the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from bench_decode_step import start_batch  # noqa: E402
from common import cpu_flags  # noqa: E402  (benchmarks/common.py)


def capture(engine, tokenizer, batch: int, context: int) -> list[tuple]:
    """Every layer's (cache, q, keys, values, layout) from one decode step of `batch` requests."""
    cache = engine.cache
    captured = []
    decode = cache._decode

    def recording(q, key_cache, value_cache, layout):
        captured.append((q.clone(), key_cache, value_cache, layout))
        return decode(q, key_cache, value_cache, layout)

    ids = start_batch(engine, tokenizer, batch, 8, f"attn{batch}", context)
    cache._decode = recording
    try:
        engine.step()
    finally:
        del cache._decode
    for request_id in ids:
        engine.abort(request_id)
    engine.step()
    return captured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both paths")
    args = parser.parse_args()

    import sorai
    from sorai.engine import EngineConfig, LLMEngine

    torch.set_num_threads(1)
    print(
        f"CPU flags: {cpu_flags()}; cores {len(os.sched_getaffinity(0))}; torch {torch.__version__}"
    )
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    llm = sorai.load()
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(), name="bench")
    kernel = engine.cache.decode_kernel
    if kernel is None:
        raise SystemExit("the decode attention kernel is unavailable here")
    for batch in (int(b) for b in args.batch.split(",")):
        layers = capture(engine, llm.tokenizer, batch, args.context)
        torch.set_num_threads(args.threads)
        cache = engine.cache
        lengths = layers[0][3].decode_slots.shape[1]
        times: dict[str, list[float]] = {"kernel": [], "sdpa": []}
        worst = 0.0
        with torch.inference_mode():
            for _ in range(args.reps):
                for name in times:
                    cache.decode_kernel = kernel if name == "kernel" else None
                    started = time.perf_counter()
                    for q, keys, values, layout in layers:
                        layout.decode_lengths = None  # counted once per step, as in a step
                        cache._decode(q, keys, values, layout)
                    times[name].append((time.perf_counter() - started) * 1e3)
            cache.decode_kernel = kernel
            for q, keys, values, layout in layers:
                a = cache._decode(q, keys, values, layout)
                cache.decode_kernel = None
                b = cache._decode(q, keys, values, layout)
                cache.decode_kernel = kernel
                worst = max(worst, (a - b).abs().max().item())
        k, s = (statistics.median(times[n]) for n in ("kernel", "sdpa"))
        print(
            f"batch {batch}, {args.threads} thread(s), longest context {lengths}, "
            f"{len(layers)} layers: kernel {k:.2f} ms, "
            f"gather+SDPA {s:.2f} ms per step ({s / k:.2f}x); largest difference {worst:.2e}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
