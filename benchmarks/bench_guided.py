"""Guided decoding cost: engine decode tokens/s with and without a JSON-schema constraint.

    python benchmarks/bench_guided.py [--model smollm2-135m-instruct] [--concurrency 1,16]
        [--rounds 3] [--max-tokens 160] [--min-requests 4] [--json out.json]

One in-process LLMEngine (the real model; the engine sets the torch threads) runs the same
chat prompts, each asking for a person record as JSON, in two modes:

- constrained: `SamplingParams(guided=GuidedSpec(json_schema=...))`, temperature 0, up to
  `--max-tokens`; a 5-field schema (strings with maxLength, an integer range, an enum and an
  array with maxItems); the tokens each request actually generates are counted;
- unconstrained: the same prompts, temperature 0, `ignore_eos=True`, and by default exactly as
  many tokens per request as the constrained run generated for it (`--unconstrained-length
  matched`), so both modes run batches of the same sizes for the same number of steps and the
  difference is the constraint's cost alone; `--unconstrained-length max` gives every request
  `--max-tokens` instead.

At concurrency C the requests go in waves of C (at least `--min-requests` requests in all, so
C=1 is not one short request). Decode tokens/s counts only steps that computed no prompt token
(engine.step() timed one by one; prefill steps, which also sample a first token, are left out);
end-to-end tokens/s is all generated tokens over the wall time of the level, prefill included.
The time spent per decode step in the engine's sampling stage (`LLMEngine._sample`), and
within it in `mask_logits` (llguidance fills a bitmask per row, then the logits are masked)
and `advance` (the matcher consumes the sampled token), is measured by wrapping them: the
sampling stage's growth over the unconstrained run is the constraint's direct cost, free of
the forward pass's noise, and is printed as a share of an unconstrained step.

A warm-up pass per level (constrained, then unconstrained) compiles the grammar, warms the
allocator and fixes the matched lengths. Then every round runs both modes at every level, in
alternating order (unconstrained first in odd rounds), and the medians over rounds are printed,
with the median of the per-round ratios constrained/unconstrained: on a small shared machine
the noise hits both modes alike. Goal: constrained decode tokens/s within 10% of unconstrained
(ratio >= 0.90) at every level.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import without_nan  # benchmarks/common.py: the script's folder is on sys.path

GOAL_RATIO = 0.90  # constrained / unconstrained decode tokens/s

# The person record (the same schema as bench_grammar_engines.py's "record" case).
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "occupation": {"type": "string", "maxLength": 40},
        "role": {"type": "string", "enum": ["engineer", "teacher", "doctor", "artist", "other"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
    },
    "required": ["name", "age", "occupation", "role", "skills"],
    "additionalProperties": False,
}

SUBJECTS = [
    "a retired lighthouse keeper from Maine",
    "a young jazz pianist in New Orleans",
    "a paediatric nurse who runs marathons",
    "a software engineer who builds compilers",
    "a primary school teacher in Lisbon",
    "a glassblower with her own studio",
    "a volcanologist working in Iceland",
    "a chef who opened a ramen shop",
    "a bridge engineer close to retirement",
    "an art restorer at a national museum",
    "a family doctor in a small village",
    "a high-school chemistry teacher",
    "a wildlife photographer in Kenya",
    "a data scientist at a weather service",
    "a violin maker from Cremona",
    "a surgeon who volunteers abroad",
    "a comic-book illustrator",
    "a robotics student building drones",
    "a beekeeper who sells honey at markets",
    "a railway signal engineer",
]


def prompt_for(subject: str) -> list[dict[str, str]]:
    return [
        {
            "role": "user",
            "content": (
                f"Invent a person: {subject}. Reply with a JSON object only, with the fields "
                '"name", "age", "occupation", "role" (one of engineer, teacher, doctor, artist, '
                'other) and "skills" (a list of up to four short strings).'
            ),
        }
    ]


# ----------------------------------------------------------------------------------------------
# Timing the engine's guided-decoding hooks


class HookTimer:
    """Wraps a module-level function so the time spent in it is summed (seconds)."""

    def __init__(self, module: Any, name: str) -> None:
        self.total = 0.0
        self.calls = 0
        original: Callable[..., Any] = getattr(module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - started
                self.calls += 1

        setattr(module, name, timed)


# ----------------------------------------------------------------------------------------------
# One run: a level's requests in one mode


@dataclass
class RunResult:
    mode: str  # "unconstrained" or "constrained"
    concurrency: int
    requests: int
    tokens: int  # generated tokens, all steps
    wall_s: float  # the whole level, prefill included
    decode_tokens: int  # tokens sampled in steps that computed no prompt token
    decode_s: float
    decode_steps: int
    mask_s: float  # in mask_logits, decode steps only
    advance_s: float  # in advance, decode steps only
    sample_s: float  # in LLMEngine._sample (mask and advance included), decode steps only
    lengths: list[int] = field(default_factory=list)  # tokens generated per request
    valid_json: int = 0  # outputs that parse as a JSON object with the schema's keys
    finish_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def e2e_tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def step_ms(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    @property
    def mask_ms(self) -> float:
        return 1e3 * self.mask_s / self.decode_steps if self.decode_steps else float("nan")

    @property
    def advance_ms(self) -> float:
        return 1e3 * self.advance_s / self.decode_steps if self.decode_steps else float("nan")

    @property
    def sample_ms(self) -> float:
        return 1e3 * self.sample_s / self.decode_steps if self.decode_steps else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import sorai
        from sorai.engine import llm_engine
        from sorai.engine.config import EngineConfig
        from sorai.engine.llm_engine import LLMEngine
        from sorai.engine.params import GuidedSpec, SamplingParams

        self.SamplingParams = SamplingParams
        self.spec = GuidedSpec(json_schema=json.dumps(SCHEMA))
        llm = sorai.load(args.model)
        self.tokenizer = llm.tokenizer
        config = EngineConfig(max_num_seqs=max(args.concurrency), kv_cache_gib=args.kv_cache_gib)
        self.engine = LLMEngine(llm.model, llm.tokenizer, config, name=args.model)
        self.mask = HookTimer(llm_engine, "mask_logits")
        self.advance = HookTimer(llm_engine, "advance")
        # The whole sampling stage of a step (on the instance): its growth is the constraint's
        # direct cost, the rest of a step being the forward pass.
        self.sample = HookTimer(self.engine, "_sample")
        self.max_tokens = args.max_tokens
        self.prompts = [self.tokenizer.encode_chat(prompt_for(s)) for s in SUBJECTS]
        self._next_id = 0

    def prompt_ids(self, count: int) -> list[list[int]]:
        return [self.prompts[i % len(self.prompts)] for i in range(count)]

    def params(self, mode: str, length: int | None) -> Any:
        if mode == "constrained":
            return self.SamplingParams(max_tokens=self.max_tokens, temperature=0, guided=self.spec)
        return self.SamplingParams(
            max_tokens=length or self.max_tokens, temperature=0, ignore_eos=True
        )

    def run(
        self, mode: str, concurrency: int, count: int, lengths: Sequence[int] | None = None
    ) -> RunResult:
        engine = self.engine
        prompts = self.prompt_ids(count)
        result = RunResult(mode, concurrency, count, 0, 0.0, 0, 0.0, 0, 0.0, 0.0, 0.0)
        started = time.perf_counter()
        for wave in range(0, count, concurrency):
            requests = []
            for i in range(wave, min(wave + concurrency, count)):
                request_id = f"{mode}-{self._next_id}"
                self._next_id += 1
                length = lengths[i] if lengths else None
                engine.add_request(request_id, prompts[i], self.params(mode, length))
                requests.append(engine.requests[request_id])
            texts: dict[str, str] = {r.request_id: "" for r in requests}
            while engine.has_work():
                generated = engine.generation_tokens
                prompt_tokens = engine.scheduler.stats.prompt_tokens
                mask, advance, sample = self.mask.total, self.advance.total, self.sample.total
                step_started = time.perf_counter()
                outputs = engine.step()
                elapsed = time.perf_counter() - step_started
                new = engine.generation_tokens - generated
                result.tokens += new
                if engine.scheduler.stats.prompt_tokens == prompt_tokens and new:
                    result.decode_tokens += new
                    result.decode_s += elapsed
                    result.decode_steps += 1
                    result.mask_s += self.mask.total - mask
                    result.advance_s += self.advance.total - advance
                    result.sample_s += self.sample.total - sample
                for output in outputs:
                    for choice in output.choices:
                        texts[output.request_id] += choice.text
            for request in requests:
                seq = request.sequences[0]
                result.lengths.append(seq.num_output)
                reason = seq.finish_reason or "?"
                result.finish_reasons[reason] = result.finish_reasons.get(reason, 0) + 1
                result.valid_json += is_record(texts[request.request_id])
        result.wall_s = time.perf_counter() - started
        return result


def is_record(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == set(SCHEMA["properties"])


# ----------------------------------------------------------------------------------------------
# Report


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def report(runs: list[RunResult], levels: Sequence[int]) -> dict[str, Any]:
    header = (
        f"{'conc':>4s} {'mode':13s} {'reqs':>4s} {'tokens':>6s} {'decode tok/s':>12s} "
        f"{'e2e tok/s':>9s} {'ms/step':>7s} {'sample ms':>9s} {'mask ms':>7s} {'advance ms':>10s} "
        f"{'valid JSON':>10s} {'finish':s}"
    )
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {}
    for c in levels:
        level: dict[str, Any] = {}
        for mode in ("unconstrained", "constrained"):
            rs = [r for r in runs if r.concurrency == c and r.mode == mode]
            if not rs:
                continue
            row = {
                "requests": rs[0].requests,
                "tokens_median": median([r.tokens for r in rs]),
                "decode_tok_s": median([r.decode_tok_s for r in rs]),
                "e2e_tok_s": median([r.e2e_tok_s for r in rs]),
                "step_ms": median([r.step_ms for r in rs]),
                "sample_ms_per_step": median([r.sample_ms for r in rs]),
                "mask_ms_per_step": median([r.mask_ms for r in rs]),
                "advance_ms_per_step": median([r.advance_ms for r in rs]),
                "valid_json": min(r.valid_json for r in rs),
                "decode_tok_s_rounds": [r.decode_tok_s for r in rs],
            }
            level[mode] = row
            reasons: dict[str, int] = {}
            for r in rs:
                for k, v in r.finish_reasons.items():
                    reasons[k] = reasons.get(k, 0) + v
            finish = ",".join(f"{k}:{v}" for k, v in sorted(reasons.items()))
            valid = f"{row['valid_json']}/{row['requests']}" if mode == "constrained" else "-"
            print(
                f"{c:4d} {mode:13s} {row['requests']:4d} {row['tokens_median']:6.0f} "
                f"{fmt(row['decode_tok_s']):>12s} {fmt(row['e2e_tok_s']):>9s} "
                f"{fmt(row['step_ms'], 2):>7s} {fmt(row['sample_ms_per_step'], 2):>9s} "
                f"{fmt(row['mask_ms_per_step'], 2):>7s} "
                f"{fmt(row['advance_ms_per_step'], 3):>10s} {valid:>10s} {finish}"
            )
        pairs = list(
            zip(
                [r for r in runs if r.concurrency == c and r.mode == "unconstrained"],
                [r for r in runs if r.concurrency == c and r.mode == "constrained"],
                strict=True,
            )
        )
        level["ratio_decode"] = median([g.decode_tok_s / u.decode_tok_s for u, g in pairs])
        level["ratio_e2e"] = median([g.e2e_tok_s / u.e2e_tok_s for u, g in pairs])
        summary[str(c)] = level
    print()
    print("constrained / unconstrained (median of per-round ratios):")
    for c in levels:
        level = summary[str(c)]
        ratio = level["ratio_decode"]
        verdict = "MET" if ratio >= GOAL_RATIO else "NOT MET"
        print(
            f"  concurrency {c:3d}: decode {fmt(ratio, 3)}  e2e {fmt(level['ratio_e2e'], 3)}  "
            f"goal decode >= {GOAL_RATIO:.2f}: {verdict}"
        )
    print("direct cost (sampling stage, constrained minus unconstrained, per decode step):")
    for c in levels:
        level = summary[str(c)]
        free, guided = level.get("unconstrained"), level.get("constrained")
        if not free or not guided:
            continue
        extra = guided["sample_ms_per_step"] - free["sample_ms_per_step"]
        share = extra / free["step_ms"] if free["step_ms"] > 0 else float("nan")
        level["direct_ms_per_step"], level["direct_share"] = extra, share
        print(
            f"  concurrency {c:3d}: +{fmt(extra, 2)} ms of a {fmt(free['step_ms'], 1)} ms step "
            f"({fmt(100 * share, 1)}%; mask {fmt(guided['mask_ms_per_step'], 2)} ms, advance "
            f"{fmt(guided['advance_ms_per_step'], 3)} ms)"
        )
    return summary


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument(
        "--min-requests", type=int, default=4, help="requests per level at least (waves of C)"
    )
    parser.add_argument(
        "--unconstrained-length",
        choices=["matched", "max"],
        default="matched",
        help="unconstrained tokens per request: the constrained run's count, or --max-tokens",
    )
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency needs levels >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    bench = Bench(args)
    import torch

    print(
        f"model {args.model}, JSON schema with {len(SCHEMA['properties'])} fields, temperature 0, "
        f"max_tokens {args.max_tokens}, unconstrained length {args.unconstrained_length}, "
        f"concurrency {args.concurrency}, {args.rounds} rounds; torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    counts = {c: max(c, args.min_requests) for c in args.concurrency}
    lengths: dict[int, list[int] | None] = {}
    for c in args.concurrency:
        warm = bench.run("constrained", c, counts[c])
        lengths[c] = warm.lengths if args.unconstrained_length == "matched" else None
        bench.run("unconstrained", c, counts[c], lengths[c])
        print(
            f"warm-up, concurrency {c}: {counts[c]} requests, constrained lengths "
            f"{warm.lengths}, {warm.valid_json} valid records",
            flush=True,
        )
    runs: list[RunResult] = []
    for round_index in range(args.rounds):
        for c in args.concurrency:
            modes = ["unconstrained", "constrained"]
            if round_index % 2:
                modes.reverse()
            for mode in modes:
                run = bench.run(mode, c, counts[c], lengths[c])
                runs.append(run)
                if mode == "constrained" and lengths[c] and run.lengths != lengths[c]:
                    print(f"  note: concurrency {c}, constrained lengths now {run.lengths}")
        done = runs[-2 * len(args.concurrency) :]
        print(
            f"round {round_index + 1}/{args.rounds}: "
            + ", ".join(f"c{r.concurrency} {r.mode[:5]} {r.decode_tok_s:.1f} tok/s" for r in done),
            flush=True,
        )
    print()
    summary = report(runs, args.concurrency)
    if args.json:
        out = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "schema": SCHEMA,
            "summary": summary,
            "runs": [
                {
                    **asdict(r),
                    "decode_tok_s": r.decode_tok_s,
                    "e2e_tok_s": r.e2e_tok_s,
                    "step_ms": r.step_ms,
                    "sample_ms_per_step": r.sample_ms,
                    "mask_ms_per_step": r.mask_ms,
                    "advance_ms_per_step": r.advance_ms,
                }
                for r in runs
            ],
        }
        args.json.write_text(json.dumps(without_nan(out), indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
