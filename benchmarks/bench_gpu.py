"""sorai's engine on a GPU against transformers `generate` on the same model, bf16, one run.

    python benchmarks/bench_gpu.py [--model DIR | --config-dir DIR] [--batches 1,4,16,64]
        [--prompt-tokens 155] [--tokens 64] [--json OUT]

`--model` is a Hugging Face directory (safetensors, config, tokenizer). Where the weights cannot
travel to the GPU machine, `--config-dir` holds only config.json and the tokenizer files: the
weights are drawn at random (seed 0) with the model's real shapes, which is what speed depends
on; every request then runs to its full length (`ignore_eos` on sorai's side, `min_new_tokens`
on transformers'). Prints, per batch size: both sides' output tok/s and the ratio, sorai's
single-stream decode tok/s and time to first token; then a parity check in float32 on the
GPU (largest logit difference against transformers, greedy tokens equal on 4 prompts).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def random_checkpoint(config_dir: Path, out: Path) -> Path:
    """A checkpoint with `config_dir`'s shapes and tokenizer and weights drawn at random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (config_dir / name).exists():
            (out / name).write_bytes((config_dir / name).read_bytes())
    return out


def prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of one length, drawn away from the special tokens at the vocab's ends."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_sorai(llm, batch: list[list[int]], tokens: int) -> float:
    sync()
    start = time.perf_counter()
    results = llm.generate_batch(batch, max_tokens=tokens, temperature=0, ignore_eos=True)
    sync()
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == tokens for r in results), "a request ended early"
    return elapsed


def sorai_single_stream(llm, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(time to first token, decode tok/s after it) for one streamed request."""
    params = llm.params(max_tokens=tokens, temperature=0, ignore_eos=True)
    sync()
    start = time.perf_counter()
    first = None
    for _ in llm.stream_deltas(prompt, params):
        if first is None:
            first = time.perf_counter()
    sync()
    end = time.perf_counter()
    return first - start, (tokens - 1) / (end - first)


def time_transformers(model, batch: list[list[int]], tokens: int, device: str) -> float:
    ids = torch.tensor(batch, device=device)
    mask = torch.ones_like(ids)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
    sync()
    assert out.shape[1] == ids.shape[1] + tokens
    return time.perf_counter() - start


def parity(path: Path, device: str, vocab: int) -> dict:
    """float32 on the device: sorai's logits and greedy tokens against transformers'."""
    from transformers import AutoModelForCausalLM

    import sorai

    llm = sorai.load(path, dtype="float32", device=device)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    batch = prompts(vocab, 4, 24, seed=1)
    ids = torch.tensor(batch[:1], device=device)
    with torch.inference_mode():
        ours = llm.model(ids).float()
        theirs = reference(ids).logits.float()
    worst = (ours - theirs).abs().max().item()
    equal = 0
    for prompt in batch:
        mine = llm.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
        with torch.inference_mode():
            out = reference.generate(
                input_ids=torch.tensor([prompt], device=device),
                max_new_tokens=16,
                min_new_tokens=16,
                do_sample=False,
                pad_token_id=0,
            )
        equal += list(mine) == out[0, len(prompt) :].tolist()
    return {"max_abs_logit_diff": worst, "greedy_equal": f"{equal}/{len(batch)}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a Hugging Face directory")
    source.add_argument("--config-dir", type=Path, help="config + tokenizer; random weights")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=155)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from sorai.engine.config import EngineConfig
    from sorai.engine.llm import LLM
    from sorai.model.hardware import machine

    path = args.model
    if path is None:
        path = random_checkpoint(args.config_dir, Path(tempfile.mkdtemp()) / "model")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"machine: {machine().describe()}; torch {torch.__version__}", flush=True)
    dtype = getattr(torch, args.dtype)
    config = EngineConfig(
        max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * args.prompt_tokens
    )
    llm = LLM.from_model(path, dtype=args.dtype, device=args.device, config=config)
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa"
    ).to(args.device)
    vocab = llm.engine.vocab_size
    results: dict = {"machine": machine().describe(), "dtype": args.dtype, "rows": []}
    warm = prompts(vocab, 2, args.prompt_tokens, seed=99)
    time_sorai(llm, warm, 8)
    time_transformers(reference, warm, 8, args.device)
    print("batch | sorai tok/s | transformers tok/s | ratio", flush=True)
    for size in batches:
        batch = prompts(vocab, size, args.prompt_tokens, seed=size)
        ours, theirs = [], []
        for _ in range(args.rounds):  # alternated, so drift hits both sides alike
            ours.append(time_sorai(llm, batch, args.tokens))
            theirs.append(time_transformers(reference, batch, args.tokens, args.device))
        a = size * args.tokens / statistics.median(ours)
        b = size * args.tokens / statistics.median(theirs)
        results["rows"].append({"batch": size, "sorai": a, "transformers": b, "ratio": a / b})
        print(f"{size:5d} | {a:11.1f} | {b:18.1f} | {a / b:5.2f}x", flush=True)
    streams = [sorai_single_stream(llm, batch[0], args.tokens) for _ in range(args.rounds)]
    ttft = statistics.median(s[0] for s in streams)
    decode = statistics.median(s[1] for s in streams)
    results["single_stream"] = {"ttft_s": ttft, "decode_tok_s": decode}
    print(f"sorai single stream: TTFT {ttft * 1000:.1f} ms, decode {decode:.1f} tok/s")
    del llm, reference
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    results["parity_fp32"] = parity(path, args.device, vocab)
    print(f"parity (float32, {args.device}): {results['parity_fp32']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
