"""Single-stream decode speed: sorai vs transformers `generate` and llama.cpp's `llama-bench`.

    python benchmarks/bench_generate.py [--model smollm2-135m-instruct] [--tokens 128]
        [--dtypes float32,bfloat16] [--quantize auto,none] [--prompt-tokens 512] [--threads N]
        [--no-llama-bench]

Decode tokens/s is (N - 1) / (time(N new tokens) - time(1 new token)), so prefill and
start-up cost cancel out for both sides. Rounds alternate sorai and transformers and the
medians are printed, so noise on a shared machine hits both sides alike. sorai runs each
`--quantize` path (auto: the GGUF's own low-bit weights; none: dequantized); transformers
always runs the dequantized weights. llama-bench (built once by llama_cpp_peer.py) measures
its text-generation rate (tg: `-p 0 -n N`) and prompt rate (pp: `-p P -n 0`) on the same GGUF
file with every core (`--threads`), `--rounds` repetitions, averaged: tg is the reference the
single-stream speed goal names. Each sorai path's prefill rate is timed on P random tokens as
llama-bench's pp is (median of `--rounds`), and both ratios are printed with the llama.cpp
version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# No progress bar from transformers' GGUF conversion in the report (tqdm reads this on import).
os.environ.setdefault("TQDM_DISABLE", "1")

# sorai before torch: it sets OpenMP's wait policy, which torch reads as it loads.
import sorai  # noqa: E402, I001
import torch  # noqa: E402
from common import peer_environment  # noqa: E402
from sorai import hub  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a cat."}]


def load_reference(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

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


@dataclass
class LlamaBench:
    tg: float  # text generation tok/s (`-p 0 -n N`)
    pp: float  # prompt processing tok/s (`-p P -n 0`)
    version: str
    threads: int


def llama_bench(path: Path, n: int, prompt_tokens: int, threads: int, reps: int) -> LlamaBench:
    """llama-bench's tg and pp rates on the GGUF (raises BuildError, RuntimeError)."""
    from llama_cpp_peer import cores, ensure_llama_cpp

    built = ensure_llama_cpp()
    threads = threads or cores()
    command = [str(built.bench), "-m", str(path), "-p", str(prompt_tokens), "-n", str(n)]
    command += ["-t", str(threads), "-r", str(reps), "-o", "json"]
    print(f"running {' '.join(command)}", flush=True)
    env = peer_environment()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench exit {done.returncode}: {done.stderr.strip()[-300:]}")
    rows = json.loads(done.stdout)  # one row per test: pp (n_gen 0), then tg (n_prompt 0)
    tg = next(float(r["avg_ts"]) for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    pp = next(float(r["avg_ts"]) for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    return LlamaBench(tg=tg, pp=pp, version=built.version, threads=threads)


def prefill_rate(llm: sorai.LLM, n_prompt: int, rounds: int) -> float:
    """sorai's prompt tokens/s on `n_prompt` random tokens (as llama-bench's pp uses), median;
    the time includes one decode step, a small part of a prompt of hundreds of tokens."""
    rng = random.Random(0)
    vocab = llm.tokenizer.vocab_size
    times = []
    for _ in range(rounds):
        ids = [rng.randrange(vocab) for _ in range(n_prompt)]
        times.append(time_sorai(llm, ids, 1))
    return n_prompt / statistics.median(times)


def main() -> None:
    from sorai.model.hardware import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quantize", default="auto,none", help="sorai paths to run")
    parser.add_argument(
        "--prompt-tokens", type=int, default=512, help="prompt length of the prefill (pp) test"
    )
    parser.add_argument("--threads", type=int, default=0, help="llama-bench -t (default: cores)")
    parser.add_argument("--no-llama-bench", action="store_true")
    args = parser.parse_args()

    path = hub.resolve(args.model, progress=print)
    print(
        f"model {args.model}, {args.tokens} new tokens, greedy; {machine().describe()}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rates: dict[str, float] = {}  # decode tok/s per sorai path
    prefill: dict[str, float] = {}
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
            if not args.no_llama_bench:
                prefill[label] = prefill_rate(llm, args.prompt_tokens, args.rounds)
                print(f"{label:28s} sorai prefill {prefill[label]:7.1f} tok/s (pp)", flush=True)
            del llm
        del ref
    if args.no_llama_bench or path.suffix != ".gguf":
        return
    from llama_cpp_peer import BuildError, busy_warning

    try:
        peer = llama_bench(path, args.tokens, args.prompt_tokens, args.threads, args.rounds)
    except (BuildError, RuntimeError, OSError, ValueError, StopIteration) as exc:
        print(f"llama-bench skipped: {exc}")
        return
    n, p = args.tokens, args.prompt_tokens
    print(
        f"\nllama.cpp {peer.version}, {peer.threads} threads; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if warning := busy_warning():
        print(warning)
    print(f"llama-bench tg{n} {peer.tg:7.1f} tok/s   pp{p} {peer.pp:7.1f} tok/s")
    print(f"{'sorai path':28s} {'decode':>7s} {'/ tg':>6s} {'prefill':>8s} {'/ pp':>6s}")
    for label, ours in rates.items():
        fill = prefill.get(label, float("nan"))
        print(f"{label:28s} {ours:7.1f} {ours / peer.tg:5.2f}x {fill:8.1f} {fill / peer.pp:5.2f}x")


if __name__ == "__main__":
    main()
