"""Single-stream decode speed: sorai vs transformers `generate` and llama.cpp's `llama-bench`.

    python benchmarks/bench_generate.py [--model smollm2-135m-instruct] [--tokens 128]
        [--dtypes float32,bfloat16] [--quantize auto,none] [--no-llama-bench]

Decode tokens/s is (N - 1) / (time(N new tokens) - time(1 new token)), so prefill and
start-up cost cancel out for both sides. Rounds alternate sorai and transformers and the
medians are printed, so noise on a shared machine hits both sides alike. sorai runs each
`--quantize` path (auto: the GGUF's own low-bit weights; none: dequantized); transformers
always runs the dequantized weights. llama-bench (built once by llama_cpp_peer.py) measures
its text-generation rate (`-p 0 -n N`, every core) on the same GGUF file, the reference the
speed goal names.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from functools import partial
from pathlib import Path

import torch

import sorai
from sorai import hub

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a cat."}]


def load_reference(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval()


def time_sorai(llm: sorai.LLM, ids: list[int], n: int) -> float:
    started = time.perf_counter()
    out = llm.generate(ids, max_tokens=n, temperature=0, ignore_eos=True)
    elapsed = time.perf_counter() - started
    assert out.completion_tokens == n, out.completion_tokens
    return elapsed


def time_reference(ref, ids: list[int], n: int) -> float:
    input_ids = torch.tensor([ids])
    started = time.perf_counter()
    with torch.inference_mode():
        out = ref.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - started
    assert out.shape[1] - len(ids) == n
    return elapsed


def decode_rate(timer, n: int) -> float:
    return (n - 1) / (timer(n) - timer(1))


def compare(llm: sorai.LLM, ref, ids: list[int], n: int, rounds: int) -> tuple[float, float, float]:
    """Median decode rates of both sides and median per-round ratio, rounds interleaved."""
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(decode_rate(partial(time_sorai, llm, ids), n))
        theirs.append(decode_rate(partial(time_reference, ref, ids), n))
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return statistics.median(ours), statistics.median(theirs), statistics.median(ratios)


def llama_bench_tg(path: Path, n: int) -> tuple[float, str] | None:
    """llama-bench's text-generation tokens/s on the GGUF, and the llama.cpp version."""
    from llama_cpp_peer import ensure_llama_cpp

    built = ensure_llama_cpp()
    threads = str(os.cpu_count() or 1)
    command = [str(built.bench), "-m", str(path), "-p", "0", "-n", str(n), "-t", threads]
    done = subprocess.run([*command, "-o", "json"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"llama-bench failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        return None
    rows = json.loads(done.stdout)
    return float(rows[0]["avg_ts"]), built.version


def main() -> None:
    from sorai.model.hardware import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quantize", default="auto,none", help="sorai paths to run")
    parser.add_argument("--no-llama-bench", action="store_true")
    args = parser.parse_args()

    path = hub.resolve(args.model, progress=print)
    print(
        f"model {args.model}, {args.tokens} new tokens, greedy; {machine().describe()}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rates: dict[str, float] = {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ref = load_reference(path, dtype)
        for quantize in args.quantize.split(","):
            llm = sorai.load(path, dtype=dtype, quantize=quantize)
            ids = llm.tokenizer.encode_chat(PROMPT)
            time_sorai(llm, ids, 8)  # warm-up: first calls pay for allocator and kernel set-up
            time_reference(ref, ids, 8)
            ours, theirs, ratio = compare(llm, ref, ids, args.tokens, args.rounds)
            label = f"{dtype_name} quantize={quantize}"
            rates[label] = ours
            print(
                f"{label:28s} sorai {ours:7.1f} tok/s   transformers {theirs:7.1f} tok/s   "
                f"ratio {ratio:.2f}x   (torch threads {torch.get_num_threads()})"
            )
            del llm
        del ref
    if not args.no_llama_bench and path.suffix == ".gguf":
        measured = llama_bench_tg(path, args.tokens)
        if measured is not None:
            tg, version = measured
            print(f"llama-bench tg{args.tokens} (llama.cpp {version}): {tg:.1f} tok/s")
            for label, ours in rates.items():
                print(f"  sorai {label:28s} / llama-bench: {ours / tg:.2f}x")


if __name__ == "__main__":
    main()
