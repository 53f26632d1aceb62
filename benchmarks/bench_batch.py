"""Interactive latency while a batch runs: TTFT of streamed chat requests alone vs while a
/v1/batches job runs in the same engine (goal: at most 20% worse).

    python benchmarks/bench_batch.py [--rounds 5] [--probes 6] [--batch-lines 64]
        [--batch-max-tokens 48] [--batch-prompt-words 0] [--max-tokens 8]
        [--variants alone,batch,...] [--trace] [--json out.json]

One server in this process (the default model), driven by the official openai client. Rounds
interleave the variants, A B C D A B C D ...: "alone" (no batch), "batch" (a batch running at
its priority, the shipped behaviour: new lines wait for a quiet spell in client traffic, batch
prompts go in batch_prefill_chunk pieces), "batch-eager" (the same, but lines start at once:
the runner's yielding off), "batch-whole" (yielding off and batch prompts computed whole: the
behaviour before both; the chunks matter with long prompts, --batch-prompt-words) and
"batch-p0" (lines at interactive priority, starting at once: what the priority buys). In a
batch variant a batch of --batch-lines chat lines is submitted, the probes wait until it has
lines running, then --probes interactive requests are sent one after another (each: a short
chat prompt, streamed; TTFT = request sent -> first content chunk); the batch is then
cancelled and drained before the next variant. The report prints the CPU's flags, the load
average, per-variant medians, the ratios against "alone" and the batch's own pace while the
probes ran (lines finished per second); --trace adds where the TTFT goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sorai  # noqa: E402
from sorai import hub  # noqa: E402
from sorai.model.hardware import machine  # noqa: E402
from sorai.server import batch_runner  # noqa: E402
from sorai.server.app import create_app  # noqa: E402
from sorai.server.local import ServerThread  # noqa: E402
from sorai.server.state import ServerSettings  # noqa: E402

GOAL = 1.20


def cpu_flags() -> str:
    return machine().describe()


class Trace:
    """Where a probe's TTFT goes (--trace): timestamps of its way through the server, taken by
    wrapping the server's own functions in this process (the shipped code is unchanged)."""

    PHASES = ("http in", "render", "wait step", "prefill", "to loop", "http out")

    def __init__(self) -> None:
        self.marks: dict[str, dict[str, float]] = {}  # engine request id -> mark -> time
        self.sent = 0.0

    def install(self) -> None:
        from sorai.engine.async_engine import AsyncEngine
        from sorai.engine.llm_engine import LLMEngine
        from sorai.server import runner

        trace = self
        init, command, add = runner.Generation.__init__, AsyncEngine._command, None
        add, step, deliver = LLMEngine.add_request, LLMEngine.step, AsyncEngine._deliver

        def g_init(gen, state, jobs, request_id, arrival):
            init(gen, state, jobs, request_id, arrival)
            if runner.PRIORITY.get() == 0:
                trace.marks[f"{request_id}-0"] = {"sent": trace.sent, "arrival": arrival}

        def a_command(engine, kind, payload):
            if kind == "add" and payload[0] in trace.marks:
                trace.marks[payload[0]]["command"] = time.perf_counter()
            command(engine, kind, payload)

        def e_add(engine, request_id, prompt_ids, params=None):
            if request_id in trace.marks:
                trace.marks[request_id]["admitted"] = time.perf_counter()
            add(engine, request_id, prompt_ids, params)

        def e_step(engine):
            waiting = engine.scheduler.waiting
            probe = next(
                (s.request.request_id for s in waiting if s.request.request_id in trace.marks), None
            )
            started = time.perf_counter()
            outputs = step(engine)
            # The client thread may have finished with the probe meanwhile.
            marks = trace.marks.get(probe) if probe is not None else None
            if marks is not None and "prefill" not in marks:
                marks["step start"] = started
                marks["prefill"] = time.perf_counter()
            return outputs

        def a_deliver(engine, outputs):
            for out in outputs:
                marks = trace.marks.get(out.request_id)
                if marks is not None and "delivered" not in marks:
                    marks["delivered"] = time.perf_counter()
            deliver(engine, outputs)

        runner.Generation.__init__ = g_init
        AsyncEngine._command = a_command
        LLMEngine.add_request = e_add
        LLMEngine.step = e_step
        AsyncEngine._deliver = a_deliver

    def take(self, first: float) -> dict[str, float] | None:
        """The phases (seconds) of the probe that just ended; `first`: its first chunk."""
        done = [m for m in self.marks.values() if "delivered" in m]
        self.marks.clear()
        if not done:
            return None
        m = done[-1]
        points = ["sent", "arrival", "command", "admitted", "prefill", "delivered"]
        if not all(p in m for p in points):
            return None
        times = [m[p] for p in points] + [first]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        phases = dict(zip(self.PHASES, gaps, strict=True))
        phases["wait step"] = m["step start"] - m["command"]  # incl. the add's own hop
        phases["prefill"] = m["prefill"] - m["step start"]
        return phases


TRACE: Trace | None = None


def ttft(client: openai.OpenAI, prompt: str, max_tokens: int) -> float:
    started = time.perf_counter()
    if TRACE is not None:
        TRACE.sent = started
    stream = client.chat.completions.create(
        model=hub.DEFAULT_MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    first = first if first is not None else time.perf_counter() - started
    if TRACE is not None:
        phases = TRACE.take(started + first)
        if phases is not None:
            TRACE_SAMPLES.setdefault(VARIANT[0], []).append(phases)
    return first


TRACE_SAMPLES: dict[str, list[dict[str, float]]] = {}
VARIANT = ["alone"]


def batch_file(client: openai.OpenAI, lines: int, max_tokens: int, words: int) -> str:
    # Each line's own number first: lines share no cached prefix beyond the template's.
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * (words // 9))
    rows = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": hub.DEFAULT_MODEL,
                "messages": [
                    {"role": "user", "content": f"#{i}: {text}\nWrite a long story about it."}
                ],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i in range(lines)
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return client.files.create(file=("bench.jsonl", data), purpose="batch").id


VARIANTS = ("alone", "batch", "batch-eager", "batch-whole", "batch-p0")
YIELD_MAX_S = batch_runner.YIELD_MAX_S
CONFIG: list = []  # the engine's EngineConfig, once made
CHUNK: list[int] = []  # its batch_prefill_chunk as shipped


def run_variant(client, variant: str, file_id: str, args) -> tuple[list[float], float | None]:
    """The probes' TTFTs, and the batch lines finished per second while they ran."""
    batch = None
    VARIANT[0] = variant
    if variant != "alone":
        batch_runner.BATCH_PRIORITY = 0 if variant == "batch-p0" else 1
        eager = variant in ("batch-eager", "batch-whole", "batch-p0")
        batch_runner.YIELD_MAX_S = 0.0 if eager else YIELD_MAX_S
        config = CONFIG[0]
        whole = variant == "batch-whole"
        config.batch_prefill_chunk = config.max_num_batched_tokens if whole else CHUNK[0]
        batch = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        # Lines are running once the engine has sequences beyond the probes'.
        while client.batches.retrieve(batch.id).status == "validating":
            time.sleep(0.05)
        time.sleep(1.0)
    times = []
    lines_before = client.batches.retrieve(batch.id).request_counts.completed if batch else 0
    started = time.perf_counter()
    for i in range(args.probes):
        times.append(ttft(client, f"Question {i}: what is the capital of France?", args.max_tokens))
    pace = None
    if batch is not None:
        lines = client.batches.retrieve(batch.id).request_counts.completed - lines_before
        pace = lines / (time.perf_counter() - started)
        with contextlib.suppress(openai.ConflictError):  # finished already: the note says so
            client.batches.cancel(batch.id)
        while client.batches.retrieve(batch.id).status not in ("cancelled", "completed"):
            time.sleep(0.1)
        remaining = client.batches.retrieve(batch.id).request_counts
        if remaining.completed >= args.batch_lines:
            print(f"  note: the batch finished before the probes did ({variant})")
    return times, pace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--probes", type=int, default=6)
    parser.add_argument("--batch-lines", type=int, default=64)
    parser.add_argument("--batch-max-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--batch-prompt-words",
        type=int,
        default=0,
        help="words of text in each batch line's prompt (long prompts: chunked prefill)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--trace", action="store_true", help="print where each variant's TTFT goes, by phase"
    )
    args = parser.parse_args()
    global TRACE
    if args.trace:
        TRACE = Trace()
        TRACE.install()

    print(f"cpu: {cpu_flags()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    llm = sorai.load(hub.DEFAULT_MODEL)
    from sorai.engine.async_engine import AsyncEngine
    from sorai.engine.llm_engine import LLMEngine

    engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, name=hub.DEFAULT_MODEL))
    CONFIG.append(engine.engine.config)
    CHUNK.append(engine.engine.config.batch_prefill_chunk)
    with tempfile.TemporaryDirectory() as data_dir:
        settings = ServerSettings(embedding_model=None, data_dir=Path(data_dir))
        server = ServerThread(create_app(engine, settings)).start()
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            file_id = batch_file(
                client, args.batch_lines, args.batch_max_tokens, args.batch_prompt_words
            )
            ttft(client, "warm up", 2)
            # The first batch pays one-off costs (the runner, first prompt shapes): not a variant's.
            run_variant(client, "batch-eager", file_id, args)
            TRACE_SAMPLES.clear()
            variants = ["alone", *(v for v in args.variants.split(",") if v != "alone")]
            unknown = set(variants) - set(VARIANTS)
            if unknown:
                parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
            samples: dict[str, list[float]] = {v: [] for v in variants}
            paces: dict[str, list[float]] = {v: [] for v in variants}
            for r in range(args.rounds):
                for variant in variants:
                    times, pace = run_variant(client, variant, file_id, args)
                    samples[variant] += times
                    if pace is not None:
                        paces[variant].append(pace)
                    median = statistics.median(times) * 1e3
                    each = " ".join(f"{t * 1e3:.0f}" for t in times)
                    print(
                        f"round {r + 1} {variant:11s} median TTFT {median:7.1f} ms (each: {each})"
                    )
        finally:
            server.stop()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    medians = {v: statistics.median(t) for v, t in samples.items()}
    print(
        f"\n{'variant':11s} {'median TTFT':>12s} {'p90':>9s} {'vs alone':>9s} "
        f"{'batch lines/s during probes':>28s}"
    )
    report = {"cpu": cpu_flags(), "medians_ms": {}, "ratios": {}, "batch_lines_per_s": {}}
    for variant, times in samples.items():
        p90 = statistics.quantiles(times, n=10)[-1] if len(times) >= 2 else times[0]
        ratio = medians[variant] / medians["alone"]
        pace = statistics.median(paces[variant]) if paces[variant] else None
        shown = f"{pace:28.2f}" if pace is not None else f"{'-':>28s}"
        print(
            f"{variant:11s} {medians[variant] * 1e3:10.1f}ms {p90 * 1e3:7.1f}ms {ratio:8.2f}x "
            f"{shown}"
        )
        report["medians_ms"][variant] = medians[variant] * 1e3
        report["ratios"][variant] = ratio
        report["batch_lines_per_s"][variant] = pace
    if TRACE_SAMPLES:
        print(f"\nTTFT by phase, medians in ms ({', '.join(Trace.PHASES)}):")
        for variant, rows in TRACE_SAMPLES.items():
            cells = " ".join(
                f"{statistics.median(r[p] for r in rows) * 1e3:8.1f}" for p in Trace.PHASES
            )
            print(f"{variant:11s} {cells}  (n={len(rows)})")
    if "batch" in report["ratios"]:
        verdict = "met" if report["ratios"]["batch"] <= GOAL else "NOT met"
        print(f"goal: TTFT while a batch runs <= {GOAL:.2f}x alone: {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
