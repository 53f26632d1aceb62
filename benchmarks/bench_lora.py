"""Many LoRA adapters in one batch: aggregate output tokens/s at 16 concurrent requests.

The same 16 requests (greedy, ignore_eos, --tokens each) run on one engine over the default
model (SmolLM2-135M), spread over 1, 4 and 16 unmerged adapters, against the base model alone,
and against peft's per-adapter `generate` (transformers + peft on the same weights, dense
float32, as many threads as the engine: one generate per adapter, its requests batched,
left-padded). The adapters are random and what `sorai train` makes by default (r 8, alpha 16,
every Linear of the blocks; the engine's --max-lora-rank 8); --mixed adds a second set, r 8 and
16 in turn (--max-lora-rank 16), on an engine of its own over the same weights. Variants run
interleaved, --rounds times; medians. The goals (issue: 16 adapters in one batch >= 0.8x the
base, >= 5x peft) are printed as met or not.
--kernels adds the two ways of applying deltas (sorai/model/multi_lora.py), gather and segment,
timed on one forward of 16 decode-like rows and of one 128-row prompt chunk.

    nice -n 10 python benchmarks/bench_lora.py [--tokens 32] [--rounds 3] [--mixed] [--kernels]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sorai
from sorai import hub
from sorai.engine.config import EngineConfig
from sorai.engine.llm_engine import LLMEngine
from sorai.engine.params import SamplingParams
from sorai.model.hardware import machine
from sorai.model.lora import CONFIG_FILE, LoRAConfig, apply_lora, lora_modules, save_adapter
from sorai.model.transformer import Transformer

REQUESTS = 16
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle gear works.",
    "List some facts about the ocean.",
    "Describe a busy market in the morning.",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOAL_BASE, GOAL_PEFT = 0.8, 5.0


def cpu_line() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{machine().describe()}; load {load}"


def write_adapters(
    model: Transformer, count: int, root: Path, ranks: tuple[int, ...] = (8,)
) -> list[Path]:
    """`count` random all-linear adapters (ranks in turn, B non-zero) in PEFT format."""
    paths = []
    for i in range(count):
        dense = _dense_copy(model)
        torch.manual_seed(i)
        apply_lora(dense, LoRAConfig(r=ranks[i % len(ranks)], alpha=16, target_modules=TARGETS))
        for module in lora_modules(dense).values():
            torch.nn.init.normal_(module.lora_B.weight, std=0.01)
        save_adapter(dense, root / f"a{i}")
        paths.append(root / f"a{i}")
    return paths


_DENSE: dict[int, Transformer] = {}


def _dense_copy(model: Transformer) -> Transformer:
    # The adapters are written over the dense model (LoRA wraps float layers); shapes match.
    if id(model) not in _DENSE:
        _DENSE[id(model)] = sorai.load(hub.DEFAULT_MODEL, quantize="none").model
    import copy

    return copy.deepcopy(_DENSE[id(model)])


def run_engine(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], n: int):
    """Tokens out per second for the requests, all added at once."""
    started = time.perf_counter()
    for i, (ids, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, adapter=adapter)
        engine.add_request(f"r{i}-{started}", ids, params)
    tokens = 0
    while engine.has_work():
        for out in engine.step():
            tokens += sum(len(c.token_ids) for c in out.choices)
    return tokens / (time.perf_counter() - started)


def run_peft(peft_model, tokenizer, prompts, adapters: list[str], n: int) -> float:
    """peft: one generate per adapter, its requests batched (left padding)."""
    started = time.perf_counter()
    tokens = 0
    for name in dict.fromkeys(adapters):
        mine = [p for p, a in zip(prompts, adapters, strict=True) if a == name]
        peft_model.set_adapter(name)
        width = max(len(p) for p in mine)
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in mine])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in mine])
        with torch.inference_mode():
            out = peft_model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
            )
        tokens += (out.shape[1] - width) * len(mine)
    return tokens / (time.perf_counter() - started)


def kernels(llm, paths: list[Path], rounds: int) -> None:
    """gather vs segment on one forward (no cache): 16 decode-like rows, one prompt chunk."""
    config = EngineConfig(max_loras=16, max_lora_rank=8, num_blocks=64)  # the r8 set
    engine = LLMEngine(llm.model, llm.tokenizer, config)
    for i, path in enumerate(paths):
        engine.adapters.add(f"a{i}", path)
        engine.adapters.admit(engine.adapters.use(f"a{i}"))
    lora = engine.adapters.lora
    model = llm.model
    cases = {
        "decode 16 rows, 1 adapter": ([0] * 16, 16),
        "decode 16 rows, 4 adapters": (sorted(i % 4 for i in range(16)), 16),
        "decode 16 rows, 16 adapters": (list(range(16)), 16),
        "prompt chunk 128 rows, 1 adapter": ([0] * 128, 128),
    }
    for label, (slots, rows) in cases.items():
        ids = torch.randint(0, 1000, (1, rows))
        times: dict[str, list[float]] = {"base": [], "gather": [], "segment": []}
        for _ in range(rounds):
            for way in times:
                started = time.perf_counter()
                with torch.inference_mode():
                    if way == "base":
                        model(ids)
                    else:
                        with lora.rows(slots, gathered=way == "gather"):
                            model(ids)
                times[way].append(time.perf_counter() - started)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        print(
            f"  {label}: base {med['base']:.1f} ms, gather {med['gather']:.1f} ms, "
            f"segment {med['segment']:.1f} ms"
        )
    lora.remove()


def adapter_engine(llm, paths: list[Path], rank: int, cores: int, name: str) -> LLMEngine:
    config = EngineConfig(
        max_loras=16, max_lora_rank=rank, max_num_seqs=REQUESTS, cpu_threads=cores
    )
    engine = LLMEngine(llm.model, llm.tokenizer, config, name=name)
    for i, path in enumerate(paths):
        engine.adapters.add(f"a{i}", path)
    engine.config.enable_prefix_caching = False  # every variant computes its prompts
    engine.pool.enable_prefix_caching = False
    run_engine(engine, [[1, 2, 3]] * 2, [None, "a0"], 2)  # warm-up
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mixed", action="store_true", help="also adapters of r 8 and 16")
    parser.add_argument("--kernels", action="store_true", help="also time gather vs segment")
    parser.add_argument("--no-peft", action="store_true", help="skip the peft comparison")
    args = parser.parse_args()
    # Every core for the engine and for peft (the server's default leaves one to its HTTP
    # thread, which this benchmark has not).
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    print(cpu_line())
    print(f"torch {torch.__version__}, threads {cores} (engine and peft)")

    llm = sorai.load(hub.DEFAULT_MODEL)  # the default GGUF, int4 layers
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    sets = {"r8": (write_adapters(llm.model, REQUESTS, tmp / "r8"), 8)}
    if args.mixed:
        sets["r8/16"] = (write_adapters(llm.model, REQUESTS, tmp / "mixed", (8, 16)), 16)
    assert all((p / CONFIG_FILE).exists() for paths, _ in sets.values() for p in paths)
    engines = {k: adapter_engine(llm, p, r, cores, f"bench-{k}") for k, (p, r) in sets.items()}
    chat = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    prompts = [chat[i % len(chat)] for i in range(REQUESTS)]
    spreads: dict[str, list[str | None]] = {
        "1 adapter": ["a0"] * REQUESTS,
        "4 adapters": [f"a{i % 4}" for i in range(REQUESTS)],
        "16 adapters": [f"a{i}" for i in range(REQUESTS)],
    }
    variants = [("base", engines["r8"], [None] * REQUESTS)]
    variants += [
        (f"{label}, {k}", engine, adapters)
        for k, engine in engines.items()
        for label, adapters in spreads.items()
    ]
    rates: dict[str, list[float]] = {label: [] for label, _, _ in variants}

    peft_model = hf_tokenizer = None
    if not args.no_peft:
        from peft import PeftModel

        from sorai.model.weights import save_hf_dir

        base_dir = tmp / "base"
        save_hf_dir(_DENSE[id(llm.model)], base_dir)
        import transformers

        reference = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
        paths = sets["r8"][0]
        peft_model = PeftModel.from_pretrained(reference, paths[0], adapter_name="a0")
        for i, path in enumerate(paths[1:], start=1):
            peft_model.load_adapter(path, adapter_name=f"a{i}")
        hf_tokenizer = type("Pad", (), {"pad_token_id": llm.tokenizer.eos_token_ids[0]})()
        for label in ("peft, 4 adapters", "peft, 16 adapters"):
            rates[label] = []

    for _ in range(args.rounds):
        for label, engine, adapters in variants:
            rates[label].append(run_engine(engine, prompts, adapters, args.tokens))
        if peft_model is not None:
            torch.set_num_threads(cores)  # what the engine's steps left set, peft gets all
            for label in ("peft, 4 adapters", "peft, 16 adapters"):
                spread = spreads[label.removeprefix("peft, ")]
                rates[label].append(
                    run_peft(peft_model, hf_tokenizer, prompts, spread, args.tokens)
                )

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{REQUESTS} concurrent requests x {args.tokens} tokens, medians of {args.rounds}:")
    for label, rate in med.items():
        print(f"  {label:22s} {rate:8.1f} tok/s  ({rate / med['base']:.2f}x base)")
    for k in engines:
        ratio = med[f"16 adapters, {k}"] / med["base"]
        met = "met" if ratio >= GOAL_BASE else "NOT met"
        print(f"  goal 16 adapters ({k}) >= {GOAL_BASE}x base: {ratio:.2f}x, {met}")
    if "peft, 16 adapters" in med:
        for k in engines:
            ratio = med[f"16 adapters, {k}"] / med["peft, 16 adapters"]
            met = "met" if ratio >= GOAL_PEFT else "NOT met"
            print(f"  goal 16 adapters ({k}) >= {GOAL_PEFT}x peft (r8): {ratio:.1f}x, {met}")
    print(cpu_line())
    if args.kernels:
        print("delta kernels, one forward without cache (medians):")
        kernels(llm, sets["r8"][0], args.rounds)


if __name__ == "__main__":
    main()
