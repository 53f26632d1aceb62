"""Quality of a narrower KV-cache storage dtype against float32 storage, same model and weights.

    python benchmarks/bench_kv_cache_dtype.py [--model M] [--dtypes float16,bfloat16]
        [--max-tokens 24]

Perplexity on the held-out English and Japanese texts in benchmarks/data, in windows of 512
tokens, with every attention reading keys and values as the cache stores them (a
ContiguousKVCache in that dtype, which rounds them as the engine's paged cache does, prefill
included), beside float32 storage, with the share of positions whose greedy next token agrees.
Then the engine's greedy outputs on the tests' chat prompts (tests/engine/test_engine.py,
tests/server/test_api_live.py): equal to float32 storage or not, and where they part, the
float32 run's logit margin between its token and the runner-up at that step (a near tie flips
under any rounding). Decode-step time: bench_decode_step.py --kv-cache-dtype; serve RSS:
bench_memory.py --sorai-args "--kv-cache-dtype ...".
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from sorai import hub
from sorai.engine import EngineConfig, LLMEngine
from sorai.engine.config import KV_CACHE_DTYPES
from sorai.engine.params import SamplingParams
from sorai.model.hardware import machine
from sorai.model.kv_cache import ContiguousKVCache
from sorai.model.loader import load_model

DATA = Path(__file__).resolve().parent / "data"
TEXTS = {"English": DATA / "heldout_en.txt", "Japanese": DATA / "heldout_ja.txt"}
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "What is 2+2?",
    "Name three colors.",
    "Who wrote Hamlet?",
    "Explain gravity in one sentence.",
    "What is photosynthesis?",
    "Say hello in Spanish.",
    "What is the largest planet?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "日本の首都は？",
]


def logits_of(model, ids: list[int], kv_dtype: torch.dtype, window: int = 512) -> torch.Tensor:
    """Next-token logits for every position, windows of `window` tokens through a cache."""
    pieces = []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window]])
            cache = ContiguousKVCache.for_model(model, chunk.shape[1], dtype=kv_dtype)
            positions = torch.arange(chunk.shape[1])
            pieces.append(model(chunk, positions, cache)[0].float())
    return torch.cat(pieces)[: len(ids) - 1]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    targets = torch.tensor(ids[1:])
    return math.exp(torch.nn.functional.cross_entropy(logits, targets).item())


def greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for result in engine.step():
            for choice in result.choices:
                out[result.request_id] += choice.token_ids
    return [out[str(i)] for i in range(len(prompts))]


def margin_at(model, ids: list[int], tokens: list[int], step: int) -> float:
    """float32 storage's top-1 minus top-2 logit at generated step `step`."""
    with torch.inference_mode():
        row = torch.tensor([ids + tokens[:step]])
        top = model(row, torch.arange(row.shape[1]), None)[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--dtypes", default="float16,bfloat16", help="compared with float32")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    model, tokenizer = load_model(hub.resolve(args.model, progress=print))
    print(f"model {args.model}, computing in {str(model.dtype).removeprefix('torch.')}")
    print(machine().describe())
    dtypes = args.dtypes.split(",")
    texts = {name: tokenizer.encode(file.read_text()) for name, file in TEXTS.items()}
    base = {name: logits_of(model, ids, torch.float32) for name, ids in texts.items()}
    for dtype in dtypes:
        for name, ids in texts.items():
            ours = logits_of(model, ids, KV_CACHE_DTYPES[dtype])
            ppl, ref = perplexity(ours, ids), perplexity(base[name], ids)
            agree = (ours.argmax(-1) == base[name].argmax(-1)).float().mean().item()
            print(
                f"{name:8s} {len(ids):4d} tokens  kv {dtype:8s} ppl {ppl:8.4f}  float32 "
                f"{ref:8.4f}  {100 * (ppl / ref - 1):+.3f}%  greedy agreement {100 * agree:.1f}%"
            )
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]

    def engine(dtype: str) -> LLMEngine:
        return LLMEngine(model, tokenizer, EngineConfig(kv_cache_dtype=dtype), name="bench")

    reference = greedy(engine("float32"), prompts, args.max_tokens)
    for dtype in dtypes:
        got = greedy(engine(dtype), prompts, args.max_tokens)
        equal = sum(a == b for a, b in zip(got, reference, strict=True))
        print(f"\nkv {dtype}: greedy outputs equal to float32 storage on {equal}/{len(PROMPTS)}")
        for prompt, ids, a, b in zip(PROMPTS, prompts, got, reference, strict=True):
            if a != b:
                step = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
                print(
                    f"  {prompt!r} parts at token {step} (float32 margin "
                    f"{margin_at(model, ids, b, step):.3f}): float32 "
                    f"{tokenizer.decode(b)!r}\n    {dtype} {tokenizer.decode(a)!r}"
                )


if __name__ == "__main__":
    main()
